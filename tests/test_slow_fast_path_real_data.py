"""The CPU fast path's start-up check on every data set the project ships (and TweetEval where
../shared has it), on the real built-in model. Its own file: `make test` hands out whole files
to its workers, and these checks run long sequences through the 135M model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import ROOT
from slow_helpers import CODES, CODES_TEMPLATE, TONE

pytestmark = [pytest.mark.slow, pytest.mark.needs_default_model]
SUITE_SECONDS = 160  # about, on one test worker (conftest: the longest files start first)

SHARED_TWEETS = ROOT.parent / "shared" / "data" / "tweeteval-emotion"  # research data, read where the machine has it
REAL_DATA = {
    "tone": {"data_name": TONE, "text_template": "Classify the tone of the phrase as joyful, angry, sad, fearful or neutral.\\nPhrase: "
                                                  "{phrase}\\nTone: {tone}"},
    "library_qa_chat": {"data_name": str(ROOT / "examples" / "data" / "library_qa.json"), "use_chat_template": "true"},
    "tiny_codes": {"data_name": CODES, "text_template": CODES_TEMPLATE, "train_split": "train[:64]", "max_seq_len": "1024",
                   "per_device_train_batch_size": "4"},
    # long documents (each exchange is under 140 tokens): sessions of 5-9 tiny-codes exchanges, 600-1,024 tokens, as the
    # training benchmark's codes workload builds them; written by the test (SESSIONS marks the path)
    "tiny_codes_sessions": {"data_name": "SESSIONS", "text_field": "text", "max_seq_len": "1024", "per_device_train_batch_size": "4"},
    **({"tweeteval": {"data_name": str(SHARED_TWEETS), "train_split": "train[:64]",
                      "text_template": "Classify the emotion of the tweet as anger, joy, optimism or sadness.\\nTweet: {text}\\nEmotion: {label}"}}
       if SHARED_TWEETS.is_dir() else {}),
}


@pytest.mark.parametrize("dataset", list(REAL_DATA))
def test_fast_path_check_passes_on_real_data(dataset, builtin_model, tmp_path, monkeypatch):
    """The fast path's start-up check keeps the path on every data set the project ships (and
    TweetEval where ../shared has it), at the precision this machine trains in (bf16 where the
    CPU has AMX or AVX512-BF16: there the model's own forward is noisy enough on long or chat
    sequences to have turned the path off before the fp32 arbitration), with padding-free
    batches forced on, then off. (The arbitration itself is tested on every machine in
    tests/test_fast_lora.py.)"""
    from slmops.config import from_flat
    from slmops.finetune_recipe import build_model, plan_finetune
    from slmops.train.cpu import FastPath, packing as fast_packing
    from slmops.train.loss import packed_loss, shares_a_prefix
    from slmops.train.trainer import Trainer, TrainingData, TrainingSetup

    options = dict(REAL_DATA[dataset])
    if options["data_name"] == "SESSIONS":
        exchanges = [json.loads(line) for line in open(CODES)][:200]
        sessions, start = [], 0
        for size in [5, 9, 7, 6, 8] * 5:
            text = "\n\n".join(f"### Language: {r['programming_language']} \n### Question: {r['prompt']} \n### Answer: {r['response']}"
                                for r in exchanges[start : start + size])
            sessions.append(json.dumps({"text": text}) + "\n")
            start += size
        options["data_name"] = str(tmp_path / "sessions.jsonl")
        (tmp_path / "sessions.jsonl").write_text("".join(sessions))
    config = from_flat({**options, "max_steps": "1", "output_path": str(tmp_path / "o")})
    plan = plan_finetune(config)
    model = build_model(plan)
    with FastPath.install(model) as path:
        setup = TrainingSetup(plan.precision, plan.learning_rate, tmp_path / "c", tmp_path / "l", True)
        # the policy this machine trains with (attention per sequence where products are fp32), and the padded one
        machine = path.packing_policy(plan.precision.autocast or plan.precision.weights)
        for policy in dict.fromkeys([machine, fast_packing.PADDED_ATTENTION]):
            for pack_below in (10.0, 0.0):  # pack every batch that can be packed; pack none
                forced = dataclasses.replace(policy, pack_below=pack_below)
                monkeypatch.setattr(path, "packing_policy", lambda dtype, forced=forced: forced)
                trainer = Trainer(model, TrainingData(plan.data.train, None, plan.tokenizer.pad_token_id), config.training, setup, path)
                probe = trainer._probe_batch()
                trainer._choose_loss(probe)
                trainer._verify_fast_path(probe)
                assert trainer.fast_path is not None and path.active, path.off_reason
                # the packing check passed; a policy that shares prefixes keeps sharing wherever the first examples have a
                # loss-free prefix to check it on (the chat template's system prompt, an instruction template's opening),
                # and the check of sharing passed there too
                checkable = shares_a_prefix(probe) or shares_a_prefix({key: value[[0, 0]] for key, value in probe.items()})
                assert trainer.loss_fn.func is packed_loss
                assert trainer.packing_policy == (forced if checkable or not forced.share_prefix else forced.unshared())
                if forced.share_prefix and dataset in ("tone", "library_qa_chat"):
                    assert checkable and trainer.packing_policy.share_prefix
                long = fast_packing.Packing.of(probe["attention_mask"], only_if_it_pays=False, policy=forced).long
                assert long == (dataset == "tiny_codes_sessions")  # long sequences: checked on the per-sequence attention
                # what was verified: packed where it pays (long batches always)
                assert (fast_packing.Packing.of(probe["attention_mask"], policy=forced) is not None) == (pack_below > 1 or long)
