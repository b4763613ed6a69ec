"""The output folder of a run: its layout, the checks before anything is written, and
the self-describing files (run.yaml with versions)."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slmops.errors import OutputError


@dataclass(frozen=True)
class OutputLayout:
    root: Path

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run_yaml(self) -> Path:
        return self.root / "run.yaml"


def check_output_folder(root: Path, overwrite: bool, resuming: bool) -> OutputLayout:
    """Refuse a folder that holds another run (unless --overwrite or resuming) and one we
    cannot write, before any expensive work."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise OutputError(f"--output_path {str(root)!r} is a file, not a folder")
    if root.is_dir() and any(root.iterdir()) and not (overwrite or resuming):
        what = "another slmops run" if (root / "run.yaml").exists() else "files"
        raise OutputError(
            f"--output_path {str(root)!r} already holds {what}; pass --overwrite to replace it, "
            "--resume_from_checkpoint latest to continue it, or choose another folder"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to --output_path {str(root)!r}: {exc.strerror or exc}") from None
    return OutputLayout(root)


def clear_previous_run(layout: OutputLayout) -> None:
    """With --overwrite: remove the old run's products (only what slmops writes)."""
    for path in (layout.adapter, layout.model, layout.checkpoints, layout.logs):
        if path.exists():
            shutil.rmtree(path)
    for name in ("run.yaml", "report.md", "report.html", "loss.png"):
        (layout.root / name).unlink(missing_ok=True)


def copy_model_folder(src: Path, dst: Path) -> None:
    """Copy a Hugging Face folder's files, hard-linking where the filesystem allows (fast,
    no extra disk). Symlinks (Hub cache) are followed."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in Path(src).iterdir():
        if not item.is_file() or item.name.startswith("."):
            continue
        target = dst / item.name
        if target.exists():
            target.unlink()
        try:
            os.link(item.resolve(), target)
        except OSError:
            shutil.copy2(item, target)


TRAINING_PACKAGES = ("slmops", "torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes")
DEPLOY_PACKAGES = ("slmops", "onnxruntime", "onnxruntime-genai", "onnx", "transformers", "peft", "torch")


def versions(packages: tuple[str, ...] = TRAINING_PACKAGES) -> dict[str, str]:
    """Installed versions of the libraries a result depends on, for reproducibility."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
