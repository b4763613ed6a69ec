"""Checkpoints that resume a run exactly: trainable weights, optimizer, scheduler, RNG
states and data position.

Safe to load: nothing in a checkpoint is pickled. Tensors are safetensors files; everything
else (optimizer hyper-parameters, scheduler, RNG states, train state) is JSON. A checkpoint
carries a manifest with the identity of the run that wrote it (model, method, data and batch
order fingerprints) and the size of each file: resuming refuses a checkpoint of another run,
or one whose files were cut short, before anything is loaded.

Atomic: written to a staging folder beside its final name, then renamed into place, so a
run killed mid-write never leaves a half checkpoint; a staging folder left by a killed run
is removed at the next start (`clean_staging`). Free space is checked before writing, and a
disk that fills up during the write ends the run with one line, its staging folder removed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slmops.errors import ConfigError, OutputError
from slmops.outputs import free_mb, is_disk_full
from slmops.train import fsdp

FORMAT = 2  # 1: the pickled .pt files of slmops 0.1 (read with weights_only=True only)
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STAGING = re.compile(r"\.(tmp|old)-\d+$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    examples_in_epoch: int = 0  # examples of `epoch`'s order already trained on (the position kept across world sizes)
    epoch_batch_size: int = 0  # the global batch `epoch`'s order was cut into (0: a checkpoint of an earlier slmops)
    tokens_seen: int = 0  # trained (labelled) tokens
    input_tokens_seen: int = 0  # non-pad tokens
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0
    paused_s: float = 0.0  # of elapsed_s, spent in eval and checkpoints (excluded from tokens/s)

    @classmethod
    def from_json(cls, text: str, source: str) -> "TrainState":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not set(data) <= known:
            raise ConfigError(f"{source} is not an slmops train state")
        return cls(**data)


def trainable_state(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole. Of a sharded model (--fsdp) every process must call this
    (each tensor is gathered from all of them); `keep` False: a process that only helps gather
    (not the writer), which holds one whole tensor at a time and returns nothing."""
    # named_parameters() skips tied duplicates, so each tensor is stored once.
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = fsdp.full(p.detach())
            if keep:
                state[name] = whole.to("cpu").contiguous()
    return state


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    unknown = [name for name in tensors if name not in params]
    if missing or unknown:
        raise ConfigError(
            f"checkpoint does not match this model/method: {len(missing)} trainable tensors missing, "
            f"{len(unknown)} unknown (e.g. {(missing or unknown)[0]}); resume with the same --method and adapter options"
        )
    wrong = [f"{name} {tuple(t.shape)} vs {tuple(params[name].shape)}" for name, t in tensors.items() if t.shape != params[name].shape]
    if wrong:
        raise ConfigError(f"checkpoint does not match this model/method: {len(wrong)} tensors have other shapes (e.g. {wrong[0]}); "
                          "resume with the same --lora_r and target modules")
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name]
            param.copy_(fsdp.shard_like(tensor.to(param.device, param.dtype), param))  # (a sharded parameter: its piece)


# ---- state without pickle ------------------------------------------------------------------
def _split_tensors(value, prefix: str, tensors: dict[str, torch.Tensor]):
    """A nested dict/list with tensors -> the same structure, JSON-safe, each tensor replaced
    by {"__tensor__": key} and stored in `tensors[key]`."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_split_tensors(k, f"{prefix}.k{i}", tensors), _split_tensors(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        items = [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint without pickle")


def _join_tensors(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_join_tensors(v, tensors) for v in value["__tuple__"])
        if "__dict__" in value:
            return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in value["__dict__"]}
        raise ConfigError("unexpected entry in a checkpoint's JSON state")
    return value


def _save_state(obj, folder: Path, name: str) -> None:
    """A state dict (optimizer, scheduler) as NAME.json, its tensors in NAME.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_tensors(obj, "s", tensors)
    if tensors:
        save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(structure))


def _load_state(folder: Path, name: str):
    tensors = load_file(folder / f"{name}.safetensors") if (folder / f"{name}.safetensors").is_file() else {}
    return _join_tensors(json.loads((folder / f"{name}.json").read_text()), tensors)


