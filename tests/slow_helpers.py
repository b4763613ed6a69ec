"""Shared by the slow end-to-end tests on the built-in model: the shipped data, the seed's
templates, and the CLI run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

TONE = str(ROOT / "examples" / "data" / "tone.jsonl")
CODES = str(ROOT / "examples" / "data" / "tiny_codes.jsonl")
LLAMA3_TONE = "<|start_header_id|>user<|end_header_id|>\\n{phrase}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n{tone}"
CODES_TEMPLATE = "### Language: {programming_language} \\n### Question: {prompt} \\n### Answer: {response}"


def slmops(*args: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "slmops.cli.main", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


HELD_OUT = ["I am furious about the late train, this is unacceptable.", "What a wonderful surprise the party was!",
            "The report is scheduled for Monday at nine."]
