"""`slmops export`: the merged folder loads in transformers and equals base + adapter; the GGUF
file reads back (transformers' GGUF loader, gguf's reader) to the merged model's weights and
logits within its weight type's error; the Modelfile carries the chat template and stop tokens;
bad requests are refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_config, run_cli



@pytest.fixture(scope="module")
def tuned(tiny_llama, tmp_path_factory) -> Path:
    """A tiny LoRA run (an slmops finetune output with model/ and adapter/)."""
    from slmops.finetune_recipe import finetune

    out = tmp_path_factory.mktemp("tuned") / "ft"
    finetune(tiny_config(tiny_llama, out, max_steps=6, lora_dropout=0.0))
    return out



def _ids(tuned: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tuned / "model")
    return torch.tensor([tok("Phrase: I love rainy days\nTone:")["input_ids"]])


def _reference(tuned: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tuned / "model", dtype=torch.float32), tuned / "adapter").eval()


def test_merged_export_loads_in_transformers_and_equals_base_plus_adapter(tuned, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, text = run_cli(capsys, "export", "-m", str(tuned), "--format", "merged", "-o", str(out), "--log_level", "2")
    assert code == 0, text
    assert "3/3 prompts identical" in text
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = _ids(tuned)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, _reference(tuned)(ids).logits, atol=1e-4)
    summary = json.loads((out / "export.json").read_text())
    assert summary["adapter"] == str(tuned / "adapter") and summary["check"]["max_logit_diff"] < 1e-4


def _gguf(tuned: Path, out: Path, quantization: str, capsys) -> Path:
    code, text = run_cli(capsys, "export", "-m", str(tuned), "--format", "gguf", "--quantization", quantization, "-o", str(out),
                      "--log_level", "2")
    assert code == 0, text
    return out / f"model-{quantization}.gguf"


def test_gguf_f32_reads_back_to_the_merged_model_exactly_with_its_tokenizer(tuned, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _gguf(tuned, tmp_path / "g32", "f32", capsys)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = _ids(tuned)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, _reference(tuned)(ids).logits, atol=1e-4)
    inside = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reference = AutoTokenizer.from_pretrained(tuned / "model")
    text = "Phrase: What a wonderful surprise!\nTone: joyful<|im_end|>"
    assert inside(text, add_special_tokens=False)["input_ids"] == reference(text, add_special_tokens=False)["input_ids"]
    assert inside.chat_template == reference.chat_template
    summary = json.loads((path.parent / "export.json").read_text())
    assert summary["check"]["exact"] == 3 and summary["check"]["tokenizer_identical"]
    modelfile = (path.parent / "Modelfile").read_text()
    assert f"FROM ./{path.name}" in modelfile and "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert not (path.parent / "merged").exists()  # (the staging merge is not left behind)


@pytest.mark.parametrize("quantization,relative_error", [("f16", 1e-3), ("q8_0", 1e-2), ("q4_0", 0.15)])
def test_quantized_gguf_weights_are_the_merged_weights_within_their_type(quantization, relative_error, tuned, tmp_path, capsys):
    """Each weight read back with gguf's own reader and dequantizer (q/k rows in llama.cpp's
    rotary order, so compared through transformers' loader, which undoes it)."""
    import gguf
    from transformers import AutoModelForCausalLM

    path = _gguf(tuned, tmp_path / quantization, quantization, capsys)
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.ffn_down.weight"] == quantization.upper()
    assert "output.weight" not in kinds  # tied head: llama.cpp reuses token_embd
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    values = gguf.quants.dequantize(down.data, down.tensor_type).reshape(-1)
    merged = _reference(tuned).merge_and_unload().state_dict()["model.layers.0.mlp.down_proj.weight"].reshape(-1).numpy()
    assert np.abs(values - merged).max() <= relative_error * np.abs(merged).max()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = loaded(_ids(tuned)).logits, _reference(tuned)(_ids(tuned)).logits
    assert (a - b).abs().max() <= relative_error * 40 * b.abs().max()


@pytest.mark.parametrize("args,message", [
    (["--quantization", "q4_k_m"], "K-quants are made by llama.cpp's quantizer"),
    (["--format", "onnx"], "--format"),
], ids=["k-quant", "format"])
def test_bad_export_requests_are_one_line(args, message, tuned, tmp_path, capsys):
    code, text = run_cli(capsys, "export", "-m", str(tuned), "--format", "gguf", "-o", str(tmp_path / "x"), *args)
    assert code == 2 and message in text, text
    assert not (tmp_path / "x").exists()


