"""One loaded model version: its config, instances, scheduler and statistics.

``infer`` is the single entry point every transport uses. It checks a request
against the model's declared inputs (names, datatypes, shapes, batch size),
hands it to the scheduler, waits, and records statistics. The checks are a
handful of tuple comparisons per input — never a walk over tensor data.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from inferstack._proto import model_config_pb2 as mc
from inferstack.backends.base import Backend, InstanceSpec, ModelInstance
from inferstack.core.datatypes import datatype_of, numpy_dtype
from inferstack.core.errors import (
    InferenceServerError,
    InvalidArgumentError,
    RequestTimeoutError,
    UnavailableError,
)
from inferstack.core.stats import ModelStats
from inferstack.core.types import InferenceRequest, InferenceResponse
from inferstack.repository.config import ModelConfigError, TensorSpec, config_to_dict, tensor_specs
from inferstack.scheduling import QueuePolicy, Scheduler, SchedulerConfig
from inferstack.serving.cache import ResponseCache, request_key
from inferstack.serving.warmup import WarmupSample, build_samples

log = logging.getLogger("inferstack.models")

#: Numbers every ModelVersion object: a reloaded version (same number, maybe new
#: files) must never be answered from the cache entries of the copy it replaced.
_load_ids = itertools.count(1)

#: Models already warned about enabling the response cache on a server without one.
_warned_no_cache: set[str] = set()


class ModelState(str, Enum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"


class _Input:
    """A TensorSpec prepared for fast checks."""

    __slots__ = ("spec", "dtype", "dims", "reshape")

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.dtype = numpy_dtype(spec.datatype)
        self.dims = spec.dims
        self.reshape = spec.reshape


def _shape_matches(shape: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    if len(shape) != len(dims):
        return False
    for got, want in zip(shape, dims):
        if want != -1 and got != want:
            return False
    return True


def _queue_policy(policy: Any) -> QueuePolicy:
    return QueuePolicy(
        max_queue_size=policy.max_queue_size,
        default_timeout_us=policy.default_timeout_microseconds,
        allow_timeout_override=policy.allow_timeout_override,
        delay_on_timeout=policy.timeout_action == mc.ModelQueuePolicy.DELAY,
    )


def scheduler_config(config: mc.ModelConfig, server_max_queue_size: int) -> SchedulerConfig:
    """Translate a model config's batching and queue fields for the scheduler."""
    batching = config.dynamic_batching if config.HasField("dynamic_batching") else None
    if batching is None:
        return SchedulerConfig(
            model=config.name,
            max_batch_size=config.max_batch_size,
            server_max_queue_size=server_max_queue_size,
        )
    return SchedulerConfig(
        model=config.name,
        max_batch_size=config.max_batch_size,
        dynamic_batching=True,
        preferred_batch_sizes=tuple(batching.preferred_batch_size),
        max_queue_delay_us=batching.max_queue_delay_microseconds,
        priority_levels=batching.priority_levels,
        default_priority_level=batching.default_priority_level,
        default_policy=_queue_policy(batching.default_queue_policy),
        level_policies={
            level: _queue_policy(policy) for level, policy in batching.priority_queue_policy.items()
        },
        server_max_queue_size=server_max_queue_size,
    )


def instance_specs(config: mc.ModelConfig) -> list[InstanceSpec]:
    """Expand ``instance_group`` into one spec per instance (default: one CPU instance)."""
    groups = list(config.instance_group) or [mc.ModelInstanceGroup(count=1)]
    specs: list[InstanceSpec] = []
    for group_index, group in enumerate(groups):
        count = group.count or 1
        kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
        if kind in ("KIND_AUTO", "KIND_MODEL"):
            kind = "KIND_CPU"
        gpus = list(group.gpus) or [0]
        base = group.name or f"{config.name}_{group_index}"
        for gpu in (gpus if kind == "KIND_GPU" else [0]):
            for i in range(count):
                specs.append(InstanceSpec(name=f"{base}_{i}", kind=kind, device_id=gpu))
    total = len(specs)
    return [InstanceSpec(s.name, s.kind, s.device_id, total) for s in specs]


