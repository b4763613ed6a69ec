import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from slmops.data.batching import collate, epoch_batches, last_tokens, split_rows
from slmops.finetune_recipe import build_model, finetune, plan_finetune
from slmops.train.loss import check_fast_path, plain_loss, selective_loss
from slmops.train.monitor import read_metrics

from helpers import tiny_config

SUITE_SECONDS = 65  # about, on one test worker (conftest: the longest files start first)


def _batch(plan, n=4):
    return collate(plan.data.train, list(range(n)), plan.tokenizer.pad_token_id)


def test_selective_loss_equals_plain_loss(tiny_models, tmp_path):
    for arch, path in tiny_models.items():
        plan = plan_finetune(tiny_config(path, tmp_path / arch))
        model = build_model(plan).eval()
        batch = _batch(plan)
        with torch.no_grad():
            a, na = plain_loss(model, batch)
            b, nb = selective_loss(model, batch)
        assert na == nb > 0
        assert float(a) == pytest.approx(float(b), rel=1e-5), arch
        assert check_fast_path(model, batch)


@pytest.mark.parametrize("with_bias,weighted,trains_head,dtype", [(False, False, False, torch.float32), (True, True, True, torch.float32),
                                                                  (False, False, False, torch.bfloat16), (True, True, True, torch.bfloat16)])
def test_chunked_head_loss_equals_the_head_then_cross_entropy(with_bias, weighted, trains_head, dtype, monkeypatch):
    """The chunked head (long sequences: no tokens x vocabulary tensors) gives the loss and the
    gradients of hidden states, weight and bias that the head followed by cross-entropy gives
    (in bf16: logits rounded to bf16 and then taken to fp32, as the head's own output is)."""
    import torch.nn.functional as F

    from slmops.train import loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 7 * 50)  # chunks of 7 tokens over 50 words: 37 tokens -> 6 chunks
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=with_bias).to(dtype).requires_grad_(trains_head)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    weights = torch.rand(37) + 0.5 if weighted else None
    chunked = loss_module.ChunkedHeadLoss.apply(hidden, head.weight, head.bias, targets, weights)
    chunked.backward()
    got = [hidden.grad.clone()] + ([head.weight.grad.clone()] + ([head.bias.grad.clone()] if with_bias else []) if trains_head else [])
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    per_token = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    reference = (per_token * weights).sum() if weighted else per_token.sum()
    reference.backward()
    want = [hidden.grad] + ([head.weight.grad] + ([head.bias.grad] if with_bias else []) if trains_head else [])
    assert float(chunked) == pytest.approx(float(reference), rel=1e-5)
    with torch.no_grad():  # evaluation: the loss alone, no gradients computed
        assert float(loss_module.ChunkedHeadLoss.apply(hidden, head.weight, head.bias, targets, weights)) == pytest.approx(float(reference), rel=1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == dtype
        if dtype == torch.float32:
            assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)
        else:  # both products round to bf16 (the weight's gradient sums chunks in fp32 here, in bf16 there)
            assert (g.float() - w.float()).abs().max() <= 1e-2 * w.float().abs().max()


