"""ONNX Runtime GenAI bundles on tiny random models: logits and greedy tokens match PyTorch
with and without adapters, adapters switch on one loaded base, converted adapters plug into
an exported base, and bad input fails before any export work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_tiny_model

from slmops.cli.main import main
from slmops.deploy import export as export_module
from slmops.deploy.export import export_bundle
from helpers import plan_export
from slmops.inference.onnx_backend import OnnxBackend as OnnxBundle
from slmops.inference import GenerationParams
from slmops.errors import ConfigError, ModelError, OutputError

PROMPT_IDS = [5, 17, 42, 99, 7, 3, 250, 64]


def _make_adapter(model_dir: Path, out: Path, targets: list[str], rank: int, seed: int, **extra) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    # Random A and B (not PEFT's zero B) so every adapter really moves the logits.
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, **extra))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    # hidden 64 / 4 heads: ONNX Runtime's CPU attention needs heads of a multiple of 16.
    root = tmp_path_factory.mktemp("onnx_models")
    return {arch: build_tiny_model(arch, tokenizer_dir, root / arch, hidden_size=64) for arch in ("llama", "qwen2", "phi3")}


@pytest.fixture(scope="module")
def llama_adapters(onnx_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    model = onnx_models["llama"]
    return {
        "a": _make_adapter(model, root / "a", ["q_proj", "v_proj"], 4, 1),
        "b": _make_adapter(model, root / "b", ["q_proj", "k_proj", "o_proj", "down_proj"], 8, 2),
        "c": _make_adapter(model, root / "c", ["v_proj"], 2, 3),  # converted later, not exported with the base
    }


@pytest.fixture(scope="module")
def llama_bundle(onnx_models, llama_adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "llama"
    plan = plan_export(str(onnx_models["llama"]), [str(llama_adapters["a"]), str(llama_adapters["b"])], str(out), adapter_names=["a", "b"])
    manifest = export_bundle(plan)
    assert all(r["exact"] == r["prompts"] for r in manifest["parity"].values()), manifest["parity"]
    return out


def _torch(model_dir: Path, adapter: Path | None = None):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(model, adapter).eval() if adapter else model


@torch.no_grad()
def _torch_logits(model, ids) -> np.ndarray:
    return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@torch.no_grad()
def _torch_greedy(model, ids, n=12, eos=2) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_fp32_bundle_matches_pytorch_and_switches_adapters(onnx_models, llama_adapters, llama_bundle):
    bundle = OnnxBundle(llama_bundle)
    manifest = json.loads((llama_bundle / "slmops_bundle.json").read_text())
    assert [a["name"] for a in manifest["adapters"]] == ["a", "b"]
    # slots cover the union of both adapters' targets, at every layer
    assert set(manifest["lora_slots"]) == {f"model.layers.{i}.{blk}.{p}" for i in (0, 1) for blk, p in
                                           [("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"), ("mlp", "down_proj")]}
    expected = {None: _torch(onnx_models["llama"]), "a": _torch(onnx_models["llama"], llama_adapters["a"]),
                "b": _torch(onnx_models["llama"], llama_adapters["b"])}
    base_logits = _torch_logits(expected[None], PROMPT_IDS)
    # Switch back and forth on one loaded base: each request sees only its own adapter.
    for name in [None, "a", "b", "a", None, "b"]:
        onnx_logits = bundle.logits(PROMPT_IDS, name)
        torch_logits = _torch_logits(expected[name], PROMPT_IDS)
        np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-3, rtol=1e-3)
        if name is not None:
            assert np.abs(torch_logits - base_logits).max() > 0.1  # the adapter really changes the model
        assert bundle.generate_ids(PROMPT_IDS, name, 12) == _torch_greedy(expected[name], PROMPT_IDS)


@pytest.mark.parametrize("arch,targets", [("qwen2", ["q_proj", "v_proj", "up_proj"]), ("phi3", ["qkv_proj", "o_proj", "gate_up_proj"])])
def test_other_architectures_match_pytorch(onnx_models, tmp_path, arch, targets):
    """Qwen2 (biases on q/k/v) and Phi-3 (fused qkv and gate_up layers, split into slots)."""
    adapter = _make_adapter(onnx_models[arch], tmp_path / "adapter", targets, 4, 5)
    plan = plan_export(str(onnx_models[arch]), [str(adapter)], str(tmp_path / "bundle"), adapter_names=["task"])
    manifest = export_bundle(plan)
    assert all(r["exact"] == r["prompts"] for r in manifest["parity"].values())
    bundle = OnnxBundle(tmp_path / "bundle")
    for name, model in [(None, _torch(onnx_models[arch])), ("task", _torch(onnx_models[arch], adapter))]:
        np.testing.assert_allclose(bundle.logits(PROMPT_IDS, name), _torch_logits(model, PROMPT_IDS), atol=1e-3, rtol=1e-3)


def test_converted_adapter_plugs_into_auto_opt_base(onnx_models, llama_adapters, llama_bundle, tmp_path, capsys):
    """An adapter trained separately (another rank, a subset of the layers) converts against
    the exported base and runs on it exactly as PEFT runs it."""
    file = tmp_path / "c.onnx_adapter"
    assert main(["convert-adapters", "--adapter_path", str(llama_adapters["c"]), "--base_bundle", str(llama_bundle),
                 "--output_path", str(file)]) == 0
    bundle = OnnxBundle(llama_bundle)
    expected = _torch_logits(_torch(onnx_models["llama"], llama_adapters["c"]), PROMPT_IDS)
    np.testing.assert_allclose(bundle.logits(PROMPT_IDS, str(file)), expected, atol=1e-3, rtol=1e-3)
    assert bundle.generate_ids(PROMPT_IDS, str(file), 12) == _torch_greedy(_torch(onnx_models["llama"], llama_adapters["c"]), PROMPT_IDS)

    # generate-adapter on the existing bundle: the base files are shared, the manifest gains "c"
    multi = tmp_path / "multi"
    assert main(["generate-adapter", "--base_model_path", str(llama_bundle), "--adapter_paths", str(llama_adapters["c"]),
                 "--output_path", str(multi)]) == 0
    assert (multi / "model.onnx.data").stat().st_ino == (llama_bundle / "model.onnx.data").stat().st_ino
    names = [a["name"] for a in json.loads((multi / "slmops_bundle.json").read_text())["adapters"]]
    assert names == ["a", "b", "c"]
    assert "c" not in [a["name"] for a in json.loads((llama_bundle / "slmops_bundle.json").read_text())["adapters"]]
    np.testing.assert_allclose(OnnxBundle(multi).logits(PROMPT_IDS, "c"), expected, atol=1e-3, rtol=1e-3)

    # without --base_bundle only the adapter's own layers are written: this base has more slots
    partial = tmp_path / "partial.onnx_adapter"
    assert main(["convert-adapters", "--adapter_path", str(llama_adapters["c"]), "--output_path", str(partial)]) == 0
    with pytest.raises(ModelError, match="does not match this bundle's LoRA slots.*--base_bundle"):
        bundle.load_adapter(str(partial))


def test_int4_keeps_lora_in_float_and_tracks_fp32(onnx_models, llama_adapters, llama_bundle, tmp_path):
    import onnx

    out = tmp_path / "int4"
    plan = plan_export(str(onnx_models["llama"]), [str(llama_adapters["a"])], str(out), precision="int4", accuracy_level=1,
                       block_size=16, quant_algo="rtn", int8_layers="none")
    manifest = export_bundle(plan, run_parity=False)
    assert manifest["quantization"] == {"block_size": 16, "accuracy_level": 1, "algorithm": "rtn", "int8_layers": "none"}
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 2 * 4  # the base projections are int4 ...
    for node in nbits:  # ... with the block size and accuracy level asked for
        attrs = {a.name: a.i for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 16, 1), node.name
    lora_inputs = [i.name for i in graph.input if ".lora_" in i.name]
    assert len(lora_inputs) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B), float inputs
    int4 = OnnxBundle(out)
    fp32 = OnnxBundle(llama_bundle)
    for name in (None, "a"):
        q, f = int4.logits(PROMPT_IDS, name), fp32.logits(PROMPT_IDS, name)
        # random weights 15x wider than a trained model's: int4 noise is large, the signal survives
        assert np.corrcoef(q.ravel(), f.ravel())[0, 1] > 0.8
    assert np.abs(int4.logits(PROMPT_IDS, "a") - int4.logits(PROMPT_IDS, None)).max() > 0.1
    assert (out / "model.onnx.data").stat().st_size < (llama_bundle / "model.onnx.data").stat().st_size / 3


def test_errors_before_any_export_work(onnx_models, tiny_models, llama_adapters, tmp_path, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("export started despite bad input")

    monkeypatch.setattr(export_module, "_run_builder", no_export)
    model = str(onnx_models["llama"])
    with pytest.raises(ModelError, match="GPT2LMHeadModel .*supported architectures: LlamaForCausalLM"):
        plan_export(str(tiny_models["gpt2"]), None, str(tmp_path / "o1"))
    with pytest.raises(ModelError, match="multiple of 16"):
        plan_export(str(tiny_models["llama"]), None, str(tmp_path / "o2"))  # hidden 32: heads of 8
    with pytest.raises(ConfigError, match="fp16 is not supported with CPUExecutionProvider; supported there: fp32"):
        plan_export(model, None, str(tmp_path / "o3"), precision="fp16")
    with pytest.raises(ConfigError, match="Did you mean 'int4'"):
        plan_export(model, None, str(tmp_path / "o3"), precision="in4")
    with pytest.raises(ConfigError, match="--device gpu does not go with"):
        plan_export(model, None, str(tmp_path / "o3"), device="gpu")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="not empty"):
        plan_export(model, None, str(used))
    assert (used / "keep.txt").read_text() == "precious"
    # an adapter trained on another base (hidden size 32 vs 64)
    other = _make_adapter(tiny_models["llama"], tmp_path / "other", ["q_proj"], 2, 0)
    with pytest.raises(ModelError, match="does not fit this model.*trained on another base"):
        plan_export(model, [str(other)], str(tmp_path / "o4"))
    dora = _make_adapter(onnx_models["llama"], tmp_path / "dora", ["q_proj"], 2, 0, use_dora=True)
    with pytest.raises(ModelError, match="DoRA"):
        plan_export(model, [str(dora)], str(tmp_path / "o5"))
    head = _make_adapter(onnx_models["llama"], tmp_path / "head", ["q_proj", "lm_head"], 2, 0)
    with pytest.raises(ModelError, match="lm_head.*cannot be deployed"):
        plan_export(model, [str(head)], str(tmp_path / "o6"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((llama_adapters["a"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="corrupt"):
        plan_export(model, [str(corrupt)], str(tmp_path / "o7"))
    # the CLI turns these into one-line errors and exit code 1
    assert main(["auto-opt", "-m", str(tiny_models["gpt2"]), "-o", str(tmp_path / "o8")]) == 1
    assert not (tmp_path / "o8").exists()


def test_failed_export_leaves_nothing_behind(onnx_models, tmp_path, monkeypatch):
    def broken(plan, staging, template):
        (staging / "model.onnx.data").write_bytes(b"half written")
        raise RuntimeError("builder crashed")

    monkeypatch.setattr(export_module, "_run_builder", broken)
    plan = plan_export(str(onnx_models["llama"]), None, str(tmp_path / "out"))
    with pytest.raises(RuntimeError):
        export_bundle(plan)
    assert list(tmp_path.iterdir()) == []


def test_generate_and_chat_cli_stream_and_switch(llama_bundle, tmp_path):
    bundle = OnnxBundle(llama_bundle)
    prompt = "Phrase: what a lovely day\nTone:"
    expected = {name: bundle.generate_text(prompt, name, GenerationParams(max_new_tokens=8)) for name in ("a", "b")}
    cli = [sys.executable, "-m", "slmops.cli.main"]
    result = subprocess.run([*cli, "generate", "-m", str(llama_bundle), "--adapter", "a,b", "--prompt", prompt.replace("\n", "\\n"),
                             "--max_new_tokens", "8"], capture_output=True, text=True, check=True)
    assert f"[onnx · a] {prompt}\n{expected['a']}\n" in result.stdout
    assert f"[onnx · b] {prompt}\n{expected['b']}\n" in result.stdout
    chat = subprocess.run([*cli, "chat", "-m", str(llama_bundle), "--adapter", "a", "--max_new_tokens", "6"],
                          input="hello\n/adapter nope\n/adapter b\nhello\n", capture_output=True, text=True)
    assert chat.returncode == 0, chat.stderr  # a mistyped adapter is reported, the chat goes on
    assert "adapter 'nope' is not in this bundle (a, b)" in chat.stderr
    assert "(adapter: b)" in chat.stdout
    history = [{"role": "user", "content": "hello"}]
    first = bundle.generate_text(bundle.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True), "a",
                                 GenerationParams(max_new_tokens=6),
                                 add_special_tokens=False)
    assert chat.stdout.startswith(first + "\n")


def test_generate_cli_on_pytorch_switches_peft_adapters_like_the_bundle(onnx_models, llama_adapters, llama_bundle):
    """`slmops generate` on the PyTorch model with two PEFT adapters loaded once gives what the
    bundle gives with the same two adapters."""
    bundle = OnnxBundle(llama_bundle)
    prompt = "Phrase: the rain will not stop\nTone:"
    result = subprocess.run([sys.executable, "-m", "slmops.cli.main", "generate", "-m", str(onnx_models["llama"]), "--adapter",
                             f"{llama_adapters['a']},{llama_adapters['b']},base", "--prompt", prompt, "--max_new_tokens", "8"],
                            capture_output=True, text=True, check=True)
    prompt = prompt.replace("\\n", "\n")
    for adapter, name in ((llama_adapters["a"], "a"), (llama_adapters["b"], "b"), ("base", None)):
        assert f"[pytorch · {adapter}] {prompt}\n{bundle.generate_text(prompt, name, GenerationParams(max_new_tokens=8))}\n" in result.stdout


def test_evaluate_on_bundle_matches_pytorch(onnx_models, llama_adapters, llama_bundle):
    """The ONNX back end of `slmops evaluate` gives the PyTorch back end's numbers."""
    from slmops.config import EvaluateConfig
    from slmops.evaluate.run import evaluate

    from conftest import TONE, TONE_TEMPLATE

    def run(model, adapter):
        cfg = EvaluateConfig.model_validate({"model": {"model_name_or_path": str(model)}, "adapter": adapter,
                                             "data": {"data_name": str(TONE), "train_split": "train[:12]", "text_template": TONE_TEMPLATE},
                                             "metrics": ["accuracy", "perplexity"], "max_new_tokens": 4})
        return evaluate(cfg)["models"][0]["metrics"]

    onnx_metrics = run(llama_bundle, "a")
    torch_metrics = run(onnx_models["llama"], str(llama_adapters["a"]))
    assert onnx_metrics["perplexity"] == pytest.approx(torch_metrics["perplexity"], rel=1e-4)
    assert onnx_metrics["accuracy"] == torch_metrics["accuracy"]
    assert onnx_metrics["unparseable"] == torch_metrics["unparseable"]


