"""Predictors: one interface (generate, loss, timed_generate) over two back ends: a
PyTorch model with or without a PEFT adapter, and an ONNX Runtime GenAI bundle with or
without an `.onnx_adapter`."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from slmops.data.batching import collate
from slmops.data.tokenize import TokenizedData
from slmops.errors import ModelError


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class TorchPredictor:
    def __init__(self, model, tokenizer, name: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model_name_or_path: str, adapter_path: str | None = None, trust_remote_code: bool = False,
             dtype: torch.dtype = torch.float32, quiet: bool = False, use_source_adapter: bool = True) -> "TorchPredictor":
        from slmops.models import load_model, load_tokenizer, resolve_model
        from slmops.models.precision import pick_device

        source = resolve_model(model_name_or_path, quiet=quiet)
        if adapter_path is None and source.adapter_path is not None and use_source_adapter:
            adapter_path = str(source.adapter_path)  # an slmops output folder: base + its adapter
        tokenizer = load_tokenizer(source.path, trust_remote_code)
        model = load_model(source.path, dtype, pick_device(), trust_remote_code)
        name = source.given if use_source_adapter or source.adapter_path is None else f"{source.given} (base)"
        if adapter_path:
            model = attach_adapter(model, adapter_path)
            name += f" + {adapter_path}"
        return cls(model, tokenizer, name)

    @torch.no_grad()
    def generate(self, prompts: list[str], add_special_tokens: bool, max_new_tokens: int = 32, batch_size: int = 8,
                 progress: bool = True) -> list[str]:
        """Greedy generation, batched with left padding; prompts sorted by length to pad little."""
        from tqdm.auto import tqdm

        tok = self.tokenizer
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        saved_side = tok.padding_side
        tok.padding_side = "left"
        try:
            for start in tqdm(range(0, len(order), batch_size), desc=f"generate ({self.name})", disable=not progress, unit="batch"):
                idx = order[start : start + batch_size]
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(self.device)
                out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
                new = out[:, enc["input_ids"].shape[1]:]
                for i, row in zip(idx, new):
                    outputs[i] = tok.decode(row, skip_special_tokens=True)
        finally:
            tok.padding_side = saved_side
        return outputs

    @torch.no_grad()
    def loss(self, data: TokenizedData, batch_size: int = 8) -> tuple[float, int]:
        from slmops.train.loss import plain_loss

        total, count = 0.0, 0
        order = sorted(range(len(data)), key=lambda i: data.lengths[i])
        for start in range(0, len(order), batch_size):
            batch = collate(data, order[start : start + batch_size], self.tokenizer.pad_token_id)
            loss_sum, n = plain_loss(self.model, {k: v.to(self.device) for k, v in batch.items()})
            total += float(loss_sum)
            count += n
        return total, count

    @torch.no_grad()
    def timed_generate(self, prompt: str, add_special_tokens: bool, max_new_tokens: int = 32) -> dict:
        """One prompt, batch 1: time to first token and decode speed."""
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(self.device)
        start = time.perf_counter()
        self.model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = self.model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        total = time.perf_counter() - start
        generated = out.shape[1] - enc["input_ids"].shape[1]
        decode = (generated - 1) / max(total - ttft, 1e-9) if generated > 1 else None
        return {"ttft_s": ttft, "decode_tokens_per_s": decode, "peak_rss_mb": peak_rss_mb()}


class OnnxPredictor:
    """An ONNX Runtime GenAI bundle: greedy generation one prompt at a time (ORT GenAI's
    batch-1 decode is the deployed path), loss from full-sequence logits."""

    def __init__(self, bundle_path: str, adapter: str | None = None, threads: int | None = None):
        from slmops.deploy.runtime import OnnxBundle

        self.bundle = OnnxBundle(bundle_path, threads)
        self.adapter = self.bundle.use_adapter(adapter)  # checked against the bundle's slots now
        self.tokenizer = self.bundle.tokenizer
        self.name = f"{bundle_path} (onnx)" + (f" + {adapter}" if self.adapter else "")

    def generate(self, prompts: list[str], add_special_tokens: bool, max_new_tokens: int = 32, batch_size: int = 8,
                 progress: bool = True) -> list[str]:
        from tqdm.auto import tqdm

        outputs = []
        for prompt in tqdm(prompts, desc=f"generate ({self.name})", disable=not progress, unit="example"):
            outputs.append(self.bundle.generate_text(prompt, self.adapter, max_new_tokens, add_special_tokens))
        return outputs

    def loss(self, data: TokenizedData, batch_size: int = 8) -> tuple[float, int]:
        import numpy as np

        total, count = 0.0, 0
        for index in range(len(data)):
            ids = [int(t) for t in data.input_ids[index]]
            labels = np.asarray(data.labels[index][1:])
            logits = self.bundle.logits(ids, self.adapter)[:-1].astype(np.float64)
            keep = labels != -100
            if not keep.any():
                continue
            rows = logits[keep]
            log_z = np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1)) + rows.max(-1)
            total += float((log_z - rows[np.arange(len(rows)), labels[keep]]).sum())
            count += int(keep.sum())
        return total, count

    def timed_generate(self, prompt: str, add_special_tokens: bool, max_new_tokens: int = 32) -> dict:
        ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        timing = self.bundle.timed(ids, self.adapter, max_new_tokens, min_new_tokens=max_new_tokens)  # as TorchPredictor
        return {"ttft_s": timing["ttft_s"], "decode_tokens_per_s": timing["decode_tokens_per_s"], "peak_rss_mb": peak_rss_mb()}


def load_predictor(model_name_or_path: str, adapter_path: str | None = None, trust_remote_code: bool = False,
                   dtype: torch.dtype = torch.float32, quiet: bool = False, use_source_adapter: bool = True):
    """An ONNX bundle (folder with genai_config.json) or anything PyTorch can load."""
    from slmops.deploy.runtime import is_bundle

    if is_bundle(model_name_or_path):
        return OnnxPredictor(model_name_or_path, adapter_path if use_source_adapter else None)
    return TorchPredictor.load(model_name_or_path, adapter_path, trust_remote_code, dtype, quiet=quiet, use_source_adapter=use_source_adapter)


def attach_adapter(model, adapter_path: str):
    """Load a PEFT adapter onto `model`, with a clear error when it was trained on another base."""
    from peft import PeftConfig, PeftModel

    path = Path(adapter_path)
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"--adapter_path {adapter_path!r} holds no adapter_config.json (not a PEFT adapter)")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        from slmops.models.load import check_safetensors

        check_safetensors(weights, "adapter weights file")
    try:
        config = PeftConfig.from_pretrained(path)
    except (ValueError, TypeError, OSError) as exc:
        raise ModelError(f"{str(path / 'adapter_config.json')!r} is not a valid PEFT adapter config ({str(exc)[:200]})") from None
    targets = config.target_modules
    if isinstance(targets, (list, set)):
        leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in leaves]
        if missing:
            raise ModelError(f"adapter {adapter_path!r} targets {', '.join(sorted(missing))}, which this model does not have: it was trained on another base")
    _check_adapter_shapes(model, path)
    try:
        return PeftModel.from_pretrained(model, path).eval()
    except RuntimeError as exc:  # size mismatch: another hidden size
        first = str(exc).splitlines()[0:3]
        raise ModelError(f"adapter {adapter_path!r} does not fit this model (trained on another base?): {' '.join(first)[:300]}") from None


def _check_adapter_shapes(model, path: Path) -> None:
    """LoRA A/B weights must fit the layers they attach to (same hidden sizes)."""
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(weights, framework="pt") as handle:
        for key in handle.keys():
            for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
                if not key.endswith(part):
                    continue
                name = key.removeprefix("base_model.model.").removesuffix(part)
                module = modules.get(name)
                if module is None:
                    raise ModelError(f"adapter {str(path)!r} has weights for {name!r}, a layer this model does not have: it was trained on another base")
                expected = getattr(module, "in_features" if dim == 1 else "out_features", None)
                if expected is None and hasattr(module, "weight"):  # GPT-2 Conv1D: weight is (in, out)
                    expected = module.weight.shape[0 if dim == 1 else 1]
                got = handle.get_slice(key).get_shape()[dim]
                if expected is not None and got != expected:
                    raise ModelError(
                        f"adapter {str(path)!r} does not fit this model: {name} is {expected} wide here and {got} in the adapter "
                        "(trained on another base, with another hidden size)"
                    )
