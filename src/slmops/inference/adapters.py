"""Adapter references: the one place that turns what a user typed for an adapter into what
a back end loads.

A reference is one of:
- 'base' or 'none': no adapter;
- a name the back end already knows (a bundle's manifest entry, an adapter loaded earlier);
- 'NAME=PATH': PATH under the name NAME;
- a PEFT adapter folder (adapter_config.json), or an slmops finetune output (its adapter/);
- an .onnx_adapter file (bundles only).
Names default to the folder's name, skipping generic ones (models/tone/ft/adapter -> 'tone').
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slmops.errors import ModelError
from slmops.inference.base import BASE

_GENERIC_FOLDERS = {"adapter", "adapters", "ft", "finetune", "output", "outputs", "lora", "peft"}


def default_adapter_name(path: Path) -> str:
    """A readable name: models/tone/ft/adapter -> 'tone' (generic folder names skipped)."""
    path = Path(path)
    stem = path.stem if path.suffix == ".onnx_adapter" else None
    if stem and stem.lower() not in _GENERIC_FOLDERS:
        return stem
    for part in reversed(path.resolve().parts):
        if part.lower() not in _GENERIC_FOLDERS and part != "/" and not part.endswith(".onnx_adapter"):
            return part
    return path.name


@dataclass(frozen=True)
class AdapterSource:
    """A resolved adapter on disk. kind: 'peft' (a PEFT folder) or 'onnx_adapter' (a file)."""

    name: str
    kind: str
    path: Path


def run_record(adapter_dir: Path) -> dict:
    """The run.yaml of the slmops finetune output that holds an adapter (OUT/adapter beside
    OUT/run.yaml), or {} for an adapter from elsewhere or a run.yaml that cannot be read."""
    import yaml

    adapter_dir = Path(adapter_dir)
    run_yaml = adapter_dir / "run.yaml" if (adapter_dir / "run.yaml").is_file() else adapter_dir.parent / "run.yaml"
    try:
        record = yaml.safe_load(run_yaml.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return record if isinstance(record, dict) else {}


def trained_template(adapter_dir: Path) -> str | None:
    """The text template an adapter was trained on (its run.yaml); None for chat-format
    training, an adapter from elsewhere, or a run.yaml that cannot be read (the chat template
    then applies)."""
    data = run_record(adapter_dir).get("config", {})
    data = data.get("data", {}) if isinstance(data, dict) else {}
    template = data.get("text_template") if isinstance(data, dict) else None
    if not isinstance(template, str) or data.get("use_chat_template"):
        return None
    from slmops.data.format import unescape

    return unescape(template)


def trained_for_precision(adapter_dir: Path) -> dict | None:
    """The quantized export a quantization-aware adapter was trained over (--deploy_precision:
    precision, block size, algorithm...), from its run.yaml; None for any other adapter."""
    resolved = run_record(adapter_dir).get("resolved", {})
    settings = resolved.get("deploy_precision") if isinstance(resolved, dict) else None
    return settings if isinstance(settings, dict) else None


def split_reference(reference: str) -> tuple[str | None, str]:
    """'tone=models/tone/ft' -> ('tone', 'models/tone/ft'); a plain reference -> (None, it)."""
    name, sep, rest = reference.partition("=")
    if sep and name and rest and "/" not in name and not Path(reference).exists():
        return name.strip(), rest.strip()
    return None, reference


def resolve_adapter(reference: str, name: str | None = None) -> AdapterSource | None:
    """A path reference -> what it holds (None for 'base'/'none'). Names of already-loaded
    adapters are the back end's business; this reads only the filesystem."""
    if reference in BASE or reference == "":
        return None
    given_name, target = split_reference(reference)
    name = name or given_name
    path = Path(target).expanduser()
    if path.suffix == ".onnx_adapter":
        if not path.is_file():
            raise ModelError(f"adapter file {target!r} does not exist")
        return AdapterSource(name or default_adapter_name(path), "onnx_adapter", path)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return AdapterSource(name or default_adapter_name(path), "peft", path)
        if (path / "run.yaml").is_file() and (path / "adapter" / "adapter_config.json").is_file():  # an slmops finetune output
            return AdapterSource(name or default_adapter_name(path / "adapter"), "peft", path / "adapter")
        raise ModelError(f"--adapter_path {target!r} holds no adapter_config.json (not a PEFT adapter) and is no slmops "
                         "finetune output with an adapter/")
    if path.exists():
        raise ModelError(f"adapter {target!r} is neither a PEFT adapter folder nor an .onnx_adapter file")
    raise ModelError(f"adapter {target!r} does not exist (no such file or folder, and no adapter of that name is loaded)")