def test_quantized_export_reports_task_metric_change(onnx_models, tmp_path):
    """An slmops finetune output exported to int8: the parity check also scores the
    adapter's own task (its eval rows, in its format) on PyTorch and on the bundle."""
    from helpers import tiny_config

    from slmops.config import EvaluateConfig
    from slmops.evaluate.run import evaluate
    from slmops.finetune_recipe import finetune

    cfg = tiny_config(onnx_models["llama"], tmp_path / "ft", eval_split="train[64:80]", max_steps=4)
    finetune(cfg)
    plan = plan_export(str(tmp_path / "ft"), None, str(tmp_path / "int8"), precision="int8", adapter_names=["tone"])
    manifest = export_bundle(plan)
    task = manifest["parity"]["tone"]["task_metric"]
    assert task["metric"] == "accuracy" and task["rows"] == 16  # five tone labels: a label task
    direct = evaluate(EvaluateConfig.model_validate({
        "model": {"model_name_or_path": str(tmp_path / "ft")}, "metrics": ["accuracy"], "max_new_tokens": 32,
        "data": {**cfg.data.model_dump(), "eval_split": "train[64:80]"}}))
    assert task["pytorch"] == pytest.approx(direct["models"][0]["metrics"]["accuracy"], abs=1e-4)
    assert task["change"] == pytest.approx(task["onnx"] - task["pytorch"], abs=1e-4)


