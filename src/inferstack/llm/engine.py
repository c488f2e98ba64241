"""The continuous-batching generation engine.

One engine per loaded generation model instance. The model runs on the
engine's own thread, one step at a time (see :mod:`inferstack.llm.scheduler`);
callers on the event loop (or any thread) submit sequences and receive their
tokens through a sink — never waiting on the model themselves. Everything the
engine thread hands out crosses threads through ``loop.call_soon_threadsafe``
or a ``queue.Queue``.

Submitting is bounded: when ``max_waiting`` requests already wait for a slot,
``submit`` raises :class:`QueueFullError` (HTTP 429 with Retry-After). An
aborted request (client gone, deadline passed) is removed at the next step and
its slot returned to the pool.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inferstack.core.errors import InternalError, InvalidArgumentError, RequestTimeoutError, UnavailableError
from inferstack.core.stats import LATENCY_BUCKETS, Histogram
from inferstack.llm.detokenizer import IncrementalDetokenizer
from inferstack.llm.params import QueueFullError
from inferstack.llm.sampling import Choice, SamplingParams, make_generator, sample
from inferstack.llm.scheduler import IterationScheduler

log = logging.getLogger("inferstack.llm")

#: Token-count buckets for the per-request prompt and generation length histograms.
TOKEN_BUCKETS: tuple[float, ...] = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
#: Finish reasons counted per model.
FINISH_REASONS = ("stop", "length", "abort", "timeout", "error")


@dataclass(slots=True)
class Output:
    """What one engine step produced for one request."""

    token_ids: list[int]
    text: str
    choices: list[Choice] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None
    #: Set on the final output.
    prompt_tokens: int = 0
    completion_tokens: int = 0


_ids = itertools.count(1)


class Sequence:
    """One request inside the engine (n=1)."""

    __slots__ = ("id", "prompt_ids", "params", "sink", "arrival", "deadline", "slot", "cached", "output_ids",
                 "last_token", "detok", "generator", "first_token_at", "last_token_at", "finished", "eos_ids",
                 "max_tokens")

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Output], None],
                 deadline: float | None, detok: IncrementalDetokenizer, eos_ids: frozenset[int],
                 max_tokens: int) -> None:
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.arrival = time.perf_counter()
        self.deadline = deadline  # perf_counter() time, or None
        self.slot: int | None = None
        #: Prompt tokens whose keys and values are in the cache.
        self.cached = 0
        self.output_ids: list[int] = []
        self.last_token = -1
        self.detok = detok
        self.generator = make_generator(params)
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.finished = False
        self.eos_ids = eos_ids
        self.max_tokens = max_tokens

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt_ids)


class EngineStats:
    """Counters and histograms the engine thread updates and the metrics collector reads."""

    def __init__(self) -> None:
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prompt_len = Histogram(TOKEN_BUCKETS)
        self.generation_len = Histogram(TOKEN_BUCKETS)
        self.finished: Counter[str] = Counter({reason: 0 for reason in FINISH_REASONS})
        self.steps = 0


@dataclass(slots=True)
class EngineSettings:
    """Engine settings, from the model config's ``parameters`` (see docs/llm.md)."""

    max_num_seqs: int = 8
    max_model_len: int = 0  # 0: the model's max_position_embeddings, capped at 4096
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    policy: str = "continuous"
    dtype: str = "auto"
    device: str = "cpu"
    torch_threads: int = 0
    default_max_tokens: int = 16
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    default_top_k: int = 0
    default_timeout_s: float = 0.0


