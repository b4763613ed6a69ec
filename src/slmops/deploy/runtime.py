"""Running a bundle: ONNX Runtime GenAI for generation (adapters switched per request on
one loaded base), plain ONNX Runtime for full-sequence logits (parity, perplexity)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from slmops.deploy.adapters import check_adapter_file
from slmops.errors import ModelError, suggest

MANIFEST = "slmops_bundle.json"


def is_bundle(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "genai_config.json").is_file()


def read_manifest(path: Path) -> dict:
    """The slmops manifest; bundles made elsewhere (e.g. by Olive) get one derived from the graph."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
            return manifest
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"{str(manifest_file)!r} is corrupt ({exc}); export the bundle again") from None
    from slmops.deploy.export import graph_lora_slots

    try:
        return {"format": 1, "lora_slots": graph_lora_slots(path / genai_config(path)["decoder"]["filename"]), "adapters": []}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"the bundle {str(path)!r} is incomplete or corrupt ({type(exc).__name__}: {str(exc)[:200]}); export it again") from None


def genai_config(path: Path) -> dict:
    """The "model" section of a bundle's genai_config.json, with a clear error when unreadable."""
    file = Path(path) / "genai_config.json"
    try:
        config = json.loads(file.read_text())["model"]
        config["decoder"]["filename"], config["decoder"]["num_key_value_heads"], config["decoder"]["head_size"]
        return config
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{str(file)!r} is not a valid ONNX Runtime GenAI config ({type(exc).__name__}: {str(exc)[:200]}); "
                         "export the bundle again") from None


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OnnxBundle:
    """One loaded base model; adapters are loaded once and chosen per call."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime_genai as og

        self.path = Path(path)
        if not is_bundle(self.path):
            raise ModelError(f"{str(self.path)!r} is not an ONNX Runtime GenAI bundle (no genai_config.json): make one with `slmops auto-opt`")
        genai = genai_config(self.path)
        self.manifest = read_manifest(self.path)
        self.slot_shapes: dict[str, list[int]] = self.manifest.get("lora_slots", {})
        self.threads = threads or default_threads()
        decoder = self.path / genai["decoder"]["filename"]
        if not decoder.is_file():
            raise ModelError(f"the bundle {str(self.path)!r} has no {decoder.name} (incomplete copy?); export it again")
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
        self.loaded: dict[str, Path] = {}  # adapters loaded into ORT GenAI, by name
        self._checked: set[Path] = set()  # adapter files checked against the slots
        from transformers import AutoTokenizer

        # The bundle's own tokenizer files, read by transformers: the same ids PyTorch sees.
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except Exception as exc:
            raise ModelError(f"could not load the tokenizer of the bundle {str(self.path)!r}: {str(exc)[:200]}") from None
        self.context_length = int(genai.get("context_length", 2048))
        self.kv_heads = int(genai["decoder"]["num_key_value_heads"])
        self.head_size = int(genai["decoder"]["head_size"])
        self.decoder_file = self.path / genai["decoder"]["filename"]
        eos = genai.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self._session = None
        self._ort_adapters: dict[Path, object] = {}

    # ---- adapters ---------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return [a["name"] for a in self.manifest.get("adapters", [])]

    def adapter_file(self, name_or_file: str) -> tuple[str, Path]:
        """A manifest name ('tone'), an .onnx_adapter path, or the name `use_adapter`
        returned for either -> (name, file). An adapter file's name is its path as given, so
        it never shadows a manifest adapter of the same stem."""
        for entry in self.manifest.get("adapters", []):
            if entry["name"] == name_or_file:
                return entry["name"], self.path / entry["file"]
        if name_or_file in self.loaded:
            return name_or_file, self.loaded[name_or_file]
        file = Path(name_or_file)
        if file.suffix == ".onnx_adapter" and not file.is_file():
            raise ModelError(f"adapter file {name_or_file!r} does not exist")
        if file.is_file():
            return name_or_file, file
        names = self.adapter_names
        raise ModelError(f"adapter {name_or_file!r} is not in this bundle ({', '.join(names) or 'it has none'}) and is no "
                         f".onnx_adapter file.{suggest(name_or_file, names)}")

    def checked_adapter_file(self, name_or_file: str) -> tuple[str, Path]:
        """adapter_file, with the file checked against the bundle's slots once."""
        name, file = self.adapter_file(name_or_file)
        if file not in self._checked:
            check_adapter_file(file, self.slot_shapes)
            self._checked.add(file)
        return name, file

    def use_adapter(self, name_or_file: str | None) -> str | None:
        """Load an adapter once (checked against the bundle's slots); return its name."""
        if name_or_file in (None, "", "none", "base"):
            return None
        name, file = self.checked_adapter_file(name_or_file)
        if name not in self.loaded:
            self.adapters.load(str(file), name)
            self.loaded[name] = file
        return name

    # ---- generation -------------------------------------------------------------------
    def stream(self, input_ids: list[int], adapter: str | None = None, max_new_tokens: int = 64,
               min_new_tokens: int = 0) -> Iterator[int]:
        """Greedy decoding, one token at a time, stopping at an end-of-sequence token
        (not before `min_new_tokens`, for benchmarks)."""
        import onnxruntime_genai as og

        name = self.use_adapter(adapter)
        max_length = min(len(input_ids) + max_new_tokens, self.context_length)
        if len(input_ids) >= max_length:
            raise ModelError(f"the prompt has {len(input_ids)} tokens; this bundle's context holds {self.context_length}")
        params = og.GeneratorParams(self.model)
        options = {"do_sample": False, "max_length": max_length}
        if min_new_tokens:
            options["min_length"] = min(len(input_ids) + min_new_tokens, max_length)
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        if name is not None:
            generator.set_active_adapter(self.adapters, name)
        generator.append_tokens(np.asarray([input_ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_ids:
                return
            yield token

    def generate_ids(self, input_ids: list[int], adapter: str | None = None, max_new_tokens: int = 64) -> list[int]:
        return list(self.stream(input_ids, adapter, max_new_tokens))

    def generate_text(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 64, add_special_tokens: bool = True,
                      on_text: Callable[[str], None] | None = None) -> str:
        """Generate and decode; `on_text` receives each new piece of text as it appears."""
        ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        tokens: list[int] = []
        shown = ""
        for token in self.stream(ids, adapter, max_new_tokens):
            tokens.append(token)
            if on_text is not None:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    on_text(text[len(shown):])
                    shown = text
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown):])
        return text

    def timed(self, input_ids: list[int], adapter: str | None = None, max_new_tokens: int = 32, min_new_tokens: int = 0) -> dict:
        """Time to first token and decode tokens/s for one prompt (batch 1)."""
        start = time.perf_counter()
        first = None
        count = 0
        for _ in self.stream(input_ids, adapter, max_new_tokens, min_new_tokens):
            count += 1
            if first is None:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        decode = (count - 1) / (total - first) if count > 1 and first is not None and total > first else None
        return {"ttft_s": first if first is not None else total, "decode_tokens_per_s": decode, "tokens": count}

    # ---- full-sequence logits (plain ONNX Runtime) ------------------------------------
    def _ort_session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.decoder_file), options, providers=["CPUExecutionProvider"])
        return self._session

    def logits(self, input_ids: list[int], adapter: str | None = None) -> np.ndarray:
        """Logits for every position of one sequence, [seq, vocab], float32."""
        import onnxruntime as ort

        session = self._ort_session()
        n = len(input_ids)
        feeds = {}
        for spec in session.get_inputs():
            if spec.name == "input_ids":
                feeds[spec.name] = np.asarray([input_ids], dtype=np.int64)
            elif spec.name == "attention_mask":
                feeds[spec.name] = np.ones((1, n), dtype=np.int64)
            elif spec.name == "position_ids":
                feeds[spec.name] = np.arange(n, dtype=np.int64)[None]
            elif spec.name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in spec.type else np.float32
                feeds[spec.name] = np.zeros((1, self.kv_heads, 0, self.head_size), dtype=dtype)
        run_options = ort.RunOptions()
        if adapter not in (None, "", "none", "base"):
            _, file = self.checked_adapter_file(adapter)
            if file not in self._ort_adapters:  # memory-mapped once
                lora = ort.LoraAdapter()
                lora.Load(str(file))
                self._ort_adapters[file] = lora
            run_options.add_active_adapter(self._ort_adapters[file])
        (logits,) = session.run(["logits"], feeds, run_options)
        return logits[0].astype(np.float32)
