"""End to end on the real built-in model (SmolLM2-135M-Instruct from the package index):
the seed commands as the issue writes them, the demo, and PEFT reloading our outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.needs_default_model]

TONE = str(ROOT / "examples" / "data" / "tone.jsonl")
CODES = str(ROOT / "examples" / "data" / "tiny_codes.jsonl")
LLAMA3_TONE = "<|start_header_id|>user<|end_header_id|>\\n{phrase}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n{tone}"
CODES_TEMPLATE = "### Language: {programming_language} \\n### Question: {prompt} \\n### Answer: {response}"


def slmops(*args: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "slmops.cli.main", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_builtin_model_answers_like_smollm2(builtin_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_model)
    model = AutoModelForCausalLM.from_pretrained(builtin_model)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    source = json.loads((builtin_model / "slmops_source.json").read_text())
    assert source["sha256"] == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


@pytest.fixture(scope="session")  # session: kept while other modules' tests run between its users
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


def test_demo_tuned_accuracy_beats_base(tmp_path, builtin_model):
    """The README's demo (examples/demo.sh): held-out accuracy, base vs tuned, then the int4
    ONNX bundle with the adapter."""
    env = dict(os.environ, DEMO_OUT=str(tmp_path / "demo"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh")], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("accuracy"))
    tuned, base = (float(x) for x in re.findall(r"\d+\.\d+", row)[:2])
    assert tuned >= 0.8 and tuned > base + 0.3, proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("accuracy")]
    assert len(rows) == 2 and float(re.findall(r"\d+\.\d+", rows[1])[0]) >= 0.8, proc.stdout  # the int4 bundle + tone
    manifest = json.loads((tmp_path / "demo" / "onnx-int4" / "slmops_bundle.json").read_text())
    # int4 MatMuls, the sensitive layers int8, LoRA slots on every projection (the fp32 bundle of this 135M model: ~520 MB)
    assert manifest["size_mb"] < 150, manifest["size_mb"]


def test_seed_qlora_commands(tmp_path, builtin_model):
    """Seed commands 2 and 3 with their flags as written, for one step each (the full 150
    steps are measured in the issue notes, not in CI: a step of 16 sequences of up to 1,024
    tokens takes ~30 s on a 2-core CPU without AVX-512), evaluating once, on 16 long eval rows."""
    out = slmops("finetune", "--method", "qlora", "--model_name_or_path", "smollm2-135m-instruct", "--data_name", CODES,
                 "--train_split", "train[:4096]", "--eval_split", "train[4096:4112]", "--text_template", CODES_TEMPLATE,
                 "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--max_steps", "1",
                 "--logging_steps", "50", "--eval_steps", "1", "--output_path", "adapters/tiny-codes", cwd=tmp_path)
    assert "bf16 LoRA (--method lora) is faster" in out
    adapter = tmp_path / "adapters" / "tiny-codes" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    slmops("finetune", "--method", "qlora", "--gradient_checkpointing", "true", "--per_device_train_batch_size", "1",
           "--gradient_accumulation_steps", "16", "--model_name_or_path", "smollm2-135m-instruct", "--data_name", CODES,
           "--train_split", "train[:64]", "--text_template", CODES_TEMPLATE, "--max_steps", "1", "--output_path", "ga", cwd=tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "ga" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and torch.isfinite(torch.tensor(metrics[-1]["loss"]))


def test_seed_logging_command(tmp_path, builtin_model):
    """Seed command 4: logging, eval, save and TensorBoard flags (one short example a step:
    the flags are under test here, not learning)."""
    slmops("finetune", "--logging_steps", "10", "--eval_steps", "50", "--save_steps", "100", "--logging_dir", "./logs",
           "--report_to", "tensorboard", "--model_name_or_path", "smollm2-135m-instruct", "--data_name", TONE,
           "--train_split", "train[:600]", "--eval_split", "train[600:620]", "--text_template", "Phrase: {phrase}\\nTone: {tone}",
           "--max_steps", "100", "--per_device_train_batch_size", "1", "--output_path", "out", cwd=tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [50, 100]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(10, 101, 10))
    step = tmp_path / "out" / "checkpoints" / "step-000100"
    manifest = json.loads((step / "manifest.json").read_text())  # resumable, and nothing pickled
    assert "optimizer.safetensors" in manifest["files"] and not list(step.rglob("*.pt"))


HELD_OUT = ["I am furious about the late train, this is unacceptable.", "What a wonderful surprise the party was!",
            "The report is scheduled for Monday at nine."]


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


SHARED_TWEETS = ROOT.parent / "shared" / "data" / "tweeteval-emotion"  # research data, read where the machine has it
REAL_DATA = {
    "tone": {"data_name": TONE, "text_template": "Classify the tone of the phrase as joyful, angry, sad, fearful or neutral.\\nPhrase: "
                                                  "{phrase}\\nTone: {tone}"},
    "library_qa_chat": {"data_name": str(ROOT / "examples" / "data" / "library_qa.json"), "use_chat_template": "true"},
    "tiny_codes_1024": {"data_name": CODES, "text_template": CODES_TEMPLATE, "train_split": "train[:64]", "max_seq_len": "1024",
                        "per_device_train_batch_size": "4"},
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
    from slmops.train.cpu import FastPath, attention
    from slmops.train.loss import packed_loss
    from slmops.train.trainer import Trainer, TrainingData, TrainingSetup

    config = from_flat({**REAL_DATA[dataset], "max_steps": "1", "output_path": str(tmp_path / "o")})
    plan = plan_finetune(config)
    model = build_model(plan)
    with FastPath.install(model) as path:
        setup = TrainingSetup(plan.precision, plan.learning_rate, tmp_path / "c", tmp_path / "l", True)
        for pack_below in (10.0, 0.0):  # pack every batch that can be packed; pack none
            monkeypatch.setattr(attention, "PACK_BELOW", pack_below)
            trainer = Trainer(model, TrainingData(plan.data.train, None, plan.tokenizer.pad_token_id), config.training, setup, path)
            probe = trainer._probe_batch()
            trainer._choose_loss(probe)
            trainer._verify_fast_path(probe)
            assert trainer.fast_path is not None and path.active, path.off_reason
            packable = probe["input_ids"].shape[1] <= attention.SHORT_ATTENTION_MAX_LEN
            assert (trainer.loss_fn is packed_loss) == packable  # the packing check passed where packing applies
            assert (attention.Packing.of(probe["attention_mask"]) is not None) == (packable and pack_below > 1)  # what was verified


def test_seed_search_file_prunes_and_best_yaml_reproduces_the_best_trial(tmp_path, builtin_model):
    """The seed's search space as written, on LoRA of the built-in model with a small per-trial
    budget: six trials, at least one pruned, best.yaml runs again to the best trial's metric."""
    import csv

    import yaml

    search = {
        "search_strategy": {"type": "random", "num_trials": 6},
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
            "lora_r": {"type": "int", "low": 8, "high": 64},
            "batch_size": {"type": "choice", "values": [8, 16, 32]},
        },
        "pruner": {"type": "median", "n_startup_trials": 2},
        "model": {"model_name_or_path": "smollm2-135m-instruct"},
        "data": {"data_name": TONE, "train_split": "train[:200]", "eval_split": "train[500:516]", "max_seq_len": 48,
                 "text_template": "Phrase: {phrase}\nTone: {tone}"},
        "method": {"method": "lora"},
        "training": {"max_steps": 2, "eval_steps": 1, "report_to": "none"},
        "output_path": str(tmp_path / "tune"),
    }
    file = tmp_path / "search.yaml"
    file.write_text(yaml.safe_dump(search, sort_keys=False))
    slmops("tune", "--config", str(file), cwd=tmp_path)
    with (tmp_path / "tune" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["state"] for r in rows} <= {"complete", "pruned"}, rows
    assert any(r["state"] == "pruned" for r in rows), rows
    assert all(8 <= int(r["lora_r"]) <= 64 and r["batch_size"] in ("8", "16", "32") for r in rows)
    best = min((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["loss"]))
    slmops("finetune", "--config", str(tmp_path / "tune" / "best.yaml"), cwd=tmp_path)
    run = yaml.safe_load((tmp_path / "tune" / "best-run" / "run.yaml").read_text())
    assert run["result"]["best_eval_loss"] == pytest.approx(float(best["loss"]), rel=1e-4)
    assert run["config"]["method"]["lora_r"] == int(best["lora_r"])
