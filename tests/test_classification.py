"""Classification data: the task found from the completions (or asked for), the stratified
10% hold-out of --eval_split auto, a warning for a validation split that misses a class, and
in-training accuracy/F1 by label likelihood that equals `slmops evaluate` on the saved adapter."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import yaml

from conftest import TONE
from helpers import run_cli, tiny_config


def test_holdout_keeps_class_ratios_and_every_class():
    from slmops.data.labels import holdout_rows

    completions = ["a"] * 500 + ["b"] * 300 + ["c"] * 150 + ["d"] * 40 + ["e"] * 10
    train, held = holdout_rows(completions, stratify=True, seed=1)
    assert sorted(train + held) == list(range(1000)) and not set(train) & set(held)
    assert Counter(completions[i] for i in held) == {"a": 50, "b": 30, "c": 15, "d": 4, "e": 1}
    assert holdout_rows(completions, stratify=True, seed=1) == (train, held)  # seeded
    assert holdout_rows(completions, stratify=True, seed=2)[1] != held
    rare = ["a"] * 95 + ["b"] * 3 + ["c"] * 2
    assert Counter(rare[i] for i in holdout_rows(rare, stratify=True, seed=0)[1]) == {"a": 10, "b": 1, "c": 1}  # none lost
    _, random_held = holdout_rows([f"free text {i}" for i in range(200)], stratify=False, seed=0)
    assert len(random_held) == 20


def test_task_is_found_from_the_completions_or_asked_for(tiny_llama, tmp_path, caplog):
    from slmops.errors import DataError
    from slmops.finetune_recipe import plan_finetune

    caplog.set_level(logging.INFO, logger="slmops")
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "a"))
    assert plan.data.labels is not None and set(plan.data.labels.names) == {"angry", "joyful", "neutral", "sad", "fearful"}
    assert "task: classification, 5 labels: angry (" in caplog.text
    assert plan.data.describe()["task"]["kind"] == "classification"
    assert plan_finetune(tiny_config(tiny_llama, tmp_path / "b", task="generation")).data.labels is None
    free = tmp_path / "free.jsonl"
    free.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer number {i}"}) + "\n" for i in range(40)))
    caplog.clear()
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "c", data_name=str(free), train_split="train", text_template="Q: {q}\\nA: {a}"))
    assert plan.data.labels is None and "task: generation" in caplog.text
    multi = tmp_path / "multi.jsonl"
    multi.write_text('{"q": "a", "a": "x"}\n{"q": "b", "a": "two\\nlines"}\n' * 8)
    with pytest.raises(DataError, match="--task classification needs a one-line label .* row 1"):
        plan_finetune(tiny_config(tiny_llama, tmp_path / "d", data_name=str(multi), train_split="train", text_template="Q: {q}\\nA: {a}",
                                  task="classification"))


def test_eval_split_auto_holds_out_a_stratified_tenth_of_train(tiny_llama, tmp_path, caplog):
    from slmops.finetune_recipe import plan_finetune

    caplog.set_level(logging.INFO, logger="slmops")
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "a", train_split="train[:200]", eval_split="auto"))
    assert len(plan.data.train) + len(plan.data.eval) == 200 and len(plan.data.eval) == 20
    rows = [json.loads(line) for line in TONE.read_text().splitlines()[:200]]
    gold = Counter(r["tone"] for r in rows)
    held = Counter(ex.completion for ex in plan.data.eval_examples)
    assert sum(held.values()) == 20 and all(abs(held[label] - count / 10) < 1 for label, count in gold.items()), (held, gold)
    assert "20 of 200 training rows held out (--eval_split auto), stratified by label" in caplog.text
    eval_prompts = {ex.prompt for ex in plan.data.eval_examples}
    train_texts = {plan.tokenizer.decode(ids) for ids in plan.data.train.input_ids}
    assert not any(prompt in text for prompt in eval_prompts for text in train_texts)  # held out, not also trained on


def test_classification_defaults_fill_only_what_was_left_unset(tiny_llama, tmp_path, caplog):
    """A classification task without an eval split gets a stratified held-out tenth and
    CLASSIFICATION_DEFAULTS (said in the log, recorded for a replay); a flag given wins; a
    generation task and `--eval_split none` keep the plain defaults."""
    from slmops.config import FinetuneConfig
    from slmops.finetune_recipe import CLASSIFICATION_DEFAULTS, plan_finetune, replayable_config

    caplog.set_level(logging.INFO, logger="slmops")
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "a", train_split="train[:200]", learning_rate=None, eval_split=None))
    assert len(plan.data.eval) == 20 and plan.config.data.eval_split == "auto"
    assert "20 of 200 training rows held out (--eval_split auto), stratified by label" in caplog.text
    training, method = plan.config.training, plan.config.method
    for name, value in CLASSIFICATION_DEFAULTS.items():
        assert getattr(training if name in FinetuneConfig.model_fields["training"].annotation.model_fields else method, name) == value
    assert plan.learning_rate == CLASSIFICATION_DEFAULTS.get("learning_rate", plan.learning_rate)
    assert "classification defaults: --metric_for_best_model macro_f1" in caplog.text
    assert "f1" in training.eval_metrics  # macro-F1 measured at each evaluation
    replay = replayable_config(plan.config)
    assert replay["data"]["eval_split"] == "auto" and replay["training"]["metric_for_best_model"] == "macro_f1"

    given = plan_finetune(tiny_config(tiny_llama, tmp_path / "b", train_split="train[:200]", metric_for_best_model="loss",
                                      target_modules="q_proj", learning_rate=1e-3, eval_split="train[200:240]"))
    assert (given.config.training.metric_for_best_model, given.target_modules, given.learning_rate) == ("loss", ["q_proj"], 1e-3)
    assert len(given.data.eval) == 40
    no_eval = plan_finetune(tiny_config(tiny_llama, tmp_path / "c", train_split="train[:200]", eval_split="none"))
    assert no_eval.data.eval is None and len(no_eval.data.train) == 200
    assert no_eval.config.training.metric_for_best_model == "loss"
    free = tmp_path / "free.jsonl"
    free.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer number {i}"}) + "\n" for i in range(40)))
    caplog.clear()
    plain = plan_finetune(tiny_config(tiny_llama, tmp_path / "d", data_name=str(free), train_split="train", text_template="Q: {q}\\nA: {a}",
                                      eval_split=None))
    assert plain.data.eval is None and "classification defaults" not in caplog.text


def test_an_eval_split_missing_a_class_is_warned_about(tiny_llama, tmp_path, caplog):
    from slmops.finetune_recipe import plan_finetune

    rows = [json.loads(line) for line in TONE.read_text().splitlines()]
    no_sad = tmp_path / "no_sad.jsonl"
    no_sad.write_text("".join(json.dumps(r) + "\n" for r in rows[:80]) + "".join(json.dumps(r) + "\n" for r in rows[80:] if r["tone"] != "sad"))
    caplog.set_level(logging.INFO, logger="slmops")
    plan_finetune(tiny_config(tiny_llama, tmp_path / "a", data_name=str(no_sad), train_split="train[:80]", eval_split="train[80:]"))
    assert "the eval split has no example of sad (of 5 labels)" in caplog.text


def test_in_training_f1_by_likelihood_equals_evaluate_on_the_saved_adapter(tiny_llama, tmp_path, capsys):
    """--metric_for_best_model macro_f1 alone: F1 computed at each evaluation by label
    likelihood (on the training model, fast path and all), the best step kept; `slmops
    evaluate` on the saved adapter gives the same score on the same split."""
    from slmops.finetune_recipe import finetune, plan_finetune

    out = tmp_path / "ft"
    result = finetune(tiny_config(tiny_llama, out, train_split="train[:96]", eval_split="auto", max_steps=9, eval_steps=3,
                                  metric_for_best_model="macro_f1", learning_rate=3e-3))
    evals = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["split"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6, 9] and all(0 <= e["macro_f1"] <= 1 for e in evals)
    best = max(evals, key=lambda e: (e["macro_f1"], -e["step"]))
    assert result.train.best_step == best["step"]
    held = tmp_path / "held.jsonl"  # the rows --eval_split auto held out, as a file evaluate reads
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["resolved"]["data"]["task"]["kind"] == "classification"
    assert run["config"]["training"]["eval_metrics"] == ["f1"]

    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "again", train_split="train[:96]", eval_split="auto"))
    held.write_text("".join(json.dumps(row) + "\n" for row in plan.data.eval_split.dataset))
    code, text = run_cli(capsys, "evaluate", "-m", str(out), "--data_name", str(held), "--eval_split", "train",
                         "--text_template", "Phrase: {phrase}\\nTone: {tone}", "--metrics", "accuracy,f1", "--labels",
                         ",".join(plan.data.labels.labels), "-o", str(tmp_path / "eval"), "--log_level", "3")
    assert code == 0, text
    measured = json.loads((tmp_path / "eval" / "results.json").read_text())["models"][0]["metrics"]
    assert measured["macro_f1"] == pytest.approx(best["macro_f1"]) and measured["unparseable"] == 0

    # --eval_split auto in evaluate: the same rows, held out again from the same train split and seed
    code, text = run_cli(capsys, "evaluate", "-m", str(out), "--data_name", str(TONE), "--train_split", "train[:96]",
                         "--eval_split", "auto", "--text_template", "Phrase: {phrase}\\nTone: {tone}", "--metrics", "accuracy,f1",
                         "-o", str(tmp_path / "eval-auto"), "--log_level", "3")
    assert code == 0, text
    auto = json.loads((tmp_path / "eval-auto" / "results.json").read_text())
    assert auto["data"]["rows"] == len(plan.data.eval_examples) == 10
    assert auto["data"]["split"] == "train[:96] (auto: 10 rows held out, stratified)"
    assert auto["models"][0]["metrics"]["macro_f1"] == pytest.approx(best["macro_f1"])
    predictions = [json.loads(line) for line in (tmp_path / "eval-auto" / "predictions-0.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in predictions] == [ex.prompt for ex in plan.data.eval_examples]


def test_label_scoring_gives_the_eval_loss_without_a_second_pass(tiny_llama, tmp_path, monkeypatch):
    """Scoring every label scores the gold one, whose log-likelihood is minus the eval loss:
    the evaluation takes its loss from there (the loss pass does not run) and it equals the
    loss pass's value, fast path on; a custom loss keeps its own pass."""
    import torch

    from conftest import ROOT
    from slmops.finetune_recipe import _generation_eval, build_model, plan_finetune
    from slmops.train.cpu import FastPath
    from slmops.train.trainer import Trainer, TrainingData, TrainingSetup

    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "a", train_split="train[:120]", eval_split="auto",
                                     metric_for_best_model="macro_f1", per_device_eval_batch_size=5))
    model = build_model(plan)
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that changes the answers (LoRA B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    with FastPath.install(model) as path:
        setup = TrainingSetup(plan.precision, plan.learning_rate, tmp_path / "c", tmp_path / "l", True)
        data = TrainingData(plan.data.train, plan.data.eval, plan.tokenizer.pad_token_id)
        trainer = Trainer(model, data, plan.config.training, setup, path, _generation_eval(plan))
        trainer.prepare()
        assert trainer.fast_path is not None
        passes = []
        own_pass = Trainer._eval_loss
        monkeypatch.setattr(Trainer, "_eval_loss", lambda self, d: passes.append(1) or own_pass(self, d))
        result = trainer.evaluate()
        assert passes == [] and {"loss", "perplexity", "macro_f1"} <= set(result)
        model.eval()  # (as the evaluation had it: no dropout)
        assert result["loss"] == pytest.approx(own_pass(trainer, plan.data.eval), rel=1e-5)

    with_custom = plan_finetune(tiny_config(tiny_llama, tmp_path / "b", train_split="train[:120]", eval_split="auto",
                                            metric_for_best_model="macro_f1",
                                            loss=f"{ROOT / 'examples' / 'custom_loss.py'}:LabelSmoothedCrossEntropy"))
    assert with_custom.custom_loss is not None and "loss" not in _generation_eval(with_custom)(build_model(with_custom))


def test_class_weights_balance_the_labels_and_weigh_each_token_loss(tiny_llama, tmp_path, caplog):
    """--class_weights auto: n / (k * n_label) per example (mean 1); the loss, on every path
    (the model's own forward, the labelled-positions head, padding-free packed batches), is
    the sum of each token's cross-entropy times its example's weight."""
    import torch

    from slmops.data.batching import collate
    from slmops.data.tokenize import IGNORE
    from slmops.finetune_recipe import build_model, plan_finetune
    from slmops.train.cpu import FastPath
    from slmops.train.loss import packed_loss, plain_loss, selective_loss

    rows = [json.loads(line) for line in TONE.read_text().splitlines()]
    skewed = tmp_path / "skewed.jsonl"  # 60 joyful, 20 sad, 10 angry
    picked = [r for r in rows if r["tone"] == "joyful"][:60] + [r for r in rows if r["tone"] == "sad"][:20] + \
        [r for r in rows if r["tone"] == "angry"][:10]
    skewed.write_text("".join(json.dumps(r) + "\n" for r in picked))
    caplog.set_level(logging.INFO, logger="slmops")
    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "w", data_name=str(skewed), train_split="train", class_weights="auto",
                                     lora_dropout=0.0))
    weights = plan.data.train.extra["loss_weight"]
    by_label = dict(zip(plan.data.train_completions, weights))
    assert by_label == pytest.approx({"joyful": 90 / (3 * 60), "sad": 90 / (3 * 20), "angry": 90 / (3 * 10)})
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    assert "class weights (balanced): angry 3.00 (10), joyful 0.50 (60), sad 1.50 (20)" in caplog.text

    model = build_model(plan).eval()
    lengths = plan.data.train.lengths
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch = collate(plan.data.train, by_length[:3] + by_length[-3:], plan.tokenizer.pad_token_id)  # padded enough to pack
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    targets = batch["labels"][:, 1:]
    token_ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    expected = float((token_ce * (targets != IGNORE) * batch["loss_weight"][:, None]).sum())
    unweighted = float((token_ce * (targets != IGNORE)).sum())
    assert abs(expected - unweighted) > 1e-3 * unweighted  # the weights change the loss
    with torch.no_grad():
        assert float(plain_loss(model, batch)[0]) == pytest.approx(expected, rel=1e-5)
        assert float(selective_loss(model, batch)[0]) == pytest.approx(expected, rel=1e-5)
    with FastPath.install(model) as path, torch.enable_grad():
        assert path.packs_sequences
        assert float(packed_loss(model, batch)[0]) == pytest.approx(expected, rel=1e-4)


def test_class_weights_need_a_classification_task(tiny_llama, tmp_path):
    from slmops.errors import ConfigError
    from slmops.finetune_recipe import plan_finetune

    with pytest.raises(ConfigError, match="--class_weights auto weighs the labels of a classification task"):
        plan_finetune(tiny_config(tiny_llama, tmp_path / "a", task="generation", class_weights="auto"))
