"""The OpenAI-compatible HTTP API (FastAPI on uvicorn):

GET  /health                    liveness and load
GET  /v1/models, /v1/models/ID  the base model and every adapter, each a model id
POST /v1/chat/completions       messages through the chat template; `stream: true` as SSE
POST /v1/completions            a raw prompt
GET  /v1/adapters               what is served
POST /v1/adapters               add {"name", "path"} (inside --adapter_dir), checked before it is served
DELETE /v1/adapters/NAME        remove one added at run time

Errors are OpenAI's JSON ({"error": {"message", "type", "param", "code"}}) with the matching
status: 400 bad request, 401 key, 404 model, 413 body too large, 429 busy."""

from __future__ import annotations

import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmops.about import __version__
from slmops.inference import GenerationParams, chat_prompt
from slmops.serve.engine import ApiError, Engine
from slmops.serve.schemas import AdapterRequest, ChatRequest, CompletionRequest

FINGERPRINT = f"slmops-{__version__}"


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before it is parsed,
    whether it announces its length or streams it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(413, f"request body of {int(declared)} bytes is over the limit of {self.limit}",
                                code="request_too_large")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body is over the limit of {self.limit} bytes", code="request_too_large")
            return message

        try:
            await self.app(scope, limited, send)
        except ApiError as exc:
            await _error(exc.status, exc.message, exc.kind, exc.code)(scope, receive, send)


def build_app(engine: Engine, api_key: str | None = None, max_tokens_limit: int = 1024, max_request_bytes: int = 1_000_000) -> FastAPI:
    app = FastAPI(title="slmops", version=__version__, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.kind, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "json_invalid":
            message, param = "the request body is not valid JSON", None
        return _error(400, f"{param}: {message}" if param else message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error",
                              "invalid_api_key")
        return await call_next(request)

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": int(started), "owned_by": "slmops",
                "root": engine.base_id, "parent": None if model_id == engine.base_id else engine.base_id}

    started = time.time()

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": engine.backend.kind, "model": engine.base_id, "adapters": list(engine.adapters),
                "in_flight": engine.in_flight, "waiting": engine.waiting,
                "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(m) for m in engine.model_ids()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        engine.adapter_for(model_id)
        return model_card(model_id)

    @app.get("/v1/adapters")
    async def adapters():
        return {"object": "list", "data": [{"id": a.name, "source": a.source, "added_at": int(a.added_at), "removable": a.at_run_time}
                                           for a in engine.adapters.values()]}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(body: AdapterRequest):
        import asyncio

        info = await asyncio.get_running_loop().run_in_executor(None, engine.add_adapter, body.name, body.path)
        return {"id": info.name, "object": "model", "source": info.source}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str):
        engine.remove_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    def params_of(body, prompt_tokens: int) -> GenerationParams:
        wanted = body.token_limit
        context = engine.backend.context_length
        if wanted is not None and wanted > max_tokens_limit:
            raise ApiError(400, f"max_tokens {wanted} is over this server's limit of {max_tokens_limit}", param="max_tokens")
        if context is not None:
            if prompt_tokens >= context or (wanted is not None and prompt_tokens + wanted > context):
                raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                    f"{prompt_tokens + (wanted or 0)} tokens ({prompt_tokens} in the prompt, {wanted or 0} for the "
                                    "completion). Shorten the prompt or ask for fewer tokens.",
                               code="context_length_exceeded", param="messages" if isinstance(body, ChatRequest) else "prompt")
        limit = wanted or max_tokens_limit
        if context is not None:
            limit = min(limit, context - prompt_tokens)
        return GenerationParams(max_new_tokens=limit, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                stop=tuple(body.stop or ()))

    async def run(body, prompt: str, add_special_tokens: bool, chat: bool):
        adapter = engine.adapter_for(body.model)
        prompt_tokens = len(engine.backend.encode(prompt, add_special_tokens))
        params = params_of(body, prompt_tokens)
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if not body.stream:
            async with engine.slot(adapter):
                generation = engine.start(prompt, add_special_tokens, adapter, params)
                async for _ in engine.pieces(generation):
                    pass
            usage = {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                     "total_tokens": generation.prompt_tokens + generation.completion_tokens}
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": generation.text}, "logprobs": None,
                          "finish_reason": generation.finish_reason}
                return {"id": request_id, "object": "chat.completion", "created": created, "model": body.model, "choices": [choice],
                        "usage": usage, "system_fingerprint": FINGERPRINT}
            choice = {"index": 0, "text": generation.text, "logprobs": None, "finish_reason": generation.finish_reason}
            return {"id": request_id, "object": "text_completion", "created": created, "model": body.model, "choices": [choice],
                    "usage": usage, "system_fingerprint": FINGERPRINT}

        # streaming: the slot is taken before the response starts, so a full queue is still a 429
        slot = engine.slot(adapter)
        await slot.__aenter__()
        try:
            generation = engine.start(prompt, add_special_tokens, adapter, params)
        except BaseException:
            await slot.__aexit__(None, None, None)
            raise
        kind = "chat.completion.chunk" if chat else "text_completion"

        def frame(choice: dict | None, usage: dict | None = None) -> str:
            payload = {"id": request_id, "object": kind, "created": created, "model": body.model,
                       "choices": [choice] if choice is not None else [], "system_fingerprint": FINGERPRINT}
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        def choice_of(text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        async def events():
            try:
                if chat:
                    yield frame({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
                async for piece in engine.pieces(generation):
                    yield frame(choice_of(piece, None))
                yield frame(choice_of(None, generation.finish_reason))
                if body.include_usage:
                    yield frame(None, {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                                       "total_tokens": generation.prompt_tokens + generation.completion_tokens})
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away: the generation was cancelled by pieces()
                await slot.__aexit__(None, None, None)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        prompt, special = chat_prompt(engine.backend.tokenizer, messages)
        return await run(body, prompt, special, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await run(body, body.prompt, True, chat=False)

    app.add_middleware(BodyLimit, limit=max_request_bytes)
    return app
