"""The malloc thresholds the CPU fast path raises (train/cpu/allocator.py): each case in its
own process, since the setting is process-wide and permanent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")

PROBE = textwrap.dedent("""
    import json, sys
    import torch
    from slmops.train.cpu import allocator

    applied = allocator.keep_freed_blocks() if sys.argv[1] == "tune" else None
    def in_heap(ptr):
        with open("/proc/self/maps") as maps:
            for line in maps:
                if line.rstrip().endswith("[heap]"):
                    low, high = (int(x, 16) for x in line.split()[0].split("-"))
                    if low <= ptr < high:
                        return True
        return False
    # a 1B Llama MLP intermediate: 2,048 x 8,192 bf16 = 32 MiB, over glibc's largest default mmap threshold
    first = torch.empty(2048, 8192, dtype=torch.bfloat16)
    first_in_heap = in_heap(first.data_ptr())
    del first
    again = torch.empty(2048, 8192, dtype=torch.bfloat16)
    print(json.dumps({"applied": applied, "in_heap": first_in_heap and in_heap(again.data_ptr())}))
""")


def _probe(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "SLMOPS_MALLOC_TUNING")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_large_tensors_come_from_the_heap_once_the_thresholds_are_raised():
    assert _probe("plain") == {"applied": None, "in_heap": False}  # glibc's default: a fresh mmap each time
    assert _probe("tune") == {"applied": True, "in_heap": True}


def test_switched_off_by_its_variable_and_never_over_the_users_malloc_settings():
    assert _probe("tune", SLMOPS_MALLOC_TUNING="0") == {"applied": False, "in_heap": False}
    # the user's own threshold (here: 1 MB) stays in force
    assert _probe("tune", MALLOC_MMAP_THRESHOLD_=str(1 << 20)) == {"applied": False, "in_heap": False}
