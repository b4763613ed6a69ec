"""`slmops run --config`: Olive's file shape read as written, passes that chain (fine-tune,
evaluate, int4 export, evaluate the bundle), a second run that reuses every pass, strict
files that name every wrong key, and `finetune --save_config` that reproduces a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import run_cli
from conftest import ROOT, TONE, TONE_TEMPLATE, build_tiny_model

from slmops.errors import ConfigError

QA = ROOT / "examples" / "data" / "library_qa.json"

# The seed's Example 2, verbatim but for the model path and the data file (a GPT-2-shaped model:
# c_attn / c_proj / ln_f / lm_head)
OLIVE_EXAMPLE = """\
model: {{type: PyTorchModel, config: {{model_path: "{model}", task: "text-generation"}}}}
data_configs:
  - name: "custom_dataset"
    type: "HuggingfaceContainer"
    load_dataset_config: {{data_files: "{data}", split: "train"}}
    pre_process_data_config: {{text_template: "User: {{input}}\\nAssistant: {{output}}"}}
passes:
  lora:
    type: LoRA
    config: {{r: 16, lora_alpha: 32, target_modules: ["c_attn", "c_proj"], modules_to_save: ["ln_f", "lm_head"]}}
"""



def test_olive_example_runs_on_gpt2_with_setup_and_writes_a_peft_adapter(tiny_models, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    file = tmp_path / "x.yaml"
    file.write_text(OLIVE_EXAMPLE.format(model=tiny_models["gpt2"], data=QA))
    code, text = run_cli(capsys, "run", "--config", str(file), "--setup", "--log_level", "2")
    assert code == 0, text
    adapter = tmp_path / "workflow-output" / "lora" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"c_attn", "c_proj"} and set(config["modules_to_save"]) == {"ln_f", "lm_head"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]), adapter)
    assert any("c_attn.lora_A" in name for name, _ in model.named_parameters())
    workflow = yaml.safe_load((tmp_path / "workflow-output" / "workflow.yaml").read_text())
    assert workflow["passes"]["lora"]["config"]["lora_r"] == 16  # the native translation, replayable


def test_olive_variants_regularization_training_config_and_newer_spellings(tiny_models, tmp_path):
    from slmops.workflow import parse_workflow, plan_workflow

    data = yaml.safe_load(OLIVE_EXAMPLE.format(model=tiny_models["gpt2"], data=QA))
    data["passes"]["lora"]["config"].update(lora_dropout=0.1, weight_decay=0.01)
    data["training_config"] = {"bf16": False, "dataloader_num_workers": 0, "optim": "adamw_torch", "lr_scheduler_type": "cosine",
                               "max_steps": 3}
    newer = {"input_model": {"type": "HfModel", "model_path": str(tiny_models["gpt2"])}, **{k: v for k, v in data.items() if k != "model"},
             "output_dir": str(tmp_path / "out"), "evaluators": {"qa": {"metrics": [{"name": "ppl", "type": "perplexity"}]}}}
    for variant in (data, newer):
        config, olive = parse_workflow(variant, "x.yaml")
        assert olive
        plan = plan_workflow(config)
        finetune = plan.passes[0].spec.finetune
        assert (finetune.method.lora_dropout, finetune.training.weight_decay, finetune.training.lr_scheduler_type) == (0.1, 0.01, "cosine")
        assert finetune.training.max_steps == 3 and finetune.method.lora_r == 16
    assert plan.out == (tmp_path / "out").resolve() and config.evaluators["qa"].metrics == ["perplexity"]


def _tone_workflow(model: Path, out: Path, **lora) -> dict:
    data = yaml.safe_load((ROOT / "examples" / "workflows" / "tone-int4.yaml").read_text())
    data["input_model"] = {"model_name_or_path": str(model)}
    data["data_configs"]["tone"]["data_name"] = str(TONE)
    data["passes"]["lora"]["config"].update({"max_steps": 4, "learning_rate": 1e-2, **lora})
    data["evaluators"]["held_out"].update(max_samples=8, max_new_tokens=4)
    data["output_dir"] = str(out)
    return data


def test_shipped_workflow_chains_finetune_export_and_evaluations_then_reuses_them(tokenizer_dir, tmp_path, capsys, caplog):
    """examples/workflows/tone-int4.yaml on a tiny model: LoRA, evaluate PyTorch, int4 bundle with
    the adapter, evaluate the bundle; the second run reuses every pass; a changed pass re-runs
    with everything after it."""
    model = build_tiny_model("llama", tokenizer_dir, tmp_path / "llama64", hidden_size=64)
    file = tmp_path / "wf.yaml"
    file.write_text(yaml.safe_dump(_tone_workflow(model, tmp_path / "out"), sort_keys=False))
    code, text = run_cli(capsys, "run", "--config", str(file), "--log_level", "2")
    assert code == 0, text
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [p["status"] for p in results["passes"]] == ["ran"] * 4
    pytorch, bundle = results["results"]["score_pytorch"], results["results"]["score_int4"]
    assert "accuracy" in pytorch["models"][0]["metrics"] and "(onnx) + lora" in bundle["models"][0]["name"]
    manifest = json.loads((tmp_path / "out" / "int4" / "slmops_bundle.json").read_text())
    assert manifest["precision"] == "int4" and [a["name"] for a in manifest["adapters"]] == ["lora"]
    assert "score_int4" in (tmp_path / "out" / "report.md").read_text()

    with caplog.at_level("INFO", logger="slmops"):
        code, text = run_cli(capsys, "run", "--config", str(file), "--log_level", "1")
    assert code == 0, text
    assert [p["status"] for p in json.loads((tmp_path / "out" / "results.json").read_text())["passes"]] == ["reused"] * 4
    assert f"lora: reused from {tmp_path / 'out' / 'lora'} (same config and inputs)" in caplog.text

    file.write_text(yaml.safe_dump(_tone_workflow(model, tmp_path / "out", max_steps=5), sort_keys=False))  # a changed pass: it and all after it
    assert run_cli(capsys, "run", "--config", str(file), "--log_level", "2")[0] == 0
    assert [p["status"] for p in json.loads((tmp_path / "out" / "results.json").read_text())["passes"]] == ["ran"] * 4
    assert run_cli(capsys, "run", "--config", str(file), "--no_cache", "--log_level", "2")[0] == 0
    assert [p["status"] for p in json.loads((tmp_path / "out" / "results.json").read_text())["passes"]] == ["ran"] * 4


def test_changed_data_is_never_reused(tiny_llama, tmp_path, capsys):
    data_file = tmp_path / "tone.jsonl"
    data_file.write_text(TONE.read_text())
    workflow = {"input_model": {"model_name_or_path": str(tiny_llama)},
                "data_configs": {"tone": {"data_name": str(data_file), "train_split": "train[:32]", "text_template": TONE_TEMPLATE}},
                "passes": {"lora": {"type": "LoRA", "config": {"max_steps": 2}}}, "output_dir": str(tmp_path / "out")}
    file = tmp_path / "wf.yaml"
    file.write_text(yaml.safe_dump(workflow, sort_keys=False))
    assert run_cli(capsys, "run", "--config", str(file), "--log_level", "3")[0] == 0
    lines = data_file.read_text().splitlines()
    data_file.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same rows, another order: other data
    assert run_cli(capsys, "run", "--config", str(file), "--log_level", "3")[0] == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["passes"][0]["status"] == "ran"


def test_finetune_save_config_reproduces_the_run_bit_for_bit(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["finetune", "-m", str(tiny_llama), "-d", str(TONE), "--train_split", "train[:32]", "--text_template", TONE_TEMPLATE,
            "--max_steps", "3", "--lora_r", "4", "--learning_rate", "1e-2", "-o", "ft", "--save_config", "ft.yaml", "--log_level", "3"]
    assert run_cli(capsys, *args)[0] == 0
    saved = yaml.safe_load((tmp_path / "ft.yaml").read_text())
    assert saved["passes"]["ft"]["type"] == "LoRA" and saved["passes"]["ft"]["config"]["lora_r"] == 4
    assert run_cli(capsys, "run", "--config", "ft.yaml", "--log_level", "3")[0] == 0
    replayed = tmp_path / "ft-workflow" / "ft" / "adapter" / "adapter_model.safetensors"
    assert replayed.read_bytes() == (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_every_shipped_config_and_workflow_parses():
    from slmops.workflow import load_workflow, plan_workflow

    workflows = sorted((ROOT / "examples" / "workflows").glob("*.yaml"))
    assert len(workflows) >= 2
    for file in workflows:
        config, _ = load_workflow(file)
        plan_workflow(config, str(file))


BASE = {"input_model": {"model_name_or_path": "smollm2-135m-instruct"},
        "data_configs": {"tone": {"data_name": str(TONE), "text_template": TONE_TEMPLATE}},
        "passes": {"lora": {"type": "LoRA", "config": {"max_steps": 2}}}}
OLIVE = yaml.safe_load(OLIVE_EXAMPLE.format(model="m", data=QA))


def _edit(base: dict, path: str, value) -> dict:
    data = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()
WRONG = [
    ("top-level typo", _edit(BASE, "pases", {}), "unknown key 'pases'. Did you mean 'passes'?"),
    ("no passes", _edit(BASE, "passes", {}), "a workflow needs at least one pass"),
    ("pass type typo", _edit(BASE, "passes.lora.type", "LoRa"), "passes.lora.type: unknown pass type 'LoRa'. Did you mean 'LoRA'"),
    ("pass config typo", _edit(BASE, "passes.lora.config.lora_alpah", 8), "passes.lora.config.lora_alpah: unknown key. Did you mean 'lora_alpha'?"),
    ("pass config type", _edit(BASE, "passes.lora.config.max_steps", "many"), "passes.lora.config.max_steps: Input should be a valid integer"),
    ("data config missing", _edit(BASE, "passes.lora.config.data_config", "tweets"), "passes.lora.config.data_config: no data config named 'tweets'"),
    ("data config typo", _edit(BASE, "data_configs.tone.text_templte", "x"), "unknown key 'data_configs.tone.text_templte'. Did you mean 'text_template'?"),
    ("reserved key", _edit(BASE, "passes.lora.config.output_path", "x"), "output_path are set by the workflow"),
    ("evaluator missing", _edit(BASE, "passes.score", {"type": "Evaluate", "config": {"evaluator": "nope"}}),
     "passes.score.config.evaluator: no evaluator named 'nope'"),
    ("unknown metric", _edit(BASE, "passes.score", {"type": "Evaluate", "config": {"metrics": ["acc"]}}), "unknown metric 'acc'"),
    ("finetune after export", _edit(_edit(BASE, "passes.onnx", {"type": "ModelBuilder", "config": {}}), "passes.again",
                                   {"type": "LoRA", "config": {}}), "passes.again: LoRA takes a PyTorch model, and pass 'onnx' gives an ONNX bundle"),
    ("merge without adapter", {**BASE, "passes": {"merge": {"type": "MergeAdapterWeights", "config": {}}}},
     "passes.merge: MergeAdapterWeights needs an adapter, and the input model has none"),
    ("export precision", _edit(BASE, "passes.onnx", {"type": "ModelBuilder", "config": {"precision": "int3"}}),
     "passes.onnx.config.precision: unknown precision 'int3'"),
    ("olive data type", _edit(OLIVE, "data_configs.0.type", "RawDataContainer"), "slmops reads HuggingfaceContainer data configs"),
    ("olive load key", _edit(OLIVE, "data_configs.0.load_dataset_config.data_file", "x"),
     "unknown key 'data_configs.custom_dataset.load_dataset_config.data_file'. Did you mean 'data_files'?"),
    ("olive user script", _edit(OLIVE, "data_configs.0.user_script", "x.py"), "slmops does not run data scripts"),
    ("olive pass key", _edit(OLIVE, "passes.lora.config.lora_alpah", 8), "passes.lora.config.lora_alpah: unknown key"),
    ("olive training_config key", _edit(OLIVE, "training_config", {"learning_rat": 1}), "unknown key 'training_config.learning_rat'"),
    ("olive remote system", _edit(OLIVE, "systems", {"aml": {"type": "AzureML"}}), "slmops runs passes on this machine"),
    ("olive model type", _edit(OLIVE, "model.type", "ONNXModel"), "slmops takes PyTorchModel / HfModel inputs"),
]


@pytest.mark.parametrize("name,data,message", WRONG, ids=[w[0] for w in WRONG])
def test_a_wrong_workflow_is_one_clear_error_before_anything_loads(name, data, message, tmp_path, capsys, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    file = tmp_path / "wf.yaml"
    file.write_text(yaml.safe_dump({**data, "output_dir": str(tmp_path / "out")}, sort_keys=False))
    code, text = run_cli(capsys, "run", "--config", str(file))
    assert code != 0 and "Traceback" not in text
    assert message in text, text
    assert not (tmp_path / "out").exists()


def test_all_problems_of_a_file_at_once():
    from slmops.workflow import parse_workflow, plan_workflow

    data = _edit(_edit(BASE, "passes.lora.config.lora_alpah", 8), "passes.score", {"type": "Evaluate", "config": {"evaluator": "x"}})
    config, _ = parse_workflow(data, "wf.yaml")
    with pytest.raises(ConfigError) as info:
        plan_workflow(config)
    assert "lora_alpah" in str(info.value) and "no evaluator named 'x'" in str(info.value)
