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
