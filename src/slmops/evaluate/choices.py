"""Classification by likelihood: every label is scored as the completion the model would
write (its tokens and the end token that follows it in training), and the most likely label
is the prediction. A constrained choice: no answer is "unparseable", and one forward pass of
the prompt serves all labels (the back ends share the prompt's cache across them).

The candidate text is the training text with the label in the gold answer's place (so the
space before it, and the end-of-text token or the chat template's end of turn after it, are
as training had them), tokenized whole and scored over the tokens training puts loss on: the
label's log-likelihood is minus its training loss."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slmops.data.format import FormattedExample
from slmops.data.labels import LabelSet
from slmops.data.tokenize import IGNORE, label_tokens
from slmops.errors import DataError

def candidate(example: FormattedExample, label: str, tokenizer, add_special_tokens: bool) -> tuple[list[int], int]:
    """(token ids of the example with `label` as its answer, index of the first scored token)."""
    if example.completion is None:
        raise DataError("likelihood scoring needs a completion in each example (the label); this format has none")
    prompt, gold = example.prompt, example.completion
    at = example.text.rfind(gold, len(prompt)) if gold else -1  # the answer: the last thing before the end of the text
    if at >= 0:  # the training text with the label in the answer's place: the space before it (which the
        # prompt leaves to the answer's first token, ' angry'), the end token or end of turn after it
        text = example.text[:at] + label + example.text[at + len(gold):]
    else:
        text = prompt + label + (tokenizer.eos_token or "")
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    scored = label_tokens(encoded["offset_mapping"], [(len(prompt), len(text))], ids)
    start = next((i for i in range(1, len(ids)) if scored[i] != IGNORE), None)
    if start is None:
        raise DataError(f"label {label!r} adds no token to the prompt; likelihood scoring cannot tell it apart")
    return ids, start


def score_labels(backend, examples: Sequence[FormattedExample], labels: LabelSet, adapter: str | None, add_special_tokens: bool,
                 progress: bool = False, batch_size: int = 16) -> np.ndarray:
    """(examples, labels) log-probabilities of each label as the completion of each prompt."""
    from slmops.logs import progress_bar

    scores = np.empty((len(examples), len(labels.labels)), dtype=np.float64)
    starts = range(0, len(examples), batch_size)
    for begin in progress_bar(starts, desc=f"score labels ({backend.name})", unit="batch", enabled=progress):
        groups = []
        for example in examples[begin: begin + batch_size]:
            candidates = [candidate(example, label, backend.tokenizer, add_special_tokens) for label in labels.labels]
            groups.append(([ids for ids, _ in candidates], [start for _, start in candidates]))
        scores[begin: begin + len(groups)] = backend.choice_logprobs_batch(groups, adapter, batch_size)
    return scores


def predict_labels(scores: np.ndarray, labels: LabelSet) -> list[str]:
    return [labels.labels[int(i)] for i in scores.argmax(axis=1)]
