"""The vLLM adapter's translation (cumulative outputs -> deltas, stats, aborts), with a stand-in
for vLLM's AsyncLLMEngine: vLLM itself cannot be installed where the suite runs."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")

from inferstack.llm.engine import EngineSettings  # noqa: E402
from inferstack.llm.params import QueueFullError, SamplingParams  # noqa: E402
from inferstack.llm.vllm_engine import VllmEngine  # noqa: E402


class StandIn:
    """Yields vLLM-shaped cumulative RequestOutputs: one token ("t<i> ") per step."""

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.requests: list[tuple[Any, Any, str]] = []

    async def generate(self, prompt: Any, params: Any, request_id: str) -> Any:
        self.requests.append((prompt, params, request_id))
        ids: list[int] = []
        for i in range(params["max_tokens"]):
            await asyncio.sleep(0)
            ids.append(100 + i)
            done = i + 1 == params["max_tokens"]
            completion = SimpleNamespace(token_ids=list(ids), text="".join(f"t{t} " for t in ids), logprobs=None,
                                         finish_reason="length" if done else None)
            yield SimpleNamespace(outputs=[completion], finished=done)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def make(max_waiting: int = 10) -> tuple[VllmEngine, StandIn]:
    stand_in = StandIn()
    engine = VllmEngine(stand_in, tokenizer=None, settings=EngineSettings(max_num_seqs=2, max_waiting=max_waiting),
                        name="m", max_model_len=64)
    engine.vllm_params = lambda p: {"max_tokens": p.max_tokens}  # type: ignore[method-assign]
    return engine, stand_in


def test_cumulative_outputs_become_deltas_with_stats() -> None:
    async def main() -> None:
        engine, stand_in = make()
        stream = engine.stream([1, 2, 3], SamplingParams(max_tokens=4))
        outputs = [o async for o in stream]
        assert [o.text for o in outputs] == ["t100 ", "t101 ", "t102 ", "t103 "]
        assert [o.token_ids for o in outputs] == [[100], [101], [102], [103]]
        assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 4
        assert outputs[-1].prompt_tokens == 3
        assert stand_in.requests[0][0] == {"prompt_token_ids": [1, 2, 3]}
        stats = engine.stats
        assert stats.generation_tokens == 4 and stats.prompt_tokens == 3
        assert sum(stats.ttft.counts) == 1 and sum(stats.itl.counts) == 3
        assert stats.finished["length"] == 1 and engine.in_flight == 0

    asyncio.run(main())


def test_close_aborts_and_full_queue_is_429() -> None:
    async def main() -> None:
        engine, stand_in = make(max_waiting=1)
        streams = [engine.stream([1], SamplingParams(max_tokens=8)) for _ in range(3)]  # 2 running, 1 waiting
        with pytest.raises(QueueFullError):
            engine.stream([1], SamplingParams(max_tokens=8))
        first = await streams[0].__anext__()
        assert first.text == "t100 "
        for stream in streams:
            stream.close()
        await asyncio.sleep(0)
        assert len(stand_in.aborted) == 3 and engine.in_flight == 0
        assert engine.stats.finished["abort"] == 3

    asyncio.run(main())
