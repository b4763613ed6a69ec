"""`slmops export`: a tuned model in the formats other runtimes load.

- merged: the adapter merged into the base weights, a plain Hugging Face folder
  (`AutoModelForCausalLM.from_pretrained` loads it; so do vLLM, TGI and llama.cpp's converter);
- gguf: one GGUF file for llama.cpp and Ollama (f32, f16, q8_0 or q4_0 weights, norms in f32), the
  tokenizer and chat template inside, and an Ollama Modelfile beside it.

The GGUF is written with the `gguf` package (llama.cpp's own Python library: its writer, its
tensor-name map, its quantizers) the way llama.cpp's convert_hf_to_gguf.py lays out a Llama
(q/k rows permuted for its rotary layout, tied output head left out). Every export is checked
before it is reported done: the merged folder against base + adapter in PyTorch, the GGUF read
back by transformers' GGUF loader against the merged model (greedy tokens, largest logit
difference), numbers in OUT/export.json."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slmops.config.deploy import ModelExportConfig
from slmops.errors import ConfigError, ModelError
from slmops.logs import phase
from slmops.outputs import check_new_folder

log = logging.getLogger("slmops")

GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
# what llama.cpp's loader expects of the whole file, by weight type
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
CHECK_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "Classify the tone: I love this!"]


@dataclass
class PortablePlan:
    config: ModelExportConfig
    base: Path  # the base model's Hugging Face folder
    adapter: Path | None  # a PEFT adapter to merge
    output: Path
    architecture: str


def plan_portable(config: ModelExportConfig) -> PortablePlan:
    """Everything checked before any weight is read: the output folder, the source, the adapter,
    and for GGUF the architecture, rotary scaling and tokenizer kind."""
    from slmops.inference.adapters import resolve_adapter
    from slmops.models import resolve_model
    from slmops.models.load import check_weight_files, load_config

    output = Path(config.output_path)
    check_new_folder(output)
    source = resolve_model(config.model_name_or_path)
    check_weight_files(source.path)
    adapter = source.adapter_path
    if config.adapter_path:
        resolved = resolve_adapter(config.adapter_path)
        if resolved is None or resolved.kind != "peft":
            raise ConfigError(f"--adapter_path {config.adapter_path!r}: a PEFT adapter folder is needed to merge")
        adapter = resolved.path
    model_config = load_config(source.path, config.trust_remote_code)
    architecture = (getattr(model_config, "architectures", None) or ["?"])[0]
    if config.format == "gguf_lora":
        if adapter is None:
            raise ConfigError(f"--format gguf_lora writes an adapter beside its base: {config.model_name_or_path!r} has none; give "
                              "a finetune output of an adapter method or --adapter_path")
        lora_settings(adapter)  # an adapter llama.cpp's LoRA can apply, or the reason it cannot
    if config.format in ("gguf", "gguf_lora"):
        if architecture not in GGUF_ARCHITECTURES:
            raise ModelError(f"{architecture} ({config.model_name_or_path}): slmops writes GGUF for {', '.join(GGUF_ARCHITECTURES)} "
                             "(SmolLM2, Llama 3.x); export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
        scaling = _rope_scaling(model_config)
        if scaling not in (None, "default"):
            raise ModelError(f"{config.model_name_or_path} uses {scaling!r} rotary scaling, which slmops' GGUF export does not write "
                             "yet; export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
        tokenizer_json = source.path / "tokenizer.json"
        kind = json.loads(tokenizer_json.read_text()).get("model", {}).get("type") if tokenizer_json.is_file() else None
        if kind != "BPE":
            raise ModelError(f"{config.model_name_or_path}: its tokenizer is {kind or 'not a tokenizer.json'}, not byte-level BPE; "
                             "slmops' GGUF export writes BPE (gpt2-style) vocabularies")
    return PortablePlan(config, source.path, adapter, output, architecture)


def _rope_scaling(model_config) -> str | None:
    params = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None) or {}
    return params.get("rope_type") or params.get("type")


def export_portable(plan: PortablePlan) -> dict:
    """Write the export (staged, moved into place when complete and checked); returns the summary."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    output = plan.output
    staging = output.parent / f".{output.name}.slmops-staging"
    shutil.rmtree(staging, ignore_errors=True)
    merged_dir = staging if plan.config.format == "merged" else staging / "merged"
    try:
        with phase("merging the adapter into the base" if plan.adapter and plan.config.format != "gguf_lora" else "loading the model"):
            model = merge(plan, merged_dir, with_adapter=plan.config.format != "gguf_lora")
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        summary: dict = {"format": plan.config.format, "source": plan.config.model_name_or_path,
                         "adapter": str(plan.adapter) if plan.adapter else None}
        if plan.config.format == "merged":
            with phase("checking the merged folder against PyTorch", "export-merged-check", size_mb):
                summary["check"] = check_merged(plan, merged_dir, tokenizer)
        elif plan.config.format == "gguf_lora":
            summary.update(_export_gguf_lora(plan, staging, merged_dir, model, tokenizer, size_mb))
            shutil.rmtree(merged_dir)
        else:
            gguf_file = staging / f"model-{plan.config.quantization}.gguf"
            from slmops.inference.adapters import default_adapter_name

            name = default_adapter_name(Path(plan.config.model_name_or_path))  # models/tone/ft -> tone
            with phase(f"writing {gguf_file.name} ({plan.config.quantization})", f"export-gguf-{plan.config.quantization}", size_mb):
                write_gguf(model, tokenizer, merged_dir, gguf_file, plan.config.quantization, name)
            (staging / "Modelfile").write_text(modelfile(gguf_file.name, tokenizer))
            summary.update(file=gguf_file.name, quantization=plan.config.quantization,
                           size_mb=round(gguf_file.stat().st_size / 2**20, 1))
            with phase("checking the GGUF against PyTorch (read back by transformers)", "export-gguf-check", size_mb):
                summary["check"] = check_gguf_export(model, tokenizer, gguf_file, plan.config.check_prompts)
            shutil.rmtree(merged_dir)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        (staging / "export.json").write_text(json.dumps(summary, indent=2))
        if output.exists():
            output.rmdir()  # (checked empty by the plan)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _export_gguf_lora(plan: PortablePlan, staging: Path, base_dir: Path, base, tokenizer, size_mb: float) -> dict:
    """base-<q>.gguf (the base, unmerged) + adapter-<name>.gguf + a Modelfile with ADAPTER; checked:
    the base read back, the adapter's updates from its file added, against base + adapter in PEFT."""
    from slmops.inference.adapters import default_adapter_name

    name = default_adapter_name(Path(plan.config.model_name_or_path))
    base_file = staging / f"base-{plan.config.quantization}.gguf"
    adapter_file = staging / f"adapter-{name}.gguf"
    with phase(f"writing {base_file.name} ({plan.config.quantization})", f"export-gguf-{plan.config.quantization}", size_mb):
        write_gguf(base, tokenizer, base_dir, base_file, plan.config.quantization, f"{name}-base")
    pairs = write_gguf_lora(plan.adapter, base.config, adapter_file, name)
    (staging / "Modelfile").write_text(modelfile(base_file.name, tokenizer, adapter_file.name))
    summary = {"file": base_file.name, "adapter_file": adapter_file.name, "adapted_weights": pairs,
               "quantization": plan.config.quantization,
               "size_mb": round(base_file.stat().st_size / 2**20, 1), "adapter_size_mb": round(adapter_file.stat().st_size / 2**20, 2)}
    if plan.config.check_prompts:
        with phase("checking base + GGUF LoRA against PyTorch + PEFT (both files read back)", "export-gguf-check", size_mb):
            summary["check"] = check_gguf_lora(plan, base_file, adapter_file, tokenizer)
    return summary