class AsyncStream:
    """The outputs of one request, for a consumer on an event loop."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.sequence: Sequence | None = None
        self.done = False

    def sink(self, output: Output) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, output)

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Output:
        if self.done:
            raise StopAsyncIteration
        output = await self.queue.get()
        if output.error is not None:
            self.done = True
            raise output.error
        if output.finish_reason is not None:
            self.done = True
        return output

    def close(self) -> None:
        """Abort the request unless it finished (client gone, consumer stopped early)."""
        self.done = True
        if self.sequence is not None and not self.sequence.finished:
            self.engine.abort(self.sequence)


class LLMEngine:
    """Tokenizer, model runner and scheduler, stepped by one thread."""

    def __init__(self, runner: Any, tokenizer: Any, settings: EngineSettings, *, name: str,
                 eos_ids: frozenset[int]) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.settings = settings
        self.name = name
        self.eos_ids = eos_ids
        self.max_model_len = runner.max_model_len
        self.stats = EngineStats()
        self.scheduler = IterationScheduler(settings.max_num_seqs, settings.max_num_batched_tokens, settings.policy)
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", []) or [])
        self._cond = threading.Condition()
        self._intake: list[Sequence] = []
        self._aborts: list[Sequence] = []
        self._stopping = False
        self._drain_deadline = 0.0
        self._waiting_count = 0  # intake + scheduler.waiting, read without the engine thread
        self._thread = threading.Thread(target=self._loop, name=f"llm-{name}", daemon=True)
        self._thread.start()

    # -- what other threads see ----------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self._waiting_count

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def slots_in_use(self) -> int:
        return self.scheduler.slots_in_use

    @property
    def num_slots(self) -> int:
        return self.scheduler.num_slots

    @property
    def load(self) -> int:
        return self._waiting_count + len(self.scheduler.running)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgumentError(
                f"model {self.name!r} has no chat template in its tokenizer; use /v1/completions"
            )
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors: the messages do not fit the template
            raise InvalidArgumentError(f"'messages' cannot be rendered by the chat template: {exc}") from None
        # The template writes BOS itself where the model wants it.
        return self.encode(text, add_special_tokens=False)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Output], None], *,
               timeout_s: float | None = None) -> Sequence:
        """Queue a request (thread-safe). Raises InvalidArgumentError / QueueFullError / UnavailableError."""
        params.validate()
        if not prompt_ids:
            raise InvalidArgumentError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidArgumentError(
                f"the prompt has {len(prompt_ids)} tokens; model {self.name!r} accepts at most "
                f"{self.max_model_len - 1} (max_model_len {self.max_model_len} includes the output)"
            )
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidArgumentError(f"prompt token ids must be in [0, {vocab})")
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        if timeout_s is None and self.settings.default_timeout_s > 0:
            timeout_s = self.settings.default_timeout_s
        deadline = time.perf_counter() + timeout_s if timeout_s else None
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, self._special_ids)
        sequence = Sequence(prompt_ids, params, sink, deadline, detok, stop_ids, max_tokens)
        with self._cond:
            if self._stopping:
                raise UnavailableError(f"model {self.name!r} is unloading", retry_after=1.0)
            if self._waiting_count >= self.settings.max_waiting:
                raise QueueFullError(
                    f"model {self.name!r}: {self._waiting_count} requests already wait for a slot "
                    f"(max_waiting_requests {self.settings.max_waiting}); retry later",
                    retry_after=1.0,
                )
            self._waiting_count += 1
            self._intake.append(sequence)
            self._cond.notify()
        return sequence

    def abort(self, sequence: Sequence) -> None:
        """Stop a request (thread-safe); its slot is freed at the next step."""
        if sequence.finished:
            return
        with self._cond:
            self._aborts.append(sequence)
            self._cond.notify()

    def stream(self, prompt_ids: list[int], params: SamplingParams, *,
               timeout_s: float | None = None) -> AsyncStream:
        """Submit now (so a full queue fails before any response is sent) and return the
        outputs as an async iterator; call its ``close()`` when done (aborts if unfinished)."""
        stream = AsyncStream(self, asyncio.get_running_loop())
        stream.sequence = self.submit(prompt_ids, params, stream.sink, timeout_s=timeout_s)
        return stream

    def generate_sync(self, prompt_ids: list[int], params: SamplingParams, *,
                      timeout_s: float | None = None) -> tuple[list[int], str, Output]:
        """Blocking generation from a non-loop thread (the /infer path): ids, text, final output."""
        outputs: queue.Queue[Output] = queue.Queue()
        sequence = self.submit(prompt_ids, params, outputs.put, timeout_s=timeout_s)
        ids: list[int] = []
        text: list[str] = []
        try:
            while True:
                output = outputs.get()
                if output.error is not None:
                    raise output.error
                ids += output.token_ids
                text.append(output.text)
                if output.finish_reason is not None:
                    return ids, "".join(text), output
        finally:
            if not sequence.finished:
                self.abort(sequence)

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let those in the engine finish (at most ``drain_timeout``
        seconds; the rest end with an error), then stop the thread."""
        with self._cond:
            self._drain_deadline = time.perf_counter() + drain_timeout
            self._stopping = True
            self._cond.notify()
        self._thread.join(drain_timeout + 10.0)

    # -- the engine thread ------------------------------------------------------------

    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._cond:
                while not (self._stopping or self._intake or self._aborts or scheduler.has_work()):
                    self._cond.wait()
                intake, self._intake = self._intake, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            for sequence in intake:
                scheduler.add(sequence)
            for sequence in aborts:
                self._finish(sequence, "abort")
            if stopping and (not scheduler.has_work() or time.perf_counter() > self._drain_deadline):
                error = UnavailableError(f"model {self.name!r} was unloaded", retry_after=1.0)
                for sequence in list(scheduler.waiting) + list(scheduler.running):
                    self._finish(sequence, "abort", error)
                return
            self._expire()
            try:
                self._step()
            except Exception as exc:
                log.exception("model %s: engine step failed", self.name)
                error = InternalError(f"model {self.name!r}: generation failed: {type(exc).__name__}: {exc}")
                for sequence in list(scheduler.running):
                    self._finish(sequence, "error", error)

    def _expire(self) -> None:
        now = time.perf_counter()
        for sequence in list(self.scheduler.waiting) + list(self.scheduler.running):
            if sequence.deadline is not None and now > sequence.deadline:
                error = None
                if not sequence.output_ids:
                    error = RequestTimeoutError(
                        f"model {self.name!r}: request exceeded its deadline before its first token"
                    )
                self._finish(sequence, "timeout", error)

    def _step(self) -> None:
        scheduler = self.scheduler
        plan = scheduler.schedule()
        with self._cond:
            self._waiting_count = len(scheduler.waiting) + len(self._intake)
        if not plan:
            return
        self.stats.steps += 1
        if plan.prefill:
            logits = self.runner.forward(scheduler.prefill_rows(plan))
            done = []
            for i, (sequence, chunk) in enumerate(plan.prefill):
                sequence.cached += chunk
                if sequence.prefilled:
                    done.append((i, sequence))
            if done:
                rows = logits[[i for i, _ in done]]
                seqs = [s for _, s in done]
                self._accept(seqs, sample(rows, [s.params for s in seqs], [s.generator for s in seqs]))
        if plan.decode:
            logits = self.runner.forward(scheduler.decode_rows(plan))
            self._accept(plan.decode, sample(logits, [s.params for s in plan.decode],
                                              [s.generator for s in plan.decode]))

    def _accept(self, sequences: list[Sequence], choices: list[Choice]) -> None:
        now = time.perf_counter()
        stats = self.stats
        for sequence, choice in zip(sequences, choices):
            if sequence.finished:
                continue
            token = choice.token
            if sequence.output_ids:
                stats.itl.observe(now - sequence.last_token_at)
                # The decode step wrote the previous token's keys and values.
                sequence.cached += 1
            else:
                sequence.first_token_at = now
                stats.ttft.observe(now - sequence.arrival)
            sequence.last_token_at = now
            sequence.output_ids.append(token)
            sequence.last_token = token
            stats.generation_tokens += 1
            finish = None
            if token in sequence.eos_ids:
                finish = "stop"
                text = ""
            else:
                text, stopped = sequence.detok.add(token)
                if stopped:
                    finish = "stop"
            if finish is None and len(sequence.output_ids) >= sequence.max_tokens:
                finish = "length"
            if finish is None and sequence.cached >= self.max_model_len:
                finish = "length"
            if finish is None:
                try:
                    sequence.sink(Output([token], text, [choice]))
                except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                    self._finish(sequence, "abort")
            else:
                self._finish(sequence, finish, None, Output([token], text, [choice]))

    def _finish(self, sequence: Sequence, reason: str, error: Exception | None = None,
                last: Output | None = None) -> None:
        if sequence.finished:
            return
        sequence.finished = True
        self.scheduler.remove(sequence)
        stats = self.stats
        stats.finished[reason] += 1
        stats.prompt_tokens += len(sequence.prompt_ids)
        stats.prompt_len.observe(len(sequence.prompt_ids))
        stats.generation_len.observe(len(sequence.output_ids))
        stats.e2e.observe(time.perf_counter() - sequence.arrival)
        output = last or Output([], "")
        if error is None:
            output.text += sequence.detok.flush()
        output.finish_reason = reason
        output.error = error
        output.prompt_tokens = len(sequence.prompt_ids)
        output.completion_tokens = len(sequence.output_ids)
        try:
            sequence.sink(output)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass
