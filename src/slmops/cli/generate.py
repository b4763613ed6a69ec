"""`slmops generate` and `slmops chat`, on a PyTorch model or an ONNX Runtime GenAI bundle."""

from __future__ import annotations

import argparse
import sys
import time

from slmops.cli.common import setup_logging
from slmops.errors import ConfigError, SlmopsError

GENERATE_EXAMPLE = """examples:
  slmops generate -m models/multi --adapter tone,qa --prompt "Phrase: I lost my keys again\\nTone:"
  slmops generate -m models/tone/ft --prompt "..."            # PyTorch, the run's adapter
  slmops generate -m models/multi --adapter base --chat --prompt "Name three rivers."
"""
CHAT_EXAMPLE = """example:
  slmops chat -m models/multi --adapter qa
  (type /adapter NAME to switch adapter without reloading, /adapters to list them, /reset, /quit)
"""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_name_or_path", "-m", required=True,
                        help="an ONNX Runtime GenAI bundle, or a PyTorch model (folder, built-in, slmops finetune output)")
    parser.add_argument("--adapter", "--adapter_path", dest="adapter", type=_csv, default=[],
                        help="adapter(s): names in the bundle or .onnx_adapter files; PEFT folders for PyTorch; 'base' for none. "
                             "Several, comma-separated, are loaded once and switched per request")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="most tokens generated per answer [default: 128]")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads [default: the CPUs available]")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--log_level", type=int, default=2, help="0 debug ... 4 critical [default: 2]")


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text for prompts, streaming, with any adapter",
                                   epilog=GENERATE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); \\n means a newline")
    parser.add_argument("--prompt_file", default=None, help="a text file, one prompt per line")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the model's chat template")
    parser.set_defaults(handler=run_generate)
    parser = subparsers.add_parser("chat", help="interactive chat using the model's chat template",
                                   epilog=CHAT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser)
    parser.add_argument("--system", default=None, help="a system message")
    parser.set_defaults(handler=run_chat)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_generate(args) -> int:
    setup_logging(args.log_level)
    prompts = [p.replace("\\n", "\n") for p in args.prompt]
    if args.prompt_file:
        from pathlib import Path

        path = Path(args.prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt_file {args.prompt_file!r} does not exist")
        prompts += [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompt_file")
    if args.max_new_tokens <= 0:
        raise ConfigError("--max_new_tokens must be positive")
    from slmops.generation import chat_prompt, open_backend

    backend = open_backend(args.model_name_or_path, args.adapter, args.threads, args.trust_remote_code, quiet=args.log_level >= 3)
    adapters = args.adapter or [None]
    for prompt in prompts:
        text, special = chat_prompt(backend.tokenizer, [{"role": "user", "content": prompt}]) if args.chat else (prompt, True)
        for adapter in adapters:
            label = adapter or "default"
            _write(f"[{backend.kind} · {label}] {prompt}\n")
            started = time.perf_counter()
            backend.generate(text, adapter, args.max_new_tokens, special, on_text=_write)
            _write(f"\n({time.perf_counter() - started:.2f} s)\n\n")
    return 0


def run_chat(args) -> int:
    setup_logging(args.log_level)
    from slmops.generation import chat_prompt, open_backend

    backend = open_backend(args.model_name_or_path, args.adapter, args.threads, args.trust_remote_code, quiet=args.log_level >= 3)
    adapter = args.adapter[0] if args.adapter else None
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"slmops chat ({backend.kind}, adapter: {adapter or 'default'}). /adapter NAME, /adapters, /reset, /quit")
    while True:
        if interactive:
            _write("> ")
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if line == "/adapters":
            print(", ".join(backend.adapter_names) or "(none)")
            continue
        if line.startswith("/adapter"):
            name = line.removeprefix("/adapter").strip() or "base"
            try:
                backend.use_adapter(name)
            except SlmopsError as exc:  # a typo must not end the conversation
                print(f"slmops: error: {exc}", file=sys.stderr)
                continue
            adapter = name
            print(f"(adapter: {adapter})")
            continue
        history.append({"role": "user", "content": line})
        prompt, special = chat_prompt(backend.tokenizer, history)
        answer = backend.generate(prompt, adapter, args.max_new_tokens, special, on_text=_write)
        _write("\n")
        history.append({"role": "assistant", "content": answer})
    return 0
