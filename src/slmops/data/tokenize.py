"""Formatted examples -> token ids and labels (-100 where no loss), with a count of what
was truncated or dropped, never silently."""

from __future__ import annotations

from dataclasses import dataclass, field

from slmops.data.format import FormattedExample, Formatter
from slmops.errors import DataError

IGNORE = -100  # label of positions without loss (PyTorch cross-entropy's ignore_index)


@dataclass
class TokenizedData:
    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    kept_rows: list[int] = field(default_factory=list)  # source row of each kept example
    extra: dict[str, list] = field(default_factory=dict)  # per-example extra inputs (pairs: input_ids_2, label)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def fingerprint(self) -> str:
        """A hash of every example's token ids and loss mask: equal exactly when training
        would see the same examples (same data, template, tokenizer and length limit)."""
        import hashlib

        import numpy as np

        digest = hashlib.sha256()
        for ids, labels in zip(self.input_ids, self.labels):
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(np.asarray(labels, dtype=np.int64).tobytes())
            digest.update(b"|")
        for key in sorted(self.extra):
            digest.update(key.encode() + repr(self.extra[key]).encode())
        return digest.hexdigest()[:16]

    def trained_tokens(self) -> int:
        return sum(sum(1 for t in labels[1:] if t != IGNORE) for labels in self.labels)

    def summary(self) -> str:
        parts = [f"{len(self)} examples"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to --max_seq_len")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as longer than --max_seq_len")
        if self.dropped_no_labels:
            parts.append(f"{self.dropped_no_labels} dropped with no completion tokens left")
        return ", ".join(parts)


def label_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], ids: list[int]) -> list[int]:
    """Labels for one example: a token carries loss when its characters overlap a span.
    No spans means loss on every token."""
    if not spans:
        return list(ids)
    labels = []
    for token_id, (start, end) in zip(ids, offsets):
        inside = end > start and any(end > s and start < e for s, e in spans)
        labels.append(token_id if inside else IGNORE)
    return labels


def tokenize_examples(
    examples: list[FormattedExample], tokenizer, formatter: Formatter, max_seq_len: int, long_examples: str = "truncate"
) -> TokenizedData:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("slmops needs a fast (Rust) tokenizer to place the loss mask; this model's tokenizer is a slow one")
    encoded = tokenizer(
        [ex.text for ex in examples],
        add_special_tokens=formatter.add_special_tokens,
        return_offsets_mapping=True,
        truncation=False,
    )
    out = TokenizedData([], [])
    for row, (ids, offsets, ex) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"], examples)):
        labels = label_tokens(offsets, ex.train_spans, ids)
        too_long = len(ids) > max_seq_len
        if too_long:
            if long_examples == "drop":
                out.dropped_too_long += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if not formatter.lm_loss:
            labels = [IGNORE] * len(ids)
        # labels[0] never counts: a causal LM predicts token t from tokens < t.
        elif not any(label != IGNORE for label in labels[1:]):
            out.dropped_no_labels += 1
            continue
        out.truncated += too_long
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.kept_rows.append(row)
        if ex.extra:
            for key, value in ex.extra.items():
                if key == "text_2":
                    second = tokenizer(value, add_special_tokens=formatter.add_special_tokens, truncation=True, max_length=max_seq_len)
                    out.extra.setdefault("input_ids_2", []).append(second["input_ids"])
                else:
                    out.extra.setdefault(key, []).append(value)
    return out
