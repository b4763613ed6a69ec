"""The trainable input embedding tied to the output head (full fine-tuning of SmolLM2, Llama 3.2
1B, Qwen, Gemma...): its gradient added as the rows the batch used into the head's gradient of the
same weight, in place, instead of as a dense matrix.

nn.Embedding's backward builds a dense (vocabulary x hidden) gradient, all zeros but the batch's
rows, and the engine then adds it out of place to the head's own dense gradient of the same
weight: two fresh vocabulary-sized tensors a step (SmolLM2-135M: 113 MB each in fp32; Llama 3.2
1B: 1 GB), each faulted in page by page because it is over malloc's thresholds. Measured on a
2-core EPYC on the tone workload: the zero fill and the add took 112 + 130 ms of a 2.9 s full
fine-tuning step. (F.embedding's `sparse=True` does not help: the engine sums a sparse gradient
with the head's dense one out of place too, a 145 ms copy.)

Here the embedding's backward hands the weight no gradient and keeps its rows (ids, grad); the
weight's gradient is then the head's alone, and a post-accumulate hook on the weight adds the
kept rows into it with index_add_ as soon as the engine has accumulated it, inside backward():
before the loop sums gradients over processes (train/distributed.py) or the optimizer reads them.
On that step the fill and the add are gone, and an interleaved A/B (three 8-step runs each way
in one process) measured 1.16x.

Only for a tied weight, whose gradient the head always gives: an untied embedding has no other
gradient to add its rows to."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slmops.train.cpu.patches import Patches


def tied_trainable_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's input embedding when it trains and is tied to the output head (the same
    Parameter), is a plain nn.Embedding and does not ask for sparse gradients itself; else None."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    embedding, head = get_in(), get_out()
    if type(embedding) is not nn.Embedding or embedding.sparse or not embedding.weight.requires_grad:
        return None
    if head is None or getattr(head, "weight", None) is not embedding.weight:
        return None
    return embedding


class _RowsFunction(torch.autograd.Function):
    """F.embedding whose backward keeps (ids, grad rows) in `kept` and gives the weight none."""

    @staticmethod
    def forward(ctx, input_ids, weight, kept: list, padding_idx: int | None):
        ctx.save_for_backward(input_ids)
        ctx.kept, ctx.padding_idx = kept, padding_idx
        return F.embedding(input_ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (input_ids,) = ctx.saved_tensors
        ids, rows = input_ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # nn.Embedding: the padding row gets no gradient
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        ctx.kept.append((ids, rows))
        return None, None, None, None


def install(patches: Patches, embedding: nn.Embedding, is_enabled) -> None:
    """`embedding`'s forward through _RowsFunction while `is_enabled()` (the same output; the same
    gradient once the hook has added the rows)."""
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    weight = embedding.weight

    def add_rows(param: torch.Tensor) -> None:
        while kept:
            ids, rows = kept.pop()
            if param.grad is None:  # (a loss that never reached the head: the rows are the whole gradient)
                param.grad = torch.zeros_like(param)
            param.grad.index_add_(0, ids, rows.to(param.grad.dtype))

    def forward(self, own_forward, input_ids, *args, **kwargs):
        if args or kwargs or not is_enabled() or self.max_norm is not None or self.scale_grad_by_freq \
                or not torch.is_grad_enabled():
            return own_forward(input_ids, *args, **kwargs)
        # (rows left by a backward whose gradient never reached the weight, e.g. a loss without the
        # head, belong to no step: never added to a later one)
        kept.clear()
        return _RowsFunction.apply(input_ids, self.weight, kept, self.padding_idx)

    handle = weight.register_post_accumulate_grad_hook(add_rows)
    patches.on_undo(handle.remove)
    patches.on_undo(kept.clear)
    patches.replace_forward(embedding, forward)
