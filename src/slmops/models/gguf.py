"""GGUF files -> plain Hugging Face folders (dequantized), through transformers' own loader."""

from __future__ import annotations

from pathlib import Path

from slmops.errors import ModelError


def convert_gguf(gguf_path: Path, out_dir: Path, quiet: bool = False) -> Path:
    """Dequantize `gguf_path` into `out_dir` (config, safetensors, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file {str(gguf_path)!r} does not exist")
    with open(gguf_path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelError(f"{str(gguf_path)!r} is not a GGUF file (bad magic bytes); is it corrupt or truncated?")
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"could not read GGUF file {str(gguf_path)!r}: {exc}") from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