def check_gguf_lora(plan: PortablePlan, base_file: Path, adapter_file: Path, tokenizer) -> dict:
    """The base GGUF read back by transformers with each update of the GGUF LoRA added as
    llama.cpp adds it, against the base with the adapter in PEFT (not merged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from slmops.logs import progress_enabled

    quiet = not progress_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(base_file.parent, gguf_file=base_file.name, dtype=torch.float32).eval()
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    updates = read_gguf_lora(adapter_file, loaded.config)
    weights = dict(loaded.named_parameters())
    with torch.no_grad():
        for name, update in updates.items():
            weights[name] += update
    reference = AutoModelForCausalLM.from_pretrained(plan.base, dtype=torch.float32, trust_remote_code=plan.config.trust_remote_code)
    reference = PeftModel.from_pretrained(reference, plan.adapter).eval()
    result = compare(reference, loaded, tokenizer, _prompts(tokenizer, plan.config.check_prompts))
    result["adapted_weights_read_back"] = len(updates)
    log.info("export: %s + %s read back vs base + adapter: %d/%d prompts identical, %.0f%% tokens agree, max |logit diff| %.3g",
             base_file.name, adapter_file.name, result["exact"], result["prompts"], 100 * result["token_agreement"],
             result["max_logit_diff"])
    return result


def merge(plan: PortablePlan, folder: Path, with_adapter: bool = True):
    """base (+ adapter merged) in fp32, saved as a Hugging Face folder; returns the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(plan.base, dtype=torch.float32, trust_remote_code=plan.config.trust_remote_code)
    if plan.adapter is not None and with_adapter:
        from peft import PeftModel

        log.info("export: merging %s into %s", plan.adapter, plan.base)
        model = PeftModel.from_pretrained(model, plan.adapter).merge_and_unload()
    model.eval()
    model.config.use_cache = True
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(plan.base, trust_remote_code=plan.config.trust_remote_code).save_pretrained(folder)
    return model


