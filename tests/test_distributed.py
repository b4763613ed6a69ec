"""slmops finetune on torchrun: real processes over gloo on this CPU. Two processes train the
same loss curve and adapter as one process with the same global batch; a checkpoint resumes at
another world size on the same curve; a killed rank ends the run with a clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TONE

SUITE_SECONDS = 290  # about, on one test worker (conftest: the longest files start first)

RUN = ["--data_name", str(TONE), "--train_split", "train[:64]", "--text_template", "Phrase: {phrase}\nTone: {tone}",
       "--learning_rate", "1e-2", "--lora_dropout", "0", "--logging_steps", "1", "--report_to", "none", "--bf16", "false",
       "--max_seq_len", "64", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--log_level", "1",
       # the settings these curves were written for, not the tone labels' classification defaults
       "--eval_split", "none", "--metric_for_best_model", "loss", "--target_modules", "q_proj,k_proj,v_proj,o_proj"]


def finetune(model: Path, out: Path, *extra: str, nproc: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    args = ["finetune", "--model_name_or_path", str(model), "--output_path", str(out), *RUN, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", "slmops.cli.main", *args]
    else:  # as a user runs it: torchrun, one machine
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "slmops.cli.main", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_two_processes_train_the_curve_of_one_process_with_the_same_global_batch(tiny_llama, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    finetune(tiny_llama, one, "--max_steps", "10", "--per_device_train_batch_size", "8")
    proc = finetune(tiny_llama, two, "--max_steps", "10", "--per_device_train_batch_size", "4", nproc=2)
    assert "distributed: 2 processes" in proc.stderr and "global batch 8 (4 per process x 2 processes x 1 accumulation)" in proc.stderr
    assert proc.stderr.count("fast CPU path:") == 1  # one voice: rank 0's
    a, b = train_losses(one), train_losses(two)
    assert list(a) == list(range(1, 11)) and list(b) == list(a)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])
    assert a[10] < a[1]
    wa, wb = adapter(one), adapter(two)
    assert set(wa) == set(wb)
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= 1e-4 * max(1.0, wa[name].abs().max()), name
    run = json.loads(json.dumps(__import__("yaml").safe_load((two / "run.yaml").read_text())))
    assert run["resolved"]["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch": 8}
    # only rank 0 wrote: one metrics line per step, one checkpoint folder set
    assert len((two / "logs" / "metrics.jsonl").read_text().splitlines()) == len((one / "logs" / "metrics.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def one_process_curve(tiny_llama, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("reference") / "run"
    finetune(tiny_llama, out, "--max_steps", "6", "--per_device_train_batch_size", "8")
    return train_losses(out)


@pytest.mark.parametrize("first,then", [(2, 1)], ids=["2-then-1"])  # (1 then 2: the FSDP test below, whose chain has it)
def test_a_checkpoint_resumes_at_another_world_size_on_the_same_curve(first, then, one_process_curve, tiny_llama, tmp_path):
    out = tmp_path / "run"
    finetune(tiny_llama, out, "--max_steps", "3", "--save_steps", "3", "--per_device_train_batch_size", str(8 // first), nproc=first)
    finetune(tiny_llama, out, "--max_steps", "6", "--per_device_train_batch_size", str(8 // then), "--resume_from_checkpoint", "latest",
             nproc=then)
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(one_process_curve[step], rel=1e-4), (step, one_process_curve[step], resumed[step])
    # another global batch is another run: refused, naming it
    proc = finetune(tiny_llama, out, "--max_steps", "8", "--per_device_train_batch_size", "2", "--resume_from_checkpoint", "latest",
                    check=False)
    assert proc.returncode == 2 and "batches.global_batch: 8 in the checkpoint, 2 now" in proc.stderr, proc.stderr[-2000:]


def children(pid: int) -> list[str]:
    """The processes `pid` started (from /proc: no procps needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # (state, ppid, ...)
            found.append(stat.parent.name)
    return found


def test_a_killed_rank_ends_the_run_with_a_clear_message(tiny_llama, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--model_name_or_path", str(tiny_llama), "--output_path", str(out), *RUN, "--max_steps", "100000",
            "--per_device_train_batch_size", "4", "--save_steps", "50"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                             "slmops.cli.main", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300
        metrics = out / "logs" / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else "no training"
            time.sleep(0.5)
        ranks = children(proc.pid)
        assert len(ranks) == 2, ranks
        started = time.monotonic()
        os.kill(int(sorted(ranks, key=int)[-1]), signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
        assert time.monotonic() - started < 120
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "slmops: error: the run stopped: another process of it" in output, output[-3000:]
    assert "--resume_from_checkpoint latest" in output


BLOCKED_RANK = """
import sys, time, torch.distributed as dist
from slmops.train import distributed

world = distributed.world()
print("joined", flush=True)
if world.rank == 0:
    dist.barrier()  # rank 1 never comes: blocked in C++, where Python's own handler cannot run
else:
    time.sleep(120)
"""


def test_sigterm_stops_a_rank_blocked_in_a_collective_with_the_message(tmp_path):
    """torchrun SIGKILLs 30 s after its SIGTERM: a rank waiting on a peer inside gloo must say why and
    go before that, although Python runs signal handlers only between bytecodes of the main thread."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "PYTHONUNBUFFERED": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", BLOCKED_RANK], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        for rank in ranks:
            assert rank.stdout.readline().strip() == "joined", rank.stderr.read()
        time.sleep(1.0)  # rank 0 inside the barrier
        started = time.monotonic()
        ranks[0].send_signal(signal.SIGTERM)
        _, errors = ranks[0].communicate(timeout=25)
        assert time.monotonic() - started < 20
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode != 0
    assert "slmops: error: the run stopped: another process of it failed or was killed (the launcher stopped this process (SIGTERM))" in errors, errors
    assert "--resume_from_checkpoint latest" in errors


def test_nproc_per_node_relaunches_under_torchrun_and_accelerate_launch_runs_it_too(tiny_llama, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "slmops.cli.main", "finetune", "--model_name_or_path", str(tiny_llama),
                           "--output_path", str(out), *RUN, "--max_steps", "3", "--per_device_train_batch_size", "4",
                           "--nproc_per_node", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchrun --standalone --nproc_per_node 2" in proc.stderr and "distributed: 2 processes" in proc.stderr
    assert sorted(train_losses(out)) == [1, 2, 3]

    # accelerate's launcher (its torchrun launcher, which runs on CPUs too): the same run
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "-m", "slmops.cli.main", "finetune", "--model_name_or_path", str(tiny_llama),
                           "--output_path", str(tmp_path / "acc"), *RUN, "--max_steps", "3", "--per_device_train_batch_size", "4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "distributed: 2 processes" in proc.stderr, proc.stderr[-3000:]
    assert train_losses(tmp_path / "acc") == pytest.approx(train_losses(out), rel=1e-6)


def test_qlora_trains_in_two_processes_like_one(tiny_llama, tmp_path):
    """Each process loads the 4-bit base; the adapters' gradients are summed like any other."""
    one, two = tmp_path / "one", tmp_path / "two"
    finetune(tiny_llama, one, "--method", "qlora", "--max_steps", "3", "--per_device_train_batch_size", "8")
    finetune(tiny_llama, two, "--method", "qlora", "--max_steps", "3", "--per_device_train_batch_size", "4", nproc=2)
    a, b = train_losses(one), train_losses(two)
    assert list(a) == list(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])


def test_a_problem_found_by_any_process_stops_all_with_one_message(tiny_llama, tmp_path):
    proc = finetune(tiny_llama, tmp_path / "bad", "--text_template", "Phrase: {phrase}\nTone: {mood}", "--max_steps", "2", nproc=2, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("slmops: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "'mood' not in the data" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "bad").exists()

    # a problem only rank 1 has (a loss whose constructor fails there): rank 0 names it, nobody waits
    loss = tmp_path / "loss.py"
    loss.write_text("import os\nfrom torch import nn\n\nclass OnlyRankZero(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                    "        if os.environ.get('RANK') == '1':\n            raise RuntimeError('no scratch disk on this node')\n\n"
                    "    def forward(self, inputs):\n        return inputs.token_losses.sum()\n")
    proc = finetune(tiny_llama, tmp_path / "bad1", "--loss", f"{loss}:OnlyRankZero", "--max_steps", "2", nproc=2, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("slmops: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "rank 1 stopped before training" in errors[0] and "no scratch disk on this node" in errors[0], errors
    assert not (tmp_path / "bad1").exists()


# -- FSDP: the model sharded over the processes --------------------------------------------------


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_shards_the_model_and_trains_the_curve_of_one_process(tiny_llama, tmp_path):
    """Each process holds half of every weight; with gradient accumulation, a short last batch (one
    process's slice empty: it runs a stand-in that counts zero) and an evaluation split that does not
    divide evenly, the run logs the losses, evaluations and adapter of one process with the same global batch."""
    data = ["--train_split", "train[:62]", "--eval_split", "train[64:77]", "--per_device_eval_batch_size", "5", "--eval_steps", "4",
            "--max_steps", "10"]
    one, two = tmp_path / "one", tmp_path / "two"
    finetune(tiny_llama, one, *data, "--per_device_train_batch_size", "8")
    proc = finetune(tiny_llama, two, *data, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                    "--fsdp", "full_shard auto_wrap", nproc=2)  # (Hugging Face's spelling)
    assert "global batch 8 (2 per process x 2 processes x 2 accumulation)" in proc.stderr
    held = [line for line in proc.stderr.splitlines() if "fsdp full_shard:" in line]
    assert len(held) == 1 and "each process holds 19,280 of the 38,560 parameters" in held[0], proc.stderr[-3000:]
    assert "fast CPU path: off: the model is sharded" in proc.stderr
    a, b = metrics(one), metrics(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert [r["step"] for r in a if r["split"] == "eval"] == [4, 8, 10]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)
    train = [r["loss"] for r in a if r["split"] == "train"]
    assert train[-1] < train[0]
    wa, wb = adapter(one), adapter(two)
    assert set(wa) == set(wb)
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= 1e-4 * max(1.0, wa[name].abs().max()), name
    run = yaml.safe_load((two / "run.yaml").read_text())
    assert run["resolved"]["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch": 8, "fsdp": "full_shard"}
    # the checkpoints hold whole tensors: the adapter copy in the last one loads in PEFT as the final one
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    last = sorted((two / "checkpoints").glob("step-*"))[-1]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), last / "adapter")
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(state) == len(wb)


def test_fsdp_checkpoints_resume_at_any_world_size_with_or_without_sharding(one_process_curve, tiny_llama, tmp_path):
    """A sharded run's checkpoint (whole tensors, gathered) resumes in one process, whose checkpoint
    resumes sharded again (each process cuts its piece of the weights and the optimizer state): the curve
    of one uninterrupted process."""
    out = tmp_path / "run"
    finetune(tiny_llama, out, "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "4", "--fsdp", "full_shard", nproc=2)
    finetune(tiny_llama, out, "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "8", "--resume_from_checkpoint", "latest")
    finetune(tiny_llama, out, "--max_steps", "6", "--save_steps", "2", "--per_device_train_batch_size", "4", "--fsdp", "full_shard",
             "--resume_from_checkpoint", "latest", nproc=2)
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(one_process_curve[step], rel=1e-4), (step, one_process_curve[step], resumed[step])


def test_accelerate_launch_use_fsdp_shards_full_fine_tuning(tiny_llama, tmp_path):
    """accelerate's FSDP setting (--use_fsdp, FSDP2, weights kept to the backward) turns sharding on;
    full fine-tuning trains the curve of one process, the evaluation's label scoring and generation run
    on the sharded model, and the saved model loads in transformers with one process's weights."""
    run = ["--method", "full", "--learning_rate", "1e-3", "--max_steps", "3", "--eval_split", "train[64:80]", "--eval_steps", "3",
           "--eval_metrics", "accuracy,bleu"]
    one, two = tmp_path / "one", tmp_path / "two"
    finetune(tiny_llama, one, *run, "--per_device_train_batch_size", "8")
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(accelerate), "launch", "--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "false",
                           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "slmops.cli.main", "finetune", "--model_name_or_path", str(tiny_llama), "--output_path", str(two), *RUN, *run,
                           "--per_device_train_batch_size", "4"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "fsdp shard_grad_op:" in proc.stderr, proc.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)
        assert rb.get("accuracy") == ra.get("accuracy") and rb.get("bleu") == pytest.approx(ra.get("bleu"))
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        la, lb = (AutoModelForCausalLM.from_pretrained(out / "model")(input_ids=ids).logits for out in (one, two))
    assert (la - lb).abs().max() <= 1e-4


def test_fsdp_settings_are_checked_before_work(tiny_llama, tmp_path, monkeypatch):
    from slmops.config import FinetuneConfig
    from slmops.errors import ConfigError
    from slmops.finetune_recipe import plan_finetune
    from slmops.train.fsdp import from_accelerate_env

    assert FinetuneConfig.model_validate({"training": {"fsdp": "full_shard auto_wrap"}}).training.fsdp == "full_shard"
    assert FinetuneConfig.model_validate({"training": {"fsdp": "shard_grad_op"}}).training.fsdp == "shard_grad_op"
    assert FinetuneConfig.model_validate({"training": {"fsdp": True}}).training.fsdp == "full_shard"
    with pytest.raises(ValueError, match="offload .* is not supported"):
        FinetuneConfig.model_validate({"training": {"fsdp": "full_shard offload"}})
    with pytest.raises(ValueError, match="unknown --fsdp"):
        FinetuneConfig.model_validate({"training": {"fsdp": "zero3"}})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert from_accelerate_env() == "full_shard"
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    assert from_accelerate_env() == "shard_grad_op"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert from_accelerate_env() is None

    from helpers import tiny_config

    with pytest.raises(ConfigError, match="--fsdp full_shard with --method qlora: bitsandbytes' 4-bit weights cannot be sharded"):
        plan_finetune(tiny_config(tiny_llama, tmp_path / "q", method="qlora", fsdp="full_shard"))
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "one", fsdp="full_shard"))  # one process: nothing to shard
    assert plan.fsdp is None and "distributed" not in plan.describe()
    assert not (tmp_path / "q").exists()
