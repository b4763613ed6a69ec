"""Deterministic batch order (a function of seed and epoch only, so a resumed run sees
the same batches) and padding collation."""

from __future__ import annotations

import math

import torch

from slmops.data.tokenize import IGNORE, TokenizedData


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool, shuffle: bool = True) -> list[list[int]]:
    """Batches of example indices for one epoch. With length grouping, examples are
    shuffled, cut into mega-batches of 50 batches, sorted by length inside each, then the
    batches are shuffled: little padding, still random order."""
    n = len(lengths)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    if group_by_length:
        mega = batch_size * 50
        grouped = []
        for start in range(0, n, mega):
            chunk = order[start : start + mega]
            grouped.extend(sorted(chunk, key=lambda i: -lengths[i]))
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length and shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


def collate(data: TokenizedData, indices: list[int], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example of the batch. Shapes: (B, T)."""
    longest = max(len(data.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), longest), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(indices), longest), dtype=torch.long)
    for row, i in enumerate(indices):
        ids = data.input_ids[i]
        n = len(ids)
        sl = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        input_ids[row, sl] = torch.tensor(ids)
        labels[row, sl] = torch.tensor(data.labels[i])
        attention[row, sl] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    for key, values in data.extra.items():  # a custom loss's inputs: a second text (padded alike), numbers
        if key == "input_ids_2":
            second = [values[i] for i in indices]
            width = max(len(s) for s in second)
            batch["input_ids_2"] = torch.full((len(indices), width), pad_id, dtype=torch.long)
            batch["attention_mask_2"] = torch.zeros((len(indices), width), dtype=torch.long)
            for row, ids in enumerate(second):
                sl = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
                batch["input_ids_2"][row, sl] = torch.tensor(ids)
                batch["attention_mask_2"][row, sl] = 1
        else:
            batch[key] = torch.tensor([values[i] for i in indices])
    return batch


def split_rows(batch: dict[str, torch.Tensor], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """A collated micro-batch cut between examples into consecutive pieces of at most
    `max_tokens` real tokens each (an example longer than that alone), each piece trimmed of
    the padding columns it no longer needs. Every tensor's rows are cut alike; the examples keep
    their order. The pieces' summed losses and gradients are the batch's (a loss summed over
    tokens), so a trainer can run them one after another to bound the activations it keeps.
    A batch within the limit comes back as it is, the only piece."""
    lengths = batch["attention_mask"].sum(1).tolist()
    total = sum(lengths)
    if total <= max_tokens or len(lengths) == 1:
        return [batch]
    target = total / math.ceil(total / max_tokens)  # pieces about even: 8 x 256 at 1,638 is 4 + 4 rows, not 6 + 2
    pieces, start, tokens = [], 0, 0
    for row, n in enumerate(lengths):
        if row > start and (tokens + n > max_tokens or tokens + n / 2 > target):
            pieces.append((start, row))
            start, tokens = row, 0
        tokens += n
    pieces.append((start, len(lengths)))
    return [_rows(batch, a, b) for a, b in pieces]


def _rows(batch: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    piece = {key: value[start:end] for key, value in batch.items()}
    used = piece["attention_mask"].any(0).nonzero()
    width = int(used[-1]) + 1 if len(used) else 0
    # only trailing all-padding columns go: a left-padded piece keeps its width (its last column is real)
    for key in ("input_ids", "attention_mask", "labels"):
        piece[key] = piece[key][:, :width].contiguous()
    return piece


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Each row's real tokens first, then only padding (no left padding, no holes)."""
    valid = attention_mask.bool()
    return torch.equal(valid, torch.arange(valid.shape[1], device=valid.device)[None] < valid.sum(1, keepdim=True))


def last_tokens(batch: dict[str, torch.Tensor], limit: int) -> dict[str, torch.Tensor]:
    """A right-padded batch with each example cut to its last `limit` real tokens (an example
    that would keep no labelled token stays whole), padded again to the longest: a batch as long
    as a check needs, and no longer. Other batches (short already, left-padded) come back as they are."""
    mask = batch["attention_mask"].bool()
    if mask.shape[1] <= limit or not right_padded(mask):
        return batch
    lengths = mask.sum(1)
    padding = batch["input_ids"][~mask]
    fill = {"input_ids": int(padding[0]) if len(padding) else 0, "attention_mask": 0, "labels": IGNORE}
    spans = []
    for row, n in enumerate(lengths.tolist()):
        start = max(0, n - limit)
        spans.append((start if bool((batch["labels"][row, start:n] != IGNORE).any()) else 0, n))
    width = max(end - start for start, end in spans)
    cut = dict(batch)
    for key, value in fill.items():
        rows = torch.full((len(spans), width), value, dtype=batch[key].dtype)
        for row, (start, end) in enumerate(spans):
            rows[row, : end - start] = batch[key][row, start:end]
        cut[key] = rows
    return cut
