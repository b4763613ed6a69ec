"""Rows -> text, with the character span(s) that carry the loss.

Every format produces a `FormattedExample`: the full training text, the prompt that a
model is given at inference, the gold completion, and the spans of `text` the loss is
computed on. Loss on the completion only is the default wherever the format says what the
completion is (assistant turns, `output`, a template whose last field ends it)."""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field

from slmops.config import DataConfig
from slmops.errors import DataError

MESSAGE_COLUMNS = ("messages", "conversations", "conversation")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant", "system": "system", "bot": "assistant"}


@dataclass
class FormattedExample:
    text: str
    prompt: str  # what a model is given at inference time
    completion: str | None  # the gold answer (no end-of-text token), None when the format has none
    train_spans: list[tuple[int, int]] = field(default_factory=list)  # char spans with loss; empty: whole text
    extra: dict | None = None  # other inputs of the example (pairs: {"text_2": ..., "label": ...}), for a custom loss


@dataclass
class Formatter:
    name: str
    description: str  # one line, shown to the user
    render: Callable[[dict], FormattedExample]
    has_completion: bool
    add_special_tokens: bool  # False when a chat template already writes bos/eos
    lm_loss: bool = True  # False: no language-model loss (pairs, for a custom loss): examples kept without labelled tokens

    def __call__(self, row: dict) -> FormattedExample:
        return self.render(row)