def test_selective_loss_takes_the_chunked_head_on_long_batches(tiny_llama, tmp_path, monkeypatch):
    """Past the logits limit the training loss (a LoRA model, its head frozen) is the same value with
    the same adapter gradients as the model's own forward."""
    from slmops.train import loss as loss_module

    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "run"))
    model = build_model(plan).eval()
    batch = _batch(plan, 8)
    grads = {}
    for limit in (10**12, 64):  # (the tiny model's vocabulary is larger than 64: every token its own chunk)
        monkeypatch.setattr(loss_module, "CHUNK_LOGITS", limit)
        calls = []
        monkeypatch.setattr(loss_module.ChunkedHeadLoss, "apply", lambda *a, _apply=loss_module.ChunkedHeadLoss.apply: calls.append(1) or _apply(*a))
        model.zero_grad(set_to_none=True)
        loss, n = selective_loss(model, batch)
        loss.backward()
        grads[limit] = (float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
        assert bool(calls) == (limit == 64)
    (a, ga), (b, gb) = grads[10**12], grads[64]
    assert b == pytest.approx(a, rel=1e-5)
    for name in ga:
        assert (ga[name] - gb[name]).abs().max() <= 1e-5 * ga[name].abs().max(), name  # (float summation order)
    model.zero_grad(set_to_none=True)
    plain, _ = plain_loss(model, batch)
    assert float(plain) == pytest.approx(b, rel=1e-5)


def test_bf16_fast_path_matches_fp32_loss(tiny_llama, tmp_path):
    """The default CPU fast path (bf16 base, fp32 adapters) and the plain fp32 path give the
    same loss within bf16 tolerance."""
    losses = {}
    for bf16 in (False, True):
        plan = plan_finetune(tiny_config(tiny_llama, tmp_path / str(bf16), bf16=bf16))
        model = build_model(plan).eval()
        assert next(p for n, p in model.named_parameters() if "q_proj.base_layer" in n).dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        with torch.no_grad():
            loss, n = selective_loss(model, _batch(plan, 8))
        losses[bf16] = float(loss) / n
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


def test_short_batch_attention_kernel_trains_like_flash_attention(tiny_llama, tmp_path, monkeypatch):
    """Without the fast path (its own attention would replace SDPA), short CPU batches run
    SDPA's math kernel (faster there) and longer ones the flash kernel: each training forward
    and backward is checked to run on the kernel the limit picks, and both give the same loss
    curve; gradient checkpointing's recomputation runs on the same kernel too."""
    import torch.nn.functional as F

    from slmops.train import trainer

    assert trainer.SHORT_ATTENTION_MAX_LEN == 192
    flash_on_call: list[bool] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():  # training forwards (and checkpointing's recomputation)
            flash_on_call.append(torch.backends.cuda.flash_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    curves = {}
    for limit, flash in ((192, False), (0, True)):
        monkeypatch.setattr(trainer, "SHORT_ATTENTION_MAX_LEN", limit)
        flash_on_call.clear()
        out = tmp_path / f"limit{limit}"
        finetune(tiny_config(tiny_llama, out, max_steps=6, lora_dropout=0.0, bf16=True, cpu_fast_path="off"))
        assert flash_on_call and set(flash_on_call) == {flash}, f"limit {limit}: SDPA ran with flash={set(flash_on_call)}"
        curves[limit] = [m["loss"] for m in read_metrics(out / "logs" / "metrics.jsonl") if m["split"] == "train"]
    assert curves[0] == pytest.approx(curves[192], rel=3e-2)
    monkeypatch.setattr(trainer, "SHORT_ATTENTION_MAX_LEN", 192)
    flash_on_call.clear()
    out = tmp_path / "checkpointed"
    finetune(tiny_config(tiny_llama, out, max_steps=6, lora_dropout=0.0, bf16=True, gradient_checkpointing=True, cpu_fast_path="off"))
    assert flash_on_call and set(flash_on_call) == {False}, "the recomputation must use the forward's kernel"
    checkpointed = [m["loss"] for m in read_metrics(out / "logs" / "metrics.jsonl") if m["split"] == "train"]
    assert checkpointed == pytest.approx(curves[192], rel=3e-2)


def test_gradient_accumulation_matches_one_big_batch(tiny_llama, tmp_path):
    common = dict(max_steps=3, lora_dropout=0.0, group_by_length=False, learning_rate=1e-3)
    finetune(tiny_config(tiny_llama, tmp_path / "big", per_device_train_batch_size=8, **common))
    finetune(tiny_config(tiny_llama, tmp_path / "acc", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common))
    a = load_file(tmp_path / "big" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "acc" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_loop_steps_with_clipped_gradients(tiny_llama, tmp_path, method):
    """After one step AdamW's first moment is (1 - beta1) = 0.1 times the gradient it stepped with:
    with the logged norm (before clipping) above --max_grad_norm, the moment's norm is 0.1 x the limit."""
    out = tmp_path / method
    finetune(tiny_config(tiny_llama, out, method=method, max_steps=1, save_steps=1, logging_steps=1, max_grad_norm=0.05,
                         lora_dropout=0.0))
    logged = [m for m in read_metrics(out / "logs" / "metrics.jsonl") if m["split"] == "train"]
    assert logged[0]["grad_norm"] > 0.5
    from slmops.train.checkpoint import _load_state

    (checkpoint,) = (out / "checkpoints").iterdir()
    moments = [state["exp_avg"] for state in _load_state(checkpoint, "optimizer")["state"].values()]
    assert len(moments) > 2
    assert float(torch.cat([t.flatten() for t in moments]).norm()) == pytest.approx(0.1 * 0.05, rel=1e-4)


def test_outputs_load_in_peft_and_reproduce_predictions(tiny_llama, tmp_path):
    out = tmp_path / "run"
    finetune(tiny_config(tiny_llama, out, eval_split="train[64:80]", max_steps=10))
    run = __import__("yaml").safe_load((out / "run.yaml").read_text())
    assert run["status"] == "finished" and "torch" in run["versions"]
    assert (out / "loss.png").stat().st_size > 1000 and "best eval" in (out / "report.md").read_text()
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2  # loss; lr + throughput
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(out / "model")
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    from slmops.inference import GenerationParams, open_backend

    ours = open_backend(str(out))
    prompts = ["Phrase: I am so happy today\nTone:", "Phrase: This is a disgrace\nTone:"]
    theirs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        theirs.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert ours.generate_batch(prompts, None, GenerationParams(max_new_tokens=5)) == theirs
    # streamed one at a time (the generate/chat/serve path): the same text
    assert [ours.generate_text(p, None, GenerationParams(max_new_tokens=5)) for p in prompts] == theirs


def test_eval_early_stopping_and_best_adapter(tiny_llama, tmp_path):
    out = tmp_path / "es"
    # A huge learning rate makes eval loss rise after a few steps, so patience triggers.
    result = finetune(tiny_config(tiny_llama, out, eval_split="train[64:96]", max_steps=60, eval_steps=2,
                                  learning_rate=0.3, early_stopping_patience=2, lr_scheduler_type="constant",
                                  metric_for_best_model="loss"))
    evals = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if r["split"] == "eval"]
    assert result.train.stopped_early and result.train.steps < 60
    best = min(evals, key=lambda r: r["loss"])
    assert result.train.best_step == best["step"]
    state = json.loads((out / "checkpoints" / "best" / "state.json").read_text())
    assert state["best_step"] == best["step"]


def test_output_folder_with_another_run_is_refused(tiny_llama, tmp_path):
    from slmops.errors import OutputError

    out = tmp_path / "taken"
    finetune(tiny_config(tiny_llama, out, max_steps=2))
    with pytest.raises(OutputError, match="--overwrite"):
        plan_finetune(tiny_config(tiny_llama, out, max_steps=2))
    finetune(tiny_config(tiny_llama, out, max_steps=2, overwrite=True))


def _cli(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "slmops.cli.main", "finetune", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _flags(model, out, steps):
    from conftest import TONE, TONE_TEMPLATE

    return ["-m", str(model), "-d", str(TONE), "--train_split", "train[:96]", "--text_template", TONE_TEMPLATE,
            "--max_steps", str(steps), "--save_steps", "4", "--logging_steps", "1", "--learning_rate", "5e-3",
            "--per_device_train_batch_size", "4", "--bf16", "false", "--report_to", "tensorboard", "-o", str(out), "--log_level", "3"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_killed_or_interrupted_then_resume_matches_uninterrupted_run(sig, tiny_llama, tmp_path):
    steps = 40
    ref = _cli(_flags(tiny_llama, tmp_path / "ref", steps))
    assert ref.wait(timeout=600) == 0, ref.stdout.read()

    out = tmp_path / "killed"
    proc = _cli(_flags(tiny_llama, out, steps))
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step-000012").is_dir():
        time.sleep(0.05)
    proc.send_signal(sig)
    said = proc.communicate(timeout=120)[0]
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), said
    if sig == signal.SIGINT:  # one line, no traceback; the checkpoints are whole, no staging folder is left
        assert said.strip().splitlines()[-1] == "slmops: interrupted", said
        assert not [p.name for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not (out / "adapter").exists(), "the run should have been stopped before it finished"
    resumed = _cli(_flags(tiny_llama, out, steps) + ["--resume_from_checkpoint", "latest"])
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()

    a = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    ref_curve = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref" / "logs" / "metrics.jsonl") if r["split"] == "train"]
    our_curve = [(r["step"], r["loss"]) for r in read_metrics(out / "logs" / "metrics.jsonl") if r["split"] == "train"]
    assert [s for s, _ in our_curve] == list(range(1, steps + 1))
    for (s1, l1), (s2, l2) in zip(ref_curve, our_curve):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)


def test_epoch_batches_are_deterministic_and_cover_everything():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4, 6, 10]
    a = epoch_batches(lengths, 3, seed=1, epoch=0, group_by_length=True)
    assert a == epoch_batches(lengths, 3, seed=1, epoch=0, group_by_length=True)
    assert a != epoch_batches(lengths, 3, seed=1, epoch=1, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(10))


def _padded(lengths, width=None, left=False):
    width = width or max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, width - n :] = 1
        else:
            mask[row, :n] = 1
    ids = torch.arange(len(lengths) * width).view(len(lengths), width) * mask
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "class_weight": torch.arange(len(lengths), dtype=torch.float)}


