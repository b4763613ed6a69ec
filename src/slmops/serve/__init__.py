"""`slmops serve`: an OpenAI-compatible server for one base model and many adapters, each
adapter a model id chosen per request (engine.py: back end, slots, adapters; app.py: the HTTP
API; schemas.py: request bodies)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from slmops.config.serve import ServeConfig
from slmops.logs import log


def build(config: ServeConfig):
    """(FastAPI app, Engine) for a config: the model loaded, its adapters checked and loaded."""
    from slmops.inference import open_backend
    from slmops.serve.app import build_app
    from slmops.serve.engine import Engine

    backend = open_backend(config.model_name_or_path, config.adapters, threads=config.threads,
                           trust_remote_code=config.trust_remote_code)
    if backend.kind == "onnx" and not config.adapters:  # a bundle serves every adapter it lists
        for name in backend.bundle_adapters:
            backend.load_adapter(name)
    base_id = config.served_model_name or _default_id(config.model_name_or_path)
    engine = Engine(backend, base_id, config.max_concurrency, config.max_queue, config.adapter_dir)
    api_key = config.api_key or os.environ.get("SLMOPS_API_KEY") or None
    return build_app(engine, api_key, config.max_tokens_limit, config.max_request_bytes), engine


def _default_id(model: str) -> str:
    import re

    name = Path(model).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:64] or "model"


def serve(config: ServeConfig) -> None:
    """Load, listen on (host, port), and answer until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    app, engine = build(config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        from slmops.errors import ConfigError

        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    if config.host not in ("127.0.0.1", "::1", "localhost") and not (config.api_key or os.environ.get("SLMOPS_API_KEY")):
        log.warning("listening on %s without --api_key: anyone who can reach this address can use the model", config.host)
    print(f"slmops: serving {engine.base_id} ({engine.backend.kind}) with adapters {', '.join(engine.adapters) or '(none)'} "
          f"on http://{config.host}:{port}/v1", file=sys.stderr, flush=True)
    levels = ["debug", "info", "warning", "error", "critical"]
    server = uvicorn.Server(uvicorn.Config(app, log_level=levels[max(config.log_level, 2)], lifespan="off", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
