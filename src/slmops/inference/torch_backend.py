"""The PyTorch back end: a Hugging Face model with PEFT adapters loaded once under their
names and switched per call (`set_adapter`, or `disable_adapter` for the base).

PEFT's active adapter is model-wide state, so calls are serialized by a lock held from the
adapter switch to the end of the generation; generation itself is transformers' `generate`
(greedy unless asked otherwise), streamed token by token from a worker thread."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from slmops.errors import ModelError
from slmops.inference.adapters import resolve_adapter, trained_template
from slmops.inference.base import BASE, Backend, GenerationParams, common_prefix


class TorchBackend(Backend):
    kind = "pytorch"

    def __init__(self, model, tokenizer, name: str):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        _keep_head_input_contiguous(model)
        self._names: dict[str, str] = {}  # adapter name -> PEFT's name for it
        self._paths: dict[str, Path] = {}  # adapter name -> its folder
        self._lock = threading.RLock()
        config = getattr(model, "config", None)
        self.context_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)

    @classmethod
    def load(cls, model_name_or_path: str, adapters: list[str] = (), trust_remote_code: bool = False,
             dtype: torch.dtype = torch.float32, own_adapter: bool = True) -> "TorchBackend":
        """A model as `--model_name_or_path` names it. An slmops finetune output brings its
        own adapter (the default unless `own_adapter` is False or `adapters` are given)."""
        from slmops.models import load_model, load_tokenizer, resolve_model
        from slmops.models.precision import pick_device

        source = resolve_model(model_name_or_path)
        tokenizer = load_tokenizer(source.path, trust_remote_code)
        model = load_model(source.path, dtype, pick_device(), trust_remote_code)
        backend = cls(model, tokenizer, source.given)
        references = list(adapters)
        if not references and own_adapter and source.adapter_path is not None:
            references = [str(source.adapter_path)]
        names = [backend.load_adapter(reference) for reference in references]
        backend.default_adapter = names[0] if names else None  # the first given ('base': none)
        return backend

    @classmethod
    def from_model(cls, model, tokenizer, name: str = "training") -> "TorchBackend":
        """A model already in memory (a PEFT model during training: its active adapter is the default)."""
        backend = cls(model, tokenizer, name)
        if hasattr(model, "peft_config"):
            active = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
            backend._names[active] = active
            backend.default_adapter = active
        return backend

    # ---- adapters --------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self._names)

    def load_adapter(self, reference: str, name: str | None = None) -> str | None:
        if reference in BASE:
            return None
        if reference in self._names and name is None:
            return reference
        source = resolve_adapter(reference, name)
        if source.kind != "peft":
            raise ModelError(f"{str(source.path)!r} is an .onnx_adapter file, which runs on an ONNX bundle; for PyTorch give "
                             "the PEFT adapter folder it was converted from")
        if source.name in self._names:
            if self._paths.get(source.name) not in (None, source.path.resolve()):
                raise ModelError(f"two adapters are named {source.name!r} ({self._paths[source.name]} and {source.path}); "
                                 "name them with NAME=PATH")
            return source.name
        check_adapter_fits(self.model, source.path)
        peft_name = f"a{len(self._names)}"
        with self._lock:
            from peft import PeftModel

            try:
                if not hasattr(self.model, "peft_config"):
                    self.model = PeftModel.from_pretrained(self.model, source.path, adapter_name=peft_name).eval()
                else:
                    self.model.load_adapter(source.path, adapter_name=peft_name)
            except RuntimeError as exc:  # size mismatch: another hidden size
                first = " ".join(str(exc).splitlines()[0:3])[:300]
                raise ModelError(f"adapter {str(source.path)!r} does not fit this model (trained on another base?): {first}") from None
        self._names[source.name] = peft_name
        self._paths[source.name] = source.path.resolve()
        self._templates[source.name] = trained_template(source.path)
        return source.name

    def unload_adapter(self, name: str) -> None:
        """Forget a loaded adapter (serve's DELETE)."""
        with self._lock:
            if name not in self._names:
                raise ModelError(f"adapter {name!r} is not loaded")
            peft_name = self._names.pop(name)
            self._paths.pop(name, None)
            self._templates.pop(name, None)
            if self._names:
                self.model.set_adapter(next(iter(self._names.values())))
                self.model.delete_adapter(peft_name)
            else:  # the last adapter: back to the plain model
                self.model = self.model.unload()
            if self.default_adapter == name:
                self.default_adapter = None

    @contextlib.contextmanager
    def _active(self, adapter: str | None):
        """The model with `adapter` (a loaded name, or None for the base) switched on; held under the lock."""
        with self._lock:
            if adapter is None:
                if hasattr(self.model, "disable_adapter"):
                    with self.model.disable_adapter():
                        yield self.model
                else:
                    yield self.model
                return
            self.model.set_adapter(self._names[adapter])
            yield self.model

    # ---- generation ------------------------------------------------------------------
    def _generate_kwargs(self, params: GenerationParams, max_new_tokens: int) -> dict:
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                  "eos_token_id": sorted(self.eos_ids) or None}
        if params.min_new_tokens:
            kwargs["min_new_tokens"] = min(params.min_new_tokens, max_new_tokens)
        if params.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        return kwargs

    def _token_stream(self, ids: list[int], adapter: str | None, params: GenerationParams, limit: int,
                      cancelled: Callable[[], bool]) -> Iterator[int]:
        """transformers' generate in a worker thread, its tokens handed over one by one."""
        from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        handoff: queue.Queue = queue.Queue()
        done = object()

        class Stream(BaseStreamer):
            def __init__(self):
                self.prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # the first call carries the prompt
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    handoff.put(int(token))

            def end(self):
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled(), dtype=torch.bool, device=input_ids.device)

        tensor = torch.tensor([ids], device=self.device)

        def work():
            try:
                with self._active(adapter) as model, torch.no_grad():
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), streamer=Stream(),
                                   stopping_criteria=StoppingCriteriaList([Stop()]), **self._generate_kwargs(params, limit))
            except BaseException as exc:  # handed to the consumer, raised there
                handoff.put(exc)
            finally:
                handoff.put(done)

        thread = threading.Thread(target=work, name="slmops-generate", daemon=True)
        thread.start()
        try:
            while True:
                item = handoff.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item in self.eos_ids and not params.min_new_tokens:
                    return
                yield item
        finally:
            thread.join()

    @torch.no_grad()
    def generate_batch(self, prompts: list[str], adapter: str | None, params: GenerationParams, add_special_tokens: bool = True,
                       batch_size: int = 8, progress: bool = False) -> list[str]:
        """Batched with left padding, prompts sorted by length so batches pad little."""
        from slmops.logs import progress_bar

        name = self._chosen(adapter)
        tok = self.tokenizer
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        saved_side = tok.padding_side
        tok.padding_side = "left"
        try:
            with self._active(name) as model:
                for start in progress_bar(range(0, len(order), batch_size), desc=f"generate ({self.name})", unit="batch",
                                          enabled=progress):
                    index = order[start : start + batch_size]
                    enc = tok([prompts[i] for i in index], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
                    enc = enc.to(self.device)
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    out = model.generate(**enc, **self._generate_kwargs(params, params.max_new_tokens))
                    for i, row in zip(index, out[:, enc["input_ids"].shape[1]:]):
                        text = tok.decode(row, skip_special_tokens=True)
                        cut = min((text.find(s) for s in params.stop if s and s in text), default=-1)
                        outputs[i] = text[:cut] if cut >= 0 else text
        finally:
            tok.padding_side = saved_side
        return outputs

    # ---- scoring ---------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, ids: list[int], adapter: str | None = None) -> np.ndarray:
        with self._active(self._chosen(adapter)) as model:
            return model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float().cpu().numpy()

    def choice_logprobs(self, candidates: list[list[int]], starts: list[int], adapter: str | None = None) -> list[float]:
        return self.choice_logprobs_batch([(candidates, starts)], adapter)[0]

    @torch.no_grad()
    def choice_logprobs_batch(self, groups: list[tuple[list[list[int]], list[int]]], adapter: str | None = None,
                              batch_size: int = 16) -> list[list[float]]:
        """Prompts batched: their shared prefixes left-padded into one pass (only the last
        position's logits computed), the cache repeated once per candidate, and every
        candidate's rest in a second pass (right-padded), positions and masks carried over.
        Prompts are batched with others of as many candidates; candidates sharing no prefix
        take one full pass each."""
        scores: list[list[float]] = [[] for _ in groups]
        by_count: dict[int, list[int]] = {}
        for index, (candidates, starts) in enumerate(groups):
            if common_prefix(candidates) == 0:
                scores[index] = Backend.choice_logprobs(self, candidates, starts, adapter)
            else:
                by_count.setdefault(len(candidates), []).append(index)
        with self._active(self._chosen(adapter)) as model:
            for k, indices in by_count.items():
                indices.sort(key=lambda i: len(groups[i][0][0]))  # similar lengths pad little
                for begin in range(0, len(indices), batch_size):
                    chunk = indices[begin: begin + batch_size]
                    for index, row in zip(chunk, self._score_chunk(model, [groups[i] for i in chunk], k)):
                        scores[index] = row
        return scores

    def _score_chunk(self, model, groups: list[tuple[list[list[int]], list[int]]], k: int) -> list[list[float]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        shared = [min(common_prefix(candidates), min(starts)) for candidates, starts in groups]
        prefixes = [candidates[0][:n] for (candidates, _), n in zip(groups, shared)]
        width = max(len(p) for p in prefixes)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=self.device)
        head = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                     logits_to_keep=1)
        cache = getattr(head, "cache", None) or head.past_key_values  # transformers 5 calls it cache
        cache.batch_repeat_interleave(k)
        rests = [candidate[n:] for (candidates, _), n in zip(groups, shared) for candidate in candidates]
        tail_width = max(len(r) for r in rests)
        tail_ids = torch.tensor([r + [pad] * (tail_width - len(r)) for r in rests], device=self.device)
        lengths = torch.tensor([len(p) for p in prefixes], device=self.device).repeat_interleave(k)
        tail_mask = torch.cat([mask.repeat_interleave(k, dim=0), torch.ones_like(tail_ids)], dim=1)
        positions = lengths[:, None] + torch.arange(tail_width, device=self.device)[None]
        tail = model(input_ids=tail_ids, attention_mask=tail_mask, position_ids=positions, use_cache=True,
                     **{_cache_argument(model): cache}).logits.float()
        # logits predicting rest[i]: the prefix's last position for i = 0, the rest's position i - 1 after
        logits = torch.cat([head.logits[:, -1:].float().repeat_interleave(k, dim=0), tail[:, :-1]], dim=1)
        picked = torch.log_softmax(logits.double(), dim=-1).gather(-1, tail_ids.unsqueeze(-1))[..., 0]
        out = []
        for g, ((_, starts), n) in enumerate(zip(groups, shared)):
            out.append([float(picked[g * k + j, start - n: len(rests[g * k + j])].sum()) for j, start in enumerate(starts)])
        return out

    @torch.no_grad()
    def loss(self, data, adapter: str | None = None, batch_size: int = 8) -> tuple[float, int]:
        from slmops.data.batching import collate
        from slmops.train.loss import plain_loss

        total, count = 0.0, 0
        order = sorted(range(len(data)), key=lambda i: data.lengths[i])
        with self._active(self._chosen(adapter)) as model:
            for start in range(0, len(order), batch_size):
                batch = collate(data, order[start : start + batch_size], self.tokenizer.pad_token_id)
                loss_sum, n = plain_loss(model, {k: v.to(self.device) for k, v in batch.items()})
                total += float(loss_sum)
                count += n
        return total, count


