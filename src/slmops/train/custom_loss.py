"""Custom losses: a user's `nn.Module` in a Python file, named with `--loss FILE.py:ClassName`
(and `--loss_kwargs margin=1.0` for its constructor). The file runs because the user named it,
and only then.

The call contract — the module's forward receives one LossInputs and returns a scalar tensor
(the loss of the micro-batch; the trainer averages micro-batches over gradient accumulation):

    inputs.logits         (N, V) fp32 logits at the labelled positions (None when nothing is labelled)
    inputs.labels         (N,) the target token of each of those positions
    inputs.hidden_states  (B, T, H) the decoder's last hidden states for inputs.batch["input_ids"]
    inputs.batch          every tensor of the micro-batch: input_ids, attention_mask, labels, and the
                          data's extra columns (pair data: input_ids_2, attention_mask_2, label)
    inputs.encode(ids, attention_mask) -> (B, T, H)  the decoder on other sequences of the batch
    inputs.model          the model being trained

Everything is checked before training: the file, the class, the constructor's arguments, and
one call on a real batch (a non-scalar or non-finite result is refused), each error naming the
file and line."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmops.data.tokenize import IGNORE
from slmops.errors import ConfigError, suggest


@dataclass
class LossInputs:
    batch: dict[str, torch.Tensor]
    hidden_states: torch.Tensor
    logits: torch.Tensor | None
    labels: torch.Tensor | None
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    model: nn.Module


def _where(exc: BaseException, file: Path) -> str:
    """' (custom_loss.py, line 12)' for the deepest frame of the user's file in a traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == file]
    return f" ({file.name}, line {frames[-1].lineno})" if frames else f" ({file.name})"


class CustomLoss:
    """The user's module behind the trainer's loss-function interface: (model, batch) -> (loss, 1)."""

    def __init__(self, spec: str, kwargs: dict[str, Any] | None):
        path_text, sep, class_name = spec.rpartition(":")
        if not sep or not path_text or not class_name:
            raise ConfigError(f"--loss {spec!r}: write it as FILE.py:ClassName")
        self.file = Path(path_text).expanduser().resolve()
        self.class_name = class_name
        self.kwargs = dict(kwargs or {})
        if not self.file.is_file():
            raise ConfigError(f"--loss: {path_text!r} does not exist")
        if self.file.suffix != ".py":
            raise ConfigError(f"--loss: {path_text!r} is not a Python file")
        self.sha256 = hashlib.sha256(self.file.read_bytes()).hexdigest()[:16]
        name = f"slmops_user_loss_{self.sha256}"
        module_spec = importlib.util.spec_from_file_location(name, self.file)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)  # the user's code, run because they named it
        except Exception as exc:
            raise ConfigError(f"--loss: {self.file.name} failed to import: {type(exc).__name__}: {exc}{_where(exc, self.file)}") from None
        sys.modules[name] = module
        cls = getattr(module, class_name, None)
        if not isinstance(cls, type) or not issubclass(cls, nn.Module):
            defined = [k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == name]
            raise ConfigError(f"--loss: {self.file.name} has no nn.Module class {class_name!r}.{suggest(class_name, defined)} "
                              f"It defines: {', '.join(defined) or 'no nn.Module class'}")
        try:
            self.module = cls(**self.kwargs)
        except Exception as exc:
            raise ConfigError(f"--loss: {class_name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())}) failed: "
                              f"{type(exc).__name__}: {exc}{_where(exc, self.file)}") from None
        self.name = f"{class_name} ({self.file.name})"

    def identity(self) -> dict:
        """What a checkpoint must share with this run's loss to be resumed by it."""
        return {"file_sha256": self.sha256, "class": self.class_name, "kwargs": self.kwargs}

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        loss = self.module(_inputs(model, batch))
        return loss, 1

    def check(self, model, batch: dict[str, torch.Tensor]) -> None:
        """One call on a real batch before training: a scalar, finite, differentiable loss."""
        try:
            loss, _ = self(model, batch)
        except Exception as exc:
            raise ConfigError(f"--loss: {self.class_name} failed on the first batch: {type(exc).__name__}: {exc}"
                              f"{_where(exc, self.file)}") from None
        where = f" ({self.file.name}, {self.class_name}.forward)"
        if not isinstance(loss, torch.Tensor):
            raise ConfigError(f"--loss: {self.class_name} returned a {type(loss).__name__}, not a tensor{where}")
        if loss.dim() != 0:
            raise ConfigError(f"--loss: {self.class_name} returned a tensor of shape {tuple(loss.shape)}, not a scalar (reduce it, "
                              f"e.g. .mean()){where}")
        if not torch.isfinite(loss):
            raise ConfigError(f"--loss: {self.class_name} returned {float(loss)} on the first batch{where}")
        if not loss.requires_grad:
            raise ConfigError(f"--loss: {self.class_name}'s loss does not depend on the trained weights (no gradient){where}")


def _decoder_of(model):
    """(the transformers model, its decoder to call alone); no decoder for a sharded model
    (--fsdp), whose weights are gathered on the model's own forward."""
    from slmops.train import fsdp

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") and not fsdp.is_sharded(model) else None
    return inner, decoder


def _inputs(model, batch: dict[str, torch.Tensor]) -> LossInputs:
    inner, decoder = _decoder_of(model)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    if decoder is not None and inner.get_output_embeddings() is not None:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
        logits = inner.get_output_embeddings()(hidden[:, :-1][mask]).float() if bool(mask.any()) else None

        def encode(ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return decoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    else:  # a model without a separate decoder: its own forward, hidden states asked for
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hidden = out.hidden_states[-1]
        logits = out.logits[:, :-1][mask].float() if bool(mask.any()) else None

        def encode(ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    return LossInputs(batch, hidden, logits, labels[mask] if logits is not None else None, encode, model)
