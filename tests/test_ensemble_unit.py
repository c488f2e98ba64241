"""Ensembles in process: the graph checks of the config, and the DAG executor against
step models that record what runs when (so concurrency is proven, not timed)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inferstack._proto import model_config_pb2 as mc
from inferstack.core.errors import InvalidArgumentError, NotFoundError
from inferstack.core.types import InferenceRequest, InferenceResponse
from inferstack.repository.config import ModelConfigError, TensorSpec, parse_config_text, validate_config
from inferstack.serving.ensemble import EnsembleVersion
from inferstack.serving.model import ModelState, _Input

DIAMOND = """
name: "diamond"
platform: "ensemble"
max_batch_size: 4
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 2 ] } ]
ensemble_scheduling { step [
  { model_name: "left" input_map { key: "X" value: "IN" } output_map { key: "Y" value: "L" } },
  { model_name: "right" input_map { key: "X" value: "IN" } output_map { key: "Y" value: "R" } },
  { model_name: "join" input_map [ { key: "A" value: "L" }, { key: "B" value: "R" } ]
    output_map { key: "Y" value: "OUT" } } ] }
"""


def _config(text: str) -> mc.ModelConfig:
    config = parse_config_text(text, "test")
    validate_config(config, config.name or "e", "test")
    return config


class FakeStep:
    """Quacks like a READY ModelVersion; ``behaviour`` is an async function of the inputs."""

    def __init__(self, name: str, inputs: list[str], outputs: list[str], behaviour, *, datatype: str = "FP32",
                 max_batch_size: int = 4) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.inputs = [_Input(TensorSpec(n, datatype, (2,))) for n in inputs]
        self.outputs = [TensorSpec(n, "FP32", (2,)) for n in outputs]
        self.behaviour = behaviour
        self.calls = 0

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        self.calls += 1
        outputs = await self.behaviour(request.inputs)
        return InferenceResponse(self.name, "1", request.id, outputs)


def _ensemble(text: str, steps: dict[str, FakeStep]) -> EnsembleVersion:
    def lookup(name: str, version: str) -> FakeStep:
        if name not in steps:
            raise NotFoundError(f"unknown model {name!r}")
        return steps[name]

    config = _config(text)
    return EnsembleVersion(config.name, 1, config, lookup)  # type: ignore[arg-type]


def _request(x: np.ndarray, model: str = "diamond") -> InferenceRequest:
    return InferenceRequest(model_name=model, inputs={"IN": x})


def test_independent_branches_run_concurrently() -> None:
    async def scenario() -> None:
        started = {"left": asyncio.Event(), "right": asyncio.Event()}

        def branch(me: str, other: str, delta: float):
            async def run(inputs):
                started[me].set()
                # Each branch waits until the other has started: sequential execution would hang.
                await asyncio.wait_for(started[other].wait(), 5)
                return {"Y": inputs["X"] + delta}
            return run

        async def join(inputs):
            return {"Y": inputs["A"] * inputs["B"]}

        steps = {"left": FakeStep("left", ["X"], ["Y"], branch("left", "right", 1)),
                 "right": FakeStep("right", ["X"], ["Y"], branch("right", "left", 2)),
                 "join": FakeStep("join", ["A", "B"], ["Y"], join)}
        ensemble = _ensemble(DIAMOND, steps)
        await ensemble.load()
        assert ensemble.state is ModelState.READY
        x = np.array([[1.0, 2.0]], np.float32)
        response = await ensemble.infer(_request(x))
        np.testing.assert_allclose(response.outputs["OUT"], (x + 1) * (x + 2))
        assert ensemble.stats.success.count == 1 and ensemble.stats.inference_count == 1

    asyncio.run(scenario())


def test_a_failing_branch_cancels_the_other_and_is_named() -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def slow(inputs):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return {"Y": inputs["X"]}

        async def bad(inputs):
            await asyncio.sleep(0)
            raise InvalidArgumentError("input 'X' is wrong")

        async def join(inputs):  # pragma: no cover - never reached
            return {"Y": inputs["A"]}

        steps = {"left": FakeStep("left", ["X"], ["Y"], slow), "right": FakeStep("right", ["X"], ["Y"], bad),
                 "join": FakeStep("join", ["A", "B"], ["Y"], join)}
        ensemble = _ensemble(DIAMOND, steps)
        await ensemble.load()
        with pytest.raises(InvalidArgumentError) as caught:
            await ensemble.infer(_request(np.zeros((1, 2), np.float32)))
        assert caught.value.message == "ensemble 'diamond' step 1 (model 'right') failed: input 'X' is wrong"
        assert cancelled.is_set()
        assert steps["join"].calls == 0
        assert ensemble.stats.failures["invalid"] == 1
        assert ensemble.scheduler.in_flight == 0

    asyncio.run(scenario())


def test_readiness_follows_the_steps() -> None:
    async def scenario() -> None:
        async def same(inputs):
            return {"Y": inputs.get("X", inputs.get("A"))}

        steps = {"left": FakeStep("left", ["X"], ["Y"], same), "right": FakeStep("right", ["X"], ["Y"], same),
                 "join": FakeStep("join", ["A", "B"], ["Y"], same)}
        ensemble = _ensemble(DIAMOND, steps)
        await ensemble.load()
        assert ensemble.state is ModelState.READY and ensemble.reason == ""
        removed = steps.pop("right")
        assert ensemble.state is ModelState.UNAVAILABLE
        assert ensemble.reason == "step 1 (model 'right') is not available: unknown model 'right'"
        # Back, but reloaded with an incompatible input datatype: still unavailable, says why.
        steps["right"] = FakeStep("right", ["X"], ["Y"], same, datatype="INT32")
        assert ensemble.reason == ("step 1 (model 'right'): input 'X' expects INT32, but tensor 'IN' "
                                   "(ensemble input 'IN') is FP32")
        steps["right"] = removed
        assert ensemble.state is ModelState.READY
        # A step that cannot take the ensemble's whole batch.
        steps["join"] = FakeStep("join", ["A", "B"], ["Y"], same, max_batch_size=2)
        assert "max_batch_size 2 is smaller than the ensemble's 4" in ensemble.reason

    asyncio.run(scenario())


def test_load_fails_with_the_reason() -> None:
    async def scenario() -> None:
        ensemble = _ensemble(DIAMOND, {})
        with pytest.raises(ModelConfigError, match="step 0 \\(model 'left'\\) is not available: unknown model"):
            await ensemble.load()

    asyncio.run(scenario())


def test_ensembles_that_are_each_others_steps_are_unavailable() -> None:
    async def scenario() -> None:
        texts = {name: f"""
