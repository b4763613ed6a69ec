"""Causal-LM loss computed only where it counts.

A plain forward computes logits for every position over the whole vocabulary (49k for
SmolLM2) and then masks most of them away. Here the decoder runs once, and the output
head runs only on positions that carry a label: for short completions that skips most of
the largest matmul of the step. Before relying on it, `check_fast_path` compares it with
the model's own forward once, so a model whose head does something extra (soft-capping,
scaling) falls back to the plain path instead of training on wrong logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmops.data.batching import right_padded
from slmops.data.tokenize import IGNORE


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_weights(batch: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """Each target position's loss weight, shaped as `like` (B, T-1): its example's class weight
    (--class_weights), or None when the batch carries none (every token counts 1)."""
    weights = batch.get("loss_weight")
    return None if weights is None else weights.to(torch.float32)[:, None].expand(like.shape)


def _summed(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.cross_entropy(logits, targets, reduction="sum")
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


def plain_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of tokens) from the model's own full forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    selected = logits[:, :-1][mask].float()  # (N, V)
    weights = token_weights(batch, targets)
    return _summed(selected, targets[mask], None if weights is None else weights[mask]), int(mask.sum())


CHUNK_LOGITS = 1 << 24  # logits (tokens x vocabulary) computed at once by the chunked head: 64 MB in fp32


def _head_loss(inner, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of token losses, count): the output head and cross-entropy on the positions of
    `hidden` whose target is not IGNORE only (each loss times its weight, where given).
    When those logits would be large (long sequences with the loss on all of it: 16 x 1024
    tokens x SmolLM2's 49k vocabulary is 3.2 GB in fp32, and cross-entropy keeps two more such
    tensors for the backward), a plain linear head runs in chunks (ChunkedHeadLoss)."""
    mask = targets != IGNORE
    head = inner.get_output_embeddings()
    selected = hidden[mask]  # (N, H)
    chosen_weights = None if weights is None else weights[mask]
    if selected.shape[0] * head.weight.shape[0] > CHUNK_LOGITS and type(head) is torch.nn.Linear:
        loss = ChunkedHeadLoss.apply(selected, head.weight, head.bias, targets[mask], chosen_weights)
        return loss, int(mask.sum())
    logits = head(selected).float()  # (N, V)
    return _summed(logits, targets[mask], chosen_weights), int(mask.sum())


class ChunkedHeadLoss(torch.autograd.Function):
    """sum_i w_i * cross_entropy(h_i @ W^T + b, t_i), a chunk of tokens at a time: each chunk's
    logits live only while its loss and its gradients (softmax - one-hot, times w_i) are
    computed, in the forward; the backward scales the kept gradients of h (N x H, small) and of
    W and b (only when they train). The same numbers as the head followed by cross-entropy
    (logits in the head's dtype, then fp32, as nn.Linear under autocast would give them),
    without the N x V tensors."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights):
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_LOGITS // vocab)
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.to(compute)
        b = None if bias is None else bias.to(compute)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # (evaluation, no gradients asked: the loss alone)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            # Two chunk-sized buffers for the whole call, every step below in place: a fresh
            # tokens x vocabulary tensor per operation (the head's output, its fp32 copy,
            # logsumexp's shifted copy, the bf16 copy of the probabilities) is an allocation
            # past glibc's mmap threshold each time, whose page faults cost more than the
            # arithmetic (measured on the 1B benchmark: 73-103 ms per such operation on
            # 341 x 49,152 logits against 3 ms in place).
            rows = min(chunk, n)
            head_out = torch.empty(rows, vocab, dtype=compute, device=hidden.device)
            scores = head_out if compute == torch.float32 else torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk):
                h = hidden[start : start + chunk].to(compute)
                c = h.shape[0]
                out, logits = head_out[:c], scores[:c]
                if b is None:
                    torch.mm(h, w.t(), out=out)
                else:
                    torch.addmm(b, h, w.t(), out=out)
                if logits is not out:
                    logits.copy_(out)  # (c, V) fp32, as the head's output .float()
                t = targets[start : start + chunk]
                target_logits = logits.gather(1, t[:, None])[:, 0]
                top = logits.amax(dim=-1)
                exp = logits.sub_(top[:, None]).exp_()
                sums = exp.sum(dim=-1)
                losses = top + sums.log() - target_logits  # logsumexp - target logit
                # d loss / d logits = softmax - one-hot, each row times its weight
                probs = exp.div_(sums[:, None])
                probs[torch.arange(c, device=probs.device), t] -= 1.0
                if token_weights is not None:
                    tw = token_weights[start : start + chunk].float()
                    losses = losses * tw
                    probs.mul_(tw[:, None])
                total += losses.sum()
                if grad_hidden is not None or grad_weight is not None:
                    low = probs if compute == torch.float32 else out.copy_(probs)  # in the head's dtype, as before
                    if grad_hidden is not None:
                        grad_hidden[start : start + c] = torch.mm(low, w)
                    if grad_weight is not None:
                        grad_weight.add_(torch.mm(low.t(), h))
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return ((grad_hidden * grad_output).to(hidden_dtype) if grad_hidden is not None else None,
                (grad_weight * grad_output).to(weight_dtype) if grad_weight is not None else None,
                (grad_bias * grad_output).to(bias_dtype) if grad_bias is not None else None,
                None, None)


def selective_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Same value as plain_loss; the head only sees labelled positions."""
    inner = _inner(model)
    hidden = inner.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]
    return _head_loss(inner, hidden[:, :-1], targets, token_weights(batch, targets))


