"""Deterministic batch order (a function of seed and epoch only, so a resumed run sees
the same batches) and padding collation."""

from __future__ import annotations

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
