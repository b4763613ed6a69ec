"""Text generation behind `slmops generate` and `slmops chat`: one interface over a PyTorch
model (PEFT adapters loaded once, switched with `set_adapter`) and an ONNX Runtime GenAI
bundle (`.onnx_adapter` files switched per request). Both stream text as it is decoded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from slmops.errors import ModelError


class TorchBackend:
    kind = "pytorch"

    def __init__(self, model_name_or_path: str, adapters: list[str], trust_remote_code: bool = False, quiet: bool = False):
        from slmops.deploy.adapters import default_adapter_name
        from slmops.evaluate.predict import TorchPredictor
        from slmops.models import resolve_model

        paths = [a for a in adapters if a not in ("base", "none")]
        if not paths and (source_adapter := resolve_model(model_name_or_path, quiet=quiet).adapter_path) is not None:
            paths = [str(source_adapter)]  # an slmops output: its own adapter
        # The first adapter is attached (with its base checks) as evaluate does; PEFT names it "default".
        predictor = TorchPredictor.load(model_name_or_path, paths[0] if paths else None, trust_remote_code, quiet=quiet,
                                        use_source_adapter=False)
        self.model, self.tokenizer = predictor.model, predictor.tokenizer
        # what the user may type (folder or short name) -> PEFT's adapter name
        self.names: dict[str, str] = {}
        self.short_names: list[str] = []
        for index, path in enumerate(paths):
            peft_name = "default" if index == 0 else f"a{index}"
            if index > 0:
                self.model.load_adapter(path, adapter_name=peft_name)
            short = default_adapter_name(Path(path))
            self.names[path] = self.names.setdefault(short, peft_name)
            self.short_names.append(short)
        self.default = paths[0] if paths else None

    @property
    def adapter_names(self) -> list[str]:
        return self.short_names

    def generate(self, prompt: str, adapter: str | None, max_new_tokens: int, add_special_tokens: bool = True,
                 on_text: Callable[[str], None] | None = None) -> str:
        from transformers.generation.streamers import BaseStreamer

        tokenizer = self.tokenizer
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(self.model.device)

        class _Stream(BaseStreamer):
            def __init__(self):
                self.tokens: list[int] = []
                self.shown = ""
                self.first = True

            def put(self, value):
                if self.first:  # the prompt
                    self.first = False
                    return
                self.tokens += [int(t) for t in value.reshape(-1)]
                text = tokenizer.decode(self.tokens, skip_special_tokens=True)
                if on_text is not None and not text.endswith("\ufffd"):
                    on_text(text[len(self.shown):])
                    self.shown = text

            def end(self):
                pass

        streamer = _Stream()
        with self._adapter(adapter):
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                      streamer=streamer)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        if on_text is not None and len(text) > len(streamer.shown):
            on_text(text[len(streamer.shown):])
        return text

    def use_adapter(self, adapter: str) -> None:
        """Check that an adapter named in a chat is loaded (PyTorch adapters load at start)."""
        if adapter not in ("base", "none") and adapter not in self.names:
            raise ModelError(f"adapter {adapter!r} was not loaded; loaded: {', '.join(self.short_names) or 'none'} "
                             "(pass PEFT folders with --adapter when starting)")

    def _adapter(self, adapter: str | None):
        import contextlib

        if not hasattr(self.model, "set_adapter"):
            if adapter not in (None, "base", "none"):
                raise ModelError(f"adapter {adapter!r} was not loaded; pass it with --adapter when starting")
            return contextlib.nullcontext()
        if adapter in ("base", "none"):
            return self.model.disable_adapter()
        key = adapter if adapter is not None else self.default
        if key not in self.names:
            raise ModelError(f"adapter {adapter!r} was not loaded; loaded: {', '.join(self.names)}")
        self.model.set_adapter(self.names[key])
        return contextlib.nullcontext()


class BundleBackend:
    kind = "onnx"

    def __init__(self, path: str, adapters: list[str], threads: int | None = None):
        from slmops.deploy.runtime import OnnxBundle

        self.bundle = OnnxBundle(path, threads)
        self.tokenizer = self.bundle.tokenizer
        for adapter in adapters:  # load (and check) each once, up front
            self.bundle.use_adapter(adapter)
        self.default = next((a for a in adapters if a not in ("base", "none")), None)

    @property
    def adapter_names(self) -> list[str]:
        return self.bundle.adapter_names

    def use_adapter(self, adapter: str) -> None:
        self.bundle.use_adapter(adapter)  # loads and checks it now, not at the next answer

    def generate(self, prompt: str, adapter: str | None, max_new_tokens: int, add_special_tokens: bool = True,
                 on_text: Callable[[str], None] | None = None) -> str:
        chosen = self.default if adapter is None else adapter
        return self.bundle.generate_text(prompt, chosen, max_new_tokens, add_special_tokens, on_text)


def open_backend(model: str, adapters: list[str], threads: int | None = None, trust_remote_code: bool = False, quiet: bool = False):
    from slmops.deploy.runtime import is_bundle

    if is_bundle(model):
        return BundleBackend(model, adapters, threads)
    return TorchBackend(model, adapters, trust_remote_code, quiet)


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """The model's chat template applied, or a plain transcript where it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:", True
