"""GGUF files -> plain Hugging Face folders (dequantized), through transformers' own loader."""

from __future__ import annotations

import struct
from pathlib import Path

from slmops.errors import ModelError


def check_gguf(gguf_path: Path) -> None:
    """Parse the whole GGUF structure (gguf's own reader, memory-mapped: no weights are
    read): a truncated or corrupt file is named here, not deep inside a conversion."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, KeyError, struct.error, IndexError, OSError, MemoryError) as exc:
        raise ModelError(f"GGUF file {str(gguf_path)!r} is corrupt or truncated ({str(exc)[:200] or type(exc).__name__}); "
                         "download it again") from None
    if end > gguf_path.stat().st_size:
        raise ModelError(f"GGUF file {str(gguf_path)!r} is truncated: its tensors need {end} bytes, the file has "
                         f"{gguf_path.stat().st_size}; download it again")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
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
    check_gguf(gguf_path)
    from slmops.logs import progress_enabled

    quiet = not progress_enabled()  # transformers' loading bars follow slmops' log level
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
    except (ValueError, KeyError, OSError, struct.error, IndexError) as exc:
        raise ModelError(f"could not read GGUF file {str(gguf_path)!r}: {str(exc)[:300] or type(exc).__name__}") from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
