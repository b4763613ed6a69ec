"""Fully sharded data parallel: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) under
slmops' own loop, for models whose weights, gradients and optimizer state do not fit one device
N times over.

Each decoder layer is one FSDP unit and the model (embeddings, final norm, output head: tied
weights stay in one unit) the root unit. Every process keeps 1/N of each parameter; a unit's
parameters are gathered for its forward and backward and freed after (`full_shard`), or kept
from the forward to the backward (`shard_grad_op`: more memory, one gather less). Gradients are
reduce-scattered as sums: slmops' loss is already normalised by the labelled tokens of the whole
global step (train/distributed.py), so the summed gradient is the one-process gradient, and the
run trains the same loss curve as one process with the same global batch.

What sharding asks of the loop (trainer.py):
- every process runs the same number of forwards (each one gathers with all the others): a
  process whose slice of a batch is empty runs a stand-in batch whose loss counts zero, and
  the evaluation split gives every process the same number of batches;
- the model's own forward only (the root unit gathers on its forward): the loss takes the full
  logits, the CPU fast path is off;
- checkpoints hold whole tensors, gathered from every process and written by rank 0, in the
  same format as any other run: a run resumes at another world size, with or without FSDP;
- the outputs (adapter or model, report) are written from a whole copy on rank 0, rebuilt from
  the base and the gathered trainable weights after training.
QLoRA is refused: bitsandbytes' 4-bit weights are not shardable parameters (DDP trains it)."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

MODES = {"full_shard": True, "shard_grad_op": False}  # mode -> reshard_after_forward


def from_accelerate_env() -> str | None:
    """The mode `accelerate launch --use_fsdp` (or an accelerate config with FSDP) asks for:
    it says so in ACCELERATE_USE_FSDP; FSDP_RESHARD_AFTER_FORWARD=false (FSDP2) or
    FSDP_SHARDING_STRATEGY SHARD_GRAD_OP/2 (FSDP1's name) keep gathered weights to the backward."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("true", "1"):
        return None
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "").upper()
    if os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "").lower() == "false" or strategy in ("SHARD_GRAD_OP", "2"):
        return "shard_grad_op"
    return "full_shard"


def root_module(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model): its forward is the one every
    call reaches (training, scoring, generation), so its unit gathers for all of them."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(root: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's list of decoder layers (model.layers, transformer.h, ...): the ModuleList as
    long as config.num_hidden_layers."""
    n = getattr(getattr(root, "config", None), "num_hidden_layers", None)
    for module in root.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and n:
            return module
    return None


def shard(model: torch.nn.Module, mode: str) -> dict:
    """Shard `model` in place over the default process group; returns what the log and run.yaml say."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    reshard = MODES[mode]
    _return_freed_blocks()
    root = root_module(model)
    layers = decoder_layers(root)
    for layer in layers or []:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(root, reshard_after_forward=reshard)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # sums, not means (the loss is normalised over the global step); as a plain SUM
            # collective, which gloo has (FSDP's default pre-scaled sum is NCCL-only)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    held = sum(local(p).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"mode": mode, "units": (len(layers) if layers is not None else 0) + 1, "parameters_held": held, "parameters": total}


def _distributed() -> bool:
    """Sharded tensors exist only in a process group (and one process need not import their module)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _return_freed_blocks() -> None:
    """glibc's malloc raises its mmap threshold each time a large block is freed; blocks below
    the new threshold then come from the heap, and their memory stays with the process when
    freed. FSDP allocates and frees each unit's gathered weights and gradients every step, so
    the process kept growing past what sharding saves. With the threshold fixed at 1 MiB those
    blocks go back to the system when freed (SmolLM2-135M full fine-tuning, 2 processes, 6
    steps: peak resident 2310 vs 3594 MB per process, 54.8 vs 52.8 s). Elsewhere, a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        pass


def is_sharded(model: torch.nn.Module) -> bool:
    if not _distributed():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(root_module(model), FSDPModule)


def _is_dtensor(value) -> bool:
    if not _distributed():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (the tensor itself otherwise)."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every process (a collective: every process calls it, in
    the same order), or the tensor itself when it is not sharded."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def full_state(value, keep: bool = True):
    """A nested state (an optimizer's state_dict) with every sharded tensor gathered whole (a
    collective). `keep` False: this process only helps gather, one tensor at a time, and gets
    the structure with None for each gathered tensor (the writer keeps them)."""
    if isinstance(value, dict):
        return {k: full_state(v, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full_state(v, keep) for v in value)
    if isinstance(value, torch.Tensor):
        whole = full(value)
        return whole if keep or whole is value else None
    return value


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor cut to `param`'s sharding; every process holds the whole value (read from
    the same checkpoint), so each keeps its own piece without communicating."""
    from torch.distributed.tensor import distribute_tensor

    if not _is_dtensor(param):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading a checkpoint's whole optimizer state: each per-parameter tensor cut to its
    parameter's sharding (AdamW's moments; the step counters stay whole)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and not _is_dtensor(value) and _is_dtensor(param) and value.shape == param.shape:
                    state[key] = shard_like(value.to(param.dtype if value.is_floating_point() else value.dtype), param)


def sync_gradients(model: torch.nn.Module, now: bool) -> None:
    """Reduce-scatter gradients after this backward (the last micro-batch of a step) or keep
    accumulating them locally (the ones before it)."""
    root_module(model).set_requires_gradient_sync(now)
