"""Ensembles: one model name that runs a graph of other models (``platform: "ensemble"``).

An :class:`EnsembleVersion` is a :class:`ModelVersion` without instances. Its
``infer`` checks the request against the ensemble's declared inputs, then runs
the steps as a DAG on the event loop: every step whose input tensors exist is
started at once (independent branches run concurrently), intermediate tensors
stay in memory as numpy arrays, and each step is an ordinary request to its
model's own ``ModelVersion.infer``. So every step goes through that model's
dynamic batcher, queue policy, response cache and statistics exactly as a
client request would; the ensemble adds only its own end-to-end statistics.

Readiness follows the step models. The version is READY only while every step
model resolves to a READY version whose inputs, outputs, datatypes, shapes and
batch sizes fit the ensemble's graph; a step model unloaded or reloaded with an
incompatible config turns the ensemble UNAVAILABLE with the reason, and a fit
one turns it READY again (the check reruns only when a step's version object
changes). Loading an ensemble loads the step models it needs first (Triton's
behaviour in explicit mode); see ``docs/ensembles.md``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inferstack._proto import model_config_pb2 as mc
from inferstack.core.errors import (
    InferenceServerError,
    InternalError,
    ModelLoadError,
    UnavailableError,
)
from inferstack.core.types import InferenceRequest, InferenceResponse, RequestedOutput
from inferstack.repository.config import ModelConfigError, TensorSpec, read_config, tensor_specs
from inferstack.repository.ensemble import EnsembleStep, ensemble_steps, is_ensemble, topological_order
from inferstack.serving.cache import ResponseCache
from inferstack.serving.model import ModelState, ModelVersion, _failure_reason

if TYPE_CHECKING:
    from inferstack.serving.manager import ModelManager

log = logging.getLogger("inferstack.models")

Lookup = Callable[[str, str], ModelVersion]


class EnsembleTracker:
    """What the scheduler slot of a version holds for an ensemble: in-flight requests.

    An ensemble has no queue of its own (its steps queue in their models), but
    an unload must still wait for the requests running through it, and the
    metrics read ``pending`` and ``in_flight`` from here like from a Scheduler.
    """

    pending = 0

    def __init__(self) -> None:
        self.in_flight = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def close(self, timeout: float) -> None:
        self.closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("ensemble unload: %d request(s) still running after %.1fs", self.in_flight, timeout)


def _full_shape(dims: tuple[int, ...], max_batch_size: int) -> tuple[int, ...]:
    """The shape a tensor really has, batch dimension included."""
    return (-1, *dims) if max_batch_size > 0 else tuple(dims)


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class EnsembleVersion(ModelVersion):
    """One version of an ensemble; see the module docstring."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        lookup: Lookup,
        *,
        response_cache: ResponseCache | None = None,
        model_dir: Path | None = None,
    ) -> None:
        self._state = ModelState.LOADING
        self._reason = ""
        super().__init__(name, version, config, None, Path(), response_cache=response_cache,  # type: ignore[arg-type]
                         model_dir=model_dir)
        self._resolve = lookup
        self.steps = topological_order(ensemble_steps(config))
        limit = config.ensemble_scheduling.max_inflight_requests
        #: Triton's max_inflight_requests: requests running at once in each step.
        self._step_slots = {step.index: asyncio.Semaphore(limit) for step in self.steps} if limit else {}
        #: The step versions the graph was last checked against, and what the check found.
        self._checked: tuple[tuple[ModelVersion, ...], str] | None = None
        self._resolving = False

    # -- state that follows the step models ---------------------------------------

    @property  # type: ignore[override]
    def state(self) -> ModelState:
        if self._state is not ModelState.READY:
            return self._state
        return ModelState.UNAVAILABLE if self._step_problem() else ModelState.READY

    @state.setter
    def state(self, value: ModelState) -> None:
        self._state = value

    @property  # type: ignore[override]
    def reason(self) -> str:
        if self._state is not ModelState.READY:
            return self._reason
        return self._step_problem()

    @reason.setter
    def reason(self, value: str) -> None:
        self._reason = value

    def _step_problem(self) -> str:
        """Why the ensemble cannot run now ("" when it can)."""
        if self._resolving:  # two ensembles that are each other's steps
            return f"ensemble {self.name!r} is part of a cycle of ensembles"
        self._resolving = True
        try:
            resolved: list[ModelVersion] = []
            for step in self.steps:
                try:
                    resolved.append(self._resolve(step.model_name, step.version_str))
                except InferenceServerError as exc:
                    return f"{step.label} is not available: {exc.message}"
            key = tuple(resolved)
            checked = self._checked
            if checked is not None and len(checked[0]) == len(key) and all(a is b for a, b in zip(checked[0], key)):
                return checked[1]
            problem = self._check_steps(key)
            self._checked = (key, problem)
            return problem
        finally:
            self._resolving = False

    def _check_steps(self, versions: tuple[ModelVersion, ...]) -> str:
        """Check the graph against the step models' configs; the first problem, or ""."""
        mbs = self.max_batch_size
        # tensor -> (datatype, full shape, who declares it)
        known: dict[str, tuple[str, tuple[int, ...], str]] = {
            spec.name: (spec.datatype, _full_shape(spec.dims, mbs), f"ensemble input {spec.name!r}")
            for spec in tensor_specs(self.config.input)
        }
        for step, version in zip(self.steps, versions):
            inputs = {spec.spec.name: spec.spec for spec in version.inputs}
            outputs = {spec.name: spec for spec in version.outputs}
            step_mbs = version.max_batch_size
            if mbs > 0 and step_mbs > 0 and step_mbs < mbs:
                return (f"{step.label}: the model's max_batch_size {step_mbs} is smaller than the ensemble's "
                        f"{mbs}; a full ensemble batch could not pass through it")
            if mbs > 0 and step_mbs == 0:
                return (f"{step.label}: the model does not batch (max_batch_size 0) but the ensemble does "
                        f"(max_batch_size {mbs})")
            for model_input, tensor in step.input_map.items():
                spec = inputs.get(model_input)
                if spec is None:
                    return (f"{step.label}: input_map names input {model_input!r}, which the model does not "
                            f"have; its inputs are {sorted(inputs)}")
                problem = self._match(step, f"input {model_input!r}", spec, step_mbs, tensor, known[tensor])
                if problem:
                    return problem
            missing = sorted(name for name, spec in inputs.items() if not spec.optional and name not in step.input_map)
            if missing:
                return f"{step.label}: the model's required inputs {missing} are not in the step's input_map"
            for model_output, tensor in step.output_map.items():
                spec = outputs.get(model_output)
                if spec is None:
                    return (f"{step.label}: output_map names output {model_output!r}, which the model does not "
                            f"have; its outputs are {sorted(outputs)}")
                known[tensor] = (spec.datatype, _full_shape(spec.dims, step_mbs),
                                 f"{step.label} output {model_output!r}")
        for spec in tensor_specs(self.config.output):
            datatype, shape, origin = known[spec.name]
            want = _full_shape(spec.dims, mbs)
            if datatype != spec.datatype:
                return (f"ensemble output {spec.name!r} is declared {spec.datatype}, but {origin} "
                        f"produces {datatype}")
            if not _compatible(shape, want):
                return (f"ensemble output {spec.name!r} is declared with shape {_shape_str(want)}, but {origin} "
                        f"produces shape {_shape_str(shape)}")
        return ""

    @staticmethod
    def _match(step: EnsembleStep, what: str, spec: TensorSpec, step_mbs: int, tensor: str,
               source: tuple[str, tuple[int, ...], str]) -> str:
        datatype, shape, origin = source
        if datatype != spec.datatype:
            return (f"{step.label}: {what} expects {spec.datatype}, but tensor {tensor!r} ({origin}) "
                    f"is {datatype}")
        want = _full_shape(spec.dims, step_mbs)
        if not _compatible(shape, want):
            return (f"{step.label}: {what} expects shape {_shape_str(want)}, but tensor {tensor!r} ({origin}) "
                    f"has shape {_shape_str(shape)}")
        return ""

    # -- lifecycle ----------------------------------------------------------------

    async def load(self) -> None:
        """Check the graph against the step models as they are now; READY on success."""
        started = time.perf_counter()
        self._state = ModelState.LOADING
        self._checked = None
        self._state = ModelState.READY
        problem = self._step_problem()
        if problem:
            self._state = ModelState.LOADING
            raise ModelConfigError(f"ensemble {self.name!r}: {problem}")
        self.scheduler = EnsembleTracker()  # type: ignore[assignment]
        self.load_seconds = time.perf_counter() - started

    # -- inference ------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        started = time.perf_counter_ns()
        tracker = self.scheduler
        if tracker is None or tracker.closing:
            return await self._hand_over(request)
        tracker.enter()  # type: ignore[attr-defined]
        try:
            try:
                inputs, outputs, batch_size = self._prepare(request)
                cache_key = None
                if self.cache is not None:
                    cache_key, cached = await self._cache_lookup(inputs, outputs)
                    if cached is not None:
                        self.stats.record_success(time.perf_counter_ns() - started)
                        return InferenceResponse(self.name, self.version_str, request.id, cached)
                results = await self._run_graph(request, inputs, outputs)
            except asyncio.CancelledError:
                self.stats.record_failure(time.perf_counter_ns() - started, "canceled")
                raise
            except InferenceServerError as exc:
                self.stats.record_failure(time.perf_counter_ns() - started, _failure_reason(exc))
                raise
            if cache_key is not None:
                await self._cache_insert(cache_key, results)
            self.stats.inference_count += batch_size or 1
            self.stats.record_success(time.perf_counter_ns() - started)
            return InferenceResponse(self.name, self.version_str, request.id, results)
        finally:
            tracker.leave()  # type: ignore[attr-defined]

    async def _run_graph(
        self, request: InferenceRequest, inputs: dict[str, np.ndarray], outputs: list[str]
    ) -> dict[str, np.ndarray]:
        """Run the steps the requested outputs need, each as soon as its inputs exist."""
        needed = set(outputs)
        wanted: list[EnsembleStep] = []
        for step in reversed(self.steps):  # reverse topological order: consumers first
            if needed & set(step.output_map.values()):
                wanted.append(step)
                needed.update(step.input_map.values())
        pending = list(reversed(wanted))
        tensors: dict[str, np.ndarray] = dict(inputs)
        running: dict[asyncio.Task[dict[str, np.ndarray]], EnsembleStep] = {}
        try:
            while pending or running:
                ready = [step for step in pending if all(tensor in tensors for tensor in step.input_map.values())]
                if len(ready) == 1 and not running:
                    # The only thing to do (a chain): await it in this task, no task or wait() overhead.
                    pending.remove(ready[0])
                    tensors.update(await self._run_step(ready[0], request, tensors))
                    continue
                for step in ready:
                    pending.remove(step)
                    task = asyncio.ensure_future(self._run_step(step, request, tensors))
                    running[task] = step
                if not running:  # cannot happen for a validated graph
                    raise InternalError(f"ensemble {self.name!r}: steps {[s.label for s in pending]} cannot start")
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                error: BaseException | None = None
                for task in done:
                    step = running.pop(task)
                    if task.cancelled():  # cancelled from inside the step model (it unloaded)
                        error = error or UnavailableError(
                            f"ensemble {self.name!r} {step.label} was cancelled", retry_after=1.0)
                    elif task.exception() is not None:
                        error = error or task.exception()
                    else:
                        tensors.update(task.result())
                if error is not None:
                    raise error
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        return {name: tensors[name] for name in outputs}

    async def _run_step(
        self, step: EnsembleStep, request: InferenceRequest, tensors: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        step_request = InferenceRequest(
            model_name=step.model_name,
            model_version=step.version_str,
            id=request.id,
            inputs={model_input: tensors[tensor] for model_input, tensor in step.input_map.items()},
            outputs=[RequestedOutput(model_output) for model_output in step.output_map],
        )
        slots = self._step_slots.get(step.index)
        try:
            model = self._resolve(step.model_name, step.version_str)
            if slots is None:
                response = await model.infer(step_request)
            else:
                async with slots:
                    response = await model.infer(step_request)
        except InferenceServerError as exc:
            raise _step_error(self.name, step, exc) from None
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a backend bug: still say which step
            log.exception("ensemble %s %s: unexpected failure", self.name, step.label)
            raise InternalError(f"ensemble {self.name!r} {step.label} failed: {type(exc).__name__}: {exc}") from None
        return {step.output_map[name]: array for name, array in response.outputs.items()}


def _step_error(ensemble: str, step: EnsembleStep, exc: InferenceServerError) -> InferenceServerError:
    """The step's error, same class (so the same status code), with the step named first."""
    message = f"ensemble {ensemble!r} {step.label} failed: {exc.message}"
    try:
        wrapped = type(exc)(message, retry_after=exc.retry_after)
    except TypeError:  # a subclass with another constructor
        wrapped = InternalError(message, retry_after=exc.retry_after)
    return wrapped


# -- loading: the manager's side ------------------------------------------------------

#: Ensembles whose step loading is under way in this task (to refuse cycles of ensembles).
_loading_chain: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("ensemble_chain", default=())


def repository_steps(manager: ModelManager, name: str) -> list[str] | None:
    """The step model names of ``name`` if its config.pbtxt is an ensemble, else None."""
    try:
        config = read_config(manager.repository.model_dir(name), required=False)
    except (ModelConfigError, InferenceServerError, OSError):
        return None
    if not is_ensemble(config):
        return None
    return list(dict.fromkeys(step.model_name for step in config.ensemble_scheduling.step))


def startup_order(manager: ModelManager, names: list[str]) -> list[str]:
    """Plain models first, then ensembles, so ensembles find their steps loading or loaded."""
    return sorted(names, key=lambda name: repository_steps(manager, name) is not None)


def _dependency_cycle(manager: ModelManager, name: str, steps: list[str]) -> list[str] | None:
    """A path ``name -> ... -> name`` through ensemble configs in the repository, if any."""
    stack: list[tuple[str, list[str]]] = [(step, [name, step]) for step in steps]
    seen: set[str] = set()
    while stack:
        current, path = stack.pop()
        if current == name:
            return path
        if current in seen:
            continue
        seen.add(current)
        for nxt in repository_steps(manager, current) or []:
            stack.append((nxt, [*path, nxt]))
    return None


async def load_steps(manager: ModelManager, name: str, config: mc.ModelConfig) -> None:
    """Make the ensemble's step models loaded before its graph is checked.

    A step model that is loading is waited for. One the manager has never seen
    is loaded (in every mode; in ``none`` and ``poll`` mode this only happens
    to one the startup load has not reached yet). In ``explicit`` mode a step
    model that is not ready (unloaded, or failed before) is loaded again, as
    Triton does when an ensemble is loaded. A step that still cannot load is
    reported by the graph check that follows.
    """
    steps = list(dict.fromkeys(step.model_name for step in config.ensemble_scheduling.step))
    chain = _loading_chain.get()
    cycle = _dependency_cycle(manager, name, steps)
    if name in chain or cycle:
        path = " -> ".join(cycle or [*chain, name])
        raise ModelConfigError(f"ensemble {name!r} depends on itself: {path}")
    token = _loading_chain.set((*chain, name))
    try:
        for step in steps:
            await _ensure_loaded(manager, step)
    finally:
        _loading_chain.reset(token)


async def _ensure_loaded(manager: ModelManager, step: str) -> None:
    model = manager._models.get(step)
    if model is not None and model.lock.locked():
        async with model.lock:  # a load under way: wait for it
            pass
    if manager.is_ready(step):
        return
    explicit = manager.options.model_control_mode == "explicit"
    if manager.known(step) and not explicit:
        return
    if step not in manager.repository.model_names():
        return
    try:
        await manager.load(step)
    except ModelLoadError as exc:
        log.error("ensemble step model %s failed to load: %s", step, exc.message)
    except UnavailableError:
        pass

