import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slmops.errors import ConfigError
from slmops.evaluate.metrics import METRICS, classification_report, get_metrics, normalize_label


def test_classification_report_by_hand():
    gold = ["joy", "joy", "anger", "sadness", "anger"]
    pred = ["Joy.", "anger", "anger", "blah", " anger\nmore"]
    report = classification_report(pred, gold)
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["unparseable"] == 1
    # anger: tp=2 fp=1 fn=0 -> p=2/3 r=1 f1=0.8; joy: tp=1 fp=0 fn=1 -> f1=2/3; sadness: 0
    assert report["per_class"]["anger"]["f1"] == pytest.approx(0.8)
    assert report["per_class"]["joy"]["f1"] == pytest.approx(2 / 3)
    assert report["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    assert report["confusion"] == {  # gold rows, predicted columns, by hand
        "anger": {"anger": 2, "joy": 0, "sadness": 0, "(other)": 0},
        "joy": {"anger": 1, "joy": 1, "sadness": 0, "(other)": 0},
        "sadness": {"anger": 0, "joy": 0, "sadness": 0, "(other)": 1},
    }
    # a label set given (likelihood scoring): a predicted label the gold answers lack is a class, not
    # unparseable; labels neither in the gold answers nor predicted are not scored (scikit-learn's rule)
    chosen = classification_report(["fear", "joy"], ["joy", "joy"], labels=["fear", "joy", "sad"])
    assert chosen["unparseable"] == 0 and set(chosen["per_class"]) == {"fear", "joy"}
    assert chosen["macro_f1"] == pytest.approx((0 + 2 / 3) / 2) and chosen["confusion"] == {"joy": {"fear": 1, "joy": 1}}
    assert normalize_label("  Joyful!\nextra") == "joyful"
    # a label named once as a whole word counts; two labels named is ambiguous
    assert classification_report(["I am angry.", "joy or anger"], ["anger", "joy"])["accuracy"] == 0.0
    assert classification_report(["I feel anger.", "joy or anger"], ["anger", "joy"])["accuracy"] == 0.5


def test_bleu_and_rouge_match_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "a quick brown fox"]
    refs = ["the cat is on the mat", "the quick brown fox jumps"]
    assert METRICS["bleu"].compute(predictions=preds, references=refs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 2
    assert METRICS["rouge"].compute(predictions=preds, references=refs)["rougeL"] == pytest.approx(expected)


def test_unknown_metric_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'accuracy'"):
        get_metrics(["acuracy"])


def test_perplexity_matches_direct_computation(tiny_llama):
    from slmops.config import DataConfig
    from slmops.data.prepare import prepare_data
    from slmops.inference.torch_backend import TorchBackend

    from conftest import TONE

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    data = prepare_data(DataConfig(data_name=str(TONE), train_split="train[:6]", text_template="{phrase} {tone}", train_on_inputs=True), tok).train
    loss_sum, count = TorchBackend(model, tok, "tiny").loss(data, batch_size=4)
    ppl = METRICS["perplexity"].compute(loss_sum=loss_sum, token_count=count)["perplexity"]
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in data.input_ids:
            x = torch.tensor([ids])
            logits = model(x).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += len(ids) - 1
    assert count == n
    assert ppl == pytest.approx(math.exp(total / n), rel=1e-4)


def test_evaluate_cli_compares_models(tiny_llama, tmp_path, capsys):
    from slmops.cli.main import main
    from slmops.finetune_recipe import finetune

    from conftest import TONE, TONE_TEMPLATE
    from helpers import tiny_config

    out = tmp_path / "ft"
    finetune(tiny_config(tiny_llama, out, max_steps=6))
    code = main(["evaluate", "-m", str(out), "--compare_to", "base", "-d", str(TONE), "--eval_split", "train[600:620]",
                 "--text_template", TONE_TEMPLATE, "--metrics", "accuracy,f1,perplexity", "--max_new_tokens", "4",
                 "-o", str(tmp_path / "ev"), "--log_level", "3"])
    text = capsys.readouterr().out
    assert code == 0
    assert "accuracy" in text and "(base)" in text and "delta" in text
    import json

    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    tuned, base = results["models"]
    assert tuned["metrics"]["perplexity"] < base["metrics"]["perplexity"]
    assert (tmp_path / "ev" / "predictions-0.jsonl").read_text().count("\n") == 20
    page = (tmp_path / "ev" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # a confusion matrix per model


def test_adapter_on_wrong_base_is_refused(tiny_models, tmp_path):
    from slmops.errors import ModelError
    from slmops.inference.torch_backend import TorchBackend
    from slmops.finetune_recipe import finetune

    from helpers import tiny_config

    out = tmp_path / "gpt2ft"
    finetune(tiny_config(tiny_models["gpt2"], out, max_steps=1))
    with pytest.raises(ModelError, match="another base"):
        TorchBackend.load(str(tiny_models["llama"]), [str(out / "adapter")])


def test_adapter_from_a_wider_model_is_refused(tiny_llama, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slmops.errors import ModelError
    from slmops.inference.torch_backend import TorchBackend
    from slmops.finetune_recipe import finetune

    from helpers import tiny_config

    wide = tmp_path / "wide"
    base = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=AutoTokenizer.from_pretrained(tokenizer_dir).__len__(), hidden_size=64,
                                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2, initializer_range=0.3))
    base.save_pretrained(wide)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(wide)
    finetune(tiny_config(wide, tmp_path / "ft", max_steps=1))
    with pytest.raises(ModelError, match="64 in the adapter"):
        TorchBackend.load(str(tiny_llama), [str(tmp_path / "ft" / "adapter")])
