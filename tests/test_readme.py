"""The README's "Use" section runs top to bottom as written: its bash block as one script
(stopping at the first command that fails) and then its Python snippet, in a fresh folder
holding a copy of examples/.

On tiny settings, so that it fits in the suite: the built-in model's name becomes a tiny
random Llama (in the commands and in the example YAML files they read), step and trial
counts become 2, the server's port a free one, and `source .venv/bin/activate` becomes the
test's own environment on PATH. Everything else is the README's text (so every command there
names its model: one that named none would train the built-in model here)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, build_tiny_model

pytestmark = pytest.mark.slow
SUITE_SECONDS = 215  # about, on one test worker (conftest: the longest files start first)


def use_section_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block in README.md's "## Use" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_settings(text: str, model: Path, port: int) -> str:
    text = text.replace("smollm2-135m-instruct", str(model))
    text = re.sub(r"(--max_steps[ =])\d+", r"\g<1>2", text)
    text = re.sub(r"((?<![\w-])max_steps\"?:\s*)\d+", r"\g<1>2", text)
    text = re.sub(r"(--n_trials[ =])\d+", r"\g<1>2", text)
    text = re.sub(r"(num_trials:\s*)\d+", r"\g<1>2", text)
    return re.sub(r"\b8000\b", str(port), text)


def test_readme_use_section_runs_top_to_bottom(tmp_path, tokenizer_dir):
    # hidden 64 / 4 heads: ONNX Runtime's CPU attention needs heads of a multiple of 16
    tiny_llama = build_tiny_model("llama", tokenizer_dir, tmp_path / "tiny-llama", hidden_size=64)
    blocks = use_section_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "python"], "the Use section: one bash block, then one Python snippet"
    port = _free_port()
    work = tmp_path / "readme"
    shutil.copytree(ROOT / "examples", work / "examples")
    for file in (work / "examples").rglob("*.yaml"):
        file.write_text(tiny_settings(file.read_text(), tiny_llama, port))
    bash = blocks[0][1]
    assert bash.startswith("source .venv/bin/activate")
    script = "set -euxo pipefail\n" + tiny_settings(bash.split("\n", 1)[1], tiny_llama, port)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    # its own process group: the server the block starts in the background goes with it, even on a failure
    proc = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=1200)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    failed = [line for line in output.splitlines() if line.startswith("+ ")][-1:] if proc.returncode else []
    assert proc.returncode == 0, f"README command failed: {failed}\n{output[-4000:]}"

    # what the commands said, beyond running: the tuned adapter reloaded through two back ends,
    # the server listed the tone adapter as a model, the comparison page has both runs
    assert "[onnx · qa]" in output and "[onnx · base]" in output
    assert re.search(r"\[.*'tone'.*\]", output), output[-3000:]
    page = (work / "models" / "runs.html").read_text()
    assert "<td>tone/ft</td>" in page and "<td>qa/ft</td>" in page
    # the Olive-shaped workflow, run as written with --setup, wrote an adapter PEFT loads over its model folder
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    olive = work / "models" / "library-qa" / "workflow" / "lora"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(olive / "model"), olive / "adapter")
    assert any("q_proj.lora_A" in name for name, _ in model.named_parameters())

    python = tiny_settings(blocks[1][1], tiny_llama, port)
    run = subprocess.run([sys.executable, "-c", python], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    adapter, loss = run.stdout.split()
    assert Path(work, adapter).joinpath("adapter_model.safetensors").is_file() and float(loss) > 0
