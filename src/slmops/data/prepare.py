"""The data half of a run: load splits, choose the format, tokenize, report. Needs only
the tokenizer, so every data problem surfaces before a model is loaded."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from slmops.config import DataConfig
from slmops.data.format import FormattedExample, Formatter, build_formatter, template_fields, unescape
from slmops.data.labels import MAX_LABELS, LabelSet, holdout_rows, is_label, label_set, looks_like_classification, normalize_label
from slmops.data.load import LoadedSplit, load_split
from slmops.data.tokenize import TokenizedData, tokenize_examples
from slmops.errors import DataError

log = logging.getLogger("slmops")


@dataclass
class PreparedData:
    formatter: Formatter
    train: TokenizedData
    train_split: LoadedSplit
    eval: TokenizedData | None = None
    eval_split: LoadedSplit | None = None
    eval_examples: list[FormattedExample] | None = None
    labels: LabelSet | None = None  # the label set of a classification task
    train_completions: list[str | None] | None = None  # each training example's completion (its label)

    def describe(self) -> dict:
        info = {
            "format": self.formatter.name,
            "format_description": self.formatter.description,
            "train": {"source": self.train_split.source, "split": self.train_split.split, "rows": len(self.train_split.dataset),
                      "fingerprint": self.train_split.fingerprint, "tokenized": self.train.summary(),
                      "trained_tokens": self.train.trained_tokens()},
        }
        if self.train_split.skipped_rows:
            info["train"]["skipped_bad_rows"] = self.train_split.skipped_rows
        if self.eval is not None and self.eval_split is not None:
            info["eval"] = {"source": self.eval_split.source, "split": self.eval_split.split, "rows": len(self.eval_split.dataset),
                            "fingerprint": self.eval_split.fingerprint, "tokenized": self.eval.summary()}
        info["task"] = {"kind": "generation"}
        if self.labels is not None:  # each label as the data writes it, with its count in train
            counts = [self.labels.counts.get(name, 0) for name in self.labels.names]
            info["task"] = {"kind": "classification", "labels": dict(zip(self.labels.labels, counts))}
        return info


def format_rows(dataset, formatter: Formatter) -> list[FormattedExample]:
    out = []
    for index, row in enumerate(dataset):
        try:
            out.append(formatter(row))
        except DataError as exc:
            raise DataError(f"row {index}: {exc}") from None
    return out


@dataclass
class RawSplits:
    train: LoadedSplit
    eval: LoadedSplit | None


def rows_split(cfg: DataConfig) -> str:
    """The split a scoring of a run reads its rows from: --eval_split, else train (auto: the
    rows are then held out of train, by hold_out)."""
    return cfg.train_split if cfg.eval_split in (None, "", "auto") else cfg.eval_split


def load_splits(cfg: DataConfig) -> RawSplits:
    """Read the splits and check what can be checked without a tokenizer (columns used by
    a template or text field), so data mistakes surface before a model is fetched."""
    train = load_split(cfg.data_name, cfg.train_split, cfg.data_files, cfg.train_subset)
    if cfg.max_samples is not None and cfg.max_samples < len(train.dataset):
        train.dataset = train.dataset.select(range(cfg.max_samples))
    evaluation = None
    if cfg.eval_split and cfg.eval_split != "auto":  # auto is held out of train once the completions are known
        evaluation = load_split(cfg.data_name, cfg.eval_split, cfg.data_files, cfg.eval_subset or cfg.train_subset)
    for split in filter(None, (train, evaluation)):
        columns = list(split.dataset.column_names)
        if cfg.text_template:
            missing = [f for f in template_fields(unescape(cfg.text_template)) if f not in columns]
            if missing:
                raise DataError(
                    f"--text_template: field(s) {', '.join(repr(m) for m in missing)} not in the data "
                    f"({split.source}, split {split.split!r}); columns are: {', '.join(columns)}"
                )
        elif cfg.text_field and cfg.text_field not in columns:
            raise DataError(f"--text_field {cfg.text_field!r} is not a column of {split.source}; columns are: {', '.join(columns)}")
        check_rows(split, cfg)
    return RawSplits(train, evaluation)


def check_rows(split: LoadedSplit, cfg: DataConfig) -> None:
    """Rows with no value (missing or null) in a field the format needs: an error naming
    them, or with --skip_bad_rows left out and counted. Never trained as empty text."""
    from slmops.data.format import required_fields

    columns = list(split.dataset.column_names)
    try:
        needed = [f for f in required_fields(cfg, columns) if f in columns]
    except DataError:
        return  # the format itself does not fit; build_formatter says how
    bad: dict[int, list[str]] = {}
    for field in needed:
        for index, value in enumerate(split.dataset[field]):
            if value is None:
                bad.setdefault(index, []).append(field)
    if not bad:
        return
    if cfg.skip_bad_rows:
        keep = [i for i in range(len(split.dataset)) if i not in bad]
        if not keep:
            raise DataError(f"every row of {split.source} (split {split.split!r}) lacks a value for {', '.join(needed)}")
        split.dataset = split.dataset.select(keep)
        split.skipped_rows = len(bad)
        return
    shown = ", ".join(f"{split.first_row + i + 1} ({', '.join(repr(f) for f in fields)})" for i, fields in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise DataError(
        f"{len(bad)} row(s) of {split.source} (split {split.split!r}) have no value for a field the format needs: "
        f"row {shown}{more} (rows counted from 1); fix the data or pass --skip_bad_rows to leave them out"
    )


def prepare_data(cfg: DataConfig, tokenizer, splits: RawSplits | None = None, need_eval_examples: bool = False,
                 seed: int = 42, hold_out_for_labels: bool = False) -> PreparedData:
    """Format and tokenize the splits. `hold_out_for_labels`: no eval split was asked for, and a
    classification task gets one anyway (--eval_split auto: what picks its best weights)."""
    splits = splits or load_splits(cfg)
    train_split = splits.train
    formatter = build_formatter(cfg, list(train_split.dataset.column_names), tokenizer)
    train_examples = format_rows(train_split.dataset, formatter)
    labels = find_labels(cfg, [ex.completion for ex in train_examples])
    eval_split, eval_examples = splits.eval, None
    if cfg.eval_split == "auto" or (hold_out_for_labels and labels is not None and eval_split is None):
        train_split, eval_split, train_examples, eval_examples = hold_out(train_split, train_examples, labels, seed)
    train = tokenize_examples(train_examples, tokenizer, formatter, cfg.max_seq_len, cfg.long_examples)
    if len(train) == 0:
        raise DataError(f"no training examples left after tokenization ({train.summary()}); raise --max_seq_len or check the data")
    prepared = PreparedData(formatter, train, train_split, labels=labels,
                            train_completions=[train_examples[row].completion for row in train.kept_rows])
    if eval_split is not None:
        eval_formatter = build_formatter(cfg, list(eval_split.dataset.column_names), tokenizer)
        examples = eval_examples if eval_examples is not None else format_rows(eval_split.dataset, eval_formatter)
        prepared.eval = tokenize_examples(examples, tokenizer, eval_formatter, cfg.max_seq_len, cfg.long_examples)
        prepared.eval_split = eval_split
        prepared.eval_examples = examples if need_eval_examples or labels is not None else None
        if len(prepared.eval) == 0:
            raise DataError(f"the eval split {cfg.eval_split!r} has no usable examples ({prepared.eval.summary()})")
        if labels is not None:
            _check_eval_classes(labels, [ex.completion for ex in examples])
    return prepared


def find_labels(cfg: DataConfig, completions: list[str | None]) -> LabelSet | None:
    """The task's label set when it is classification (asked, or found from the training
    completions), else None; said in the log either way."""
    if cfg.task == "generation":
        return None
    if cfg.task == "classification":
        bad = [i for i, c in enumerate(completions) if not is_label(c)]
        if bad:
            raise DataError(f"--task classification needs a one-line label as each example's completion; row {bad[0]} has "
                            f"{completions[bad[0]]!r}" + (f" ({len(bad)} rows in all)" if len(bad) > 1 else ""))
        labels = label_set(completions)
        if len(labels.labels) < 2:
            raise DataError(f"--task classification needs two or more labels; every training completion is {labels.labels[0]!r}")
        if len(labels.labels) > MAX_LABELS:
            raise DataError(f"--task classification: the training completions hold {len(labels.labels)} distinct answers, more than "
                            f"a label set of at most {MAX_LABELS} (free text? then leave --task to auto)")
    elif looks_like_classification(completions):
        labels = label_set(completions)
    else:
        log.info("task: generation (the completions are free text; --task classification if they are labels)")
        return None
    log.info("task: classification, %d labels: %s", len(labels.labels), labels.describe())
    return labels


def hold_out(train_split: LoadedSplit, examples: list[FormattedExample], labels: LabelSet | None, seed: int):
    """--eval_split auto: 10% of the training rows held out (stratified by label for
    classification); (train split, eval split, train examples, eval examples)."""
    import dataclasses

    train_rows, eval_rows = holdout_rows([ex.completion for ex in examples], labels is not None, seed)
    dataset = train_split.dataset
    held = dataclasses.replace(train_split, dataset=dataset.select(eval_rows), split=f"{train_split.split} (auto: {len(eval_rows)} rows "
                               f"held out{', stratified' if labels is not None else ''})", fingerprint=f"{train_split.fingerprint}-heldout-{seed}")
    kept = dataclasses.replace(train_split, dataset=dataset.select(train_rows))
    if labels is not None:
        counts = Counter(normalize_label(examples[i].completion or "") for i in eval_rows)
        shown = ", ".join(f"{name} {counts.get(name, 0)}" for name in labels.names)
        log.info("eval: %d of %d training rows held out (--eval_split auto), stratified by label: %s", len(eval_rows), len(examples), shown)
    else:
        log.info("eval: %d of %d training rows held out at random (--eval_split auto)", len(eval_rows), len(examples))
    return kept, held, [examples[i] for i in train_rows], [examples[i] for i in eval_rows]


def _check_eval_classes(labels: LabelSet, eval_completions: list[str | None]) -> None:
    """A validation split that misses a class scores it 0 F1 by construction; one with labels
    never trained on scores answers the model cannot give: both said before training."""
    seen = Counter(normalize_label(c or "") for c in eval_completions)
    missing = [name for name in labels.names if not seen.get(name)]
    if missing:
        log.warning("the eval split has no example of %s (of %d labels): its scores say nothing about %s; --eval_split auto "
                    "holds out a stratified 10%% of train", ", ".join(missing), len(labels.labels), "them" if len(missing) > 1 else "it")
    unknown = sorted(set(seen) - set(labels.names))
    if unknown:
        log.warning("the eval split has labels the training data never shows: %s", ", ".join(unknown[:5]))


def preview(example: FormattedExample, tokenizer, formatter: Formatter, max_seq_len: int) -> str:
    """One example as the model sees it: tokens without loss dimmed in [brackets], tokens
    with loss plain, plus counts."""
    data = tokenize_examples([example], tokenizer, formatter, max_seq_len)
    if not len(data):
        return f"(this example is dropped: {data.summary()})"
    ids, labels = data.input_ids[0], data.labels[0]
    pieces = []
    for i, (token, label) in enumerate(zip(ids, labels)):
        text = tokenizer.decode([token])
        trained = label != -100 and i > 0
        pieces.append(text if trained else f"[{text}]")
    n_loss = sum(1 for label in labels[1:] if label != -100)
    legend = f"\n\n-- {len(ids)} tokens, {n_loss} with loss (shown plain); tokens in [brackets] carry no loss"
    return "".join(pieces) + legend