def test_split_rows_cuts_between_examples_into_even_pieces_and_trims_their_padding():
    batch = _padded([256] * 8)
    assert split_rows(batch, 2048)[0] is batch and len(split_rows(batch, 2048)) == 1  # within the limit: as it is
    assert [p["input_ids"].shape for p in split_rows(batch, 1638)] == [(4, 256), (4, 256)]  # even, not 6 + 2

    batch = _padded([300, 1000, 50, 700, 900, 20])
    pieces = split_rows(batch, 1200)
    assert [int(p["attention_mask"].sum()) for p in pieces] == [300, 1000, 750, 920]
    assert all(int(p["attention_mask"].sum()) <= 1200 for p in pieces)
    def real(b, key):  # each row's values at its real tokens (a per-example value as it is)
        return [row if key == "class_weight" else row[mask.bool()] for row, mask in zip(b[key], b["attention_mask"])]

    for key in batch:  # every tensor's rows cut alike, in order, nothing lost or repeated
        joined, whole = [r for p in pieces for r in real(p, key)], real(batch, key)
        assert len(joined) == len(whole) and all(torch.equal(a, b) for a, b in zip(joined, whole)), key
    # each piece as wide as its longest example: the padding only the others needed is gone
    assert [p["input_ids"].shape[1] for p in pieces] == [300, 1000, 700, 900]
    assert all(p[k].is_contiguous() for p in pieces for k in ("input_ids", "attention_mask", "labels"))
    assert [int(p["class_weight"][0]) for p in pieces] == [0, 1, 2, 4]

    alone = split_rows(_padded([5000, 10]), 1024)  # an example over the limit runs alone, whole
    assert [p["input_ids"].shape for p in alone] == [(1, 5000), (1, 10)]
    assert split_rows(_padded([5000]), 1024)[0]["input_ids"].shape == (1, 5000)

    left = split_rows(_padded([300, 1000, 50, 700], left=True), 1100)  # left padding: the real tokens end every row
    assert all(p["input_ids"].shape[1] == 1000 for p in left)
    assert sum(int(p["attention_mask"].sum()) for p in left) == 2050


