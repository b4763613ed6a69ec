import json

import pytest
from transformers import AutoTokenizer

from slmops.config import DataConfig
from slmops.data.format import build_formatter
from slmops.data.load import load_split, parse_split
from slmops.data.prepare import load_splits, prepare_data
from slmops.data.tokenize import IGNORE, tokenize_examples
from slmops.errors import DataError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_slices(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": i} for i in range(10)])
    assert [r["a"] for r in load_split(str(path), "train[2:5]").dataset] == [2, 3, 4]
    assert [r["a"] for r in load_split(str(path), "train[-2:]").dataset] == [8, 9]
    assert len(load_split(str(path), "train[:50%]").dataset) == 5
    with pytest.raises(DataError, match="out of range.*10 rows"):
        load_split(str(path), "train[4096:4224]")
    with pytest.raises(DataError, match="selects no rows"):
        load_split(str(path), "train[5:5]")
    with pytest.raises(DataError, match="cannot parse split"):
        parse_split("train[1:2")
    with pytest.raises(DataError, match="split 'test' not found"):
        load_split(str(path), "test")


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a" 3}\n')
    with pytest.raises(DataError, match="line 3"):
        load_split(str(path), "train")


def test_json_array_and_folder_splits(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"input": "q", "output": "a"}] * 3))
    write_jsonl(tmp_path / "val.jsonl", [{"input": "q", "output": "a"}])
    assert len(load_split(str(tmp_path), "train").dataset) == 3
    assert len(load_split(str(tmp_path), "validation").dataset) == 1


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_split(str(path), "train")


def test_template_field_missing_names_columns(tone_data):
    cfg = DataConfig(data_name=str(tone_data), text_template="{phrase} -> {mood}")
    with pytest.raises(DataError, match="'mood' not in the data.*columns are: phrase, tone"):
        load_splits(cfg)


def test_template_loss_mask_covers_completion_only(tok, tone_data):
    cfg = DataConfig(data_name=str(tone_data), train_split="train[:4]", text_template="Phrase: {phrase}\\nTone: {tone}")
    data = prepare_data(cfg, tok)
    assert data.formatter.name == "template"
    for ids, labels, row in zip(data.train.input_ids, data.train.labels, data.train_split.dataset):
        trained = [t for t in labels if t != IGNORE]
        text = tok.decode(trained)
        assert text.strip() == row["tone"] + tok.eos_token
        assert tok.decode(ids).startswith("Phrase: " + row["phrase"] + "\nTone:")


def test_train_on_inputs_puts_loss_everywhere(tok, tone_data):
    cfg = DataConfig(data_name=str(tone_data), train_split="train[:2]", text_template="{phrase} {tone}", train_on_inputs=True)
    data = prepare_data(cfg, tok)
    assert data.train.labels[0] == data.train.input_ids[0]


def test_chat_messages_loss_on_assistant_turns(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "joyful"},
                          {"role": "user", "content": "and now"}, {"role": "assistant", "content": "sad"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = prepare_data(DataConfig(data_name=str(path)), tok)
    assert data.formatter.name == "chat"
    trained = tok.decode([t for t in data.train.labels[0] if t != IGNORE])
    assert trained == "joyful<|im_end|>\nsad<|im_end|>\n"


def test_sharegpt_conversations(tok, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "neutral"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    data = prepare_data(DataConfig(data_name=str(path)), tok)
    assert tok.decode([t for t in data.train.labels[0] if t != IGNORE]).startswith("neutral")


@pytest.mark.parametrize(
    "row, expected_format",
    [
        ({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca"),
        ({"input": "What?", "output": "That."}, "input_output"),
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion"),
        ({"text": "free text"}, "text"),
    ],
)
def test_format_detection(tok, tmp_path, row, expected_format):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    cfg = DataConfig(data_name=str(path))
    formatter = build_formatter(cfg, list(row), tok)
    assert formatter.name == expected_format
    example = formatter(row)
    if expected_format != "text":
        answer = row.get("output", row.get("completion"))
        assert example.completion == answer
        start, end = example.train_spans[0]
        assert example.text[start:end].startswith(answer)


def test_prompt_completion_with_chat_template(tok, tmp_path):
    row = {"prompt": "2+2=", "completion": "4"}
    formatter = build_formatter(DataConfig(data_name="x", use_chat_template=True), list(row), tok)
    example = formatter(row)
    assert example.prompt.endswith("<|im_start|>assistant\n")
    assert example.text.startswith(example.prompt)


def test_unknown_columns_are_explained(tok):
    with pytest.raises(DataError, match="columns are: foo, bar"):
        build_formatter(DataConfig(data_name="x"), ["foo", "bar"], tok)


def test_overlong_examples_are_counted(tok, tone_data):
    rows = list(load_split(str(tone_data), "train[:20]").dataset)
    lengths = [len(tok(f"{r['phrase']} {r['tone']}{tok.eos_token}")["input_ids"]) for r in rows]
    limit = sorted(lengths)[len(lengths) // 2]  # half the rows are longer than this
    n_long = sum(1 for n in lengths if n > limit)
    on_inputs = DataConfig(data_name=str(tone_data), train_split="train[:20]", text_template="{phrase} {tone}",
                           train_on_inputs=True, max_seq_len=limit)
    truncated = prepare_data(on_inputs, tok).train
    assert truncated.truncated == n_long and len(truncated) == 20
    assert max(truncated.lengths) == limit and f"{n_long} truncated" in truncated.summary()
    dropped = prepare_data(on_inputs.model_copy(update={"long_examples": "drop"}), tok).train
    assert dropped.dropped_too_long == n_long and len(dropped) == 20 - n_long
    # with loss on the completion only, a row whose answer is cut off entirely is dropped, and counted
    cfg = on_inputs.model_copy(update={"train_on_inputs": False})
    formatter = build_formatter(cfg, ["phrase", "tone"], tok)
    completion_only = tokenize_examples([formatter(r) for r in rows], tok, formatter, 4)
    assert completion_only.dropped_no_labels == 20 and "20 dropped with no completion tokens left" in completion_only.summary()
    with pytest.raises(DataError, match="no training examples left"):
        prepare_data(cfg.model_copy(update={"max_seq_len": 4}), tok)