def test_gguf_of_an_architecture_it_does_not_write_is_refused_before_work(tiny_models, tmp_path, capsys):
    code, text = run_cli(capsys, "export", "-m", str(tiny_models["gpt2"]), "--format", "gguf", "-o", str(tmp_path / "x"))
    assert code != 0 and "GPT2LMHeadModel" in text and "convert_hf_to_gguf.py" in text, text
    assert not (tmp_path / "x").exists()
    code, text = run_cli(capsys, "export", "-m", str(tiny_models["gpt2"]), "--format", "merged", "-o", str(tmp_path / "m"), "--dry_run")
    assert code == 0 and '"architecture": "GPT2LMHeadModel"' in text and not (tmp_path / "m").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    code, text = run_cli(capsys, "export", "-m", str(tiny_models["gpt2"]), "--format", "merged", "-o", str(tmp_path / "used"))
    assert code != 0 and "is not empty" in text and (tmp_path / "used" / "keep.txt").read_text() == "mine"


def test_gguf_lora_is_the_adapter_as_llama_cpp_applies_it_beside_its_base(tuned, tmp_path, capsys):
    """--format gguf_lora: the base (unmerged) as GGUF and the adapter as a GGUF LoRA, laid out as
    llama.cpp's convert_lora_to_gguf.py lays it out (checked here with gguf's own reader and
    llama.cpp's q/k row order written out independently); the export's own check (base read back
    + the file's updates) gives the PEFT model's logits; the Modelfile names both."""
    import gguf
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    code, text = run_cli(capsys, "export", "-m", str(tuned), "--format", "gguf_lora", "--quantization", "f32", "-o", str(out),
                         "--log_level", "2")
    assert code == 0, text
    summary = json.loads((out / "export.json").read_text())
    adapter_file = out / summary["adapter_file"]
    assert summary["file"] == "base-f32.gguf" and summary["check"]["exact"] == 3 and summary["check"]["max_logit_diff"] < 1e-4
    reader = gguf.GGUFReader(str(adapter_file))

    def field(key):
        part = reader.fields[key].parts[-1]
        return bytes(part).decode() if part.dtype == np.uint8 else float(part[0])

    config = json.loads((tuned / "adapter" / "adapter_config.json").read_text())
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("adapter.lora.alpha") == pytest.approx(config["lora_alpha"])  # alpha/rank in llama.cpp = PEFT's scale
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    peft = load_file(tuned / "adapter" / "adapter_model.safetensors")
    heads = 4
    for layer in (0, 1):
        prefix = f"base_model.model.model.layers.{layer}.self_attn"
        a, b = peft[f"{prefix}.q_proj.lora_A.weight"].numpy(), peft[f"{prefix}.q_proj.lora_B.weight"].numpy()
        rows = b.shape[0]
        llama_cpp_order = b.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(b.shape)
        np.testing.assert_array_equal(tensors[f"blk.{layer}.attn_q.weight.lora_a"], a)
        np.testing.assert_array_equal(tensors[f"blk.{layer}.attn_q.weight.lora_b"], llama_cpp_order)
        np.testing.assert_array_equal(tensors[f"blk.{layer}.attn_v.weight.lora_b"], peft[f"{prefix}.v_proj.lora_B.weight"].numpy())
    assert len(tensors) == 2 * len([k for k in peft if ".lora_A." in k])
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./base-f32.gguf\n" in modelfile and f"ADAPTER ./{adapter_file.name}\n" in modelfile


def test_gguf_lora_refuses_what_llama_cpp_cannot_apply_before_work(tiny_llama, tuned, tmp_path, capsys):
    from slmops.finetune_recipe import finetune

    code, text = run_cli(capsys, "export", "-m", str(tiny_llama), "--format", "gguf_lora", "-o", str(tmp_path / "none"))
    assert code == 2 and "has none; give a finetune output of an adapter method or --adapter_path" in text
    dora = tmp_path / "dora"
    finetune(tiny_config(tiny_llama, dora, max_steps=1, method="dora"))
    code, text = run_cli(capsys, "export", "-m", str(dora), "--format", "gguf_lora", "-o", str(tmp_path / "d"))
    assert code == 1 and "is DoRA: llama.cpp's LoRA has no magnitude vector; export --format gguf (the adapter merged) instead" in text
    assert not (tmp_path / "d").exists() and not (tmp_path / "none").exists()
