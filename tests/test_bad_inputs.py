"""A catalogue of bad inputs, one case each, across every command. Each case must end with a
non-zero exit, one line that names the problem (the expected words below), no traceback,
and nothing changed on disk: not in the output folder, not in the inputs.

Cases marked `loads_model=False` (most) must also fail before any model weights are read."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import TONE, TONE_TEMPLATE, build_tiny_model

from slmops.cli.main import main


@dataclass
class Case:
    id: str
    args: list[str]  # {model} {model64} {data} {out} {run} {bundle} {adapter} {dora} {tmp} are filled in
    message: str  # words the error line must contain
    loads_model: bool = False  # the problem can only show once a model is loaded
    setup: object = None  # setup(tmp: Path) -> None, writes the bad files the case needs
    out: str = "none"  # the output folder: none (must stay absent), run (a copy of a finished run), notes (user files)
    extra: dict = field(default_factory=dict)


def _write(rel: str, text: str | bytes):
    def setup(tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)

    return setup


def _corrupt_model(tmp: Path, world) -> None:
    shutil.copytree(world["model"], tmp / "bad_model")
    weights = tmp / "bad_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])


def _truncated_gguf(tmp: Path, world) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp / "full.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = (tmp / "full.gguf").read_bytes()
    (tmp / "full.gguf").unlink()
    (tmp / "half.gguf").write_bytes(data[: len(data) // 2])


def _pickle_checkpoint(tmp: Path, world) -> None:
    """An old-format (pickled) checkpoint whose rng.pt would run a command when unpickled."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'PWNED'}",))

    step = tmp / "o" / "checkpoints" / "step-000004"
    for name in ("manifest.json", "optimizer.json", "optimizer.safetensors", "scheduler.json", "rng.json"):
        (step / name).unlink(missing_ok=True)
    torch.save({"torch": Payload(), "numpy": None, "python": None}, step / "rng.pt")


def _truncate_checkpoint(tmp: Path, world) -> None:
    file = tmp / "o" / "checkpoints" / "step-000004" / "trainable.safetensors"
    file.write_bytes(file.read_bytes()[:100])


def _corrupt_adapter(tmp: Path, world) -> None:
    shutil.copytree(world["adapter"], tmp / "bad_adapter")
    weights = tmp / "bad_adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def _corrupt_bundle(tmp: Path, world) -> None:
    shutil.copytree(world["bundle"], tmp / "bad_bundle")
    (tmp / "bad_bundle" / "genai_config.json").write_text("{not json")


def _hold_lock(tmp: Path, world) -> None:
    from slmops.outputs import OutputLock

    world["held_lock"] = OutputLock.acquire(tmp / "o")


def _adapter_of(base_key: str):
    """A PEFT adapter trained on world[base_key] (to be refused on a base of another size)."""

    def setup(tmp: Path, world) -> None:
        shutil.copytree(world[f"adapter_of_{base_key}"], tmp / "other_adapter")

    return setup


FT = ["finetune", "-m", "{model}", "-d", "{data}", "--text_template", TONE_TEMPLATE, "-o", "{out}", "--report_to", "none"]
FT_RUN = [*FT, "--train_split", "train[:32]", "--max_seq_len", "64", "--lora_r", "8", "--eval_split", "none"]  # world["run"]'s settings
EV = ["evaluate", "-m", "{model}", "-d", "{data}", "--text_template", TONE_TEMPLATE, "--eval_split", "train[:4]"]
EVB = ["evaluate", "-m", "{bundle}", "-d", "{data}", "--text_template", TONE_TEMPLATE, "--eval_split", "train[:4]", "--metrics", "accuracy"]
AO = ["auto-opt", "-m", "{model64}", "-o", "{out}", "--no_parity"]
TONE_ROWS = '{"phrase": "a", "tone": "joyful"}\n'

