"""Classification by likelihood: each label's score is the log-probability the training loss
gives that label as the completion (computed here the training way: the example re-formatted
with the label, tokenized by the training tokenizer, cross-entropy over its labelled tokens),
on PyTorch and on the ONNX bundle; evaluate picks the most likely label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TONE, build_tiny_model
from helpers import run_cli

TEMPLATE = "Phrase: {phrase}\nTone: {tone}"
LABELS = ["angry", "joyful", "neutral", "sad", "fearful"]


def _rows(n: int = 6) -> list[dict]:
    return [json.loads(line) for line in TONE.read_text().splitlines()[:n]]


def _examples(tokenizer, rows: list[dict], template: str = TEMPLATE, chat: bool = False):
    from slmops.config import DataConfig
    from slmops.data.format import build_formatter
    from slmops.data.prepare import format_rows

    data = DataConfig(use_chat_template=True) if chat else DataConfig(text_template=template)
    formatter = build_formatter(data, list(rows[0]), tokenizer)
    return formatter, format_rows(rows, formatter)


def _training_logprob(model, tokenizer, formatter, row: dict, label: str, chat: bool) -> float:
    """-(the training loss summed over the example's labelled tokens) with `label` as its answer."""
    from slmops.data.format import FormattedExample  # noqa: F401 (the type the formatter returns)
    from slmops.data.tokenize import IGNORE, tokenize_examples

    relabelled = dict(row, **({"completion": label} if chat else {"tone": label}))
    data = tokenize_examples([formatter(relabelled)], tokenizer, formatter, 1024)
    ids, labels = torch.tensor([data.input_ids[0]]), torch.tensor(data.labels[0])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    keep = labels[1:] != IGNORE
    return float(-torch.nn.functional.cross_entropy(logits[keep], labels[1:][keep], reduction="sum"))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tokenizer_dir):
    """A tiny Llama with a random LoRA adapter, as a PEFT folder and as an fp32 bundle."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("choices")
    model_dir = build_tiny_model("llama", tokenizer_dir, root / "model", hidden_size=64)
    torch.manual_seed(3)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(root / "adapter")
    from slmops.cli.main import main

    assert main(["optimize", "-m", str(model_dir), "--adapter_path", str(root / "adapter"), "--adapter_names", "tone",
                 "-o", str(root / "bundle"), "--no_parity", "--log_level", "3"]) == 0
    return {"model": model_dir, "adapter": root / "adapter", "bundle": root / "bundle"}


@pytest.mark.parametrize("chat", [False, True], ids=["template", "chat"])
def test_label_scores_are_the_training_log_likelihood_of_each_label(tuned, chat):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmops.data.labels import label_set
    from slmops.evaluate.choices import score_labels
    from slmops.inference import open_backend

    backend = open_backend(str(tuned["model"]), [str(tuned["adapter"])])
    rows = _rows()
    if chat:
        rows = [{"prompt": f"Tone of: {r['phrase']}", "completion": r["tone"]} for r in rows]
    formatter, examples = _examples(backend.tokenizer, rows, chat=chat)
    labels = label_set([ex.completion for ex in examples], LABELS)
    scores = score_labels(backend, examples, labels, None, formatter.add_special_tokens)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tuned["model"]), tuned["adapter"]).eval()
    expected = np.array([[_training_logprob(model, backend.tokenizer, formatter, row, label, chat) for label in labels.labels]
                         for row in rows])
    assert np.allclose(scores, expected, atol=1e-4), (scores, expected)
    assert len(set(np.round(expected[0], 3))) == len(LABELS)  # the labels really differ


def test_output_head_gets_a_contiguous_input_when_scoring_and_generating(tuned):
    """transformers hands the head a strided view of the last positions (logits_to_keep=1);
    torch's CPU linear is ~150x slower on that for a frozen bf16 weight, so the backend copies
    it contiguous (the scores do not change: same values, another memory layout)."""
    from slmops.data.labels import label_set
    from slmops.evaluate.choices import score_labels
    from slmops.inference import GenerationParams, open_backend

    backend = open_backend(str(tuned["model"]), [str(tuned["adapter"])], dtype="bfloat16")
    backend.model.requires_grad_(False)  # frozen, as the base is in training's evaluations
    formatter, examples = _examples(backend.tokenizer, _rows())
    labels = label_set([ex.completion for ex in examples], LABELS)
    head = backend.model.get_output_embeddings()
    seen = []
    watcher = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    try:
        scores = score_labels(backend, examples, labels, None, formatter.add_special_tokens)
        backend.generate_batch([ex.prompt for ex in examples], None, GenerationParams(max_new_tokens=2), True, 4)
        assert seen and all(seen), seen
        head.slmops_contiguous_input.remove()  # as transformers gives it: strided, same scores
        seen.clear()
        strided = score_labels(backend, examples, labels, None, formatter.add_special_tokens)
        assert not all(seen)
    finally:
        watcher.remove()
    assert np.array_equal(scores, strided)


def test_onnx_bundle_scores_labels_as_pytorch_does(tuned):
    from slmops.data.labels import label_set
    from slmops.evaluate.choices import score_labels
    from slmops.inference import open_backend
    from slmops.inference.base import Backend

    torch_backend = open_backend(str(tuned["model"]), [str(tuned["adapter"])])
    bundle = open_backend(str(tuned["bundle"]))
    formatter, examples = _examples(bundle.tokenizer, _rows())
    labels = label_set([ex.completion for ex in examples], LABELS)
    for adapter, torch_adapter in (("tone", None), ("base", "base")):
        ours = score_labels(bundle, examples, labels, adapter, formatter.add_special_tokens)
        reference = score_labels(torch_backend, examples, labels, torch_adapter, formatter.add_special_tokens)
        assert np.allclose(ours, reference, atol=2e-3), (adapter, ours - reference)
    # the cached prefix and batched candidates give what one full pass per candidate gives
    from slmops.evaluate.choices import candidate

    for example, row in zip(examples, score_labels(bundle, examples, labels, "tone", formatter.add_special_tokens)):
        candidates = [candidate(example, label, bundle.tokenizer, formatter.add_special_tokens) for label in labels.labels]
        full = Backend.choice_logprobs(bundle, [ids for ids, _ in candidates], [start for _, start in candidates], "tone")
        assert np.allclose(row, full, atol=1e-4), (row, full)


def test_label_set_keeps_the_data_spelling_and_refuses_answers_outside_given_labels():
    from slmops.errors import DataError
    from slmops.data.labels import label_set, looks_like_classification

    labels = label_set(["Angry", "angry", "angry", "joyful", " joyful "])
    assert labels.labels == ("angry", "joyful") and labels.counts == {"angry": 3, "joyful": 2}
    with pytest.raises(DataError, match="outside the given labels: joyful"):
        label_set(["angry", "joyful"], ["angry", "sad"])
    assert looks_like_classification(["a", "b"] * 4)
    assert not looks_like_classification(["a", "b", "c"])  # too few rows per label to call it a label set
    assert not looks_like_classification([f"answer {i}" for i in range(40)])
    assert not looks_like_classification(["two\nlines", "a"] * 4)


def test_evaluate_scores_labels_by_likelihood_and_generation_stays_available(tuned, tmp_path, capsys):
    """A random model writes no label: generation leaves every answer unparseable, likelihood
    picks one label for each (and writes every label's log-probability beside it)."""
    common = ["evaluate", "-m", str(tuned["model"]), "--adapter_path", str(tuned["adapter"]), "--data_name", str(TONE),
              "--eval_split", "train[:12]", "--text_template", TEMPLATE.replace("\n", "\\n"), "--metrics", "accuracy,f1",
              "--max_new_tokens", "4", "--log_level", "3"]
    code, out = run_cli(capsys, *common, "-o", str(tmp_path / "lik"))
    assert code == 0, out
    code, out = run_cli(capsys, *common, "--scoring", "generation", "-o", str(tmp_path / "gen"))
    assert code == 0, out
    lik = json.loads((tmp_path / "lik" / "results.json").read_text())["models"][0]["metrics"]
    gen = json.loads((tmp_path / "gen" / "results.json").read_text())["models"][0]["metrics"]
    assert lik["scoring"] == "likelihood" and lik["unparseable"] == 0
    assert "scoring" not in gen and gen["unparseable"] > 0
    rows = [json.loads(line) for line in (tmp_path / "lik" / "predictions-0.jsonl").read_text().splitlines()]
    gold = {json.loads(line)["tone"] for line in TONE.read_text().splitlines()[:12]}
    for row in rows:
        assert set(row["label_logprobs"]) == gold
        assert row["label"] == max(row["label_logprobs"], key=row["label_logprobs"].get)
    assert lik["accuracy"] == pytest.approx(sum(r["label"] == r["reference"] for r in rows) / len(rows))
    report = (tmp_path / "lik" / "report.md").read_text()  # per class, then the confusion matrix, each as a table
    assert "| label | precision | recall | F1 | support |" in report and "| gold / predicted |" in report
    for label, row in lik["confusion"].items():
        assert f"| {label} | " + " | ".join(str(v) for v in row.values()) + " |" in report
