"""``backend: "vllm"``: the same APIs and metrics in front of vLLM's async engine.

:class:`VllmEngine` offers what the routes use of :class:`~inferstack.llm.engine.LLMEngine`
(``stream``, ``encode``, ``apply_chat_template``, ``settings``, ``max_model_len``, the
gauges and :class:`EngineStats`), delegating generation to ``vllm.AsyncLLMEngine``
(an alias of vLLM V1's ``AsyncLLM`` in recent releases). vLLM does its own continuous
batching and paged KV cache; this adapter only translates requests and outputs (vLLM's
outputs are cumulative, ours are deltas) and keeps the TTFT/ITL statistics.

Written against vLLM's documented ``generate(prompt, sampling_params, request_id)`` /
``abort(request_id)`` API; vLLM cannot be installed where inferstack is tested, so this
path is not exercised by the test suite (see docs/llm.md).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from inferstack.core.errors import InvalidArgumentError, UnavailableError
from inferstack.llm.engine import EngineSettings, EngineStats, Output
from inferstack.llm.params import QueueFullError, SamplingParams
from inferstack.llm.sampling import Choice

_ids = itertools.count(1)


class _Request:
    __slots__ = ("params",)

    def __init__(self, params: SamplingParams) -> None:
        self.params = params


class VllmStream:
    """An async iterator of :class:`Output` deltas for one vLLM request."""

    def __init__(self, engine: VllmEngine, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.sequence = _Request(params)
        self.request_id = f"inferstack-{next(_ids)}"
        self.arrival = time.perf_counter()
        self._iterator = engine.vllm.generate(
            {"prompt_token_ids": prompt_ids}, engine.vllm_params(params), self.request_id
        ).__aiter__()
        self._text = 0
        self._tokens = 0
        self._last = 0.0
        self.done = False
        engine.in_flight += 1

    def __aiter__(self) -> VllmStream:
        return self

    async def __anext__(self) -> Output:
        if self.done:
            raise StopAsyncIteration
        try:
            result = await self._iterator.__anext__()
        except StopAsyncIteration:
            self._finish("abort")
            raise
        completion = result.outputs[0]
        now = time.perf_counter()
        stats = self.engine.stats
        new_ids = list(completion.token_ids[self._tokens:])
        if new_ids:
            if self._tokens == 0:
                stats.ttft.observe(now - self.arrival)
            else:
                stats.itl.observe(now - self._last)
            self._last = now
            stats.generation_tokens += len(new_ids)
        self._tokens = len(completion.token_ids)
        text = completion.text[self._text:]
        self._text = len(completion.text)
        choices = [Choice(token) for token in new_ids]
        if completion.logprobs and self.sequence.params.logprobs is not None:
            for choice, entry in zip(choices, completion.logprobs[-len(new_ids):]):
                ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)
                choice.logprob = entry[choice.token].logprob if choice.token in entry else None
                choice.top = [(t, lp.logprob) for t, lp in ranked[: self.sequence.params.logprobs]]
        output = Output(new_ids, text, choices)
        if result.finished:
            output.finish_reason = completion.finish_reason or "stop"
            output.prompt_tokens = len(self.prompt_ids)
            output.completion_tokens = self._tokens
            self._finish(output.finish_reason)
        return output

    def _finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        stats = self.engine.stats
        stats.finished[reason if reason in stats.finished else "stop"] += 1
        stats.prompt_tokens += len(self.prompt_ids)
        stats.prompt_len.observe(len(self.prompt_ids))
        stats.generation_len.observe(self._tokens)
        stats.e2e.observe(time.perf_counter() - self.arrival)
        self.engine.in_flight -= 1

    def close(self) -> None:
        if not self.done:
            self._finish("abort")
            asyncio.get_running_loop().create_task(self.engine.vllm.abort(self.request_id))


class VllmEngine:
    """inferstack's engine interface over a ``vllm.AsyncLLMEngine``."""

    def __init__(self, vllm_engine: Any, tokenizer: Any, settings: EngineSettings, *, name: str,
                 max_model_len: int) -> None:
        self.vllm = vllm_engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.name = name
        self.max_model_len = max_model_len
        self.stats = EngineStats()
        self.in_flight = 0
        self.stopping = False

    # gauges: vLLM schedules internally; what is in flight here is the best outside view
    @property
    def num_running(self) -> int:
        return min(self.in_flight, self.settings.max_num_seqs)

    @property
    def num_waiting(self) -> int:
        return max(0, self.in_flight - self.settings.max_num_seqs)

    @property
    def slots_in_use(self) -> int:
        return self.num_running

    @property
    def num_slots(self) -> int:
        return self.settings.max_num_seqs

    @property
    def load(self) -> int:
        return self.in_flight

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        from inferstack.llm.engine import LLMEngine

        return LLMEngine.apply_chat_template(self, messages)  # type: ignore[arg-type]

    def vllm_params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VllmSamplingParams

        return VllmSamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, seed=params.seed, stop=params.stop or None,
            stop_token_ids=params.stop_token_ids or None, ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
        )

    def stream(self, prompt_ids: list[int], params: SamplingParams, *, timeout_s: float | None = None) -> VllmStream:
        params.validate()
        if self.stopping:
            raise UnavailableError(f"model {self.name!r} is unloading", retry_after=1.0)
        if not prompt_ids or len(prompt_ids) >= self.max_model_len:
            raise InvalidArgumentError(
                f"the prompt has {len(prompt_ids)} tokens; model {self.name!r} accepts 1 to {self.max_model_len - 1}")
        if self.num_waiting >= self.settings.max_waiting:
            raise QueueFullError(
                f"model {self.name!r}: {self.num_waiting} requests already wait (max_waiting_requests "
                f"{self.settings.max_waiting}); retry later", retry_after=1.0)
        params.max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        return VllmStream(self, prompt_ids, params)

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        self.stopping = True
        shutdown = getattr(self.vllm, "shutdown", None)
        if callable(shutdown):
            shutdown()


def build_vllm_engine(config: Any, model_path: Any, instance: Any) -> VllmEngine:
    """Start vLLM's async engine on the model folder (slow: called off the event loop)."""
    from transformers import AutoTokenizer
    from vllm import AsyncEngineArgs, AsyncLLMEngine

    from inferstack.llm.backend import engine_settings

    settings = engine_settings(config, instance)
    args = AsyncEngineArgs(model=str(model_path), max_num_seqs=settings.max_num_seqs,
                           max_model_len=settings.max_model_len or None, dtype=settings.dtype)
    engine = AsyncLLMEngine.from_engine_args(args)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    max_model_len = settings.max_model_len or int(getattr(engine, "model_config", None).max_model_len
                                                  if getattr(engine, "model_config", None) else 2048)
    return VllmEngine(engine, tokenizer, settings, name=config.name or "model", max_model_len=max_model_len)
