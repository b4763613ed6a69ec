"""Turn what the user typed for --model_name_or_path into a local Hugging Face folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slmops.errors import ModelError
from slmops.models import builtin


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local Hugging Face folder.

    kind: builtin | local | gguf | slmops_output | hub
    adapter_path: set when the source is an earlier slmops adapter run (merged on load)."""

    given: str
    kind: str
    path: Path
    adapter_path: Path | None = None
    hub_id: str | None = None  # the public name, recorded in adapter configs


def is_slmops_output(path: Path) -> bool:
    return (path / "run.yaml").is_file() and (path / "model" / "config.json").is_file()


def resolve_model(name_or_path: str, fetch: bool = True) -> ModelSource:
    """Resolve without loading weights. Built-ins are fetched on first use when `fetch`."""
    given = name_or_path
    path = Path(name_or_path).expanduser()
    if name_or_path in builtin.BUILTIN_MODELS:
        spec = builtin.get_builtin(name_or_path)
        if not builtin.is_fetched(name_or_path):
            if not fetch:
                raise ModelError(f"built-in model {name_or_path!r} is not fetched yet: run `slmops models fetch {name_or_path}`")
            builtin.fetch_builtin(name_or_path)
        return ModelSource(given, "builtin", builtin.builtin_dir(name_or_path), hub_id=spec.hub_id)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(given, "gguf", _converted_gguf(path))
    if path.is_dir():
        if is_slmops_output(path):
            adapter = path / "adapter"
            has_adapter = (adapter / "adapter_config.json").is_file()
            return ModelSource(given, "slmops_output", path / "model", adapter if has_adapter else None)
        if (path / "config.json").is_file():
            return ModelSource(given, "local", path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(given, "gguf", _converted_gguf(ggufs[0]))
        raise ModelError(
            f"{str(path)!r} is a folder but holds no config.json (not a Hugging Face model folder), "
            "no single .gguf file, and no slmops output (run.yaml + model/)"
        )
    if path.exists():
        raise ModelError(f"{str(path)!r} is neither a model folder nor a .gguf file")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or name_or_path.endswith(".gguf")
    if looks_local:
        raise ModelError(f"model path {name_or_path!r} does not exist")
    if "/" not in name_or_path:
        from slmops.errors import suggest

        raise ModelError(
            f"{name_or_path!r} is not a built-in model, a local path, or a Hub id (owner/name)."
            f"{suggest(name_or_path, builtin.BUILTIN_MODELS)} Built-ins: {', '.join(builtin.BUILTIN_MODELS)}"
        )
    return ModelSource(given, "hub", _download_hub(name_or_path), hub_id=name_or_path)


def _converted_gguf(gguf_file: Path) -> Path:
    """GGUF files are converted once into the cache, keyed by their content hash."""
    from slmops.models.gguf import convert_gguf

    stat = gguf_file.stat()
    key = f"{gguf_file.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    target = builtin.cache_root() / "gguf" / key
    if not (target / "config.json").is_file():
        staged = target.with_name(target.name + ".partial")
        convert_gguf(gguf_file, staged)
        staged.replace(target)
    return target


def _download_hub(repo_id: str) -> Path:
    """The Hub path, kept for users with the network: download the model's files."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "tokenizer*"],
        )
    except Exception as exc:  # network, auth, not found: all end the same way for the user
        raise ModelError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:200]}). "
            "Without network access use a local folder, a .gguf file, or a built-in (`slmops models list`)."
        ) from None
    return Path(local)


def source_description(source: ModelSource) -> dict:
    info = {"given": source.given, "kind": source.kind, "path": str(source.path)}
    if source.adapter_path:
        info["adapter_path"] = str(source.adapter_path)
    marker = source.path / "slmops_source.json"
    if marker.is_file():
        info["origin"] = json.loads(marker.read_text())
    return info
