"""An ONNX Runtime GenAI bundle on disk: what makes a folder one, and its two descriptions
(ONNX Runtime GenAI's genai_config.json, and slmops' manifest with the LoRA slots and the
adapters). Read by the inference layer, written by export.py."""

from __future__ import annotations

import json
from pathlib import Path

from slmops.deploy.adapters import graph_lora_slots
from slmops.errors import ModelError

MANIFEST = "slmops_bundle.json"


def is_bundle(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "genai_config.json").is_file()


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
    try:
        return {"format": 1, "lora_slots": graph_lora_slots(path / genai_config(path)["decoder"]["filename"]), "adapters": []}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"the bundle {str(path)!r} is incomplete or corrupt ({type(exc).__name__}: {str(exc)[:200]}); export it again") from None
