"""`slmops generate` and `slmops chat`, on a PyTorch model or an ONNX Runtime GenAI bundle
(the inference layer picks the back end)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from slmops.cli.common import add_config_flags, config_from_args, setup_logging
from slmops.config import ChatConfig, GenerateConfig
from slmops.errors import ConfigError, SlmopsError

GENERATE_EXAMPLE = """examples:
  slmops generate -m models/multi --adapter tone,qa --prompt "Phrase: I lost my keys again\\nTone:"
  slmops generate -m models/tone/ft --prompt "..."            # PyTorch, the run's adapter
  slmops generate -m models/multi --adapter base --chat --prompt "Name three rivers."
"""
CHAT_EXAMPLE = """example:
  slmops chat -m models/multi --adapter qa
  (type /adapter NAME to switch adapter without reloading, /adapters to list them, /max_tokens N, /reset, /quit;
   Ctrl-C stops the answer being written, Ctrl-C or Ctrl-D at the prompt ends the chat)
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text for prompts, streaming, with any adapter",
                                   epilog=GENERATE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, GenerateConfig, main_title="generate")
    parser.set_defaults(handler=run_generate)
    parser = subparsers.add_parser("chat", help="interactive chat using the model's chat template",
                                   epilog=CHAT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, ChatConfig, main_title="chat")
    parser.set_defaults(handler=run_chat)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _params(config):
    from slmops.inference import GenerationParams

    return GenerationParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p, seed=config.seed)


def _open(config):
    from slmops.inference import open_backend

    return open_backend(config.model_name_or_path, config.adapter, threads=config.threads, trust_remote_code=config.trust_remote_code)


def run_generate(args) -> int:
    config = config_from_args(GenerateConfig, args)
    setup_logging(config.log_level)
    prompts = [p.replace("\\n", "\n") for p in config.prompt]
    if config.prompt_file:
        path = Path(config.prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt_file {config.prompt_file!r} does not exist")
        prompts += [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompt_file {config.prompt_file!r} holds no prompts")
    from slmops.inference import chat_prompt

    backend = _open(config)
    params = _params(config)
    adapters = config.adapter or [None]
    for prompt in prompts:
        text, special = chat_prompt(backend.tokenizer, [{"role": "user", "content": prompt}]) if config.chat else (prompt, True)
        for adapter in adapters:
            label = adapter or backend.default_adapter or "default"
            _write(f"[{backend.kind} · {label}] {prompt}\n")
            started = time.perf_counter()
            backend.generate_text(text, adapter, params, special, on_text=_write)
            _write(f"\n({time.perf_counter() - started:.2f} s)\n\n")
    return 0


CHAT_COMMANDS = "/adapter NAME, /adapters, /max_tokens N, /reset, /quit"


def run_chat(args) -> int:
    config = config_from_args(ChatConfig, args)
    setup_logging(config.log_level)
    import dataclasses

    from slmops.inference import chat_prompt

    backend = _open(config)
    params = _params(config)
    adapter = config.adapter[0] if config.adapter else None
    history: list[dict] = [{"role": "system", "content": config.system}] if config.system else []
    told_template = None  # the trained template last announced
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # not on every platform
            pass
        print(f"slmops chat ({backend.kind}, adapter: {adapter or backend.default_adapter or 'none'}). {CHAT_COMMANDS}; "
              "Ctrl-C stops an answer")
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: the chat ends
            if interactive:
                print()
            break
        if not interactive and not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            argument = argument.strip()
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                history = history[:1] if config.system else []
            elif command == "/adapters":
                print(", ".join(backend.adapter_names) or "(none)")
            elif command == "/adapter":
                name = argument or "base"
                try:
                    backend.load_adapter(name)  # loads and checks it now, not at the next answer
                except SlmopsError as exc:  # a typo must not end the conversation
                    print(f"slmops: error: {exc}", file=sys.stderr)
                    continue
                adapter = name
                print(f"(adapter: {adapter})")
            elif command == "/max_tokens":
                try:
                    params = dataclasses.replace(params, max_new_tokens=int(argument))
                    print(f"(answers up to {params.max_new_tokens} tokens)")
                except (ValueError, ConfigError):
                    print(f"slmops: error: /max_tokens takes a positive whole number (got {argument!r})", file=sys.stderr)
            else:
                print(f"slmops: error: unknown command {command}; commands: {CHAT_COMMANDS}", file=sys.stderr)
            continue
        template = backend.trained_template(adapter)
        if template is not None:  # an adapter trained on a text template gets that template's prompt, one turn at a time
            prompt, problem = _template_turn(template, line)
            if problem:
                print(f"slmops: error: {problem}", file=sys.stderr)
                continue
            if template != told_template:
                print(f"(adapter {adapter or backend.default_adapter} was trained on the template {template!r}: each line fills it; "
                      "answers do not see earlier turns)")
                told_template = template
            special = True
        else:
            history.append({"role": "user", "content": line})
            prompt, special = chat_prompt(backend.tokenizer, history)
        generation = backend.start(prompt, adapter, params, special)
        try:
            for piece in generation:
                _write(piece)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            generation.cancel()
            _write(" (stopped)")
        _write("\n")
        if generation.finish_reason == "length":
            print(f"(cut at the token limit, {generation.completion_tokens} tokens: /max_tokens N for longer answers)")
        if template is None:
            history.append({"role": "assistant", "content": generation.text})
    return 0


def _template_turn(template: str, line: str) -> tuple[str, str | None]:
    """(prompt, problem) for a chat line given to an adapter trained on `template`: the line
    fills its one input field; several fields take the line's parts split by ' | ', in order."""
    from slmops.data.format import template_inputs, template_prompt

    inputs, _ = template_inputs(template)
    parts = [line] if len(inputs) <= 1 else [p.strip() for p in line.split(" | ")]
    if len(parts) != len(inputs):
        return "", (f"this adapter's template has {len(inputs)} fields ({', '.join(inputs)}): type their values in that order, "
                    "separated by ' | '")
    return template_prompt(template, dict(zip(inputs, parts))), None
