"""The ONNX back end: an ONNX Runtime GenAI bundle (one loaded base graph whose LoRA weights
are inputs) with `.onnx_adapter` files loaded once and chosen per request. Generation runs
on ONNX Runtime GenAI (each generator carries its own active adapter, so requests with
different adapters may run at the same time); full-sequence logits (parity, perplexity)
on plain ONNX Runtime, with the same adapter file as a LoraAdapter."""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from slmops.deploy.adapters import check_adapter_file, convert_adapter
from slmops.deploy.bundle import genai_config, is_bundle, read_manifest
from slmops.errors import ModelError, suggest
from slmops.machine import available_cores, threads_setting
from slmops.inference.adapters import resolve_adapter, split_reference, trained_template
from slmops.inference.base import BASE, Backend, GenerationParams, common_prefix, token_logprobs


def default_threads() -> int:
    return threads_setting() or available_cores()


class OnnxBackend(Backend):
    kind = "onnx"

    def __init__(self, path: str | Path, adapters: list[str] = (), threads: int | None = None):
        super().__init__()
        import onnxruntime_genai as og

        self.path = Path(path)
        self.name = f"{path} (onnx)"
        if not is_bundle(self.path):
            raise ModelError(f"{str(self.path)!r} is not an ONNX Runtime GenAI bundle (no genai_config.json): make one with `slmops optimize`")
        genai = genai_config(self.path)
        self.manifest = read_manifest(self.path)
        self.slot_shapes: dict[str, list[int]] = self.manifest.get("lora_slots", {})
        self.threads = threads or default_threads()
        self.decoder_file = self.path / genai["decoder"]["filename"]
        if not self.decoder_file.is_file():
            raise ModelError(f"the bundle {str(self.path)!r} has no {self.decoder_file.name} (incomplete copy?); export it again")
        try:
            config = og.Config(str(self.path))
            # LoRA inputs with defaults make ONNX Runtime warn once per input at load: not news.
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads,
                                                                                  "log_severity_level": 3}}}}))
            self.model = og.Model(config)
            self.adapters = og.Adapters(self.model)
        except Exception as exc:  # onnxruntime_genai raises plain RuntimeErrors with C++ messages
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelError(f"ONNX Runtime GenAI cannot load the bundle {str(self.path)!r} ({first}); is it corrupt? export it again") from None
        from transformers import AutoTokenizer

        # The bundle's own tokenizer files, read by transformers: the same ids PyTorch sees.
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except Exception as exc:
            raise ModelError(f"could not load the tokenizer of the bundle {str(self.path)!r}: {str(exc)[:200]}") from None
        self.context_length = int(genai.get("context_length", 2048))
        self.kv_heads = int(genai["decoder"]["num_key_value_heads"])
        self.head_size = int(genai["decoder"]["head_size"])
        eos = genai.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self._files: dict[str, Path] = {}  # adapters loaded into ORT GenAI: name -> checked .onnx_adapter
        self._lock = threading.Lock()  # loading adapters; generation itself runs concurrently
        self._converted: tempfile.TemporaryDirectory | None = None  # PEFT adapters converted for this bundle
        self._session = None
        self._ort_adapters: dict[Path, object] = {}
        names = [self.load_adapter(reference) for reference in adapters]
        self.default_adapter = names[0] if names else None

    # ---- adapters --------------------------------------------------------------------
    @property
    def bundle_adapters(self) -> list[str]:
        """The adapters the bundle's manifest lists."""
        return [a["name"] for a in self.manifest.get("adapters", [])]

    @property
    def adapter_names(self) -> list[str]:
        return list(dict.fromkeys([*self.bundle_adapters, *self._files]))

    def load_adapter(self, reference: str, name: str | None = None) -> str | None:
        """A manifest name, a loaded name, NAME=PATH, an .onnx_adapter file, or a PEFT adapter
        folder (converted against this bundle's slots once) -> the name to use."""
        if reference in BASE or reference == "":
            return None
        if reference in self._files and name is None:
            return reference
        entry = next((a for a in self.manifest.get("adapters", []) if a["name"] == reference), None)
        if entry is not None:
            loaded = self._load_file(name or entry["name"], self.path / entry["file"])
            self._templates[loaded] = entry.get("text_template") or (trained_template(Path(entry["source"]))
                                                                     if entry.get("source") else None)
            return loaded
        given_name, target = split_reference(reference)
        path = Path(target).expanduser()
        if not path.exists() and path.suffix != ".onnx_adapter" and "/" not in target:
            names = self.adapter_names
            raise ModelError(f"adapter {reference!r} is not in this bundle ({', '.join(names) or 'it has none'}) and is no "
                             f".onnx_adapter file.{suggest(reference, names)}")
        source = resolve_adapter(reference, name)
        if source.kind == "onnx_adapter":
            # a file loads under its path as given unless named, so it never shadows a bundle adapter of the same stem
            return self._load_file(name or given_name or target, source.path)
        loaded = self._load_file(source.name, self._convert(source.path, source.name))
        self._templates[loaded] = trained_template(source.path)
        return loaded

    def _convert(self, peft_folder: Path, name: str) -> Path:
        """A PEFT LoRA folder as an .onnx_adapter filling this bundle's slots (kept for the
        back end's life): `--adapter models/qa/ft` works on a bundle without convert-adapters."""
        if not self.slot_shapes:
            raise ModelError(f"the bundle {str(self.path)!r} has no LoRA slots (exported without adapters); export the base with "
                             "--adapter_path or --lora_slots all so adapters can plug in")
        if self._converted is None:
            self._converted = tempfile.TemporaryDirectory(prefix="slmops-adapters-")
        target = Path(self._converted.name) / f"{len(self._files)}-{name}.onnx_adapter"
        convert_adapter(peft_folder, target, self.slot_shapes)
        return target

    def _load_file(self, name: str, file: Path) -> str:
        with self._lock:
            known = self._files.get(name)
            if known is not None:
                if known.resolve() != file.resolve():
                    raise ModelError(f"an adapter named {name!r} is already loaded ({known}); name this one with NAME=PATH")
                return name
            check_adapter_file(file, self.slot_shapes)
            self.adapters.load(str(file), name)
            self._files[name] = file
        return name

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter loaded at run time (serve's DELETE); bundle adapters stay listed."""
        with self._lock:
            if name not in self._files:
                raise ModelError(f"adapter {name!r} is not loaded")
            self.adapters.unload(name)
            file = self._files.pop(name)
            self._ort_adapters.pop(file, None)

    # ---- generation ------------------------------------------------------------------
    def _token_stream(self, ids: list[int], adapter: str | None, params: GenerationParams, limit: int,
                      cancelled: Callable[[], bool]) -> Iterator[int]:
        import onnxruntime_genai as og

        max_length = len(ids) + limit
        generator_params = og.GeneratorParams(self.model)
        options: dict = {"max_length": max_length}
        if params.min_new_tokens:
            options["min_length"] = min(len(ids) + params.min_new_tokens, max_length)
        if params.greedy:
            options["do_sample"] = False
        else:
            options.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            if params.seed is not None:
                options["random_seed"] = params.seed
        generator_params.set_search_options(**options)
        generator = og.Generator(self.model, generator_params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        while not generator.is_done() and not cancelled():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_ids and not params.min_new_tokens:
                return
            yield token

    # ---- full-sequence logits (plain ONNX Runtime) ----------------------------------------
    def _ort_session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.decoder_file), options, providers=["CPUExecutionProvider"])
        return self._session

    def _run(self, ids: np.ndarray, adapter: str | None, past: dict[str, np.ndarray] | None = None, present: bool = False):
        """One pass of the decoder over `ids` (batch, n) after `past` (the present.* outputs of
        an earlier pass); (logits, present outputs renamed as the next pass's past inputs)."""
        import onnxruntime as ort

        session = self._ort_session()
        batch, n = ids.shape
        cached = 0 if not past else next(iter(past.values())).shape[2]
        feeds = {}
        for spec in session.get_inputs():
            if spec.name == "input_ids":
                feeds[spec.name] = ids.astype(np.int64)
            elif spec.name == "attention_mask":
                feeds[spec.name] = np.ones((batch, cached + n), dtype=np.int64)
            elif spec.name == "position_ids":
                feeds[spec.name] = np.tile(np.arange(cached, cached + n, dtype=np.int64), (batch, 1))
            elif spec.name.startswith("past_key_values"):
                if past:
                    feeds[spec.name] = past[spec.name]
                else:
                    dtype = np.float16 if "float16" in spec.type else np.float32
                    feeds[spec.name] = np.zeros((batch, self.kv_heads, 0, self.head_size), dtype=dtype)
        run_options = ort.RunOptions()
        if adapter is not None:
            file = self._files[adapter]
            if file not in self._ort_adapters:  # memory-mapped once
                lora = ort.LoraAdapter()
                lora.Load(str(file))
                self._ort_adapters[file] = lora
            run_options.add_active_adapter(self._ort_adapters[file])
        names = ["logits"] + ([o.name for o in session.get_outputs() if o.name.startswith("present")] if present else [])
        outputs = session.run(names, feeds, run_options)
        presents = {name.replace("present", "past_key_values", 1): value for name, value in zip(names[1:], outputs[1:])}
        return outputs[0].astype(np.float32), presents

    def logits(self, ids: list[int], adapter: str | None = None) -> np.ndarray:
        return self._run(np.asarray([ids]), self._chosen(adapter))[0][0]

    def choice_logprobs(self, candidates: list[list[int]], starts: list[int], adapter: str | None = None) -> list[float]:
        """The shared prefix runs once; its cache serves each candidate's rest (one at a time:
        the exported attention takes several new tokens after a cache only at batch 1)."""
        shared = min(common_prefix(candidates), min(starts))
        if shared == 0:
            return super().choice_logprobs(candidates, starts, adapter)
        name = self._chosen(adapter)
        head, past = self._run(np.asarray([candidates[0][:shared]]), name, present=True)
        scores = []
        for ids, start in zip(candidates, starts):
            tail, _ = self._run(np.asarray([ids[shared:]]), name, past)
            # logits predicting ids[shared:]: the prefix's last position, then the rest's own positions
            logits = np.concatenate([head[0, -1:], tail[0, :-1]])
            scores.append(float(token_logprobs(logits, ids[shared - 1:])[start - shared:].sum()))
        return scores