def test_bundle_remembers_the_template_each_adapter_was_trained_on(onnx_models, llama_adapters, tmp_path):
    """An adapter from a finetune output on a text template: the bundle's manifest records the
    template, so a chat on the bundle prompts it that way even once the training folder is gone;
    an adapter from elsewhere has none (the chat template applies)."""
    import shutil

    from conftest import TONE_TEMPLATE
    from helpers import tiny_config

    from slmops import finetune

    run = tmp_path / "tone-run"
    finetune(tiny_config(onnx_models["llama"], run, max_steps=2))
    out = tmp_path / "bundle"
    export_bundle(plan_export(str(onnx_models["llama"]), [str(run / "adapter"), str(llama_adapters["a"])], str(out), adapter_names=["tone", "a"]),
                  run_parity=False)
    shutil.rmtree(run)
    manifest = json.loads((out / "slmops_bundle.json").read_text())
    assert {a["name"]: a["text_template"] for a in manifest["adapters"]} == {"tone": TONE_TEMPLATE.replace("\\n", "\n"), "a": None}
    bundle = OnnxBundle(out, adapters=["tone"])
    assert bundle.trained_template("tone") == TONE_TEMPLATE.replace("\\n", "\n") and bundle.trained_template(None) == bundle.trained_template("tone")
    assert bundle.trained_template("a") is None and bundle.trained_template("base") is None


