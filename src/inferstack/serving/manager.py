"""The model manager: which models and versions exist, their states, and lookups.

It reads the repository, asks the right backend to complete and load each
version, and answers "which version serves this request?". A model whose
config is broken, or whose file does not load, becomes UNAVAILABLE with the
reason; every other model keeps serving. Loading a model again loads the new
versions beside the old ones, switches atomically, then drains and unloads
what is no longer wanted.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferstack._proto import model_config_pb2 as mc
from inferstack.backends import backend_for
from inferstack.core.errors import (
    InferenceServerError,
    InvalidArgumentError,
    ModelLoadError,
    NotFoundError,
    UnavailableError,
)
from inferstack.repository import ModelConfigError, ModelRepository
from inferstack.repository.config import read_config, select_versions, validate_config
from inferstack.repository.ensemble import is_ensemble
from inferstack.repository.repository import check_model_name
from inferstack.serving import ensemble
from inferstack.serving.cache import ResponseCache
from inferstack.serving.model import ModelState, ModelVersion

log = logging.getLogger("inferstack.models")


@dataclass(slots=True)
class ServerOptions:
    """Server-wide settings the manager needs (the CLI fills these)."""

    model_repository: Path
    model_control_mode: str = "none"  # none | explicit | poll
    startup_models: list[str] = field(default_factory=list)
    strict_model_config: bool = False
    #: Ready only when every model meant to be loaded is READY (Triton's default).
    strict_readiness: bool = True
    #: Queue bound for models whose queue policy sets none (0: unbounded).
    max_queue_size: int = 1024
    #: Seconds an unload waits for in-flight requests.
    unload_timeout: float = 30.0
    #: The response cache (``--cache-config``) for models that enable one; None: no cache.
    response_cache: ResponseCache | None = None


@dataclass(slots=True)
class _Model:
    """Everything the manager knows about one model name."""

    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    #: Why the model as a whole is unavailable (config error, no versions ...).
    reason: str = ""
    state: ModelState = ModelState.UNAVAILABLE
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def ready_versions(self) -> list[ModelVersion]:
        return [v for _, v in sorted(self.versions.items()) if v.state is ModelState.READY]


class ModelManager:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.repository = ModelRepository(options.model_repository)
        self._models: dict[str, _Model] = {}
        self._wanted: set[str] = set()
        #: False until the models loaded at start have finished loading (or failing).
        self.startup_complete = False

    # -- lifecycle ----------------------------------------------------------------

    async def load_startup_models(self) -> None:
        """Load what the control mode says to load at start, concurrently."""
        mode = self.options.model_control_mode
        names = self.repository.model_names()
        if mode == "explicit":
            wanted = self.options.startup_models
            names = names if "*" in wanted else list(dict.fromkeys(wanted))
        if not names:
            log.warning("no models to load from %s", self.repository.root)
        names = ensemble.startup_order(self, names)
        await asyncio.gather(*(self.load(name) for name in names), return_exceptions=True)
        self.startup_complete = True
        ready = sum(1 for name in names if self._models.get(name) and self._models[name].ready_versions())
        log.info("startup: %d of %d models ready", ready, len(names))

    def require_explicit_mode(self, action: str) -> None:
        """Load/unload through the API is only for ``explicit`` mode (Triton's rule).

        400, not 503: retrying cannot help, the server's mode forbids it.
        """
        mode = self.options.model_control_mode
        if mode != "explicit":
            raise InvalidArgumentError(
                f"explicit model {action} is not allowed in model control mode {mode!r}; "
                "start the server with --model-control-mode explicit"
            )

    async def load(self, name: str, config_override: mc.ModelConfig | None = None) -> None:
        """Load (or reload) a model.

        Raises ModelLoadError when anything failed — even if a previous
        version keeps serving, the caller asked for a load that did not happen.
        """
        check_model_name(name)
        model = self._models.setdefault(name, _Model(name))
        self._wanted.add(name)
        async with model.lock:
            await self._load_locked(model, config_override)
        if model.reason:
            raise ModelLoadError(f"failed to load model {name!r}: {model.reason}")

    async def _load_locked(self, model: _Model, override: mc.ModelConfig | None) -> None:
        name = model.name
        try:
            model_dir = self.repository.model_dir(name)
            # Taken before anything is read: a file that changes during the load
            # makes the next comparison differ, never the reverse.
            snapshot = await asyncio.to_thread(self.repository.snapshot, name)
            if override is not None:
                config = copy.deepcopy(override)
                source = f"config override for {name!r}"
            else:
                config = read_config(model_dir, required=self.options.strict_model_config)
                source = str(model_dir / "config.pbtxt")
            if not config.name:
                config.name = name
            for warning in validate_config(config, name, source):
                log.warning("%s", warning)
            if is_ensemble(config):
                await ensemble.load_steps(self, name, config)
                backend = None
            else:
                backend = backend_for(config.backend, config.platform)
                bind = getattr(backend, "bind_server", None)
                if bind is not None:  # backends whose models call other models (Python BLS)
                    bind(self, asyncio.get_running_loop())
            versions = select_versions(config, self.repository.versions(name))
            if not versions:
                raise ModelConfigError(f"model {name!r}: no version directory matches the version policy")
        except (ModelConfigError, InferenceServerError) as exc:
            reason = str(exc)
            self._set_model_unavailable(model, reason)
            return

        if not model.ready_versions():
            model.state = ModelState.LOADING
        config_key = override.SerializeToString(deterministic=True) if override is not None else None
        new_versions: dict[int, ModelVersion] = {}

        async def load_version(number: int) -> None:
            origin = (config_key, snapshot.shared, snapshot.version(number))
            previous = model.versions.get(number)
            if previous is not None and previous.state is ModelState.READY and previous.source == origin:
                new_versions[number] = previous  # nothing it was loaded from changed: keep it
                return
            version_config = copy.deepcopy(config)
            try:
                version_dir = self.repository.version_dir(name, number)
                if backend is None:  # an ensemble: no model file, no instances
                    version: ModelVersion = ensemble.EnsembleVersion(
                        name, number, version_config, self.get,
                        response_cache=self.options.response_cache, model_dir=model_dir,
                    )
                    await version.load()
                    new_versions[number] = version
                    self._log_state(name, number, ModelState.READY, "ensemble of " + ", ".join(
                        dict.fromkeys(step.model_name for step in version.steps)))
                    version.source = origin
                    version.lookup = functools.partial(self.get, name)
                    return
                model_path = backend.model_path(version_config, version_dir)
                self.repository.check_inside(model_path, f"model {name!r} version {number}: model file")
                await asyncio.to_thread(
                    backend.complete_config, version_config, model_path,
                    strict=self.options.strict_model_config,
                )
                version = ModelVersion(
                    name, number, version_config, backend, model_path,
                    server_max_queue_size=self.options.max_queue_size,
                    response_cache=self.options.response_cache,
                    model_dir=model_dir,
                )
                await version.load()
            except (ModelConfigError, InferenceServerError) as exc:
                self._log_state(name, number, ModelState.UNAVAILABLE, str(exc))
                new_versions[number] = ModelVersion.failed(name, number, str(exc))
                return
            except Exception as exc:  # a backend bug must not take the server down
                log.exception("model %s version %d: unexpected load failure", name, number)
                new_versions[number] = ModelVersion.failed(name, number, f"{type(exc).__name__}: {exc}")
                return
            version.source = origin
            version.lookup = functools.partial(self.get, name)
            warmup = f", warmup {version.warmup_seconds:.2f}s" if version.config.model_warmup else ""
            self._log_state(name, number, ModelState.READY, f"loaded in {version.load_seconds:.2f}s{warmup}")
            new_versions[number] = version

        await asyncio.gather(*(load_version(v) for v in versions))
        retired = self._switch(model, new_versions)
        await asyncio.gather(*(self._unload_version(v) for v in retired if v.scheduler is not None))
        if retired:
            _collect_garbage_soon()

    def _switch(self, model: _Model, new_versions: dict[int, ModelVersion]) -> list[ModelVersion]:
        """Put the new versions in place in one assignment; return the ones to retire.

        A failed load never reduces what serves: a version that failed keeps
        its old copy serving, and while any version failed, old versions the
        policy no longer selects keep serving too (so a broken new version 2
        leaves version 1 in place). Versions kept unchanged are not retired.
        """
        old = model.versions
        failed = any(v.state is not ModelState.READY for v in new_versions.values())
        merged: dict[int, ModelVersion] = {}
        retired: list[ModelVersion] = []
        for number, version in new_versions.items():
            previous = old.get(number)
            if version is previous:
                merged[number] = version
            elif version.state is not ModelState.READY and previous is not None and previous.state is ModelState.READY:
                merged[number] = previous
            else:
                merged[number] = version
                if previous is not None:
                    retired.append(previous)
        for number, previous in old.items():
            if number in new_versions:
                continue
            if failed and previous.state is ModelState.READY:
                merged[number] = previous
            else:
                retired.append(previous)
        # Retired versions stop being found by lookups in this same step.
        model.versions = dict(sorted(merged.items()))
        failures = [f"version {v.version}: {v.reason}" for v in new_versions.values() if v.state is not ModelState.READY]
        model.reason = "; ".join(failures)
        model.state = ModelState.READY if model.ready_versions() else ModelState.UNAVAILABLE
        unchanged = new_versions.keys() == old.keys() and all(new_versions[n] is v for n, v in old.items())
        if unchanged:
            log.info("model %s: nothing changed; version(s) %s keep serving",
                     model.name, ", ".join(str(n) for n in merged))
        return retired

    def _set_model_unavailable(self, model: _Model, reason: str) -> None:
        model.reason = reason
        if model.ready_versions():
            log.error("model %s: new configuration rejected, previous versions keep serving: %s",
                      model.name, reason)
            model.reason = f"reload failed, previous configuration still serving: {reason}"
            return
        model.state = ModelState.UNAVAILABLE
        self._log_state(model.name, None, ModelState.UNAVAILABLE, reason)

    async def unload(self, name: str) -> None:
        """Unload every version of a model after its in-flight requests finish."""
        check_model_name(name)
        model = self._models.get(name)
        self._wanted.discard(name)
        if model is None:
            raise NotFoundError(f"model {name!r} is not loaded")
        async with model.lock:
            versions = list(model.versions.values())
            model.state = ModelState.UNLOADING
            for version in versions:
                if version.state is ModelState.READY:
                    version.state = ModelState.UNLOADING
            await asyncio.gather(*(self._unload_version(v) for v in versions if v.scheduler is not None))
            model.versions = {}
            model.state = ModelState.UNAVAILABLE
            model.reason = "unloaded"
        _collect_garbage_soon()

    async def _unload_version(self, version: ModelVersion) -> None:
        self._log_state(version.name, version.version, ModelState.UNLOADING, "")
        await version.unload(self.options.unload_timeout)
        self._log_state(version.name, version.version, ModelState.UNAVAILABLE, "unloaded")

    async def shutdown(self) -> None:
        """Unload everything (each drains its in-flight requests first)."""
        await asyncio.gather(
            *(self.unload(name) for name, model in list(self._models.items()) if model.versions),
            return_exceptions=True,
        )

    @staticmethod
    def _log_state(name: str, version: int | None, state: ModelState, reason: str) -> None:
        where = f"model {name}" + (f" version {version}" if version is not None else "")
        level = logging.ERROR if state is ModelState.UNAVAILABLE and reason != "unloaded" else logging.INFO
        log.log(level, "%s: %s%s", where, state.value, f" ({reason})" if reason else "",
                extra={"model": name, "version": version, "state": state.value})

    # -- lookups --------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The READY version that serves a request: the highest one if none is named."""
        model = self._models.get(name)
        if model is None:
            check_model_name(name)  # 400 for a name that could never be a model
            raise NotFoundError(f"unknown model {name!r}")
        if not version:
            ready = model.ready_versions()
            if not ready:
                detail = f": {model.reason}" if model.reason else ""
                raise UnavailableError(
                    f"model {name!r} is not ready ({model.state.value}{detail})", retry_after=1.0
                )
            return ready[-1]
        if not (version.isascii() and version.isdigit()):
            raise InvalidArgumentError(f"model {name!r}: version {version!r} is not a number")
        found = model.versions.get(int(version))
        if found is None:
            raise NotFoundError(f"model {name!r} has no version {version}")
        if found.state is not ModelState.READY:
            detail = f": {found.reason}" if found.reason else ""
            raise UnavailableError(
                f"model {name!r} version {version} is not ready ({found.state.value}{detail})",
                retry_after=1.0,
            )
        return found

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except InferenceServerError:
            return False
        return True

    def known(self, name: str) -> bool:
        return name in self._models

    def ready_version_numbers(self, name: str) -> list[str]:
        model = self._models.get(name)
        return [v.version_str for v in model.ready_versions()] if model else []

    def server_ready(self) -> bool:
        """Startup loading is over and every model meant to be loaded is READY
        (or, without strict readiness, whatever could load has loaded)."""
        if not self.startup_complete:
            return False
        if not self.options.strict_readiness:
            return True
        # A model whose reload is under way, or failed, still serves its old
        # versions: it stays ready, so a reload never takes the server out of a
        # load balancer.
        return all(
            self._models.get(name) is not None and bool(self._models[name].ready_versions())
            for name in self._wanted
        )

    def all_versions(self) -> list[ModelVersion]:
        """Every version the manager knows, loaded or failed."""
        return [v for model in list(self._models.values()) for v in list(model.versions.values())]

    def loaded_versions(self) -> list[ModelVersion]:
        """Every version that holds a scheduler (for statistics and metrics)."""
        return [
            v for model in list(self._models.values()) for v in list(model.versions.values())
            if v.scheduler is not None
        ]

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Triton's repository index: every model in the repository and its versions."""
        rows: list[dict[str, Any]] = []
        names = sorted(set(self.repository.model_names()) | set(self._models))
        for name in names:
            model = self._models.get(name)
            if model is None or (not model.versions):
                if ready_only:
                    continue
                row: dict[str, Any] = {"name": name}
                if model is not None:
                    row.update(state=model.state.value, reason=model.reason)
                rows.append(row)
                continue
            for version in model.versions.values():
                if ready_only and version.state is not ModelState.READY:
                    continue
                rows.append({
                    "name": name,
                    "version": version.version_str,
                    "state": version.state.value,
                    # A failed reload leaves the old version READY: say so there.
                    "reason": version.reason or model.reason,
                })
        return rows


def _collect_garbage_soon() -> None:
    """Free an unloaded version's memory now rather than at the next cyclic collection.

    Sessions and their weights can sit in reference cycles; with the server's raised
    gen-0 threshold (server._tune_gc) a collection may not come for a long while after
    an unload. Scheduled on the loop so the caller's references are gone by then.
    """
    try:
        asyncio.get_running_loop().call_soon(gc.collect)
    except RuntimeError:  # no loop (tests calling the manager synchronously)
        gc.collect()