# ---- checks ------------------------------------------------------------------------------------
def _prompts(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for text in CHECK_PROMPTS[:count]:
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        prompts.append(list(ids))
    return prompts


def compare(reference, candidate, tokenizer, prompts: list[list[int]], new_tokens: int = 12) -> dict:
    """deploy.parity's agreement of two PyTorch models, the logits also compared on the reference's answer."""
    from slmops.deploy.parity import agreement
    from slmops.inference.torch_backend import TorchBackend

    return agreement(TorchBackend.from_model(reference, tokenizer, "reference"), TorchBackend.from_model(candidate, tokenizer, "export"),
                     prompts, new_tokens, continuation_logits=True)


def check_merged(plan: PortablePlan, folder: Path, tokenizer) -> dict:
    from transformers import AutoModelForCausalLM

    if not plan.config.check_prompts:
        return {}
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(plan.base, dtype=torch.float32, trust_remote_code=plan.config.trust_remote_code)
    if plan.adapter is not None:
        from peft import PeftModel

        reference = PeftModel.from_pretrained(reference, plan.adapter)
    result = compare(reference.eval(), merged, tokenizer, _prompts(tokenizer, plan.config.check_prompts))
    log.info("export: merged folder vs base + adapter: %d/%d prompts identical, max |logit diff| %.2g", result["exact"],
             result["prompts"], result["max_logit_diff"])
    return result


def check_gguf_export(merged, tokenizer, gguf_file: Path, count: int) -> dict:
    """The GGUF read back by transformers' GGUF loader (dequantized) against the merged model."""
    from transformers import AutoModelForCausalLM

    if not count:
        return {}
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from slmops.logs import progress_enabled

    quiet = not progress_enabled()  # (transformers' de-quantizing bar follows slmops' log level)
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
        inside = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)  # the vocabulary the file carries
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    prompts = _prompts(tokenizer, count)
    result = compare(merged, loaded, tokenizer, prompts)
    texts = [tokenizer.decode(ids) for ids in prompts]
    result["tokenizer_identical"] = all(inside(t, add_special_tokens=False)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
                                        for t in texts)
    log.info("export: %s read back vs the merged model: %d/%d prompts identical, %.0f%% tokens agree, max |logit diff| %.3g",
             gguf_file.name, result["exact"], result["prompts"], 100 * result["token_agreement"], result["max_logit_diff"])
    return result


