"""What every back end shares: generation parameters, a running generation (text pieces as
they decode, stop strings, finish reason, token counts), and the interface evaluate,
generate/chat, deploy's parity check and serve use."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from slmops.errors import ConfigError, ModelError

BASE = ("base", "none")  # adapter names that mean "no adapter"


@dataclass(frozen=True)
class GenerationParams:
    """How to decode one request. temperature 0 is greedy (the default everywhere slmops
    compares outputs); stop strings end the text before the first of them."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0  # benchmarks: decode exactly this many before an end token may stop

    def __post_init__(self):
        problems = []
        if self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens must be positive (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Generation:
    """One request's output while it is produced: iterate for text pieces (whole characters,
    never past a stop string); afterwards `text`, `finish_reason` ('stop': an end token or a
    stop string, 'length': max_new_tokens or the context, 'cancelled'), `prompt_tokens`,
    `completion_tokens`, `first_token_s`. `cancel()` (from any thread) ends it at the next
    token; leaving the loop early cancels it too."""

    def __init__(self, tokenizer, prompt_ids: list[int], tokens: Iterator[int], params: GenerationParams, limit: int):
        self.tokenizer = tokenizer
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        self._tokens = tokens
        self._limit = limit  # most tokens this request may produce (max_new_tokens, or what the context leaves)
        self._cancelled = threading.Event()
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.first_token_s: float | None = None
        self._started = time.perf_counter()

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[str]:
        stops = [s for s in self.params.stop if s]
        shown = 0
        try:
            for token in self._tokens:
                if self.first_token_s is None:
                    self.first_token_s = time.perf_counter() - self._started
                self.ids.append(token)
                text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    continue
                cut = min((i for i in (text.find(s, max(0, shown - len(s))) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    self.text = text[:cut]
                    if cut > shown:
                        yield text[shown:cut]
                    self.finish_reason = "stop"
                    return
                # hold back a tail that may be the start of a stop string
                safe = len(text) - max((k for s in stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
                self.text = text
                if safe > shown:
                    yield text[shown:safe]
                    shown = safe
                if self._cancelled.is_set():
                    self.finish_reason = "cancelled"
                    return
            # the whole decode at the end, as a batch decode gives it (a cut multi-byte character included)
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s, max(0, shown - len(s))) for s in stops) if i >= 0), default=-1)
            self.text = text[:cut] if cut >= 0 else text
            if len(self.text) > shown:
                yield self.text[shown:]
            self.finish_reason = "stop" if cut >= 0 or len(self.ids) < self._limit else "length"
        finally:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
            self._cancelled.set()
            close = getattr(self._tokens, "close", None)
            if close is not None:
                close()

    def run(self) -> str:
        """Consume the whole generation; the text."""
        for _ in self:
            pass
        return self.text


class Backend:
    """A loaded model with adapters loaded once and chosen per call. `adapter` arguments take
    a loaded adapter's name, 'base' for none, or None for the default (the first adapter
    given at load, or the one an slmops output folder carries)."""

    kind = "?"

    def __init__(self):
        self.name = "?"
        self.tokenizer = None
        self.default_adapter: str | None = None
        self.context_length: int | None = None
        self._templates: dict[str, str | None] = {}  # adapter name -> the text template it was trained on

    def trained_template(self, adapter: str | None) -> str | None:
        """The text template the adapter (a loaded name; None: the default) was trained on,
        when it was trained on one rather than on chat turns: the prompt a chat must give it."""
        name = self.default_adapter if adapter is None else adapter
        return self._templates.get(name) if name and name not in BASE else None

    # ---- adapters --------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def load_adapter(self, reference: str, name: str | None = None) -> str | None:
        """Load (and check) an adapter once; returns the name to pass to the other calls,
        None for 'base'. `reference`: a name this back end knows, 'name=path', or a path."""
        raise NotImplementedError

    def _chosen(self, adapter: str | None) -> str | None:
        """The adapter a call runs with: None means the default; 'base' means none."""
        if adapter is None:
            return self.default_adapter
        if adapter in BASE:
            return None
        return self.load_adapter(adapter)

    # ---- generation ------------------------------------------------------------------
    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def start(self, prompt: str | list[int], adapter: str | None = None, params: GenerationParams = GenerationParams(),
              add_special_tokens: bool = True) -> Generation:
        """Begin generating for one prompt (text, or token ids); iterate the result for text."""
        ids = self.encode(prompt, add_special_tokens) if isinstance(prompt, str) else list(prompt)
        name = self._chosen(adapter)
        limit = params.max_new_tokens
        if self.context_length is not None:
            if len(ids) >= self.context_length:
                raise ModelError(f"the prompt has {len(ids)} tokens; this model's context holds {self.context_length}")
            limit = min(limit, self.context_length - len(ids))
        holder: list[Generation] = []
        tokens = self._token_stream(ids, name, params, limit, lambda: holder[0].cancelled)
        holder.append(Generation(self.tokenizer, ids, tokens, params, limit))
        return holder[0]

    def _token_stream(self, ids: list[int], adapter: str | None, params: GenerationParams, limit: int,
                      cancelled: Callable[[], bool]) -> Iterator[int]:
        """New token ids for one prompt, up to `limit`, ending before an end token."""
        raise NotImplementedError

    def generate_text(self, prompt: str, adapter: str | None = None, params: GenerationParams = GenerationParams(),
                      add_special_tokens: bool = True, on_text: Callable[[str], None] | None = None) -> str:
        generation = self.start(prompt, adapter, params, add_special_tokens)
        for piece in generation:
            if on_text is not None:
                on_text(piece)
        return generation.text

    def generate_ids(self, ids: list[int], adapter: str | None = None, max_new_tokens: int = 64) -> list[int]:
        """Greedy token ids after `ids` (no end token): what the parity check compares."""
        generation = self.start(ids, adapter, GenerationParams(max_new_tokens=max_new_tokens))
        for _ in generation:
            pass
        return generation.ids

    def generate_batch(self, prompts: list[str], adapter: str | None, params: GenerationParams, add_special_tokens: bool = True,
                       batch_size: int = 8, progress: bool = False) -> list[str]:
        """Texts for many prompts (evaluate). One at a time unless a back end batches."""
        from slmops.logs import progress_bar

        return [self.generate_text(p, adapter, params, add_special_tokens)
                for p in progress_bar(prompts, desc=f"generate ({self.name})", unit="example", enabled=progress)]

    def timed(self, prompt: str | list[int], adapter: str | None = None, max_new_tokens: int = 32, add_special_tokens: bool = True) -> dict:
        """Batch 1: time to first token and decode tokens/s, decoding exactly max_new_tokens."""
        generation = self.start(prompt, adapter, GenerationParams(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens),
                                add_special_tokens)
        started = time.perf_counter()
        for _ in generation:
            pass
        total = time.perf_counter() - started
        first = generation.first_token_s if generation.first_token_s is not None else total
        count = generation.completion_tokens
        decode = (count - 1) / (total - first) if count > 1 and total > first else None
        return {"ttft_s": first, "decode_tokens_per_s": decode, "tokens": count}

    # ---- scoring ---------------------------------------------------------------------
    def logits(self, ids: list[int], adapter: str | None = None) -> np.ndarray:
        """Logits at every position of one sequence, (len(ids), vocab) float32."""
        raise NotImplementedError

    def choice_logprobs(self, candidates: list[list[int]], starts: list[int], adapter: str | None = None) -> list[float]:
        """log P(candidate[start:] | candidate[:start]) for each candidate token sequence (the
        alternatives of one prompt, e.g. its labels). Here one full pass per candidate; back
        ends that keep a cache run the shared prefix once."""
        return [float(token_logprobs(self.logits(ids, adapter), ids)[start - 1:].sum()) for ids, start in zip(candidates, starts)]

    def choice_logprobs_batch(self, groups: list[tuple[list[list[int]], list[int]]], adapter: str | None = None,
                              batch_size: int = 16) -> list[list[float]]:
        """choice_logprobs for many prompts: `groups` holds each prompt's (candidates, starts).
        One prompt at a time here; back ends that batch override it."""
        return [self.choice_logprobs(candidates, starts, adapter) for candidates, starts in groups]

    def loss(self, data, adapter: str | None = None, batch_size: int = 8) -> tuple[float, int]:
        """(summed cross-entropy, token count) over the labelled tokens of TokenizedData."""
        total, count = 0.0, 0
        for index in range(len(data)):
            labels = np.asarray(data.labels[index][1:])
            keep = labels != -100
            if not keep.any():
                continue
            ids = [int(t) for t in data.input_ids[index]]  # a labelled token is its own input token
            total -= float(token_logprobs(self.logits(ids, adapter), ids)[keep].sum())
            count += int(keep.sum())
        return total, count


def token_logprobs(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """log P(ids[t + 1] | ids[:t + 1]) for t in 0..len(ids)-2, from a sequence's logits (float64)."""
    rows = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    top = rows.max(-1, keepdims=True)
    log_z = np.log(np.exp(rows - top).sum(-1)) + top[:, 0]
    return rows[np.arange(len(rows)), np.asarray(ids[1:])] - log_z


def common_prefix(sequences: list[list[int]]) -> int:
    """Length of the token prefix every sequence shares."""
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """(prompt, add_special_tokens): the model's chat template applied, or a plain transcript
    where it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:", True
