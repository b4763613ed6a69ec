"""One inference layer for everything that runs a model: `slmops evaluate`, generate/chat,
deploy's parity check and the server. Two back ends behind one interface (base.Backend):

- TorchBackend (torch_backend.py): a Hugging Face model + PEFT adapters, switched per call;
- OnnxBackend (onnx_backend.py): an ONNX Runtime GenAI bundle + `.onnx_adapter` files,
  switched per request on one loaded base.

Adapter references (names, NAME=PATH, PEFT folders, slmops outputs, .onnx_adapter files) are
resolved in one place (adapters.py). A new back end is one module here: a Backend subclass
with `_token_stream`, `logits` and `load_adapter`, and a branch in `open_backend`.
"""

from __future__ import annotations

from slmops.inference.base import BASE, Backend, Generation, GenerationParams, chat_prompt

__all__ = ["BASE", "Backend", "Generation", "GenerationParams", "chat_prompt", "is_bundle", "open_backend"]


def is_bundle(path) -> bool:
    from slmops.deploy.bundle import is_bundle as _is_bundle

    return _is_bundle(path)


def open_backend(model: str, adapters: list[str] = (), *, threads: int | None = None, trust_remote_code: bool = False,
                 dtype: str = "float32", own_adapter: bool = True) -> Backend:
    """A bundle folder opens on ONNX Runtime GenAI; anything else PyTorch loads (a Hugging
    Face folder, a built-in, a .gguf, an slmops finetune output with its adapter, a Hub id).
    `adapters` are loaded now (and checked); the first is the default of later calls."""
    if is_bundle(model):
        from slmops.inference.onnx_backend import OnnxBackend

        return OnnxBackend(model, list(adapters), threads)
    import torch

    from slmops.inference.torch_backend import TorchBackend

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    return TorchBackend.load(model, list(adapters), trust_remote_code, torch_dtype, own_adapter=own_adapter)