# ---- GGUF ----------------------------------------------------------------------------------------
def lora_settings(adapter_dir: Path) -> tuple[int, float]:
    """(rank, PEFT's scale) of a LoRA adapter that a GGUF LoRA can carry: llama.cpp applies
    B·A·alpha/rank per adapted weight, one alpha per file, nothing else."""
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{adapter_dir}: adapter_config.json cannot be read ({exc})") from None
    merged_instead = "; export --format gguf (the adapter merged) instead"
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{adapter_dir} is a {config.get('peft_type')} adapter; a GGUF LoRA carries LoRA only{merged_instead}")
    if config.get("use_dora"):
        raise ModelError(f"{adapter_dir} is DoRA: llama.cpp's LoRA has no magnitude vector{merged_instead}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ModelError(f"{adapter_dir} has per-layer ranks or alphas; a GGUF LoRA has one alpha{merged_instead}")
    if config.get("modules_to_save"):
        raise ModelError(f"{adapter_dir} also trains whole modules ({', '.join(config['modules_to_save'])}), which a GGUF LoRA "
                         f"cannot carry{merged_instead}")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    return rank, alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank


def write_gguf_lora(adapter_dir: Path, model_config, path: Path, name: str) -> int:
    """The adapter alone as a GGUF LoRA for llama.cpp (`--lora`) and Ollama (`ADAPTER`), laid
    out as llama.cpp's convert_lora_to_gguf.py does: each adapted weight's A and B (f32) as
    `<weight>.lora_a` / `.lora_b`, B's rows in llama.cpp's rotary order for q and k, and
    adapter.lora.alpha so that llama.cpp's alpha/rank is PEFT's scale. Returns the tensor pairs."""
    import gguf
    from safetensors.torch import load_file

    rank, scale = lora_settings(adapter_dir)
    heads = model_config.num_attention_heads
    kv_heads = model_config.num_key_value_heads or heads
    state = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, model_config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * rank)
    pairs = 0
    for key in sorted(state):
        if not key.endswith(".lora_A.weight"):
            if ".lora_B." not in key:
                raise ModelError(f"{adapter_dir}: the adapter holds {key!r}, which a GGUF LoRA cannot carry; export --format gguf")
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        mapped = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if mapped is None:
            raise ModelError(f"GGUF LoRA export: no llama.cpp name for the adapted weight {module!r}")
        a = state[key].float()
        b = state[key.replace(".lora_A.", ".lora_B.")].float()
        if module.endswith("q_proj"):
            b = _permute(b, heads)
        elif module.endswith("k_proj"):
            b = _permute(b, kv_heads)
        writer.add_tensor(f"{mapped}.lora_a", a.numpy())
        writer.add_tensor(f"{mapped}.lora_b", b.numpy())
        pairs += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pairs


def read_gguf_lora(path: Path, model_config) -> dict[str, torch.Tensor]:
    """{Hugging Face weight name: the update B·A·alpha/rank} of a GGUF LoRA, computed from the
    file as llama.cpp applies it (B's rotary order undone for q and k)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].parts[-1][0])
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model_config.num_hidden_layers)
    heads = model_config.num_attention_heads
    kv_heads = model_config.num_key_value_heads or heads
    updates = {}
    for layer in range(model_config.num_hidden_layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"):
            hf = f"model.layers.{layer}.{part}.weight"
            mapped = names.get_name(hf, try_suffixes=(".weight",))
            if f"{mapped}.lora_a" not in tensors:
                continue
            a, b = tensors[f"{mapped}.lora_a"], tensors[f"{mapped}.lora_b"]
            if part.endswith("q_proj"):
                b = _unpermute(b, heads)
            elif part.endswith("k_proj"):
                b = _unpermute(b, kv_heads)
            updates[hf] = b @ a * (alpha / a.shape[0])
    return updates


def _unpermute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary row order -> Hugging Face's (the inverse of _permute)."""
    return weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)

def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q/k rows -> llama.cpp's rotary layout (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _vocabulary(tokenizer, size: int):
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization rules (it picks its regex by it)."""
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and len(vocab) == 49152:
        return "smollm"
    if "<|begin_of_text|>" in vocab:
        return "llama-bpe"
    return "gpt2"


def write_gguf(model, tokenizer, hf_folder: Path, path: Path, quantization: str, name: str = "model") -> None:
    import gguf
    import numpy as np

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = params.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    arch = gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quantization]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = _vocabulary(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(hf_folder, load_merges=True, n_vocab=len(tokens))  # merges, bos/eos/pad ids, chat template
    special.add_to_gguf(writer)

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[quantization]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False)
    for name, tensor in state.items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp uses the token embedding as the output head when output.weight is absent
        if name.endswith("rotary_emb.inv_freq"):
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ModelError(f"GGUF export: no llama.cpp name for the tensor {name!r}")
        data = tensor.detach().float()
        if name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        array = data.numpy()
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(mapped, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16 or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            writer.add_tensor(mapped, array.astype(np.float16))
        else:
            writer.add_tensor(mapped, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


CHATML = '''TEMPLATE """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""'''
LLAMA3 = '''TEMPLATE """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""'''


def modelfile(gguf_name: str, tokenizer, adapter_name: str | None = None) -> str:
    """An Ollama Modelfile: the GGUF (and a GGUF LoRA on it), the chat template in Ollama's (Go)
    template language for the two families slmops' models use, and the stop tokens."""
    template = tokenizer.chat_template or ""
    lines = ["# ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    stops = []
    if "<|im_start|>" in template:
        lines.append(CHATML)
        stops = ["<|im_end|>", "<|im_start|>"]
    elif "<|start_header_id|>" in template:
        lines.append(LLAMA3)
        stops = ["<|eot_id|>", "<|start_header_id|>"]
    elif tokenizer.eos_token:
        stops = [tokenizer.eos_token]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
