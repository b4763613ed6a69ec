"""Custom losses (--loss FILE.py:Class): the call contract, exact training with a user loss,
pair data for a contrastive embedding adapter, and errors that name the file and line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from helpers import tiny_config

from slmops.errors import ConfigError
from slmops.finetune_recipe import build_model, finetune, plan_finetune
from slmops.train.monitor import read_metrics

EXAMPLES = ROOT / "examples" / "custom_loss.py"
PAIRS = ROOT / "examples" / "data" / "tone_pairs.jsonl"


def test_label_smoothed_cross_entropy_trains_exactly_like_pytorch_by_hand(tiny_llama, tmp_path, caplog):
    """A custom loss computing cross_entropy(label_smoothing=0.1) on the contract's labelled
    logits gives, step for step, the run of a hand-written loop with PyTorch's own loss (same
    init, batches, optimizer, schedule and clipping) — with the CPU fast path on."""
    from transformers import get_scheduler

    from slmops.data.batching import collate, epoch_batches
    from slmops.data.tokenize import IGNORE
    from slmops.train.optimizer import build_optimizer

    steps = 6
    flags = dict(max_steps=steps, lora_dropout=0.0, logging_steps=1, learning_rate=1e-2, train_split="train[:48]",
                 lr_scheduler_type="linear", warmup_ratio=0.0, target_modules="q_proj,k_proj,v_proj,o_proj")  # (what the loop runs)
    with caplog.at_level("INFO", logger="slmops"):
        finetune(tiny_config(tiny_llama, tmp_path / "custom", loss=f"{EXAMPLES}:LabelSmoothedCrossEntropy",
                             loss_kwargs="smoothing=0.1", **flags))
    assert "loss: custom, LabelSmoothedCrossEntropy (custom_loss.py)" in caplog.text
    assert "fast CPU path: off" not in caplog.text and "LoRA layers" in caplog.text  # the path stayed on with the custom loss
    ours = [r["loss"] for r in read_metrics(tmp_path / "custom" / "logs" / "metrics.jsonl") if r["split"] == "train"]

    config = tiny_config(tiny_llama, tmp_path / "hand", **flags)
    plan = plan_finetune(config)
    model = build_model(plan).train()  # same seed: the same adapter initialisation
    optimizer = build_optimizer(model, config.training, plan.learning_rate)
    scheduler = get_scheduler(config.training.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = epoch_batches(plan.data.train.lengths, config.training.per_device_train_batch_size, config.training.seed, 0, False)
    theirs = []
    for step in range(steps):
        batch = collate(plan.data.train, batches[step], plan.tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        loss = F.cross_entropy(logits[mask].float(), targets[mask], label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        theirs.append(float(loss))
    assert ours == pytest.approx(theirs, rel=1e-4)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "custom" / "adapter" / "adapter_model.safetensors")
    mine = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    # Adam divides by the root of the squared gradients, so an element whose gradients are at
    # float noise level moves by up to lr per step either way: 1e-5 absolute (a thousandth of
    # lr) is float drift, a wrong loss or gradient moves weights by lr-sized amounts
    for key, value in saved.items():
        torch.testing.assert_close(value, mine[key], rtol=1e-4, atol=1e-5)


def test_contrastive_loss_on_pairs_pulls_same_tone_together(tiny_llama, tmp_path):
    """The shipped CustomContrastiveLoss on the shipped tone pairs: the loss falls, and on the
    training pairs same-tone phrases end closer than different-tone ones by more than before."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("custom_loss_example", EXAMPLES)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()][:64]

    def separation(model, tokenizer) -> float:
        with torch.no_grad():
            embedded = []
            for key in ("text1", "text2"):
                enc = tokenizer([r[key] for r in rows], return_tensors="pt", padding=True)
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
                embedded.append(example.mean_pool(hidden, enc["attention_mask"]))
            distance = (embedded[0] - embedded[1]).norm(dim=-1)
        labels = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
        return float(distance[~labels].mean() - distance[labels].mean())

    out = tmp_path / "embed"
    config = tiny_config(tiny_llama, out, data_name=str(PAIRS), train_split="train[:64]", text_template=None, max_steps=30,
                         learning_rate=1e-2, loss=f"{EXAMPLES}:CustomContrastiveLoss", loss_kwargs="margin=1.0", logging_steps=5)
    result = finetune(config)
    losses = [r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if r["split"] == "train"]
    assert losses[-1] < losses[0] * 0.7, losses
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    before = separation(base, tokenizer)
    after = separation(PeftModel.from_pretrained(base, result.adapter_path).eval(), tokenizer)
    assert after > before + 0.05, (before, after)


def test_pair_data_is_tokenized_and_batched_for_the_loss(tiny_llama, tmp_path):
    from slmops.data.batching import collate

    plan = plan_finetune(tiny_config(tiny_llama, tmp_path / "o", data_name=str(PAIRS), train_split="train[:8]", text_template=None,
                                     loss=f"{EXAMPLES}:CustomContrastiveLoss"))
    assert plan.data.formatter.name == "pairs" and len(plan.data.train) == 8
    batch = collate(plan.data.train, [0, 1, 2], plan.tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "input_ids_2", "attention_mask_2", "label"}
    assert batch["input_ids_2"].shape == batch["attention_mask_2"].shape and batch["label"].tolist() == [1.0, 0.0, 1.0]
    assert (batch["labels"] == -100).all()  # no language-model loss on pairs


@pytest.mark.parametrize("body,message", [
    ("import torch\nfrom torch import nn\nclass Loss(nn.Module):\n    def forward(self, inputs):\n        return inputs.logits.sum(-1)\n",
     "returned a tensor of shape"),
    ("import torch\nfrom torch import nn\nclass Loss(nn.Module):\n    def forward(self, inputs):\n        return inputs.logits.sum() * float('nan')\n",
     "returned nan on the first batch"),
    ("import torch\nfrom torch import nn\nclass Loss(nn.Module):\n    def forward(self, inputs):\n        return torch.tensor(1.0)\n",
     "does not depend on the trained weights"),
    ("import torch\nfrom torch import nn\nclass Loss(nn.Module):\n    def forward(self, inputs):\n        return inputs.batch['nope'].sum()\n",
     "failed on the first batch: KeyError: 'nope' (loss.py, line 5)"),
])
def test_a_bad_loss_is_refused_on_the_first_batch_before_training(tiny_llama, tmp_path, body, message):
    file = tmp_path / "loss.py"
    file.write_text(body)
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune(tiny_config(tiny_llama, out, loss=f"{file}:Loss"))
    assert not (out / "run.yaml").exists() and not (out / "checkpoints").exists()