def rng_states() -> dict:
    """Every generator a run draws from, as JSON-safe values."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        states["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


# ---- writing ---------------------------------------------------------------------------
def _optimizer_bytes(optimizer) -> int:
    if optimizer is None:
        return 0
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: TrainState, save_adapter: bool,
                    identity: dict | None = None, writer: bool = True) -> Path | None:
    """Write a checkpoint atomically. `identity` (the run's fingerprints) goes into the
    manifest so that a resume can tell whether the checkpoint is its own. A sharded model
    (--fsdp): every process calls this, the tensors are gathered whole, and only the `writer`
    writes them, in the format of any other run (so it resumes at any world size)."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    sharded = fsdp.is_sharded(model)
    trainable = trainable_state(model, keep=writer)
    optimizer_state = fsdp.full_state(optimizer.state_dict(), keep=writer) if optimizer is not None else None
    if not writer:
        return None
    weights = sum(t.numel() * t.element_size() for t in trainable.values())
    # weights, optimizer state, and the PEFT copy of the adapter; plus room for the JSON files
    needed_mb = (weights * (2 if save_adapter else 1) + _optimizer_bytes(optimizer)) / 2**20 + 1
    available = free_mb(folder.parent)
    if available < needed_mb:
        raise OutputError(_no_space(folder, needed_mb, available))
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir(parents=True)
        save_file(trainable, staging / "trainable.safetensors")
        if optimizer_state is not None:
            _save_state(optimizer_state, staging, "optimizer")
        if scheduler is not None:
            _save_state(scheduler.state_dict(), staging, "scheduler")
        (staging / "rng.json").write_text(json.dumps(rng_states()))
        if save_adapter:
            # A PEFT-format copy, so any checkpoint can be loaded or exported on its own.
            model.save_pretrained(staging / "adapter", **({"state_dict": trainable} if sharded else {}))
        (staging / "state.json").write_text(json.dumps(asdict(state), indent=2))
        files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
        from slmops.about import __version__

        manifest = {"format": FORMAT, "slmops": __version__, "step": state.step, "identity": identity or {}, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync_tree(staging)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(exc):
            raise OutputError(_no_space(folder, needed_mb, free_mb(folder.parent))) from None
        raise
    old = None
    if folder.exists():  # replacing (e.g. 'best'): move the old one aside first
        old = folder.with_name(folder.name + f".old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _no_space(folder: Path, needed_mb: float, available_mb: float) -> str:
    return (f"no space left on {str(folder.parent)!r} for checkpoint {folder.name} (needs ~{needed_mb:.0f} MB, has "
            f"{available_mb:.0f} MB); the earlier checkpoints are intact: free some space and continue with "
            "--resume_from_checkpoint latest")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def clean_staging(root: Path) -> list[Path]:
    """Remove staging and set-aside folders a killed run left in `root` (call with the
    output folder's lock held: no live run is writing them). Returns what was removed."""
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and _STAGING.search(path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# ---- reading ---------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict | None:
    """The checkpoint's manifest after checking its files are all there at their recorded
    sizes; None for a format-1 checkpoint (no manifest). Raises on an incomplete one."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / "state.json").is_file() and (folder / "rng.pt").is_file():
            return None
        raise ConfigError(f"{str(folder)!r} is not a complete slmops checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{str(path)!r} is corrupt (not a checkpoint manifest)") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{str(folder)!r} is a checkpoint of format {manifest.get('format')!r}; this slmops reads format {FORMAT}")
    for name, size in files.items():
        file = folder / name
        if not file.is_file():
            raise ConfigError(f"checkpoint {str(folder)!r} is incomplete: {name} is missing")
        if file.stat().st_size != size:
            raise ConfigError(f"checkpoint {str(folder)!r} is corrupt: {name} has {file.stat().st_size} bytes, the manifest says {size}")
    return manifest


def identity_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'method.lora_r: 16 in the checkpoint, 8 now' for each value that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} in the checkpoint, {b!r} now")
    return out


def check_belongs(folder: Path, identity: dict, ignore_mismatch: bool, log=None) -> None:
    """Refuse a checkpoint written by another run (other model, method, data or batch order),
    naming what differs, unless --ignore_mismatch."""
    manifest = read_manifest(folder)
    if manifest is None:
        problem = "was written by slmops 0.1 and has no manifest, so it cannot be checked against this run"
        if not ignore_mismatch:
            raise ConfigError(f"checkpoint {str(folder)!r} {problem}; pass --ignore_mismatch to resume it anyway")
        if log is not None:
            log.warning("checkpoint %s %s (resuming anyway: --ignore_mismatch)", folder, problem)
        return
    differences = identity_differences(_current_form(manifest.get("identity") or {}), identity)
    if not differences:
        return
    shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
    if not ignore_mismatch:
        raise ConfigError(f"checkpoint {str(folder)!r} belongs to another run ({shown}); resume with the same settings, "
                          "or pass --ignore_mismatch to resume it anyway")
    if log is not None:
        log.warning("resuming checkpoint %s of another run (%s): --ignore_mismatch", folder, shown)


def _current_form(identity: dict) -> dict:
    """A manifest of a one-process slmops before distributed training named the batch by its
    per-device size and accumulation; today's names the global batch (the same thing at world size 1)."""
    batches = identity.get("batches")
    if isinstance(batches, dict) and "per_device_train_batch_size" in batches:
        batches = dict(batches)
        size = batches.pop("per_device_train_batch_size") * batches.pop("gradient_accumulation_steps", 1)
        identity = {**identity, "batches": {"global_batch": size, **batches}}
    return identity


def _legacy_load(path: Path):
    """A format-1 `.pt` part, unpickled with weights_only=True: tensors, containers and the
    NumPy types of an RNG state only; anything that would run code is refused."""
    import pickle

    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core
    safe = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Float64DType, core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        # torch names the offending global on a line of its own ("... GLOBAL posix.system ...")
        found = re.search(r"GLOBAL [\w.]+", str(exc))
        reason = f"it asks for {found[0]}" if found else type(exc).__name__
        raise ConfigError(f"{str(path)!r} was refused: it holds more than tensors and plain values ({reason}); "
                          "slmops does not unpickle code from checkpoints") from None


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> TrainState:
    """Restore a checkpoint in place (weights, optimizer, scheduler, RNG states); returns
    the train state. Nothing here unpickles code."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        load_trainable_state(model, load_file(folder / "trainable.safetensors"))
        if manifest is None:  # format 1
            if optimizer is not None and (folder / "optimizer.pt").is_file():
                optimizer.load_state_dict(_legacy_load(folder / "optimizer.pt"))
            if scheduler is not None and (folder / "scheduler.pt").is_file():
                scheduler.load_state_dict(_legacy_load(folder / "scheduler.pt"))
            rng = _legacy_load(folder / "rng.pt")
            np_state = rng["numpy"]
            rng = {"torch": rng["torch"].tolist(), "numpy": list(np_state), "python": list(rng["python"]),
                   **({"cuda": [s.tolist() for s in rng["cuda"]]} if "cuda" in rng else {})}
        else:
            if optimizer is not None and (folder / "optimizer.json").is_file():
                optimizer.load_state_dict(_load_state(folder, "optimizer"))
                fsdp.reshard_optimizer_state(optimizer)  # (a sharded model: each process its piece)
            if scheduler is not None and (folder / "scheduler.json").is_file():
                scheduler.load_state_dict(_load_state(folder, "scheduler"))
            rng = json.loads((folder / "rng.json").read_text())
        set_rng_states(rng)
        return TrainState.from_json((folder / "state.json").read_text(), str(folder / "state.json"))
    except (SafetensorError, ValueError, KeyError, TypeError, OSError) as exc:
        raise ConfigError(f"checkpoint {str(folder)!r} cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None


def step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and ((path / MANIFEST).is_file() or (path / "state.json").is_file()):
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
