"""`slmops chat` as a user drives it: commands (unknown ones refused with the list), the token
limit said when an answer is cut and raised with /max_tokens, Ctrl-C stopping the answer being
written and not the chat."""

from __future__ import annotations

import io
import sys

from slmops.cli.main import main


def chat(monkeypatch, capsys, model, lines: list[str], *flags: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", "-m", str(model), "--log_level", "3", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_commands_and_the_token_limit(monkeypatch, capsys, tiny_llama):
    code, out, err = chat(monkeypatch, capsys, tiny_llama, ["/frobnicate", "/max_tokens 3", "hello", "/max_tokens many", "/quit", "never"],
                          "--max_new_tokens", "40")
    assert code == 0
    assert "unknown command /frobnicate; commands: /adapter NAME, /adapters, /max_tokens N, /reset, /quit" in err
    assert "(answers up to 3 tokens)" in out
    assert "(cut at the token limit, 3 tokens: /max_tokens N for longer answers)" in out
    assert "/max_tokens takes a positive whole number (got 'many')" in err


def test_ctrl_c_stops_the_answer_not_the_chat(monkeypatch, capsys, tiny_llama):
    from slmops.inference import base

    real = base.Generation.__iter__
    calls = []

    def interrupted_once(self):
        calls.append(1)
        for i, piece in enumerate(real(self)):
            if len(calls) == 1 and i == 1:
                raise KeyboardInterrupt  # the user presses Ctrl-C while the first answer is written
            yield piece

    monkeypatch.setattr(base.Generation, "__iter__", interrupted_once)
    code, out, err = chat(monkeypatch, capsys, tiny_llama, ["hello", "hello again"], "--max_new_tokens", "8")
    assert code == 0, err
    assert " (stopped)\n" in out and len(calls) == 2  # the second line was still answered


def test_an_adapter_trained_on_a_text_template_is_prompted_with_it(monkeypatch, capsys, tiny_llama, tmp_path):
    """A chat line given to an adapter trained on 'Phrase: {phrase}\\nTone: {tone}' becomes that
    template's prompt (as training rendered it), not a chat-template turn; the base (or a
    chat-trained adapter) keeps the chat template."""
    from conftest import TONE_TEMPLATE
    from helpers import tiny_config

    from slmops import finetune
    from slmops.inference import GenerationParams, open_backend

    out = tmp_path / "tone"
    finetune(tiny_config(tiny_llama, out, max_steps=2))
    backend = open_backend(str(out))
    assert backend.trained_template(None) == TONE_TEMPLATE.replace("\\n", "\n")
    expected = backend.generate_text("Phrase: what a lovely day\nTone:", None, GenerationParams(max_new_tokens=6))
    history = [{"role": "user", "content": "hello"}]
    base_answer = backend.generate_text(backend.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True),
                                        "base", GenerationParams(max_new_tokens=6), add_special_tokens=False)
    code, out_text, err = chat(monkeypatch, capsys, out, ["what a lovely day", "/adapter base", "hello"], "--max_new_tokens", "6")
    assert code == 0, err
    note = "(adapter tone was trained on the template 'Phrase: {phrase}\\nTone: {tone}': each line fills it; answers do not see earlier turns)"
    assert out_text.startswith(note + "\n" + expected + "\n(cut at the token limit"), out_text
    assert "(adapter: base)\n" + base_answer + "\n(cut at the token limit" in out_text, out_text


def test_a_template_with_several_fields_takes_them_split_by_bars():
    from slmops.cli.generate import _template_turn

    template = "Q: {question}\nContext: {context}\nA: {answer}"
    assert _template_turn(template, "Who? | Alice met Bob") == ("Q: Who?\nContext: Alice met Bob\nA:", None)
    prompt, problem = _template_turn(template, "Who?")
    assert problem == "this adapter's template has 2 fields (question, context): type their values in that order, separated by ' | '"