def unescape(template: str) -> str:
    r"""Shell users type '\n' in templates; make it a newline (and \t a tab)."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise DataError(f"--text_template is not a valid template ({exc}); use {{column}} placeholders, {{{{ for a literal brace") from None


def template_inputs(template: str) -> tuple[list[str], str | None]:
    """(the fields a prompt fills, the completion field or None) of a text template, by the
    rule training uses: the last field is the completion when nothing but whitespace follows it."""
    fields = template_fields(template)
    if not fields:
        return [], None
    last = fields[-1]
    marker = "{" + last + "}"
    cut = template.rfind(marker)
    unique = list(dict.fromkeys(fields))
    if template[cut + len(marker):].strip() == "" and cut > 0:
        return [f for f in unique if f != last], last
    return unique, None


def prompt_head(template: str) -> str:
    """The part of a text template a model is prompted with: the text before the completion
    field (the whole template when it has none)."""
    _, completion = template_inputs(template)
    return template[: template.rfind("{" + completion + "}")] if completion else template


def fill_prompt(head: str, values: dict[str, str]) -> str:
    """A prompt head filled as training renders it. A prompt ending in a space would tokenize
    differently from training text, where the space merges into the answer's first token
    (" joyful"): leave it to the model."""
    return head.format_map(_BlankIfMissing(values)).rstrip(" \t")


class _BlankIfMissing(dict):
    """Template values where a field not given (the completion, met in the prompt) is empty."""

    def __missing__(self, key: str) -> str:
        return ""


def template_prompt(template: str, values: dict[str, str]) -> str:
    """The prompt a model trained on `template` is given for `values` (its input fields)."""
    return fill_prompt(prompt_head(template), values)


def build_formatter(cfg: DataConfig, columns: list[str], tokenizer) -> Formatter:
    """Choose the format (from the flags, else from the columns) and check it fits the data."""
    fmt = cfg.data_format
    if fmt == "auto":
        fmt = _detect(cfg, columns)
    builder = _BUILDERS[fmt]
    return builder(cfg, columns, tokenizer)


def required_fields(cfg: DataConfig, columns: list[str]) -> list[str]:
    """The columns every row needs a value in, for the format these flags and columns choose
    (a null there would train as an empty string)."""
    fmt = _detect(cfg, columns) if cfg.data_format == "auto" else cfg.data_format
    if fmt == "pairs":
        return list(PAIR_COLUMNS)
    if fmt == "template":
        return list(dict.fromkeys(template_fields(unescape(cfg.text_template or ""))))
    if fmt == "text":
        return [cfg.text_field or "text"]
    if fmt == "chat":
        column = next((c for c in MESSAGE_COLUMNS if c in columns), None)
        return [column] if column else ["prompt", "completion"]
    return {"alpaca": ["instruction", "output"], "input_output": ["input", "output"],
            "prompt_completion": ["prompt", "completion"]}[fmt]


def _detect(cfg: DataConfig, columns: list[str]) -> str:
    cols = set(columns)
    if cfg.text_template:
        return "template"
    if cfg.text_field:
        return "text"
    if cols & set(MESSAGE_COLUMNS):
        return "chat"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"input", "output"} <= cols:
        return "input_output"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if set(PAIR_COLUMNS) <= cols:
        return "pairs"
    if "text" in cols:
        return "text"
    raise DataError(
        f"cannot tell how to turn rows into text; columns are: {', '.join(columns)}. Pass --text_template "
        "'...{column}...', --text_field COLUMN, or data with messages / prompt+completion / instruction+output / input+output columns"
    )


def _require(columns: list[str], needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{what}: field(s) {', '.join(repr(m) for m in missing)} not in the data; columns are: {', '.join(columns)}")


def _eos(tokenizer) -> str:
    return tokenizer.eos_token or ""


def _template(cfg: DataConfig, columns: list[str], tokenizer) -> Formatter:
    if not cfg.text_template:
        raise DataError("--data_format template needs --text_template")
    template = unescape(cfg.text_template)
    fields = template_fields(template)
    if not fields:
        raise DataError("--text_template has no {column} placeholders")
    _require(columns, fields, "--text_template")
    _, completion = template_inputs(template)
    has_completion = completion is not None
    last = fields[-1]
    loss_on_completion = has_completion and not cfg.train_on_inputs
    head = prompt_head(template)  # parsed once, filled per row
    eos = _eos(tokenizer)

    def render(row: dict) -> FormattedExample:
        values = {k: "" if row.get(k) is None else str(row[k]) for k in fields}
        text = template.format(**values)
        if not has_completion:
            return FormattedExample(text + eos, text, None)
        prompt = fill_prompt(head, values)
        spans = [(len(prompt), len(text) + len(eos))] if loss_on_completion else []
        return FormattedExample(text + eos, prompt, values[completion], spans)

    what = f"text template over {', '.join(dict.fromkeys(fields))}"
    what += f"; loss on '{{{last}}}' (the completion) only" if loss_on_completion else "; loss on the whole text"
    return Formatter("template", what, render, has_completion, True)


def _text(cfg: DataConfig, columns: list[str], tokenizer) -> Formatter:
    column = cfg.text_field or "text"
    _require(columns, [column], "--text_field")
    eos = _eos(tokenizer)

    def render(row: dict) -> FormattedExample:
        text = "" if row.get(column) is None else str(row[column])
        return FormattedExample(text + eos, text, None)

    return Formatter("text", f"plain text from column '{column}'; loss on all of it", render, False, True)


def _chat_render(tokenizer) -> Callable[..., str]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("this format needs a chat template, and the model's tokenizer has none; use --text_template instead")

    def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def _chat_example(messages: list[dict], render, train_on_inputs: bool) -> FormattedExample:
    """Loss on every assistant turn: each turn's span is found by rendering the conversation
    up to it with and without the turn, so it works for any chat template."""
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("a conversation must end with an assistant message (the completion)")
    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True) if i else ""
        through = render(messages[: i + 1])
        if text.startswith(through) and through.startswith(before):
            spans.append((len(before), len(through)))
    prompt = render(messages[:-1], add_generation_prompt=True)
    if train_on_inputs or not spans:
        spans = []
    return FormattedExample(text, prompt, messages[-1]["content"], spans)


def _chat(cfg: DataConfig, columns: list[str], tokenizer) -> Formatter:
    column = next((c for c in MESSAGE_COLUMNS if c in columns), None)
    if column is None:
        if {"prompt", "completion"} <= set(columns):
            return _prompt_completion(cfg, columns, tokenizer)
        raise DataError(f"--use_chat_template needs a messages/conversations column or prompt+completion columns; columns are: {', '.join(columns)}")
    render = _chat_render(tokenizer)

    def to_messages(row: dict) -> list[dict]:
        turns = row[column] or []
        out = []
        for turn in turns:
            if "role" in turn:
                out.append({"role": turn["role"], "content": turn.get("content") or ""})
            else:
                role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
                if role is None:
                    raise DataError(f"unknown speaker {turn.get('from')!r} in '{column}' (expected human/gpt/system)")
                out.append({"role": role, "content": turn.get("value") or ""})
        return out

    def render_row(row: dict) -> FormattedExample:
        return _chat_example(to_messages(row), render, cfg.train_on_inputs)

    loss = "the whole conversation" if cfg.train_on_inputs else "assistant turns only"
    return Formatter("chat", f"'{column}' through the model's chat template; loss on {loss}", render_row, True, False)


def _pair_formatter(name: str, prompt_of: Callable[[dict], str], answer_col: str, plain_prompt: Callable[[dict], str]):
    def build(cfg: DataConfig, columns: list[str], tokenizer) -> Formatter:
        if cfg.use_chat_template:
            render = _chat_render(tokenizer)

            def render_row(row: dict) -> FormattedExample:
                messages = [{"role": "user", "content": prompt_of(row)}, {"role": "assistant", "content": _s(row.get(answer_col))}]
                return _chat_example(messages, render, cfg.train_on_inputs)

            how = "through the model's chat template"
            special = False
        else:
            eos = _eos(tokenizer)

            def render_row(row: dict) -> FormattedExample:
                prompt = plain_prompt(row)
                answer = _s(row.get(answer_col))
                text = prompt + answer + eos
                spans = [] if cfg.train_on_inputs else [(len(prompt), len(text))]
                return FormattedExample(text, prompt, answer, spans)

            how = "as plain text (add --use_chat_template for the model's chat template)"
            special = True
        loss = "all of it" if cfg.train_on_inputs else f"'{answer_col}' only"
        return Formatter(name, f"{name} columns {how}; loss on {loss}", render_row, True, special)

    return build


def _s(value) -> str:
    return "" if value is None else str(value)


def _alpaca_prompt(row: dict) -> str:
    if _s(row.get("input")).strip():
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            f"Write a response that appropriately completes the request.\n\n### Instruction:\n{_s(row.get('instruction'))}"
            f"\n\n### Input:\n{_s(row.get('input'))}\n\n### Response:\n"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{_s(row.get('instruction'))}\n\n### Response:\n"
    )


def _alpaca_user(row: dict) -> str:
    extra = _s(row.get("input")).strip()
    return _s(row.get("instruction")) + (f"\n\n{extra}" if extra else "")


def _checked(builder, needed: list[str], label: str):
    def build(cfg: DataConfig, columns: list[str], tokenizer) -> Formatter:
        _require(columns, needed, f"{label} format")
        return builder(cfg, columns, tokenizer)

    return build


_alpaca = _checked(_pair_formatter("alpaca", _alpaca_user, "output", _alpaca_prompt), ["instruction", "output"], "alpaca")
_input_output = _checked(
    _pair_formatter("input_output", lambda r: _s(r.get("input")), "output", lambda r: f"Input: {_s(r.get('input'))}\nOutput: "),
    ["input", "output"],
    "input_output",
)
_prompt_completion = _checked(
    _pair_formatter("prompt_completion", lambda r: _s(r.get("prompt")), "completion", lambda r: _s(r.get("prompt"))),
    ["prompt", "completion"],
    "prompt_completion",
)


PAIR_COLUMNS = ("text1", "text2", "label")


def _pairs(cfg: DataConfig, columns: list[str], tokenizer) -> Formatter:
    """Two texts and a number per row (similar pairs 1, others 0, or a score): the data of a
    contrastive or ranking loss. No language-model loss; the custom loss reads the texts'
    hidden states (text1 is the batch's input_ids, text2 its input_ids_2) and the label."""
    _require(columns, list(PAIR_COLUMNS), "pairs format")

    def render(row: dict) -> FormattedExample:
        try:
            label = float(row["label"])
        except (TypeError, ValueError):
            raise DataError(f"label {row.get('label')!r} is not a number") from None
        text = _s(row.get("text1"))
        return FormattedExample(text, text, None, [], {"text_2": _s(row.get("text2")), "label": label})

    return Formatter("pairs", "pairs of texts (text1, text2) with a numeric label, for a custom loss (--loss)", render, False, True,
                     lm_loss=False)


_BUILDERS: dict[str, Callable[[DataConfig, list[str], object], Formatter]] = {
    "pairs": _pairs,
    "template": _template,
    "text": _text,
    "chat": _chat,
    "alpaca": _alpaca,
    "input_output": _input_output,
    "prompt_completion": _prompt_completion,
}