name: "{name}"
platform: "ensemble"
max_batch_size: 4
input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ 2 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ 2 ] }} ]
ensemble_scheduling {{ step [ {{ model_name: "{other}" input_map {{ key: "IN" value: "IN" }}
  output_map {{ key: "OUT" value: "OUT" }} }} ] }}
""" for name, other in (("e1", "e2"), ("e2", "e1"))}
        versions: dict[str, EnsembleVersion] = {}

        def lookup(name: str, version: str) -> EnsembleVersion:
            found = versions[name]
            if found.state is not ModelState.READY:
                from inferstack.core.errors import UnavailableError

                raise UnavailableError(f"model {name!r} is not ready ({found.reason})")
            return found

        for name, text in texts.items():
            config = _config(text)
            versions[name] = EnsembleVersion(name, 1, config, lookup)
            versions[name].state = ModelState.READY
        assert versions["e1"].state is ModelState.UNAVAILABLE
        assert "cycle" in versions["e1"].reason

    asyncio.run(scenario())


@pytest.mark.parametrize(("steps", "outputs", "message"), [
    ("""{ model_name: "m" input_map { key: "X" value: "IN" } output_map { key: "Y" value: "IN" } }""", "OUT",
     "output 'Y' is mapped to tensor 'IN', but it is an ensemble input"),
    ("""{ model_name: "m" input_map { key: "X" value: "IN" } output_map { key: "Y" value: "OUT" } },
        { model_name: "n" input_map { key: "X" value: "IN" } output_map { key: "Y" value: "OUT" } }""", "OUT",
     "step 1 (model 'n'): output 'Y' is mapped to tensor 'OUT', but step 0 (model 'm') produces it too"),
    ("""{ model_name: "m" input_map { key: "X" value: "IN" } output_map { key: "Y" value: "T" } }""", "OUT",
     "ensemble output 'OUT' is not produced by any step's output_map"),
    ("""{ model_name: "e" input_map { key: "X" value: "IN" } output_map { key: "Y" value: "OUT" } }""", "OUT",
     "step 0 (model 'e'): an ensemble cannot be a step of itself"),
    ("""{ model_name: "m" input_map { key: "X" value: "IN" } }""", "OUT",
     "step 0 (model 'm') has an empty output_map"),
    ("""{ model_name: "a" input_map { key: "X" value: "C" } output_map { key: "Y" value: "B" } },
        { model_name: "b" input_map { key: "X" value: "B" } output_map { key: "Y" value: "C" } },
        { model_name: "c" input_map { key: "X" value: "C" } output_map { key: "Y" value: "OUT" } }""", "OUT",
     "the steps form a cycle: step 0 (model 'a') -> step 1 (model 'b') -> step 0 (model 'a')"),
])
def test_graph_errors(steps: str, outputs: str, message: str) -> None:
    text = f"""
name: "e"
platform: "ensemble"
max_batch_size: 4
input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ 2 ] }} ]
output [ {{ name: "{outputs}" data_type: TYPE_FP32 dims: [ 2 ] }} ]
ensemble_scheduling {{ step [ {steps} ] }}
"""
    config = parse_config_text(text, "cfg")
    with pytest.raises(ModelConfigError) as caught:
        validate_config(config, "e", "cfg")
    assert message in str(caught.value)


def test_config_level_errors() -> None:
    for text, message in [
        ('platform: "ensemble"', "needs ensemble_scheduling with at least one step"),
        ('platform: "onnxruntime_onnx" ensemble_scheduling { step [ { model_name: "m" } ] }',
         "ensemble_scheduling needs platform: \"ensemble\""),
        ('platform: "ensemble" ensemble_scheduling { step [ { model_name: "m" output_map { key: "Y" value: "O" } } ] }',
         "must declare its inputs and outputs"),
    ]:
        with pytest.raises(ModelConfigError, match=message):
            validate_config(parse_config_text(text, "cfg"), "e", "cfg")