CASES = [
    # ---- finetune: flags and values ----------------------------------------------------
    Case("ft-unknown-flag", [*FT, "--max_step", "3"], "unknown flag --max_step. Did you mean '--max_steps'?"),
    Case("ft-unknown-flag-dashed", [*FT, "--lora-rr", "2"], "unknown flag --lora-rr"),
    Case("ft-not-an-int", [*FT, "--max_steps", "many"], "--max_steps: Input should be a valid integer"),
    Case("ft-max-steps-zero", [*FT, "--max_steps", "0"], "--max_steps: must be a positive number of steps, or -1"),
    Case("ft-max-steps-negative", [*FT, "--max_steps", "-5"], "--max_steps: must be a positive number of steps"),
    Case("ft-unknown-method", [*FT, "--method", "lorra"], "unknown method 'lorra'. Did you mean 'lora'?"),
    Case("ft-bad-bool", [*FT, "--bf16", "maybe"], "--bf16: Input should be a valid boolean"),
    Case("ft-dropout-range", [*FT, "--lora_dropout", "1.5"], "--lora_dropout: Input should be less than 1"),
    Case("ft-bf16-and-fp16", [*FT, "--bf16", "true", "--fp16", "true"], "--bf16 and --fp16 are both on"),
    Case("ft-fp16-on-cpu", [*FT, "--fp16", "true"], "--fp16 needs a CUDA GPU"),
    Case("ft-max-samples-zero", [*FT, "--max_samples", "0"], "--max_samples: Input should be greater than 0"),
    Case("ft-unknown-format", [*FT, "--data_format", "sharegpt"], "--data_format: Input should be"),
    Case("ft-modules-to-save-full", [*FT, "--method", "full", "--modules_to_save", "lm_head"], "--modules_to_save applies to adapter methods"),
    Case("ft-eval-latency", [*FT, "--eval_split", "train[:8]", "--eval_metrics", "latency"], "latency is measured by `slmops evaluate`"),
    Case("ft-eval-metrics-no-split", [*FT, "--eval_metrics", "accuracy"], "--eval_metrics needs --eval_split"),
    Case("ft-best-metric-missing", [*FT, "--eval_split", "train[:8]", "--metric_for_best_model", "f1_macro"],
         "--metric_for_best_model 'f1_macro' is not computed"),
    Case("ft-best-metric-no-split", [*FT, "--metric_for_best_model", "macro_f1"],
         "--metric_for_best_model macro_f1 is measured on held-out data: give --eval_split"),
    Case("ft-task-not-labels", [*FT, "--data_name", str(TONE.with_name("library_qa.json")), "--text_template", "Q: {input} A: {output}",
                                "--task", "classification"], "distinct answers, more than a label set of at most 32"),
    Case("ft-class-weights-free-text", [*FT, "--task", "generation", "--class_weights", "auto"],
         "--class_weights auto weighs the labels of a classification task"),
    Case("ft-class-weights-typo", [*FT, "--class_weights", "balanced"], "--class_weights: Input should be 'none' or 'auto'"),
    Case("ft-eval-auto-tiny", [*FT, "--train_split", "train[:6]", "--eval_split", "auto"], "--eval_split auto holds out 10%"),
    Case("ev-labels-missing-one", [*EV, "--labels", "angry,joyful"], "--labels: the data has answers outside the given labels",
         loads_model=True),  # the gold answers are known once the model's tokenizer formats the rows (as ev-multiline-labels)
    # ---- finetune: the model ------------------------------------------------------------
    Case("ft-unknown-builtin", [*FT, "-m", "smollm3-135m"], "not a built-in model"),
    Case("ft-missing-model-path", [*FT, "-m", "./no/such/model"], "model path './no/such/model' does not exist"),
    Case("ft-folder-not-a-model", [*FT, "-m", "{tmp}/empty"], "holds no config.json", setup=_write("empty/readme.txt", "x")),
    Case("ft-corrupt-gguf-magic", [*FT, "-m", "{tmp}/model.gguf"], "not a GGUF file", setup=_write("model.gguf", b"NOPE" + b"\0" * 64)),
    Case("ft-truncated-gguf", [*FT, "-m", "{tmp}/half.gguf"], "is corrupt or truncated", setup=_truncated_gguf),
    Case("ft-corrupt-safetensors", [*FT, "-m", "{tmp}/bad_model"], "is corrupt or truncated", setup=_corrupt_model),
    Case("ft-unknown-target", [*FT, "--target_modules", "q_projj"], "'q_projj' not found"),
    Case("ft-adapter-path-not-peft", [*FT, "--adapter_path", "{tmp}"], "holds no adapter_config.json"),
    # ---- finetune: the data -------------------------------------------------------------
    Case("ft-missing-data", [*FT, "-d", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
    Case("ft-template-field", [*FT, "--text_template", "{phrase} {mood}"], "'mood' not in the data"),
    Case("ft-template-no-fields", [*FT, "--text_template", "just text"], "has no {column} placeholders"),
    Case("ft-template-invalid", [*FT, "--text_template", "{phrase"], "is not a valid template"),
    Case("ft-split-out-of-range", [*FT, "--train_split", "train[4096:4224]"], "out of range: split 'train' has 650 rows"),
    Case("ft-split-empty", [*FT, "--eval_split", "train[10:10]"], "selects no rows"),
    Case("ft-split-syntax", [*FT, "--train_split", "train[:abc]"], "cannot parse split"),
    Case("ft-split-name", [*FT, "--train_split", "test"], "split 'test' not found"),
    Case("ft-malformed-json-line", [*FT, "-d", "{tmp}/bad.jsonl"], "malformed JSON on line 2",
         setup=_write("bad.jsonl", TONE_ROWS + '{"phrase": "c" "tone": "d"}\n')),
    Case("ft-json-not-object", [*FT, "-d", "{tmp}/bad.jsonl"], "line 2 is not a JSON object", setup=_write("bad.jsonl", TONE_ROWS + "[1, 2]\n")),
    Case("ft-non-utf8", [*FT, "-d", "{tmp}/latin1.jsonl"], "line 2 is not valid UTF-8 (byte 0xe9",
         setup=_write("latin1.jsonl", TONE_ROWS.encode() + '{"phrase": "caf\u00e9", "tone": "sad"}\n'.encode("latin-1"))),
    Case("ft-ragged-csv", [*FT, "-d", "{tmp}/rag.csv"], "Expected 2 fields in line 3, saw 3", setup=_write("rag.csv", "phrase,tone\na,b\nc,d,e\n")),
    Case("ft-empty-csv", [*FT, "-d", "{tmp}/empty.csv"], "the CSV file is empty", setup=_write("empty.csv", "")),
    Case("ft-empty-jsonl", [*FT, "-d", "{tmp}/empty.jsonl"], "is empty", setup=_write("empty.jsonl", "\n")),
    Case("ft-null-field", [*FT, "-d", "{tmp}/nulls.jsonl"], "row 2 ('tone')",
         setup=_write("nulls.jsonl", TONE_ROWS + '{"phrase": "b", "tone": null}\n' + TONE_ROWS)),
    Case("ft-missing-field", [*FT, "-d", "{tmp}/gaps.jsonl"], "have no value for a field the format needs: row 3 ('tone')",
         setup=_write("gaps.jsonl", TONE_ROWS * 2 + '{"phrase": "c"}\n')),
    Case("ft-unsupported-extension", [*FT, "-d", "{tmp}/data.xml"], "unsupported data file type '.xml'", setup=_write("data.xml", "<a/>")),
    Case("ft-folder-without-data", [*FT, "-d", "{tmp}/nodata"], "holds no data files", setup=_write("nodata/readme.md", "x")),
    Case("ft-chat-without-messages", ["finetune", "-m", "{model}", "-d", "{data}", "--use_chat_template", "-o", "{out}"],
         "cannot tell how to turn rows into text"),
    # ---- finetune: the output folder, resume, config files --------------------------------
    Case("ft-output-is-file", [*FT, "-o", "{tmp}/file"], "is a file, not a folder", setup=_write("file", "keep me")),
    Case("ft-output-under-file", [*FT, "-o", "{tmp}/file/sub"], "which is a file", setup=_write("file", "keep me")),
    Case("ft-output-unwritable", [*FT, "-o", "/proc/slmops-test/o"], "cannot write to --output_path"),
    Case("ft-output-holds-files", FT, "already holds files (notes.txt)", out="notes"),
    Case("ft-output-holds-run", FT, "already holds another slmops run", out="run"),
    Case("ft-overwrite-foreign-folder", [*FT, "--overwrite"], "--overwrite refused", out="notes"),
    Case("ft-overwrite-corrupt-model", [*FT, "--overwrite", "-m", "{tmp}/bad_model"], "is corrupt or truncated", out="run", setup=_corrupt_model),
    Case("ft-folder-in-use", [*FT_RUN, "--resume_from_checkpoint", "latest"], "is in use by another slmops run (PID", out="run", setup=_hold_lock),
    Case("ft-resume-no-checkpoint", [*FT, "--resume_from_checkpoint", "latest"], "no checkpoint in", out="notes"),
    Case("ft-resume-not-a-folder", [*FT, "--resume_from_checkpoint", "{tmp}/nope"], "is not a checkpoint folder"),
    Case("ft-resume-other-rank", [*FT_RUN, "--resume_from_checkpoint", "latest", "--lora_r", "4"],
         "belongs to another run (method.lora_r: 8 in the checkpoint, 4 now)", out="run"),
    Case("ft-resume-other-data", [*FT_RUN, "--resume_from_checkpoint", "latest", "--train_split", "train[8:40]"],
         "data.train_examples", out="run"),
    Case("ft-resume-truncated", [*FT_RUN, "--resume_from_checkpoint", "latest"], "is corrupt: trainable.safetensors has 100 bytes",
         out="run", setup=_truncate_checkpoint),
    Case("ft-resume-pickle-unchecked", [*FT_RUN, "--resume_from_checkpoint", "latest"], "has no manifest", out="run", setup=_pickle_checkpoint),
    Case("ft-resume-pickle-forced", [*FT_RUN, "--resume_from_checkpoint", "latest", "--ignore_mismatch"],
         "it asks for GLOBAL posix.system", out="run", setup=_pickle_checkpoint, loads_model=True, extra={"not_created": "PWNED"}),
    Case("ft-config-missing", ["finetune", "--config", "{tmp}/nope.yaml"], "config file"),
    Case("ft-config-bad-yaml", ["finetune", "--config", "{tmp}/c.yaml"], "is not valid YAML", setup=_write("c.yaml", "model: [unclosed\n")),
    Case("ft-config-not-mapping", ["finetune", "--config", "{tmp}/c.yaml"], "must hold a mapping", setup=_write("c.yaml", "- a\n- b\n")),
    Case("ft-config-unknown-key", ["finetune", "--config", "{tmp}/c.yaml"], "unknown key 'training.max_step'",
         setup=_write("c.yaml", "training:\n  max_step: 3\n")),
    Case("ft-config-misplaced-key", ["finetune", "--config", "{tmp}/c.yaml"], "It belongs under 'method'",
         setup=_write("c.yaml", "training:\n  lora_r: 3\n")),
    # ---- finetune: a custom loss ----------------------------------------------------------
    Case("ft-loss-missing-file", [*FT, "--loss", "{tmp}/nope.py:Loss"], "nope.py' does not exist"),
    Case("ft-loss-format", [*FT, "--loss", "{tmp}/loss.py"], "write it as FILE.py:ClassName", setup=_write("loss.py", "")),
    Case("ft-loss-missing-class", [*FT, "--loss", "{tmp}/loss.py:Los"], "has no nn.Module class 'Los'. Did you mean 'Loss'?",
         setup=_write("loss.py", "from torch import nn\nclass Loss(nn.Module):\n    pass\n")),
    Case("ft-loss-bad-argument", [*FT, "--loss", "{tmp}/loss.py:Loss", "--loss_kwargs", "margn=1"],
         "Loss(margn=1) failed: TypeError", setup=_write("loss.py", "from torch import nn\nclass Loss(nn.Module):\n"
                                                                     "    def __init__(self, margin=1.0):\n        super().__init__()\n")),
    Case("ft-loss-import-error", [*FT, "--loss", "{tmp}/loss.py:Loss"], "loss.py failed to import: NameError: name 'nn' is not defined (loss.py, line 1)",
         setup=_write("loss.py", "class Loss(nn.Module):\n    pass\n")),
    Case("ft-loss-kwargs-alone", [*FT, "--loss_kwargs", "margin=1"], "--loss_kwargs is for a custom loss"),
    Case("ft-loss-kwargs-syntax", [*FT, "--loss_kwargs", "margin"], "--loss_kwargs: write the arguments as name=value pairs"),
    Case("ft-pairs-without-loss", ["finetune", "-m", "{model}", "-d", "{pairs}", "-o", "{out}"], "the pairs format has no language-model loss"),
    # ---- run: workflow files (more in tests/test_workflow.py) -------------------------------
    Case("run-config-missing", ["run", "--config", "{tmp}/nope.yaml"], "does not exist"),
    Case("run-config-unknown-key", ["run", "--config", "{tmp}/wf.yaml"], "unknown key 'pases'. Did you mean 'passes'?",
         setup=_write("wf.yaml", "pases: {}\n")),
    Case("run-output-foreign", ["run", "--config", "{tmp}/wf.yaml", "-o", "{out}"], "holds files that are not an slmops workflow's",
         setup=_write("wf.yaml", "passes: {lora: {type: LoRA}}\ndata_configs: {d: {data_name: x.jsonl}}\n"), out="notes"),
    # ---- evaluate -------------------------------------------------------------------------
    Case("ev-no-metrics", [*EV, "--metrics", ""], "--metrics: name at least one metric"),
    Case("ev-unknown-metric", [*EV, "--metrics", "acuracy"], "unknown metric 'acuracy'. Did you mean 'accuracy'?"),
    Case("ev-output-is-file", [*EV, "-o", "{tmp}/file"], "is a file, not a folder", setup=_write("file", "keep")),
    Case("ev-output-under-file", [*EV, "-o", "{tmp}/file/x"], "which is a file", setup=_write("file", "keep")),
    Case("ev-multiline-labels", [*EV, "-d", "{tmp}/ml.jsonl", "--metrics", "accuracy", "--eval_split", "train"], "one-line, non-empty gold labels",
         setup=_write("ml.jsonl", '{"phrase": "a", "tone": "two\\nlines"}\n' * 3), loads_model=True),
    Case("ev-adapter-other-base", [*EV, "--adapter_path", "{tmp}/other_adapter"], "trained on another base", setup=_adapter_of("model64"),
         loads_model=True),
    Case("ev-adapter-not-peft", [*EV, "--adapter_path", "{tmp}"], "holds no adapter_config.json", loads_model=True),
    Case("ev-corrupt-adapter", [*EV, "--adapter_path", "{tmp}/bad_adapter"], "adapter weights file", setup=_corrupt_adapter, loads_model=True),
    Case("ev-corrupt-model", [*EV, "-m", "{tmp}/bad_model"], "is corrupt or truncated", setup=_corrupt_model),
    Case("ev-bundle-missing-adapter-file", [*EVB, "--adapter_path", "{tmp}/x.onnx_adapter"], "does not exist", loads_model=True),
    Case("ev-bundle-unknown-adapter", [*EVB, "--adapter_path", "ton"], "is not in this bundle (tone)", loads_model=True),
    Case("ev-bundle-corrupt", [*EVB, "-m", "{tmp}/bad_bundle"], "not a valid ONNX Runtime GenAI config", setup=_corrupt_bundle),
    Case("ev-bundle-bad-adapter-file", [*EVB, "--adapter_path", "{tmp}/junk.onnx_adapter"], "is not a readable .onnx_adapter file",
         setup=_write("junk.onnx_adapter", b"junk"), loads_model=True),
    # ---- auto-opt / optimize ----------------------------------------------------------------
    Case("ao-misspelt-required", ["auto-opt", "--model_name_or_pth", "m", "-o", "{out}"], "unknown flag --model_name_or_pth"),
    Case("ao-unknown-precision", [*AO, "--precision", "int3"], "--precision: unknown precision 'int3'"),
    Case("ao-device-provider", [*AO, "--device", "gpu"], "--device gpu does not go with --provider CPUExecutionProvider"),
    Case("ao-precision-provider", [*AO, "--precision", "fp16"], "--precision fp16 is not supported with CPUExecutionProvider"),
    Case("ao-block-size", [*AO, "--precision", "int4", "--block_size", "48"], "int4 block size must be one of"),
    Case("ao-output-not-empty", AO, "is not empty", out="notes"),
    Case("ao-output-is-file", [*AO, "-o", "{tmp}/file"], "is a file, not a folder", setup=_write("file", "keep")),
    Case("ao-architecture", ["auto-opt", "-m", "{gpt2}", "-o", "{out}"], "cannot be exported for ONNX Runtime GenAI"),
    Case("ao-corrupt-model", [*AO, "-m", "{tmp}/bad_model"], "is corrupt or truncated", setup=_corrupt_model),
    Case("ao-dora-adapter", [*AO, "--adapter_path", "{dora}"], "uses DoRA"),
    Case("ao-corrupt-adapter", [*AO, "--adapter_path", "{tmp}/bad_adapter"], "the file is corrupt or truncated", setup=_corrupt_adapter),
    Case("ft-corrupt-adapter", [*FT, "--adapter_path", "{tmp}/bad_adapter"], "adapter weights file", setup=_corrupt_adapter),
    Case("ao-adapter-not-peft", [*AO, "--adapter_path", "{tmp}"], "holds no adapter_config.json"),
    Case("ao-adapter-other-base", [*AO, "--adapter_path", "{tmp}/other_adapter"], "trained on another base", setup=_adapter_of("model")),
    Case("ao-npu-flag", [*AO, "--num_split", "4"], "--num_split is Olive's option for NPU"),
    Case("ao-act-precision-conflict", [*AO, "--precision", "int4", "--act_precision", "int8", "--accuracy_level", "1"],
         "--act_precision int8 means --accuracy_level 4, not 1"),
    Case("ao-exporter", [*AO, "--exporter", "dynamo_exporter"], "--exporter: Input should be 'model_builder'"),
    Case("ao-missing-output", ["optimize", "-m", "{model64}"], "--output_path: required (give it as a flag or in --config)"),
    Case("ao-config-unknown-key", ["optimize", "--config", "{tmp}/x.yaml"], "unknown key 'precison'. Did you mean 'precision'?",
         setup=_write("x.yaml", "model_name_or_path: m\noutput_path: o\nprecison: int4\n")),
    # ---- generate-adapter / convert-adapters ---------------------------------------------------
    Case("ga-names-count", ["generate-adapter", "--base_model_path", "{bundle}", "--adapter_paths", "{adapter}", "--adapter_names", "a,b",
                            "-o", "{out}"], "--adapter_names has 2 names for 1 adapters"),
    Case("ga-name-taken", ["generate-adapter", "--base_model_path", "{bundle}", "--adapter_paths", "{adapter}", "--adapter_names", "tone",
                           "-o", "{out}"], "an adapter named 'tone' is already in the bundle"),
    Case("ga-not-peft", ["generate-adapter", "--base_model_path", "{bundle}", "--adapter_paths", "{tmp}", "-o", "{out}"],
         "holds no adapter_config.json"),
    Case("ga-corrupt-bundle", ["generate-adapter", "--base_model_path", "{tmp}/bad_bundle", "--adapter_paths", "{adapter}", "-o", "{out}"],
         "not a valid ONNX Runtime GenAI config", setup=_corrupt_bundle),
    Case("ga-output-not-empty", ["generate-adapter", "--base_model_path", "{bundle}", "--adapter_paths", "{adapter}", "-o", "{out}"],
         "is not empty", out="notes"),
    Case("ca-suffix", ["convert-adapters", "--adapter_path", "{adapter}", "-o", "{tmp}/a.onnx"], "should end in .onnx_adapter"),
    Case("ca-not-a-bundle", ["convert-adapters", "--adapter_path", "{adapter}", "--base_bundle", "{tmp}", "-o", "{tmp}/a.onnx_adapter"],
         "is not a bundle"),
    Case("ca-not-peft", ["convert-adapters", "--adapter_path", "{tmp}", "-o", "{tmp}/a.onnx_adapter"], "holds no adapter_config.json"),
    Case("ca-output-under-file", ["convert-adapters", "--adapter_path", "{adapter}", "-o", "{tmp}/file/a.onnx_adapter"], "which is a file",
         setup=_write("file", "keep")),
    # ---- generate / chat ----------------------------------------------------------------------
    Case("gen-no-prompt", ["generate", "-m", "{bundle}"], "give at least one --prompt"),
    Case("gen-prompt-file-missing", ["generate", "-m", "{bundle}", "--prompt_file", "{tmp}/p.txt"], "--prompt_file"),
    Case("gen-max-new-tokens", ["generate", "-m", "{bundle}", "--prompt", "hi", "--max_new_tokens", "0"], "--max_new_tokens: Input should be greater than 0"),
    Case("gen-corrupt-bundle", ["generate", "-m", "{tmp}/bad_bundle", "--prompt", "hi"], "not a valid ONNX Runtime GenAI config",
         setup=_corrupt_bundle),
    Case("gen-unknown-adapter", ["generate", "-m", "{bundle}", "--adapter", "ton", "--prompt", "hi"], "is not in this bundle (tone)",
         loads_model=True),
    Case("gen-missing-model", ["generate", "-m", "./no/such/model", "--prompt", "hi"], "does not exist"),
    Case("gen-bad-temperature", ["generate", "-m", "{bundle}", "--prompt", "hi", "--temperature", "-1"],
         "--temperature: Input should be greater than or equal to 0"),
    Case("gen-config-no-model", ["generate", "--config", "{tmp}/g.yaml"], "--model_name_or_path: required",
         setup=_write("g.yaml", "prompt: [hello]\n")),
    Case("chat-missing-model", ["chat", "-m", "./no/such/model"], "does not exist"),
    Case("chat-corrupt-model", ["chat", "-m", "{tmp}/bad_model"], "is corrupt or truncated", setup=_corrupt_model),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models, tokenizer_dir):
    """What the cases point at: a tiny model, a finished run with checkpoints, an exported
    bundle with its adapter, a DoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config

    from slmops.finetune_recipe import finetune

    root = tmp_path_factory.mktemp("world")
    model64 = build_tiny_model("llama", tokenizer_dir, root / "llama64", hidden_size=64)
    run = root / "run"
    finetune(tiny_config(tiny_models["llama"], run, max_steps=4, save_steps=2, lora_r=8, train_split="train[:32]"))
    run64 = root / "run64"
    finetune(tiny_config(model64, run64, max_steps=2, train_split="train[:16]"))
    bundle = root / "bundle"
    assert main(["auto-opt", "-m", str(run64), "-o", str(bundle), "--adapter_names", "tone", "--no_parity", "--log_level", "3"]) == 0
    dora = root / "dora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model64), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(dora)
    world = {"model": tiny_models["llama"], "model64": model64, "gpt2": tiny_models["gpt2"], "run": run, "bundle": bundle,
             "adapter": run64 / "adapter", "dora": dora}
    for key in ("model", "model64"):
        base = AutoModelForCausalLM.from_pretrained(world[key])
        get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / f"adapter_of_{key}")
        world[f"adapter_of_{key}"] = root / f"adapter_of_{key}"
    return world


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots with a hash of its bytes, and every folder."""
    seen = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return seen


def test_catalogue_is_large_and_covers_every_command():
    commands = {case.args[0] for case in CASES}
    assert len(CASES) >= 60
    assert {"finetune", "evaluate", "auto-opt", "generate-adapter", "convert-adapters", "generate", "chat", "run"} <= commands
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    if case.out == "run":
        shutil.copytree(world["run"], out)
    elif case.out == "notes":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if case.setup is not None:
        import inspect

        case.setup(*([tmp_path, world] if len(inspect.signature(case.setup).parameters) == 2 else [tmp_path]))
    if not case.loads_model:
        import transformers

        def refuse(*args, **kwargs):
            raise AssertionError(f"{case.id}: the model was loaded before the bad input was reported")

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    fill = {k: str(v) for k, v in world.items() if isinstance(v, Path)} | {"tmp": str(tmp_path), "out": str(out), "data": str(TONE),
                                                                            "pairs": str(TONE.with_name("tone_pairs.jsonl"))}
    args = [re.sub(r"\{(\w+)\}", lambda m: fill.get(m[1], m[0]), a) for a in case.args]
    before = _snapshot(tmp_path, world["run"], world["bundle"])
    try:
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
        after = _snapshot(tmp_path, world["run"], world["bundle"])
    finally:
        if "held_lock" in world:  # the test's own lock (ft-folder-in-use), released after the snapshot
            world.pop("held_lock").release()
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code not in (0, None), f"{case.id}: exit code {code}\n{text}"
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, f"{case.id}: expected one error line, got:\n{text}"
    assert case.message in errors[0], f"{case.id}: {case.message!r} not in {errors[0]!r}"
    assert after == before, f"{case.id}: files changed: {sorted(set(after.items()) ^ set(before.items()))[:6]}"
    if case.out == "none":
        assert not out.exists()
    if "not_created" in case.extra:
        assert not (tmp_path / case.extra["not_created"]).exists(), "the pickled payload ran"
