"""The output folder of a run: its layout, the checks before anything is written, the lock
that keeps a second run out, and --overwrite done without losing the old run.

What slmops guarantees about an output folder (docs/finetune.md, "What slmops guarantees"):
- a refused or failed start changes nothing in it (all checks run before anything is written);
- one run at a time: an OS lock on the folder, held for the whole run, released on any exit;
- --overwrite replaces only an earlier slmops run, and only once the new run has written its
  first checkpoint: until then the old run is kept aside and put back if the new one fails.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import shutil
import tempfile
import time
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


# Everything a finetune run writes at the top of its folder (what --overwrite may replace).
RUN_PRODUCTS = ("adapter", "model", "checkpoints", "logs", "run.yaml", "report.md", "report.html", "loss.png")
LOCK_FILE = ".slmops.lock"  # who holds the folder (the lock itself is on the folder)
SET_ASIDE = ".slmops-replaced"  # an earlier run moved aside by --overwrite


def check_writable(path: Path, flag: str) -> None:
    """`path` (which may not exist yet) can be created: no file in the way, and the nearest
    existing folder above it accepts new entries. Creates and removes one empty folder to be
    sure (permission bits do not tell for root or special filesystems)."""
    path = Path(path).expanduser()
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        where = "is a file" if ancestor == path else f"is under {str(ancestor)!r}, which is a file"
        raise OutputError(f"{flag} {str(path)!r} {where}, not a folder; choose another path")
    if path.exists():
        return
    try:
        probe = tempfile.mkdtemp(dir=ancestor, prefix=".slmops-write-test-")
        os.rmdir(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {flag} {str(path)!r}: {exc.strerror or exc} (in {str(ancestor)!r})") from None


def check_new_folder(path: Path, flag: str = "--output_path") -> None:
    """`path` can be written and holds nothing yet (an export into a used folder would mix old and new files)."""
    check_writable(path, flag)
    if path.is_dir() and any(path.iterdir()):
        raise OutputError(f"output folder {str(path)!r} is not empty; choose another {flag} or remove it")


def _listing(root: Path, limit: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _visible_entries(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name not in (LOCK_FILE, SET_ASIDE)]


def check_output_folder(root: Path, overwrite: bool, resuming: bool) -> OutputLayout:
    """Refuse, before anything is written: a file in the way, a folder we cannot write, a
    folder that holds another run (unless --overwrite or resuming), and --overwrite on a
    folder that is not an slmops run (it would delete the user's files). Creates nothing."""
    root = Path(root).expanduser()
    check_writable(root, "--output_path")
    if root.is_dir():
        OutputLock.probe(root)
        entries = _visible_entries(root)
        if entries and not resuming:
            is_run = (root / "run.yaml").is_file()
            if not overwrite:
                what = "another slmops run" if is_run else f"files ({_listing(root)})"
                raise OutputError(
                    f"--output_path {str(root)!r} already holds {what}; pass --overwrite to replace it, "
                    "--resume_from_checkpoint latest to continue it, or choose another folder"
                )
            foreign = [p.name for p in entries if p.name not in RUN_PRODUCTS]
            if not is_run or foreign:
                detail = f"it holds {_listing(root)}" + (f", not only an slmops run's files ({', '.join(sorted(foreign)[:4])})" if foreign else "")
                raise OutputError(
                    f"--overwrite refused: {str(root)!r} is not an slmops run folder ({detail}); "
                    "--overwrite only replaces an earlier slmops run. Choose another --output_path"
                )
    return OutputLayout(root)


class OutputLock:
    """An exclusive OS lock (flock) on the output folder itself, for the whole run. The
    kernel releases it when the process ends however it ends, so a crashed run leaves no
    stale lock; the file LOCK_FILE only says who holds it, for the message a second run gets."""

    def __init__(self, root: Path, fd: int):
        self.root = root
        self._fd = fd

    @staticmethod
    def _holder(root: Path) -> str:
        try:
            info = json.loads((root / LOCK_FILE).read_text())
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            return f"PID {info['pid']} on {info.get('host', '?')}, started {started}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    @classmethod
    def _flock(cls, root: Path) -> int:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(f"--output_path {str(root)!r} is in use by another slmops run ({cls._holder(root)}); "
                                  "wait for it to finish, or choose another folder") from None
            raise
        return fd

    @classmethod
    def acquire(cls, root: Path) -> "OutputLock":
        lock = cls(root, cls._flock(root))
        info = {"pid": os.getpid(), "host": platform.node(), "started": time.time()}
        _write_atomic(root / LOCK_FILE, json.dumps(info))
        return lock

    @classmethod
    def probe(cls, root: Path) -> None:
        """Raise if another process holds the folder now: a cheap early check that writes
        nothing (the run itself takes the lock before it writes)."""
        os.close(cls._flock(root))

    def release(self) -> None:
        if self._fd < 0:
            return
        (self.root / LOCK_FILE).unlink(missing_ok=True)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = -1


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFolder:
    """The output folder for the length of one run (a context manager):

    - created if new (and removed again if the run fails before writing anything into it);
    - locked (OutputLock) against a second run;
    - an --overwrite set-aside left by a run killed before its first checkpoint is put back
      (that run never had a checkpoint, so the old run is the last complete state);
    - with `replace` (--overwrite), the old run's files move into SET_ASIDE; `commit()` (called
      once the new run has written its first checkpoint, and at the end) deletes them, and a
      run that fails before that puts them back, removing what it wrote.
    """

    def __init__(self, layout: OutputLayout, replace: bool, has_checkpoint, log=None):
        self.layout = layout
        self.replace = replace
        self.has_checkpoint = has_checkpoint  # () -> bool: the run in the folder has a complete checkpoint
        self.log = log
        self._lock: OutputLock | None = None
        self._created = False
        self._aside: Path | None = None

    def __enter__(self) -> "RunFolder":
        root = self.layout.root
        self._created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = OutputLock.acquire(root)
        except BaseException:
            if self._created:
                shutil.rmtree(root, ignore_errors=True)
            raise
        self._recover_set_aside()
        if self.replace and any(p.name in RUN_PRODUCTS for p in _visible_entries(root)):
            aside = root / SET_ASIDE
            aside.mkdir()
            for name in RUN_PRODUCTS:
                if (root / name).exists():
                    os.replace(root / name, aside / name)  # a rename: instant, nothing copied
            self._aside = aside
        return self

    def _recover_set_aside(self) -> None:
        aside = self.layout.root / SET_ASIDE
        if not aside.is_dir():
            return
        if self.has_checkpoint():  # the replacing run got as far as a checkpoint
            shutil.rmtree(aside, ignore_errors=True)
            return
        self._put_back(aside)
        if self.log is not None:
            self.log.warning("restored the earlier run in %s that an interrupted --overwrite had set aside", self.layout.root)

    def _put_back(self, aside: Path) -> None:
        root = self.layout.root
        for name in RUN_PRODUCTS:
            if (aside / name).exists():
                _remove(root / name)
                os.replace(aside / name, root / name)
            elif (root / name).exists():
                _remove(root / name)  # written by the failed run, not part of the old one
        shutil.rmtree(aside, ignore_errors=True)

    def commit(self) -> None:
        """The new run is worth more than the old one now: drop the set-aside copy."""
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None

    def __exit__(self, exc_type, exc, tb) -> None:
        root = self.layout.root
        try:
            if exc_type is None:
                self.commit()
            elif self._aside is not None:
                self._put_back(self._aside)
                self._aside = None
        finally:
            if self._lock is not None:
                self._lock.release()
            if exc_type is not None and self._created and root.is_dir() and not any(root.iterdir()):
                root.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# Weight files are large and nothing rewrites them in place: hard-linking them makes the
# output's model folder free. Every other file (config, tokenizer, chat template) is copied:
# the run writes its own tokenizer there, and a write through a hard link would edit the base
# model's file in place (the shared model cache of every other run included).
LINKED_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def copy_model_folder(src: Path, dst: Path) -> None:
    """Copy a Hugging Face folder's files into `dst`: weight files hard-linked where the
    filesystem allows (fast, no extra disk), the small files copied so that writing them in
    `dst` never changes `src`. Symlinks (Hub cache) are followed."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in Path(src).iterdir():
        if not item.is_file() or item.name.startswith("."):
            continue
        target = dst / item.name
        _remove(target)  # (a link left by an earlier version: replaced, never written through)
        if item.name.endswith(LINKED_WEIGHT_SUFFIXES):
            try:
                os.link(item.resolve(), target)
                continue
            except OSError:
                pass
        shutil.copy2(item, target)


def free_mb(path: Path) -> float:
    """Free space (MB) on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free / 2**20


def is_disk_full(exc: BaseException) -> bool:
    """True for 'no space left on device', however the library that hit it words it
    (OSError errno 28, safetensors' 'os error 28', C++ stream errors)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text


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
