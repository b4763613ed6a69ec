"""The README's demo (examples/demo.sh) end to end on the real built-in model. Its own file:
`make test` hands out whole files to its workers, and this is the longest single test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.needs_default_model]
SUITE_SECONDS = 275  # about, on one test worker (conftest: the longest files start first)


def test_demo_tuned_accuracy_beats_base(tmp_path, builtin_model):
    """The README's demo (examples/demo.sh): held-out accuracy, base vs tuned, then the int4
    ONNX bundle with the adapter."""
    env = dict(os.environ, DEMO_OUT=str(tmp_path / "demo"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh")], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("accuracy"))
    tuned, base = (float(x) for x in re.findall(r"\d+\.\d+", row)[:2])
    assert tuned >= 0.8 and tuned > base + 0.3, proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("accuracy")]
    assert len(rows) == 2 and float(re.findall(r"\d+\.\d+", rows[1])[0]) >= 0.8, proc.stdout  # the int4 bundle + tone
    manifest = json.loads((tmp_path / "demo" / "onnx-int4" / "slmops_bundle.json").read_text())
    # int4 MatMuls, the sensitive layers int8, LoRA slots on every projection (the fp32 bundle of this 135M model: ~520 MB)
    assert manifest["size_mb"] < 150, manifest["size_mb"]