def _bits(model_file: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    return {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}


def test_int4_keeps_sensitive_layers_at_int8(onnx_models, tmp_path):
    """--int8_layers: sensitive (default) keeps the output head and the mixed strategy's
    projections at int8, head the output head alone, none nothing."""
    bits = {}
    for choice in ("sensitive", "head", "none"):
        out = tmp_path / choice
        export_bundle(plan_export(str(onnx_models["llama"]), None, str(out), precision="int4", **({} if choice == "sensitive" else
                                                                                                 {"int8_layers": choice})),
                      run_parity=False)
        bits[choice] = _bits(out / "model.onnx")
    assert {name for name, b in bits["none"].items() if b == 8} == set()
    assert {name for name, b in bits["head"].items() if b == 8} == {"/lm_head/MatMul_Q8"} or \
        [name for name, b in bits["head"].items() if b == 8] == [n for n in bits["head"] if "lm_head" in n]
    sensitive = {name for name, b in bits["sensitive"].items() if b == 8}
    assert any("lm_head" in name for name in sensitive) and any("layers." in name for name in sensitive)
    assert len(sensitive) < len(bits["sensitive"])  # the rest stays int4


def test_quantized_base_is_what_the_bundle_computes_with(onnx_models, tmp_path):
    """deploy.quantized_base reads the int4 export's weights back: a PyTorch model holding them
    gives the int4 bundle's logits (fp32 activations), much closer than the float model does."""
    from slmops.deploy import quantized_base

    model_dir = onnx_models["llama"]
    model = _torch(model_dir)
    float_logits = _torch_logits(model, PROMPT_IDS)
    weights = quantized_base.torch_names(quantized_base.quantized_weights(model_dir, "int4"), model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(weights) == set(linears)  # every projection and the (tied) head
    levels = {}
    for name, weight in weights.items():  # (q - zero point) x scale: 16 levels a block of 32 (256 at int8)
        levels[name] = len(torch.unique(weight[0, :32]))
        assert levels[name] <= 256 and not torch.equal(weight, dict(model.named_modules())[name].weight)
    assert sum(count <= 16 for count in levels.values()) > len(levels) / 2, levels
    quantized_base.load_quantized_weights(model, weights)
    assert torch.equal(model.model.embed_tokens.weight, weights["lm_head"])  # tied: the bundle's embedding reads the head
    out = tmp_path / "int4"
    export_bundle(plan_export(str(model_dir), None, str(out), precision="int4", accuracy_level=1), run_parity=False)
    onnx_logits = OnnxBundle(out).logits(PROMPT_IDS, None)
    torch_logits = _torch_logits(model, PROMPT_IDS)
    scale = np.abs(onnx_logits).max()
    assert np.abs(torch_logits - onnx_logits).max() < 2e-3 * scale
    assert np.abs(float_logits - onnx_logits).max() > 20 * np.abs(torch_logits - onnx_logits).max()


def test_quantization_aware_adapter_trains_over_the_bundles_weights(onnx_models, tmp_path, caplog):
    """finetune --deploy_precision int4: the adapter trains over the int4 export's weights
    (run.yaml says which), its int4 bundle gives the logits of that adapter on those weights,
    and an export with other settings says the adapter was trained for another."""
    import logging

    import yaml
    from helpers import tiny_config
    from peft import PeftModel

    from slmops.deploy import quantized_base
    from slmops.finetune_recipe import finetune

    model_dir = onnx_models["llama"]
    finetune(tiny_config(model_dir, tmp_path / "ft", max_steps=4, deploy_precision="int4"))
    resolved = yaml.safe_load((tmp_path / "ft" / "run.yaml").read_text())["resolved"]
    assert resolved["deploy_precision"] == {"precision": "int4", "block_size": 32, "algorithm": "k_quant", "int8_layers": "sensitive"}
    with caplog.at_level(logging.INFO, logger="slmops"):
        export_bundle(plan_export(str(tmp_path / "ft"), None, str(tmp_path / "int4"), precision="int4", accuracy_level=1,
                                  adapter_names=["qa"]), run_parity=False)
    assert "trained over these very weights" in caplog.text
    base = _torch(model_dir)
    read = quantized_base.quantized_weights(model_dir, "int4", resolved["target_modules"])  # slots on q/k/v/o: q/k/v apart
    quantized_base.load_quantized_weights(base, quantized_base.torch_names(read, base))
    tuned = PeftModel.from_pretrained(base, tmp_path / "ft" / "adapter").eval()
    onnx_logits = OnnxBundle(tmp_path / "int4").logits(PROMPT_IDS, "qa")
    assert np.abs(_torch_logits(tuned, PROMPT_IDS) - onnx_logits).max() < 2e-3 * np.abs(onnx_logits).max()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slmops"):
        plan_export(str(tmp_path / "ft"), None, str(tmp_path / "fp32"))
    assert "trained over the int4 export's weights" in caplog.text and "precision fp32 (trained over int4)" in caplog.text


def test_deploy_precision_refused_where_it_cannot_apply(onnx_models, tmp_path):
    from helpers import tiny_config

    from slmops.finetune_recipe import plan_finetune

    for method, words in (("full", "changes the base weights themselves"), ("qlora", "bitsandbytes' 4-bit base")):
        with pytest.raises(ConfigError, match=words):
            plan_finetune(tiny_config(onnx_models["llama"], tmp_path / method, method=method, deploy_precision="int4"))
        assert not (tmp_path / method).exists()