def test_last_tokens_cuts_long_examples_to_their_end_and_keeps_a_labelled_token():
    batch = _padded([700, 300, 1000])
    batch["input_ids"][~batch["attention_mask"].bool()] = 7  # the pad id
    batch["labels"][0, :] = -100
    batch["labels"][0, 10] = 5  # example 0's only labelled token is near its start: it stays whole
    cut = last_tokens(batch, 512)
    assert cut["input_ids"].shape == (3, 700) and cut["attention_mask"].sum(1).tolist() == [700, 300, 512]
    assert torch.equal(cut["input_ids"][2, :512], batch["input_ids"][2, 488:1000])  # the last 512 of example 2
    assert torch.equal(cut["labels"][2, :512], batch["labels"][2, 488:1000]) and (cut["input_ids"][2, 512:] == 7).all()
    assert torch.equal(cut["input_ids"][0], batch["input_ids"][0, :700])
    assert torch.equal(cut["input_ids"][1, :300], batch["input_ids"][1, :300]) and (cut["input_ids"][1, 300:] == 7).all()
    assert (cut["labels"][1, 300:] == -100).all() and torch.equal(cut["class_weight"], batch["class_weight"])
    short = _padded([100, 50])
    assert last_tokens(short, 512) is short
    left = _padded([700, 1000], left=True)
    assert last_tokens(left, 512) is left  # not right-padded: as it is


