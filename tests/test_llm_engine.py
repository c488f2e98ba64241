"""The continuous-batching engine in process: batched == solo, scheduling, sampling, limits."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from inferstack._proto import model_config_pb2 as mc  # noqa: E402
from inferstack.core.errors import InvalidArgumentError, RequestTimeoutError  # noqa: E402
from inferstack.llm.backend import build_engine  # noqa: E402
from inferstack.llm.detokenizer import IncrementalDetokenizer  # noqa: E402
from inferstack.llm.params import QueueFullError, SamplingParams  # noqa: E402
from inferstack.testing.llm_models import tiny_llama  # noqa: E402

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Now is better than never.",
    "a",
    "Errors should never pass silently. Unless explicitly silenced. In the face of ambiguity, refuse",
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. " * 2,
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _config(**parameters: Any) -> mc.ModelConfig:
    config = mc.ModelConfig(name="tiny")
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    return config


@pytest.fixture(scope="module")
def engines(model_dir: Path) -> Iterator[Any]:
    created: list[Any] = []

    def make(**parameters: Any) -> Any:
        engine = build_engine(_config(**parameters), model_dir)
        created.append(engine)
        return engine

    yield make
    for engine in created:
        engine.shutdown(drain_timeout=0)


def greedy(max_tokens: int = 24, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def run(engine: Any, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[list[int], str, Any]]:
    """Submit every prompt at once; wait for all: (token ids, text, final output) per prompt."""
    boxes = []
    for ids, p in zip(prompts, params):
        box: queue.Queue = queue.Queue()
        engine.submit(ids, p, box.put)
        boxes.append(box)
    results = []
    for box in boxes:
        ids, text = [], []
        while True:
            output = box.get(timeout=60)
            if output.error is not None:
                raise output.error
            ids += output.token_ids
            text.append(output.text)
            if output.finish_reason is not None:
                results.append((ids, "".join(text), output))
                break
    return results


def test_solo_matches_hugging_face_generate(engines: Any, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    engine = engines(max_num_seqs=2, max_model_len=256)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for text in PROMPTS[:3]:
        ids = engine.encode(text)
        expected = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
        [(got, _, final)] = run(engine, [ids], [greedy(16)])
        assert got == expected
        assert final.finish_reason == "length" and final.completion_tokens == 16


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_batched_outputs_identical_to_solo(engines: Any, policy: str) -> None:
    """Prompts of different lengths, more prompts than slots, prompts longer than the token
    budget (chunked prefill), different max_tokens: each sequence's greedy tokens are
    exactly those it gets alone."""
    engine = engines(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=32, scheduling_policy=policy)
    prompts = [engine.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts) and max(len(p) for p in prompts) > 32
    params = [greedy(8 + 5 * i) for i in range(len(prompts))]
    solo = [run(engine, [p], [q])[0] for p, q in zip(prompts, params)]
    batched = run(engine, prompts, params)
    for (solo_ids, solo_text, _), (ids, text, final) in zip(solo, batched):
        assert ids == solo_ids
        assert text == solo_text
    assert [r[2].completion_tokens for r in batched] == [p.max_tokens for p in params]
    assert engine.slots_in_use == 0


def test_new_request_joins_running_batch(engines: Any) -> None:
    """A request arriving mid-generation starts at the next step and finishes long before the first."""
    engine = engines(max_num_seqs=4, max_model_len=512)
    long_ids, short_ids = engine.encode(PROMPTS[1]), engine.encode(PROMPTS[2])
    [(solo_short, _, _)] = run(engine, [short_ids], [greedy(4)])
    events: queue.Queue = queue.Queue()
    engine.submit(long_ids, greedy(300), lambda o: events.put(("long", o)))
    first = events.get(timeout=60)
    assert first[0] == "long"
    engine.submit(short_ids, greedy(4), lambda o: events.put(("short", o)))
    order, short_tokens = [], []
    while True:
        name, output = events.get(timeout=60)
        if name == "short":
            short_tokens += output.token_ids
        if output.finish_reason is not None:
            order.append(name)
            if len(order) == 2:
                break
    assert order == ["short", "long"]
    assert short_tokens == solo_short
    assert engine.stats.ttft.counts and sum(engine.stats.ttft.counts) >= 3


def test_seeded_sampling_is_deterministic_and_batch_independent(engines: Any) -> None:
    engine = engines(max_num_seqs=4, max_model_len=256)
    ids = engine.encode(PROMPTS[0])

    def sampled(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)

    [(alone, _, _)] = run(engine, [ids], [sampled(7)])
    together = run(engine, [ids, engine.encode(PROMPTS[1]), ids], [sampled(7), greedy(20), sampled(8)])
    assert together[0][0] == alone
    assert together[2][0] != alone  # another seed, another draw
    [(again, _, _)] = run(engine, [ids], [sampled(7)])
    assert again == alone


def test_top_k_one_is_greedy_and_logprobs(engines: Any) -> None:
    engine = engines(max_num_seqs=2, max_model_len=256)
    ids = engine.encode(PROMPTS[2])
    [(expected, _, _)] = run(engine, [ids], [greedy(10)])
    box: queue.Queue = queue.Queue()
    engine.submit(ids, SamplingParams(max_tokens=10, temperature=0.8, top_k=1, logprobs=3, ignore_eos=True), box.put)
    tokens = []
    while True:
        output = box.get(timeout=60)
        for choice in output.choices:
            tokens.append(choice.token)
            assert choice.logprob is not None and choice.logprob <= 0.0
            assert len(choice.top) == 3 and choice.top[0][0] == choice.token
            assert choice.top[0][1] == pytest.approx(choice.logprob)
            assert choice.top[0][1] >= choice.top[1][1] >= choice.top[2][1]
        if output.finish_reason:
            break
    assert tokens == expected


def test_stop_string_truncates_text(engines: Any) -> None:
    engine = engines(max_num_seqs=2, max_model_len=256)
    ids = engine.encode(PROMPTS[4])
    [(_, text, _)] = run(engine, [ids], [greedy(40)])
    # a stop string from the middle of the greedy text, free of replacement characters
    start = next(i for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    [(_, stopped, final)] = run(engine, [ids], [greedy(40, stop=[stop])])
    assert stopped == text[: text.index(stop)]
    assert final.finish_reason == "stop"
    assert final.completion_tokens < 40


def test_detokenizer_holds_back_a_possible_stop_string() -> None:
    class Chars:  # one token per character
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(i) for i in ids)

    detok = IncrementalDetokenizer(Chars(), ["END"])
    released = [detok.add(ord(c)) for c in "abEN"]
    assert "".join(r[0] for r in released) == "ab"  # "EN" might start "END"
    assert detok.add(ord("x")) == ("ENx", False)
    assert detok.add(ord("E"))[0] == ""
    assert detok.add(ord("N"))[0] == ""
    assert detok.add(ord("D")) == ("", True)
    assert detok.text == "abENx"


def test_queue_full_is_429_with_retry_after(engines: Any) -> None:
    engine = engines(max_num_seqs=1, max_waiting_requests=1, max_model_len=512)
    ids = engine.encode(PROMPTS[0])
    first = engine.submit(ids, greedy(400), lambda o: None)
    deadline = time.monotonic() + 30
    while engine.num_running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = engine.submit(ids, greedy(400), lambda o: None)
    with pytest.raises(QueueFullError) as caught:
        engine.submit(ids, greedy(4), lambda o: None)
    assert caught.value.http_status == 429 and caught.value.retry_after
    assert "max_waiting_requests" in caught.value.message
    engine.abort(first)
    engine.abort(second)
    while (engine.slots_in_use or engine.num_waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.slots_in_use == 0 and engine.stats.finished["abort"] >= 2


def test_abort_frees_the_slot_at_the_next_step(engines: Any) -> None:
    engine = engines(max_num_seqs=2, max_model_len=512)
    box: queue.Queue = queue.Queue()
    sequence = engine.submit(engine.encode(PROMPTS[0]), greedy(450), box.put)
    box.get(timeout=60)  # it runs
    assert engine.slots_in_use == 1
    engine.abort(sequence)
    while True:
        output = box.get(timeout=60)
        if output.finish_reason is not None:
            break
    assert output.finish_reason == "abort" and output.completion_tokens < 450
    assert engine.slots_in_use == 0


def test_deadline_aborts(engines: Any) -> None:
    engine = engines(max_num_seqs=1, max_model_len=512)
    ids = engine.encode(PROMPTS[0])
    box: queue.Queue = queue.Queue()
    engine.submit(ids, greedy(450), box.put, timeout_s=0.3)
    while True:
        output = box.get(timeout=60)
        if output.finish_reason is not None:
            break
    assert output.finish_reason == "timeout" and output.completion_tokens < 450
    # waiting behind a long request: no token before the deadline is an error
    blocker = engine.submit(ids, greedy(450), lambda o: None)
    with pytest.raises(RequestTimeoutError, match="deadline"):
        run_with_timeout(engine, ids, 0.05)
    engine.abort(blocker)


def run_with_timeout(engine: Any, ids: list[int], timeout_s: float) -> None:
    box: queue.Queue = queue.Queue()
    engine.submit(ids, greedy(4), box.put, timeout_s=timeout_s)
    while True:
        output = box.get(timeout=60)
        if output.error is not None:
            raise output.error
        if output.finish_reason is not None:
            return


def test_bad_requests_name_the_field(engines: Any) -> None:
    engine = engines(max_num_seqs=1, max_model_len=64)
    with pytest.raises(InvalidArgumentError, match="accepts at most 63"):
        engine.submit(list(range(5, 75)), greedy(4), lambda o: None)
    with pytest.raises(InvalidArgumentError, match="empty"):
        engine.submit([], greedy(4), lambda o: None)
    for params, field in [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-0.5), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=-3), "top_k"),
        (SamplingParams(stop=[""]), "stop"),
        (SamplingParams(logprobs=50), "logprobs"),
    ]:
        with pytest.raises(InvalidArgumentError, match=field):
            engine.submit([5, 6], params, lambda o: None)


def test_max_tokens_is_capped_by_the_context(engines: Any) -> None:
    engine = engines(max_num_seqs=1, max_model_len=40)
    ids = engine.encode(PROMPTS[1])[:30]
    [(tokens, _, final)] = run(engine, [ids], [greedy(100)])
    assert len(tokens) == 10 and final.finish_reason == "length"


def test_runner_reads_the_cache_in_place_or_gathered_alike(model_dir: Path) -> None:
    """Rows whose slots span a compact range are attended in place; scattered slots are
    gathered. Both give the logits of the same rows in neighbouring slots."""
    from transformers import AutoModelForCausalLM

    from inferstack.llm.runner import ModelRunner, Row

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    runner = ModelRunner(model, slots=8, max_model_len=64, device=torch.device("cpu"), dtype=torch.float32)
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23]]

    def decode(slots: tuple[int, int]) -> torch.Tensor:
        runner.forward([Row(slot, 0, p) for slot, p in zip(slots, prompts)])  # prefill
        return runner.forward([Row(slot, len(p), [40]) for slot, p in zip(slots, prompts)])

    in_place = decode((0, 1))  # span 2 <= 2 * rows
    gathered = decode((0, 7))  # span 8 > 2 * rows
    torch.testing.assert_close(in_place, gathered, rtol=1e-5, atol=1e-5)
    assert not torch.equal(in_place[0], in_place[1])
