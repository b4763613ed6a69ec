"""Checkpoints that resume a run exactly: trainable weights, optimizer, scheduler, RNG
states and data position, written to a temporary folder and renamed into place, so a run
killed mid-write never leaves a half checkpoint behind."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from slmops.errors import ConfigError

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    tokens_seen: int = 0  # trained (labelled) tokens
    input_tokens_seen: int = 0  # non-pad tokens
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0
    paused_s: float = 0.0  # of elapsed_s, spent in eval and checkpoints (excluded from tokens/s)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() skips tied duplicates, so each tensor is stored once.
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    unknown = [name for name in tensors if name not in params]
    if missing or unknown:
        raise ConfigError(
            f"checkpoint does not match this model/method: {len(missing)} trainable tensors missing, "
            f"{len(unknown)} unknown (e.g. {(missing or unknown)[0]}); resume with the same --method and adapter options"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: TrainState, save_adapter: bool) -> Path:
    folder = Path(folder)
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file(trainable_state(model), staging / "trainable.safetensors")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    torch.save(rng_states(), staging / "rng.pt")
    if save_adapter:
        # A PEFT-format copy, so any checkpoint can be loaded or exported on its own.
        model.save_pretrained(staging / "adapter")
    (staging / "state.json").write_text(json.dumps(asdict(state), indent=2))
    _fsync_tree(staging)
    old = None
    if folder.exists():  # replacing (e.g. 'best'): move the old one aside first
        old = folder.with_name(folder.name + f".old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> TrainState:
    """Restore a checkpoint in place (weights, optimizer, scheduler, RNG states); returns
    the train state."""
    folder = Path(folder)
    for required in ("trainable.safetensors", "state.json", "rng.pt"):
        if not (folder / required).is_file():
            raise ConfigError(f"{str(folder)!r} is not a complete slmops checkpoint (no {required})")
    load_trainable_state(model, load_file(folder / "trainable.safetensors"))
    if optimizer is not None and (folder / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    if scheduler is not None and (folder / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    rng = torch.load(folder / "rng.pt", weights_only=False)
    set_rng_states(rng)
    return TrainState(**json.loads((folder / "state.json").read_text()))


def step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match[1]), path))
    return sorted(found)


def find_resume_checkpoint(spec: str, root: Path) -> Path:
    if spec == "latest":
        found = step_checkpoints(root)
        if not found:
            raise ConfigError(f"--resume_from_checkpoint latest: no checkpoint in {str(root)!r} yet")
        return found[-1][1]
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--resume_from_checkpoint: {spec!r} is not a checkpoint folder")
    return path


def prune_checkpoints(root: Path, keep: int | None) -> None:
    if not keep:
        return
    for _, path in step_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