def test_dataloader_workers_give_the_same_run(tiny_llama, tmp_path):
    finetune(tiny_config(tiny_llama, tmp_path / "w0", max_steps=4, lora_dropout=0.0))
    finetune(tiny_config(tiny_llama, tmp_path / "w2", max_steps=4, lora_dropout=0.0, dataloader_num_workers=2))
    a = load_file(tmp_path / "w0" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "w2" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_eval_metrics_during_training_pick_the_best(tiny_llama, tmp_path):
    out = tmp_path / "acc"
    result = finetune(tiny_config(tiny_llama, out, eval_split="train[64:80]", max_steps=6, eval_steps=2,
                                  eval_metrics="accuracy,f1", metric_for_best_model="accuracy", eval_max_new_tokens=3))
    evals = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(0.0 <= r["accuracy"] <= 1.0 and "macro_f1" in r for r in evals)
    best = max(evals, key=lambda r: (r["accuracy"], -r["step"]))
    assert result.train.best_eval_loss == best["accuracy"] and result.train.best_step == best["step"]


def test_eval_metric_problems_are_reported_up_front(tiny_llama, tmp_path):
    from slmops.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="needs --eval_split"):
        plan_finetune(tiny_config(tiny_llama, tmp_path / "a", eval_metrics="accuracy"))
    with pytest.raises(ConfigError, match="'f1_score' is not computed; available: accuracy, loss"):
        plan_finetune(tiny_config(tiny_llama, tmp_path / "b", eval_split="train[64:80]", eval_metrics="accuracy",
                                  metric_for_best_model="f1_score"))
    with pytest.raises(ConfigError, match="Did you mean 'accuracy'"):
        plan_finetune(tiny_config(tiny_llama, tmp_path / "c", eval_split="train[64:80]", eval_metrics="acurracy"))
    bad = tmp_path / "multi.jsonl"
    bad.write_text('{"phrase": "a", "tone": "x"}\n{"phrase": "b", "tone": "two\\nlines"}\n' * 4)
    with pytest.raises(DataError, match="one-line, non-empty gold labels"):
        plan_finetune(tiny_config(tiny_llama, tmp_path / "d", data_name=str(bad), train_split="train", eval_split="train[:4]",
                                  eval_metrics="accuracy"))