def _failure_reason(error: InferenceServerError) -> str:
    """The ``reason`` label of a failed request in the statistics and metrics."""
    if isinstance(error, RequestTimeoutError):
        return "timeout"
    if isinstance(error, UnavailableError):
        return "rejected"
    if isinstance(error, InvalidArgumentError):
        return "invalid"
    return "backend"


class ModelVersion:
    """A version of a model, from LOADING through READY to unloaded."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        backend: Backend,
        model_path: Path,
        *,
        server_max_queue_size: int = 1024,
        response_cache: ResponseCache | None = None,
        model_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.version_str = str(version)
        self.config = config
        self.backend = backend
        self.model_path = model_path
        self.state = ModelState.LOADING
        self.reason = ""
        self.stats = ModelStats()
        self.max_batch_size = config.max_batch_size
        self.inputs = [_Input(spec) for spec in tensor_specs(config.input)]
        self._inputs_by_name = {i.spec.name: i for i in self.inputs}
        self._required = [i.spec.name for i in self.inputs if not i.spec.optional]
        self.outputs = tensor_specs(config.output)
        self._outputs_by_name = {o.name: o for o in self.outputs}
        self._all_outputs = [o.name for o in self.outputs]
        self._server_max_queue_size = server_max_queue_size
        self.scheduler: Scheduler | None = None
        #: The server's response cache, if this model enables it (``response_cache { enable: true }``).
        self.cache: ResponseCache | None = None
        if config.response_cache.enable:
            if response_cache is not None:
                self.cache = response_cache
            elif name not in _warned_no_cache:
                _warned_no_cache.add(name)
                log.warning("model %s enables response_cache, but the server has no cache; start it "
                            "with --cache-config local,size=<bytes> to use one", name)
        #: The version as the cache key sees it: this copy's number plus a load id.
        self._cache_version = f"{version}#{next(_load_ids)}"
        #: Instance creation plus warmup, i.e. how long the version took to become READY.
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        #: Where ``warmup/`` data files are read from.
        self.model_dir = model_dir
        #: What this version was loaded from (config and file fingerprints), so a
        #: reload can keep it when nothing it depends on changed. Set by the manager.
        self.source: tuple | None = None
        #: The manager's lookup (``get(name, version)``): a request that resolved this
        #: version just before it was retired is handed to whatever serves now.
        self.lookup: Callable[[str], ModelVersion] | None = None

    @classmethod
    def failed(cls, name: str, version: int, reason: str) -> ModelVersion:
        """A version that could not be loaded, kept so the index can say why."""
        placeholder = cls(name, version, mc.ModelConfig(name=name), None, Path())  # type: ignore[arg-type]
        placeholder.state = ModelState.UNAVAILABLE
        placeholder.reason = reason
        return placeholder

    # -- lifecycle ----------------------------------------------------------------

    async def load(self) -> None:
        """Create every instance and run the warmup samples through each (all off the
        loop), then start the scheduler; READY on success. Nothing is left behind on
        failure: instances already created are unloaded."""
        started = time.perf_counter()
        specs = instance_specs(self.config)

        def create() -> tuple[list[ModelInstance], float]:
            samples = self._warmup_samples()
            created: list[ModelInstance] = []
            warmup = 0.0
            try:
                for spec in specs:
                    instance = self.backend.load(self.config, self.model_path, spec)
                    created.append(instance)
                    warmup += self._warm_up(instance, spec, samples)
            except BaseException:
                for instance in created:
                    instance.unload()
                raise
            if samples:
                log.info("model %s version %d: warmup ran %d sample(s) on %d instance(s) in %.2fs",
                         self.name, self.version, len(samples), len(created), warmup)
            return created, warmup

        instances, self.warmup_seconds = await asyncio.to_thread(create)
        self.scheduler = Scheduler(
            scheduler_config(self.config, self._server_max_queue_size), instances, self.stats
        )
        self.load_seconds = time.perf_counter() - started
        self.state = ModelState.READY

    def _warmup_samples(self) -> list[tuple[WarmupSample, dict[str, np.ndarray], list[str]]]:
        """Each warmup sample with its backend inputs, checked like a request would be."""
        what = f"model {self.name!r} version {self.version}"
        prepared = []
        for sample in build_samples(self.config, self.model_dir, what):
            request = InferenceRequest(model_name=self.name, inputs=sample.inputs)
            try:
                inputs, outputs, _ = self._prepare(request)
            except InferenceServerError as exc:
                raise ModelConfigError(f"{what}: warmup sample {sample.name!r} is invalid: {exc.message}") from None
            prepared.append((sample, inputs, outputs))
        return prepared

    def _warm_up(self, instance: ModelInstance, spec: InstanceSpec,
                 samples: list[tuple[WarmupSample, dict[str, np.ndarray], list[str]]]) -> float:
        """Run every sample ``count`` times on one instance; seconds spent."""
        started = time.perf_counter()
        for sample, inputs, outputs in samples:
            for _ in range(sample.count):
                try:
                    results = instance.execute(inputs, outputs)
                except Exception as exc:
                    message = exc.message if isinstance(exc, InferenceServerError) else f"{type(exc).__name__}: {exc}"
                    raise ModelConfigError(
                        f"model {self.name!r} version {self.version}: warmup sample {sample.name!r} "
                        f"failed on instance {spec.name}: {message}"
                    ) from None
                missing = [name for name in outputs if name not in results]
                if missing:
                    raise ModelConfigError(
                        f"model {self.name!r} version {self.version}: warmup sample {sample.name!r} "
                        f"on instance {spec.name}: the backend did not produce outputs {missing}"
                    )
        return time.perf_counter() - started

    async def unload(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let in-flight ones finish (bounded), free the instances."""
        self.state = ModelState.UNLOADING
        if self.scheduler is not None:
            await self.scheduler.close(timeout)
            self.scheduler = None
        self.state = ModelState.UNAVAILABLE
        self.reason = "unloaded"

    # -- metadata -------------------------------------------------------------------

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        mbs = self.max_batch_size
        return {
            "name": self.name,
            "versions": versions,
            "platform": self.config.platform or self.config.backend,
            "inputs": [
                {"name": i.spec.name, "datatype": i.spec.datatype, "shape": i.spec.shape_with_batch(mbs)}
                for i in self.inputs
            ],
            "outputs": [
                {"name": o.name, "datatype": o.datatype, "shape": o.shape_with_batch(mbs)}
                for o in self.outputs
            ],
        }

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    @property
    def pending(self) -> int:
        return self.scheduler.pending if self.scheduler is not None else 0

    # -- inference ------------------------------------------------------------------

    def _prepare(self, request: InferenceRequest) -> tuple[dict[str, np.ndarray], list[str], int]:
        """Check a request against the config; return backend inputs, outputs, batch size."""
        model = self.name
        given = request.inputs
        for name in self._required:
            if name not in given:
                raise InvalidArgumentError(f"model {model!r}: missing input {name!r}")
        batching = self.max_batch_size > 0
        batch_size = 0
        inputs: dict[str, np.ndarray] = {}
        for name, array in given.items():
            spec = self._inputs_by_name.get(name)
            if spec is None:
                raise InvalidArgumentError(
                    f"model {model!r}: unexpected input {name!r}; the model's inputs are "
                    f"{sorted(self._inputs_by_name)}"
                )
            if array.dtype != spec.dtype:
                raise InvalidArgumentError(
                    f"model {model!r}: input {name!r} has datatype {datatype_of(array)}, "
                    f"the model expects {spec.spec.datatype}"
                )
            shape = array.shape
            if batching:
                if len(shape) == 0 or not _shape_matches(shape[1:], spec.dims):
                    raise InvalidArgumentError(
                        f"model {model!r}: input {name!r} has shape {list(shape)}, "
                        f"expected {[-1, *spec.dims]}"
                    )
                rows = shape[0]
                if rows < 1 or rows > self.max_batch_size:
                    raise InvalidArgumentError(
                        f"model {model!r}: input {name!r} has batch size {rows}, which is "
                        f"outside 1..max_batch_size {self.max_batch_size}"
                    )
                if batch_size and rows != batch_size:
                    raise InvalidArgumentError(
                        f"model {model!r}: input {name!r} has batch size {rows}, other "
                        f"inputs have {batch_size}"
                    )
                batch_size = rows
                if spec.reshape is not None:
                    array = array.reshape((rows, *spec.reshape))
            else:
                if not _shape_matches(shape, spec.dims):
                    raise InvalidArgumentError(
                        f"model {model!r}: input {name!r} has shape {list(shape)}, "
                        f"expected {list(spec.dims)}"
                    )
                if spec.reshape is not None:
                    array = array.reshape(spec.reshape)
            inputs[name] = array
        if request.outputs is None:
            outputs = self._all_outputs
        else:
            outputs = []
            for requested in request.outputs:
                if requested.name not in self._outputs_by_name:
                    raise InvalidArgumentError(
                        f"model {model!r}: unknown output {requested.name!r}; the model's "
                        f"outputs are {self._all_outputs}"
                    )
                outputs.append(requested.name)
        return inputs, outputs, batch_size

    async def _cache_lookup(
        self, inputs: dict[str, np.ndarray], outputs: list[str]
    ) -> tuple[bytes, dict[str, np.ndarray] | None]:
        """Hash the request and look it up; counts the hit or the miss (Triton's stats)."""
        assert self.cache is not None
        started = time.perf_counter_ns()
        key = request_key(self.name, self._cache_version, inputs, outputs)
        cached = await self.cache.get(key)
        if cached is not None:
            self.stats.record_cache_hit(time.perf_counter_ns() - started)
        else:
            self.stats.record_cache_miss(time.perf_counter_ns() - started)
        return key, cached

    async def _cache_insert(self, key: bytes, results: dict[str, np.ndarray]) -> None:
        assert self.cache is not None
        started = time.perf_counter_ns()
        await self.cache.put(key, results)
        self.stats.record_cache_miss(time.perf_counter_ns() - started, count=0)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Run one request through the scheduler; failures are counted and re-raised."""
        started = time.perf_counter_ns()
        scheduler = self.scheduler
        if scheduler is None or scheduler.closing:
            return await self._hand_over(request)
        try:
            inputs, outputs, batch_size = self._prepare(request)
            cache_key = None
            if self.cache is not None:
                cache_key, cached = await self._cache_lookup(inputs, outputs)
                if cached is not None:
                    self.stats.record_success(time.perf_counter_ns() - started)
                    return InferenceResponse(
                        model_name=self.name, model_version=self.version_str, id=request.id, outputs=cached
                    )
            future = scheduler.submit(
                inputs,
                outputs,
                batch_size=batch_size,
                priority=request.priority,
                timeout_us=request.timeout_us,
                request=request,
            )
        except InferenceServerError as exc:
            self.stats.record_failure(time.perf_counter_ns() - started, _failure_reason(exc))
            raise
        try:
            results = await future
        except asyncio.CancelledError:
            future.cancel()
            self.stats.record_failure(time.perf_counter_ns() - started, "canceled")
            raise
        except InferenceServerError as exc:
            self.stats.record_failure(time.perf_counter_ns() - started, _failure_reason(exc))
            raise
        for spec in self.outputs:
            if spec.reshape is not None and spec.name in results:
                lead = (results[spec.name].shape[0],) if self.max_batch_size > 0 else ()
                results[spec.name] = results[spec.name].reshape((*lead, *spec.dims))
        if cache_key is not None:
            await self._cache_insert(cache_key, results)
        self.stats.record_success(time.perf_counter_ns() - started)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version_str,
            id=request.id,
            outputs=results,
        )

    async def _hand_over(self, request: InferenceRequest) -> InferenceResponse:
        """This version started unloading after the request looked it up (a transport
        resolves the version, then reads and decodes the body): hand the request to
        the version that serves now, once. Only when nothing serves does it fail."""
        lookup = self.lookup
        if lookup is not None:
            current = lookup(request.model_version)  # 404 / 503 when nothing serves
            if current is not self and current.scheduler is not None and not current.scheduler.closing:
                return await current.infer(request)
        raise UnavailableError(
            f"model {self.name!r} version {self.version} is unloading", retry_after=1.0
        )
