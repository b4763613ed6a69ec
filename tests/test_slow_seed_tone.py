"""Seed command 1 (LoRA on the tone data with the Llama-3 template) as written, on the real
built-in model, and what is built on its output: PEFT reproduces it, the fp32 ONNX bundle
(seed step 3), the GGUF export, one base with two adapters switched per request. One file, so
that `make test` (whole files per worker) trains it once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from slow_helpers import HELD_OUT, LLAMA3_TONE, TONE, slmops

pytestmark = [pytest.mark.slow, pytest.mark.needs_default_model]
SUITE_SECONDS = 420  # about, on one test worker (conftest: the longest files start first)


@pytest.fixture(scope="module")
def seed_tone_run(tmp_path_factory, builtin_model) -> Path:
    """Seed command 1, as written (model and data pointed at local sources)."""
    cwd = tmp_path_factory.mktemp("seed1")
    slmops("finetune", "--model_name_or_path", "smollm2-135m-instruct", "--trust_remote_code", "--output_path", "models/llama/ft",
           "--data_name", TONE, "--text_template", LLAMA3_TONE, "--method", "lora", "--max_steps", "100", "--log_level", "1", cwd=cwd)
    return cwd / "models" / "llama" / "ft"


def test_seed_tone_command_learns_and_peft_reproduces_it(seed_tone_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmops.inference import GenerationParams, open_backend

    out = seed_tone_run
    metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [m["loss"] for m in metrics if m["split"] == "train"]
    assert train[-1] < train[0] / 3, train
    prompts = [LLAMA3_TONE.replace("\\n", "\n").split("{tone}")[0].format(phrase=p) for p in
               ["I am furious about the late train, this is unacceptable.", "What a wonderful surprise the party was!",
                "The report is scheduled for Monday at nine."]]
    ours = open_backend(str(out)).generate_batch(prompts, None, GenerationParams(max_new_tokens=6))
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "model"), out / "adapter").eval()
    theirs = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        theirs.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert ours == theirs
    assert [t.strip() for t in theirs] == ["angry", "joyful", "neutral"]


def test_seed_step3_auto_opt_as_written(seed_tone_run):
    """Seed step 3 as written, on the output of seed command 1: the fp32 bundle gives PyTorch's
    greedy tokens with and without the adapter, and with the tone adapter switched on labels
    held-out phrases. (int4 on this model is measured by the demo test: accuracy with the
    adapter, and the bundle's size.)"""
    from slmops.inference import GenerationParams
    from slmops.inference.onnx_backend import OnnxBackend as OnnxBundle

    cwd = seed_tone_run.parents[2]
    slmops("auto-opt", "--model_name_or_path", "models/llama/ft/model", "--adapter_path", "models/llama/ft/adapter", "--device", "cpu",
           "--provider", "CPUExecutionProvider", "--use_ort_genai", "--output_path", "models/llama/onnx", "--log_level", "1", cwd=cwd)
    prompts = [LLAMA3_TONE.replace("\\n", "\n").split("{tone}")[0].format(phrase=p) for p in HELD_OUT]
    bundle_dir = cwd / "models" / "llama" / "onnx"
    parity = json.loads((bundle_dir / "slmops_bundle.json").read_text())["parity"]
    assert set(parity) == {"(no adapter)", "llama"}
    assert all(r["exact"] == r["prompts"] and r["max_logit_diff"] < 1e-2 for r in parity.values()), parity
    bundle = OnnxBundle(bundle_dir)
    answers = [bundle.generate_text(p, "llama", GenerationParams(max_new_tokens=6)).strip() for p in prompts]
    assert answers == ["angry", "joyful", "neutral"]


def test_tuned_model_exported_as_gguf_answers_like_pytorch(seed_tone_run, tmp_path):
    """The tone run merged and written as a q8_0 GGUF for llama.cpp / Ollama: read back (transformers'
    GGUF loader), it labels the held-out phrases as the PyTorch model does, with its own tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = slmops("export", "-m", str(seed_tone_run), "--format", "gguf", "--quantization", "q8_0", "-o", "gguf", cwd=tmp_path)
    assert "model-q8_0.gguf" in out, out
    summary = json.loads((tmp_path / "gguf" / "export.json").read_text())
    # q8_0 (the tied output head included) moves logits by about 1 on this model: 2 of the 3 chat
    # prompts keep all 12 greedy tokens (the base model measured 2/3, 85% of tokens)
    assert summary["check"]["tokenizer_identical"] and summary["check"]["token_agreement"] >= 0.7, summary
    assert summary["size_mb"] < 200
    gguf_dir = tmp_path / "gguf"
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model-q8_0.gguf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model-q8_0.gguf")
    answers = []
    for phrase in HELD_OUT:
        prompt = LLAMA3_TONE.replace("\\n", "\n").split("{tone}")[0].format(phrase=phrase)
        ids = tok(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert answers == ["angry", "joyful", "neutral"], answers
    assert 'PARAMETER stop "<|im_end|>"' in (gguf_dir / "Modelfile").read_text()


def test_two_adapters_one_base_switched_per_request(seed_tone_run, tmp_path):
    """The seed's multi-adapter example: tone and library Q&A adapters trained separately,
    one base exported once; each request picks its adapter and answers as PyTorch does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmops.inference import GenerationParams
    from slmops.inference.onnx_backend import OnnxBackend as OnnxBundle

    slmops("finetune", "--model_name_or_path", "smollm2-135m-instruct", "--data_name", str(ROOT / "examples/data/library_qa.json"),
           "--use_chat_template", "--max_steps", "8", "--learning_rate", "1e-3", "--output_path", "qa", cwd=tmp_path)
    out = slmops("generate-adapter", "--base_model_path", "smollm2-135m-instruct", "--adapter_paths",
                 f"{seed_tone_run / 'adapter'},{tmp_path / 'qa' / 'adapter'}", "--adapter_names", "tone,qa",
                 "--output_path", "multi", cwd=tmp_path)
    assert "parity qa: 3/3 prompts identical" in out and "parity tone: 3/3 prompts identical" in out, out
    bundle = OnnxBundle(tmp_path / "multi")
    tok = bundle.tokenizer
    tone_prompt = LLAMA3_TONE.replace("\\n", "\n").split("{tone}")[0].format(phrase=HELD_OUT[1])
    qa_prompt = tok.apply_chat_template([{"role": "user", "content": "How many books can I borrow at once?"}], tokenize=False,
                                        add_generation_prompt=True)
    requests = [("tone", tone_prompt, True), ("qa", qa_prompt, False), (None, qa_prompt, False), ("tone", tone_prompt, True),
                (None, tone_prompt, True)]
    base = AutoModelForCausalLM.from_pretrained(seed_tone_run / "model").eval()
    torch_models = {None: base}
    for name, path in (("tone", seed_tone_run / "adapter"), ("qa", tmp_path / "qa" / "adapter")):
        torch_models[name] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(seed_tone_run / "model"), path).eval()
    for adapter, prompt, special in requests:  # interleaved on one loaded base
        ids = tok(prompt, add_special_tokens=special)["input_ids"]
        with torch.no_grad():
            gen = torch_models[adapter].generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                                 eos_token_id=sorted(bundle.eos_ids), pad_token_id=0)
        expected = [t for t in gen[0, len(ids):].tolist()]
        expected = expected[: next((i for i, t in enumerate(expected) if t in bundle.eos_ids), len(expected))]
        assert bundle.generate_ids(ids, adapter, 12) == expected, adapter
    assert bundle.generate_text(tone_prompt, "tone", GenerationParams(max_new_tokens=6)).strip() == "joyful"