def test_time_left_prices_steps_and_evaluations_apart():
    """20 steps of 1 s (the first 3 s: warm-up), an evaluation of 10 s every 5 steps: the time
    left is the steps left at 1 s and the evaluations left at 10 s, so it falls steadily
    instead of jumping after each evaluation as a bar's own rate does."""
    from slmops.train.monitor import TrainingClock

    clock = TrainingClock(total_steps=20, pause_every=5)
    assert clock.remaining() is None and clock.describe() == "? left"
    estimates = {}
    for step in range(1, 21):
        clock.stepped(3.0 if step == 1 else 1.0)
        if step % 5 == 0:
            clock.paused(10.0)
        estimates[step] = clock.remaining()
    assert estimates[1] == 19 * 3.0  # only the warm-up step timed so far
    assert estimates[2] == 18 * 1.0
    for step in range(5, 21):  # once an evaluation is timed: exact, and never rising
        assert estimates[step] == (20 - step) * 1.0 + (4 - step // 5) * 10.0
        assert step == 5 or estimates[step] <= estimates[step - 1]
    resumed = TrainingClock(total_steps=12, pause_every=5, start_step=5)  # a resumed run: evaluations at 10 and 12 left
    resumed.stepped(2.0)
    assert resumed.pauses_left() == 2 and resumed.describe() == "00:12 left +eval"


def test_gradient_checkpointing_turns_itself_on_when_activations_would_not_fit(tiny_llama, tmp_path, monkeypatch, caplog):
    """Unasked, checkpointing is on only when one micro-batch's activations would pass half the memory
    available, and the log and run.yaml say so; asked, it is as asked."""
    import slmops.machine

    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "roomy"))
    assert plan.gradient_checkpointing[0] is False and plan.gradient_checkpointing[1].startswith("off: ~")
    model = build_model(plan)
    assert not model.is_gradient_checkpointing

    monkeypatch.setattr(slmops.machine, "available_memory", lambda: 2 * 2**20)  # 2 MB left on this machine
    with caplog.at_level("INFO", logger="slmops"):
        plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "tight"))
    assert plan.gradient_checkpointing[0] is True and "gradient checkpointing: on: a micro-batch of 8 x" in caplog.text
    assert plan.describe()["gradient_checkpointing"]["on"] is True
    assert build_model(plan).is_gradient_checkpointing
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "asked", gradient_checkpointing=False))
    assert plan.gradient_checkpointing == (False, "--gradient_checkpointing false")


def test_early_stopping_ends_the_run_once_the_best_score_cannot_be_beaten(tiny_llama, tmp_path):
    """A classification metric at its ceiling (macro-F1 1.0) cannot be beaten by a later
    evaluation (a tie keeps the earlier weights), so with early stopping on the run ends there
    instead of waiting out its patience; the kept adapter is that evaluation's. With early
    stopping off, the run goes on to --max_steps."""
    rows = [{"phrase": f"{word} number {i}", "tone": tone} for i in range(40) for word, tone in (("sunny", "joyful"), ("stormy", "angry"))]
    easy = tmp_path / "easy.jsonl"
    easy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(data_name=str(easy), train_split="train", eval_split="auto", metric_for_best_model="macro_f1",
                    max_steps=40, eval_steps=4, learning_rate=2e-2)
    out = tmp_path / "stops"
    result = finetune(tiny_config(tiny_llama, out, **settings))
    evals = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if r["split"] == "eval"]
    assert evals[-1]["macro_f1"] == pytest.approx(1.0) and all(r["macro_f1"] < 1.0 for r in evals[:-1]), evals
    assert result.train.stopped_early and result.train.steps == evals[-1]["step"] < 40
    assert result.train.best_step == evals[-1]["step"]
    assert json.loads((out / "checkpoints" / "best" / "state.json").read_text())["best_step"] == evals[-1]["step"]

    patient = finetune(tiny_config(tiny_llama, tmp_path / "runs-on", early_stopping_patience=0, **settings))
    assert patient.train.steps == 40 and not patient.train.stopped_early