def packed_loss(model, batch: dict[str, torch.Tensor], policy=None) -> tuple[torch.Tensor, int]:
    """Same value as selective_loss, without computing on padding: the batch's real tokens
    run as one packed sequence (1, N) with per-example position ids, and the fast path's
    attention (cpu/packing.Packing) keeps each example to itself (under a policy with
    share_prefix, a prefix all the examples share is packed, and computed, once). Batches it cannot or
    need not pack (left padding, little padding under the `policy`, a cpu/packing.PackingPolicy:
    the fast path's `packing_policy`, PADDED_ATTENTION by default; no gradients) take selective_loss."""
    from slmops.train.cpu.packing import PADDED_ATTENTION, Packing

    packing = Packing.of(batch["attention_mask"], policy=policy or PADDED_ATTENTION, input_ids=batch["input_ids"],
                         labels=batch["labels"]) if torch.is_grad_enabled() else None
    if packing is None:
        return selective_loss(model, batch)
    return _packed(model, batch, packing)


def shares_a_prefix(batch: dict[str, torch.Tensor]) -> bool:
    """Whether a policy with share_prefix would pack this batch's common prefix once."""
    from slmops.train.cpu.packing import SHARED_PREFIX_MIN, shareable_prefix

    valid = batch["attention_mask"].bool()
    return right_padded(valid) and shareable_prefix(batch["input_ids"], batch["labels"], valid) >= SHARED_PREFIX_MIN


def _packed(model, batch: dict[str, torch.Tensor], packing) -> tuple[torch.Tensor, int]:
    from slmops.train.cpu import last_layer

    inner = _inner(model)
    input_ids = packing.pack(batch["input_ids"])
    # each token's target is the next token of its own example (IGNORE after its last)
    labels = batch["labels"]
    targets = packing.pack(torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], 1))[0]
    targets[packing.tokens :] = IGNORE  # the rows that round the count up carry no loss
    packing.loss_rows = last_layer.loss_rows(targets, IGNORE)  # the last layer's MLP runs on these only (fast path)
    # sequences attending alone need no mask on the fast path: transformers is kept from building one
    mask = packing.skip_mask if packing.alone else None
    hidden = inner.get_decoder()(input_ids=input_ids, position_ids=packing.position_ids(), attention_mask=mask,
                                 slmops_packing=packing).last_hidden_state
    weights = token_weights(batch, labels)
    if weights is not None:  # packed as the targets are (the rows past the real tokens carry no loss anyway)
        weights = packing.pack(weights.contiguous())[0]
    return _head_loss(inner, hidden[0], targets, weights)


@torch.no_grad()
def check_fast_path(model, batch: dict[str, torch.Tensor]) -> bool:
    """True when selective_loss reproduces the model's own logits on this batch."""
    inner = _inner(model)
    if not (hasattr(inner, "get_decoder") and inner.get_output_embeddings() is not None):
        return False
    was_training = model.training
    model.eval()
    try:
        plain, _ = plain_loss(model, batch)
        fast, _ = selective_loss(model, batch)
    except Exception:
        return False
    finally:
        model.train(was_training)
    return bool(torch.isfinite(fast)) and abs(float(plain) - float(fast)) <= 1e-3 * max(1.0, abs(float(plain)))


def packing_losses(model, batch: dict[str, torch.Tensor], policy=None) -> tuple[float, float] | None:
    """(packed, padded) mean losses of this batch (dropout off), for the packing check; None
    when the batch cannot be packed at all (left padding, holes, too long) or the two count
    other tokens. The batch is packed even where packed_loss would not bother (little padding),
    so the check always exercises packing, as the `policy` runs it (attention in the padded
    layout or per sequence)."""
    from slmops.train.cpu.packing import PADDED_ATTENTION, Packing

    packing = Packing.of(batch["attention_mask"], only_if_it_pays=False, policy=policy or PADDED_ATTENTION,
                         input_ids=batch["input_ids"], labels=batch["labels"])
    if packing is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the fused attention runs in training forwards only
            packed, n_packed = _packed(model, batch, packing)
        with torch.no_grad():
            padded, n_padded = selective_loss(model, batch)
    except Exception:
        return None
    finally:
        model.train(was_training)
    if n_packed != n_padded:
        return None
    return float(packed.detach()) / n_packed, float(padded) / n_padded


def check_packing(model, batch: dict[str, torch.Tensor], fp32_loss=None, policy=None) -> bool:
    """True when the packed forward reproduces the padded one on this batch. In bf16 the two
    round differently (other matmul shapes), and on a few labelled tokens that moves the
    loss by a percent or more; then `fp32_loss()` (the model's own forward in fp32, where the
    caller can compute it) decides: packing passes when it is within tolerance of fp32, or no
    further from it than the padded forward is (x2)."""
    losses = packing_losses(model, batch, policy)
    if losses is None:
        return False
    packed, padded = losses
    tolerance = 1e-2 * max(1.0, abs(padded))
    if abs(packed - padded) <= tolerance:
        return True
    truth = fp32_loss() if fp32_loss is not None else None
    return truth is not None and abs(packed - truth) <= max(2 * abs(padded - truth), 1e-2 * max(1.0, abs(truth)))
