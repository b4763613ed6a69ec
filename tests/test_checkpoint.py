"""Checkpoints: nothing pickled, exact round trip of optimizer / scheduler / RNG state, a
manifest that names the run, and a full disk that ends the run in one line without leaving
a partial checkpoint behind."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_config

from slmops.errors import ConfigError, OutputError
from slmops.finetune_recipe import finetune
from slmops.train import checkpoint as ckpt
from slmops.train.monitor import read_metrics


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), fused=True)
    from transformers import get_scheduler

    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_round_trip_is_exact_and_pickle_free(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer()
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    state = ckpt.TrainState(step=3, epoch=1, batch_in_epoch=2)
    folder = ckpt.save_checkpoint(tmp_path / "step-000003", model, optimizer, scheduler, state, save_adapter=False, identity={"a": 1})
    assert not list(folder.rglob("*.pt")) and not list(folder.rglob("*.bin"))
    expected = (torch.rand(3), np.random.rand(3), random.random())

    other, other_opt, other_sched = _model_and_optimizer()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other_opt.state.clear()
    torch.manual_seed(0)
    restored = ckpt.load_checkpoint(folder, other, other_opt, other_sched)
    assert restored == state
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict(), other_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, values in saved["state"].items():
        for key, value in values.items():
            assert torch.equal(value, loaded["state"][index][key]), key
    assert scheduler.state_dict() == other_sched.state_dict()
    got = (torch.rand(3), np.random.rand(3), random.random())  # the RNG streams continue where they were saved
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    # the optimizer still steps (betas came back as a pair, the step count as a tensor)
    other(torch.randn(5, 4)).square().sum().backward()
    other_opt.step()


def test_manifest_names_the_run_and_catches_a_cut_file(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer()
    identity = {"method": {"method": "lora", "lora_r": 16}, "data": {"train_examples": "abc"}}
    folder = ckpt.save_checkpoint(tmp_path / "step-000001", model, optimizer, scheduler, ckpt.TrainState(step=1), False, identity)
    ckpt.check_belongs(folder, identity, ignore_mismatch=False)
    other = {"method": {"method": "lora", "lora_r": 8}, "data": {"train_examples": "abc"}}
    with pytest.raises(ConfigError, match=r"belongs to another run \(method.lora_r: 16 in the checkpoint, 8 now\)"):
        ckpt.check_belongs(folder, other, ignore_mismatch=False)
    ckpt.check_belongs(folder, other, ignore_mismatch=True)  # allowed when asked
    state = folder / "optimizer.safetensors"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="is corrupt: optimizer.safetensors has"):
        ckpt.read_manifest(folder)


def test_legacy_checkpoint_loads_with_weights_only(tmp_path):
    """A format-1 checkpoint (torch.save of plain state) still resumes, through
    torch.load(weights_only=True) with NumPy's RNG types allowed and nothing else."""
    model, optimizer, scheduler = _model_and_optimizer()
    folder = tmp_path / "step-000003"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(ckpt.trainable_state(model), folder / "trainable.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}, folder / "rng.pt")
    (folder / "state.json").write_text(json.dumps({"step": 3}))
    expected = torch.rand(2)
    assert ckpt.read_manifest(folder) is None
    with pytest.raises(ConfigError, match="has no manifest"):
        ckpt.check_belongs(folder, {}, ignore_mismatch=False)
    other, other_opt, other_sched = _model_and_optimizer()
    assert ckpt.load_checkpoint(folder, other, other_opt, other_sched).step == 3
    assert torch.equal(torch.rand(2), expected)


def test_a_crafted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"torch": Payload()}, tmp_path / "rng.pt")
    with pytest.raises(ConfigError, match="it asks for GLOBAL posix.system"):
        ckpt._legacy_load(tmp_path / "rng.pt")
    assert not marker.exists()


def _enospc_on(call_number: int, monkeypatch):
    """safetensors writes fail with 'no space left' from the Nth call on: half the file is
    written first, as a real full disk leaves it."""
    calls = {"n": 0}
    real = ckpt.save_file

    def save_file(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= call_number:
            with open(path, "wb") as handle:
                handle.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)


def test_disk_full_mid_checkpoint_ends_in_one_line_and_resume_continues(tiny_llama, tmp_path, monkeypatch):
    flags = dict(max_steps=8, save_steps=2, train_split="train[:48]", logging_steps=1)
    finetune(tiny_config(tiny_llama, tmp_path / "ref", **flags))
    out = tmp_path / "full"
    # each step checkpoint writes two safetensors files (trainable, optimizer state); the best
    # checkpoint is not written here (no eval split): the 5th call is step 6's first write
    _enospc_on(5, monkeypatch)
    with pytest.raises(OutputError, match=r"no space left on .* for checkpoint step-000006 \(needs ~\d+ MB, has \d+ MB\)"):
        finetune(tiny_config(tiny_llama, out, **flags))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000004"], names  # no staging folder left behind
    monkeypatch.undo()  # space freed
    finetune(tiny_config(tiny_llama, out, resume_from_checkpoint="latest", **flags))
    a = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _tmpfs(path, size_kb: int) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_free_space_is_checked_before_a_checkpoint_is_written(tiny_llama, tmp_path, monkeypatch):
    """On a real small filesystem where the machine allows mounting one (root), else with the
    free space reported low: the run stops before writing, in one line with both numbers."""
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, 512)
    try:
        if not mounted:
            monkeypatch.setattr(ckpt, "free_mb", lambda path: 0.4)
        with pytest.raises(OutputError, match=r"no space left on .*checkpoints' for checkpoint step-000002 \(needs ~1 MB, has 0 MB\)"):
            # a 1 MB free-space margin does not fit in 512 kB
            finetune(tiny_config(tiny_llama, disk / "out", max_steps=4, save_steps=2))
        assert not [p for p in (disk / "out" / "checkpoints").iterdir()] if (disk / "out" / "checkpoints").exists() else True
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_stale_staging_is_cleaned_at_start_and_torn_metrics_tolerated(tiny_llama, tmp_path):
    out = tmp_path / "o"
    flags = dict(max_steps=4, save_steps=2, logging_steps=1)
    finetune(tiny_config(tiny_llama, out, **{**flags, "max_steps": 2}))
    stale = out / "checkpoints" / "step-000004.tmp-99999"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"\0" * 10)
    with open(out / "logs" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "split": "tr')  # a run killed mid-write
    finetune(tiny_config(tiny_llama, out, resume_from_checkpoint="latest", **flags))
    assert not stale.exists()
    steps = [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]
