"""Load tokenizers and models from a resolved folder, and inspect a model's structure
without loading its weights (for validation before any expensive work)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slmops.errors import ModelError


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"could not load the tokenizer from {str(path)!r}: {exc}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token will do;
        # eos is the usual choice and keeps the vocabulary unchanged.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"could not read the model config in {str(path)!r}: {exc}") from None


def check_safetensors(file: Path, what: str) -> None:
    """A .safetensors file whose header parses and whose tensors all lie inside the file:
    catches truncated and corrupt downloads in a millisecond, before a load fails halfway."""
    import json
    import struct

    size = file.stat().st_size
    problem = None
    try:
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                problem = f"it has {size} bytes, too few for a header"
            else:
                (header_len,) = struct.unpack("<Q", head)
                if header_len > size - 8:
                    problem = f"its header claims {header_len} bytes, more than the file has"
                else:
                    header = json.loads(handle.read(header_len))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                    if 8 + header_len + end > size:
                        problem = f"it is cut short ({size} bytes; its tensors need {8 + header_len + end})"
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        problem = "its header is not valid"
    if problem:
        raise ModelError(f"{what} {str(file)!r} is corrupt or truncated: {problem}. Download or export it again")


def check_weight_files(path: Path) -> None:
    """Every safetensors weight file of a model folder is whole (see check_safetensors)."""
    for file in sorted(Path(path).glob("*.safetensors")):
        check_safetensors(file, "model weights file")


@dataclass(frozen=True)
class ModelStructure:
    """What validation needs to know about a model, read without loading its weights."""

    model_type: str
    linear_layers: list[str]  # full names of linear-like leaves
    attention_projections: list[str]  # leaf names of linears directly inside attention blocks
    num_parameters: int
    max_positions: int | None = None  # the longest sequence the model's position embeddings cover
    hidden_size: int | None = None  # of the residual stream (None: the config does not say)
    num_layers: int | None = None  # decoder layers
    mlp_size: int | None = None  # of a layer's MLP

    def leaf_names(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.linear_layers})


def inspect_model(path: Path, trust_remote_code: bool = False) -> ModelStructure:
    """Build the model on the meta device (no memory, no weights read) and describe it."""
    from transformers import AutoModelForCausalLM

    config = load_config(path, trust_remote_code)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"could not build the model in {str(path)!r}: {exc}") from None
    classes = {name: type(module).__name__ for name, module in model.named_modules()}
    linear = [name for name, module in model.named_modules() if _is_linear(module)]
    projections: list[str] = []
    for full in linear:
        parent, _, leaf = full.rpartition(".")
        if classes.get(parent, "").endswith("Attention") and leaf not in projections:
            projections.append(leaf)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or (4 * hidden if hidden else None)
    return ModelStructure(config.model_type, linear, projections, sum(p.numel() for p in model.parameters()),
                          int(positions) if positions else None, hidden, layers, mlp)


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with transposed weights.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def load_model(path: Path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False, quantize_4bit: bool = False, compute_dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or dtype,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
    check_weight_files(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as exc:
        raise ModelError(f"loading {str(path)!r} needs a package that is missing: {exc}") from None
    except (OSError, ValueError, RuntimeError) as exc:  # missing weight files, corrupt or mismatched shards
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelError(f"could not load the model weights in {str(path)!r}: {first}") from None
    if not quantize_4bit:
        model.to(device)
    return model
