"""The model behind the API: one inference back end, its adapters as model ids, and the slots
that bound how many requests generate at once and how many may wait.

Each generation runs in a worker thread (ONNX Runtime GenAI and PyTorch release the GIL while
they compute) and hands its text pieces to the event loop; a request that goes away (a client
that disconnects mid-stream) cancels its generation, which stops at the next token and frees
its slot. On the ONNX back end every request carries its own active adapter, so requests with
different adapters run side by side; PyTorch switches PEFT adapters model-wide, so there one
request generates at a time."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from slmops.config.serve import ADAPTER_NAME
from slmops.errors import ModelError
from slmops.inference import Backend, Generation, GenerationParams


class ApiError(Exception):
    """An error the API returns as OpenAI-shaped JSON with this HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


@dataclass
class AdapterInfo:
    name: str
    source: str
    added_at: float = field(default_factory=time.time)
    at_run_time: bool = False


class Engine:
    def __init__(self, backend: Backend, base_id: str, max_concurrency: int, max_queue: int, adapter_dir: str | None = None):
        self.backend = backend
        self.base_id = base_id
        # PEFT's active adapter is model-wide: PyTorch generates one request at a time
        self.max_concurrency = max_concurrency if backend.kind == "onnx" else 1
        self.max_queue = max_queue
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        self._slots = asyncio.Semaphore(self.max_concurrency)
        self.in_flight = 0
        self.waiting = 0
        self.cancelled = 0  # generations stopped early because their client went away
        self._using: dict[str, int] = {}  # adapter name -> requests using it now
        self._adapters_lock = threading.Lock()
        self.adapters: dict[str, AdapterInfo] = {name: AdapterInfo(name, "bundle" if backend.kind == "onnx" else "startup")
                                                 for name in backend.adapter_names}

    # ---- model ids -------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def adapter_for(self, model_id: str) -> str | None:
        """The adapter a request's `model` asks for: None for the base model."""
        if model_id in (self.base_id, "base"):
            return None
        if model_id in self.adapters:
            return model_id
        raise ApiError(404, f"The model `{model_id}` does not exist. Models served: {', '.join(self.model_ids())}",
                       code="model_not_found", param="model")

    # ---- adapters at run time --------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> AdapterInfo:
        if self.adapter_dir is None:
            raise ApiError(403, "adding adapters at run time is off; start the server with --adapter_dir DIR", code="forbidden")
        if not ADAPTER_NAME.match(name or "") or name in (self.base_id, "base", "none"):
            raise ApiError(400, f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (64 at most), not the base's id",
                           param="name")
        target = (self.adapter_dir / path).resolve()
        if not target.is_relative_to(self.adapter_dir):
            raise ApiError(400, f"adapter path {path!r} is outside the adapter folder", param="path")
        if not target.exists():
            raise ApiError(404, f"adapter path {path!r} does not exist in the adapter folder", param="path")
        with self._adapters_lock:
            if name in self.adapters:
                raise ApiError(409, f"an adapter named {name!r} is already served", code="adapter_exists", param="name")
            try:  # checked against the bundle's LoRA slots (or the PyTorch model's layers) before it is accepted
                self.backend.load_adapter(f"{name}={target}")
            except ModelError as exc:
                raise ApiError(400, str(exc), param="path") from None
            info = AdapterInfo(name, str(target.relative_to(self.adapter_dir)), at_run_time=True)
            self.adapters[name] = info
        return info

    def remove_adapter(self, name: str) -> None:
        with self._adapters_lock:
            if name not in self.adapters:
                raise ApiError(404, f"no adapter named {name!r} is served", code="model_not_found", param="name")
            if not self.adapters[name].at_run_time:
                raise ApiError(403, f"adapter {name!r} was served from the start; only adapters added at run time can be removed",
                               code="forbidden")
            if self._using.get(name):
                raise ApiError(409, f"adapter {name!r} is answering {self._using[name]} request(s); remove it when they are done",
                               code="adapter_busy")
            self.backend.unload_adapter(name)
            del self.adapters[name]

    # ---- admission -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def slot(self, adapter: str | None):
        """Hold a generation slot (waiting in the bounded queue for one)."""
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise ApiError(429, f"the server is busy ({self.in_flight} generating, {self.waiting} waiting); retry later",
                           kind="rate_limit_error", code="server_busy")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        if adapter is not None:
            self._using[adapter] = self._using.get(adapter, 0) + 1
        try:
            yield
        finally:
            if adapter is not None:
                self._using[adapter] -= 1
            self.in_flight -= 1
            self._slots.release()

    # ---- generation --------------------------------------------------------------------------
    def start(self, prompt: str, add_special_tokens: bool, adapter: str | None, params: GenerationParams) -> Generation:
        try:
            return self.backend.start(prompt, adapter or "base", params, add_special_tokens)
        except ModelError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded" if "context" in str(exc) else None) from None

    async def pieces(self, generation: Generation) -> AsyncIterator[str]:
        """The generation's text pieces, produced in a worker thread; leaving the loop early
        (a client that went away) cancels the generation."""
        loop = asyncio.get_running_loop()
        handoff: asyncio.Queue = asyncio.Queue()
        end = object()

        def work():
            try:
                for piece in generation:
                    loop.call_soon_threadsafe(handoff.put_nowait, piece)
            except BaseException as exc:  # raised in the request, not lost in the thread
                loop.call_soon_threadsafe(handoff.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(handoff.put_nowait, end)

        thread = threading.Thread(target=work, name="slmops-serve", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                item = await handoff.get()
                if item is end:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not finished:
                self.cancelled += 1
                generation.cancel()
                await asyncio.get_running_loop().run_in_executor(None, thread.join)