def _keep_head_input_contiguous(model) -> None:
    """Hand the output head a contiguous input. transformers gives it the last position's
    hidden states as a strided view (`logits_to_keep=1`: label scoring's prompt pass and the
    first step of every generation), and torch's CPU linear takes a path about 150x slower for
    a strided bf16 input than for a contiguous one (torch 2.13: 517 ms against 3.4 ms for 8 rows
    through SmolLM2's 49,152-word head), which was 90% of an in-training evaluation on TweetEval.
    The copy is one row per sequence; on a contiguous input `.contiguous()` is free. Once per
    module: a training model gets a backend at every evaluation."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "slmops_contiguous_input", None) is not None:
        return
    head.slmops_contiguous_input = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]) if args else None)


def _cache_argument(model) -> str:
    """The forward's keyword for a KV cache: 'cache' from transformers 5.x, 'past_key_values' before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def check_adapter_fits(model, path: Path) -> None:
    """A PEFT adapter must target layers this model has, with the same sizes: say 'trained on
    another base' before PEFT fails halfway (or, worse, loads it partially)."""
    from peft import PeftConfig

    from slmops.models.load import check_safetensors

    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights, "adapter weights file")
    try:
        config = PeftConfig.from_pretrained(path)
    except (ValueError, TypeError, OSError) as exc:
        raise ModelError(f"{str(path / 'adapter_config.json')!r} is not a valid PEFT adapter config ({str(exc)[:200]})") from None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = config.target_modules
    if isinstance(targets, (list, set)):
        # a layer name ("q_proj") or, as PEFT saves an all-linear adapter's, a module's full name
        names = {name for name, _ in base.named_modules()}
        leaves = {name.rsplit(".", 1)[-1] for name in names}
        missing = [t for t in targets if t not in leaves and t not in names and not any(n.endswith("." + t) for n in names)]
        if missing:
            raise ModelError(f"adapter {str(path)!r} targets {', '.join(sorted(missing))}, which this model does not have: it was "
                             "trained on another base")
    if not weights.is_file():
        return
    from safetensors import safe_open

    modules = dict(base.named_modules())
    with safe_open(weights, framework="pt") as handle:
        for key in handle.keys():
            for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
                if not key.endswith(part):
                    continue
                name = key.removeprefix("base_model.model.").removesuffix(part)
                module = modules.get(name)
                if module is None:
                    raise ModelError(f"adapter {str(path)!r} has weights for {name!r}, a layer this model does not have: it was "
                                     "trained on another base")
                module = getattr(module, "base_layer", module)
                expected = getattr(module, "in_features" if dim == 1 else "out_features", None)
                if expected is None and hasattr(module, "weight"):  # GPT-2 Conv1D: weight is (in, out)
                    expected = module.weight.shape[0 if dim == 1 else 1]
                got = handle.get_slice(key).get_shape()[dim]
                if expected is not None and got != expected:
                    raise ModelError(f"adapter {str(path)!r} does not fit this model: {name} is {expected} wide here and {got} in the "
                                     "adapter (trained on another base, with another hidden size)")
