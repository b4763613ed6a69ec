"""Classification data: the label set of a task whose answers are a few one-line labels,
found from the data (or given), and the stratified hold-out that keeps class ratios."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from slmops.errors import DataError

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_label(text: str) -> str:
    """First non-empty line, lower-cased, without punctuation or surrounding space."""
    for line in text.strip().splitlines():
        if line.strip():
            return re.sub(r"\s+", " ", line.translate(_PUNCT).strip().lower())
    return ""


# More distinct answers than this is free text, not a label set.
MAX_LABELS = 32


@dataclass(frozen=True)
class LabelSet:
    """The labels as written in the data (one spelling each: the most common), in the order
    their normalized forms sort; `counts` by normalized label."""

    labels: tuple[str, ...]
    counts: dict[str, int]

    @property
    def names(self) -> list[str]:
        return [normalize_label(label) for label in self.labels]

    def describe(self) -> str:
        return ", ".join(f"{name} ({self.counts.get(name, 0)})" for name in self.names)


def label_set(completions: Sequence[str | None], given: Sequence[str] | None = None) -> LabelSet:
    """The label set of a classification task: `given` (--labels) or the distinct gold answers."""
    gold = [c for c in completions if c is not None]
    counts = Counter(normalize_label(c) for c in gold)
    if given:
        labels = tuple(dict.fromkeys(label.strip() for label in given if label.strip()))
        unknown = sorted(set(counts) - {normalize_label(label) for label in labels})
        if unknown:
            raise DataError(f"--labels: the data has answers outside the given labels: {', '.join(unknown[:5])}; add them to --labels "
                            "or drop those rows")
        return LabelSet(labels, dict(counts))
    spellings: dict[str, Counter] = {}
    for c in gold:
        spellings.setdefault(normalize_label(c), Counter())[c.strip()] += 1
    labels = tuple(spellings[name].most_common(1)[0][0] for name in sorted(spellings))
    return LabelSet(labels, dict(counts))


def is_label(completion: str | None) -> bool:
    """A gold answer that can be a class label: present, non-empty, one line."""
    return completion is not None and bool(normalize_label(completion)) and len(completion.strip().splitlines()) == 1


def balanced_class_weights(completions: Sequence[str | None]) -> dict[str, float]:
    """--class_weights auto: each label's weight n / (k * n_label) (scikit-learn's 'balanced'),
    so every label weighs the same in the loss and the examples' weights average 1."""
    counts = Counter(normalize_label(c or "") for c in completions)
    return {name: len(completions) / (len(counts) * count) for name, count in counts.items()}


def looks_like_classification(completions: Sequence[str | None]) -> bool:
    """Few distinct one-line answers, each seen several times: a label set, not free text."""
    if not completions or not all(is_label(c) for c in completions):
        return False
    distinct = {normalize_label(c) for c in completions}
    return 2 <= len(distinct) <= MAX_LABELS and len(completions) >= 4 * len(distinct)


HOLDOUT_FRACTION = 0.1  # the seed's advice: a 10-20 % validation split, stratified for classification


def holdout_rows(completions: Sequence[str | None], stratify: bool, seed: int,
                 fraction: float = HOLDOUT_FRACTION) -> tuple[list[int], list[int]]:
    """(train rows, eval rows): `fraction` of the rows held out at random (seeded), taken from
    each label in proportion when `stratify` (every label with two or more rows gives at
    least one), so the eval split keeps the training class ratios."""
    import random

    n = len(completions)
    if n < 10:
        raise DataError(f"--eval_split auto holds out {fraction:.0%} of the training rows, and there are only {n}; "
                        "give an --eval_split, or more data")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for row, completion in enumerate(completions):
        groups.setdefault(normalize_label(completion or "") if stratify else "", []).append(row)
    # each group's share of the hold-out by largest remainder, so the shares add up to the total
    total = round(n * fraction)
    exact = {name: len(rows) * total / n for name, rows in groups.items()}
    share = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda k: (share[k] - exact[k], k))[: total - sum(share.values())]:
        share[name] += 1
    held: list[int] = []
    for name in sorted(groups):
        rows = groups[name]
        take = max(share[name], 1) if stratify and len(rows) >= 2 else share[name]
        held += rng.sample(rows, min(take, len(rows) - 1))
    held_set = set(held)
    return [r for r in range(n) if r not in held_set], sorted(held)
