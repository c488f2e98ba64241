"""Python backend (``backend: "python"``): ``model.py`` run in a worker process per instance.

Each instance owns one worker process (:mod:`inferstack.python_backend.worker`)
so a model's GIL, memory and crashes stay its own. The instance's thread
sends a batch and blocks on the reply; tensors cross in shared memory. While
it waits it also serves the worker's BLS requests (``InferenceRequest.exec()``)
by running them through the server's normal path — the target model's
scheduler and batcher included — on the event loop.

A worker that dies (segfault, ``os._exit``, OOM kill) fails the batch it was
running with an error naming the model, and is started again (by a monitor
thread, or by the next batch if that comes first); the model stays READY and
other models never notice. ``EXECUTION_ENV_PATH`` runs the worker under another
interpreter: a virtual environment / conda directory, or a packed
``.tar.gz`` environment unpacked once into a cache directory.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from inferstack._proto import model_config_pb2 as mc
from inferstack.backends.base import Backend, InstanceSpec, ModelInstance
from inferstack.core.datatypes import datatype_of, numpy_dtype
from inferstack.core.errors import (
    AlreadyExistsError,
    CancelledError,
    InferenceServerError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    UnsupportedError,
)
from inferstack.core.types import InferenceRequest, RequestedOutput
from inferstack.python_backend import ipc
from inferstack.python_backend.worker import BLS_IN, BLS_OUT, IN, OUT
from inferstack.repository.config import ModelConfigError, config_to_dict, parameter, tensor_specs

log = logging.getLogger("inferstack.backends.python")

#: Seconds a worker gets to finalize() before it is killed.
SHUTDOWN_TIMEOUT = 30.0

_ERRORS: dict[str, type[InferenceServerError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError, "NOT_FOUND": NotFoundError, "UNAVAILABLE": UnavailableError,
    "UNIMPLEMENTED": UnsupportedError, "ALREADY_EXISTS": AlreadyExistsError, "CANCELLED": CancelledError,
    "INTERNAL": InternalError,
}


def _error(code: str, message: str) -> InferenceServerError:
    return _ERRORS.get(code, InternalError)(message)


class PythonBackend(Backend):
    name = "python"
    default_model_filename = "model.py"

    def __init__(self) -> None:
        self._manager: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_server(self, manager: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Where BLS requests go: the model manager and the loop it runs on."""
        self._manager = manager
        self._loop = loop

    def complete_config(self, config: mc.ModelConfig, model_path: Path, *, strict: bool) -> None:
        if not model_path.is_file():
            raise ModelConfigError(f"model file {model_path} not found")
        if not config.backend:
            config.backend = "python"
        if not config.input or not config.output:
            raise ModelConfigError(
                f"model {config.name!r}: a Python model's config must declare its inputs and outputs "
                "(auto_complete_config is not supported)"
            )
        # Resolve (and, for packed environments, unpack) now: a bad path is a load error.
        python_for(config, model_path.parent.parent)

    def load(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> ModelInstance:
        return PythonInstance(self, config, model_path, instance)

    def run_bls(self, request: InferenceRequest) -> Any:
        """Run a worker's BLS request through the server; blocks the calling (instance) thread."""
        if self._manager is None or self._loop is None or self._loop.is_closed():
            raise UnavailableError("BLS calls need a running server")
        manager = self._manager

        async def infer() -> Any:
            return await manager.get(request.model_name, request.model_version).infer(request)

        return asyncio.run_coroutine_threadsafe(infer(), self._loop).result()


# -- environments ---------------------------------------------------------------------

_shim_lock = threading.Lock()
_shim_dir: str | None = None


def _import_path() -> str:
    """A directory holding only ``inferstack`` and ``triton_python_backend_utils`` (links),
    put on a foreign environment's PYTHONPATH so the worker code imports there without
    exposing every package of the server's own environment."""
    global _shim_dir
    with _shim_lock:
        if _shim_dir is None:
            path = tempfile.mkdtemp(prefix="inferstack-pyworker-")
            package = Path(importlib.util.find_spec("inferstack").origin).parent  # type: ignore[union-attr, arg-type]
            utils = importlib.util.find_spec("triton_python_backend_utils")
            os.symlink(package, os.path.join(path, "inferstack"))
            if utils is not None and utils.origin:
                os.symlink(utils.origin, os.path.join(path, "triton_python_backend_utils.py"))
            atexit.register(shutil.rmtree, path, True)
            _shim_dir = path
        return _shim_dir


def _cache_root() -> Path:
    root = os.environ.get("INFERSTACK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "inferstack")
    return Path(root) / "python_envs"


def _unpack(archive: Path) -> Path:
    """Unpack a packed environment (conda-pack / tarred venv) once; its directory."""
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = _cache_root() / key
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="tar")
        unpack = staging / "bin" / "conda-unpack"
        if unpack.is_file():  # conda-pack: fix prefixes once
            subprocess.run([str(unpack)], cwd=staging, check=True, capture_output=True, timeout=600)
        try:
            staging.rename(target)
        except OSError:  # another load unpacked it first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("unpacked Python environment %s into %s", archive, target)
    return target


def python_for(config: mc.ModelConfig, model_dir: Path) -> tuple[str, Path | None]:
    """The interpreter for a model's workers and its environment directory (None: the server's own)."""
    value = parameter(config, "EXECUTION_ENV_PATH")
    if not value:
        return sys.executable, None
    value = value.replace("$$TRITON_MODEL_DIRECTORY", str(model_dir))
    path = Path(value)
    if not path.is_absolute():
        path = model_dir / path
    if not path.exists():
        raise ModelConfigError(f"model {config.name!r}: EXECUTION_ENV_PATH {value!r} does not exist")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise ModelConfigError(
                f"model {config.name!r}: EXECUTION_ENV_PATH {value!r} is a file but not a tar archive")
        try:
            path = _unpack(path)
        except (OSError, tarfile.TarError, subprocess.SubprocessError) as exc:
            raise ModelConfigError(f"model {config.name!r}: cannot unpack EXECUTION_ENV_PATH {value!r}: {exc}") \
                from None
    for name in ("python3", "python"):
        candidate = path / "bin" / name
        if candidate.exists():
            return str(candidate), path
    raise ModelConfigError(
        f"model {config.name!r}: EXECUTION_ENV_PATH {value!r} has no bin/python3 (expected a virtual "
        "environment, a conda environment or a packed .tar.gz of one)")


def _worker_env(env_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    shim = _import_path()
    if env_dir is None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (shim, env.get("PYTHONPATH", "")) if p)
        return env
    env["PYTHONPATH"] = shim
    env["VIRTUAL_ENV"] = str(env_dir)
    env["PATH"] = os.pathsep.join([str(env_dir / "bin"), env.get("PATH", "")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(env_dir / "lib"), env.get("LD_LIBRARY_PATH", "")) if p)
    env.pop("PYTHONHOME", None)
    return env


# -- instances ----------------------------------------------------------------------


class _Worker:
    """One running worker process and its endpoint."""

    def __init__(self, process: subprocess.Popen, endpoint: ipc.Endpoint) -> None:
        self.process = process
        self.endpoint = endpoint
        self.style = ""

    def exit_description(self) -> str:
        code = self.process.poll()
        if code is None:
            return "closed its connection"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"


class PythonInstance(ModelInstance):
    def __init__(self, backend: PythonBackend, config: mc.ModelConfig, model_path: Path,
                 spec: InstanceSpec) -> None:
        self._backend = backend
        self._name = config.name
        self._spec = spec
        self._model_path = model_path
        version_dir = model_path.parent
        model_dir = version_dir.parent
        self._python, env_dir = python_for(config, model_dir)
        self._env = _worker_env(env_dir)
        self._args = {
            "model_config": json.dumps(config_to_dict(config)),
            "model_instance_kind": "GPU" if spec.kind == "KIND_GPU" else "CPU",
            "model_instance_name": spec.name,
            "model_instance_device_id": str(spec.device_id),
            "model_repository": str(model_dir),
            "model_version": version_dir.name,
            "model_name": config.name,
            "model_file": str(model_path),
        }
        self._version = int(version_dir.name) if version_dir.name.isdigit() else 0
        #: Declared output dtypes: a model returning float64 for a TYPE_FP32 output is an error,
        #: not a silently different wire datatype.
        self._output_dtypes = {spec.name: (spec.datatype, numpy_dtype(spec.datatype))
                               for spec in tensor_specs(config.output)}
        self._lock = threading.Lock()
        self._closing = False
        #: Why the worker cannot run (a restart failed); None while it can.
        self._broken: str | None = None
        self.restarts = 0
        self._worker = self._start()

    # -- process lifecycle ---------------------------------------------------------

    @property
    def per_request(self) -> bool:
        """Triton-style models get each request of a batch separately (execute_requests)."""
        return self._worker.style == "triton"

    @property
    def pid(self) -> int:
        return self._worker.process.pid

    def _start(self) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [self._python, "-m", "inferstack.python_backend.worker", str(child.fileno())],
                pass_fds=(child.fileno(),), env=self._env, start_new_session=True,
                cwd=str(self._model_path.parent),
            )
        except OSError as exc:
            parent.close()
            raise ModelConfigError(f"model {self._name!r}: cannot start the Python worker: {exc}") from None
        finally:
            child.close()
        worker = _Worker(process, ipc.Endpoint(ipc.Channel(parent)))
        try:
            kind, payload = self._exchange(worker, ipc.INIT, self._args, (ipc.READY, ipc.ERROR))
        except ipc.ChannelClosed:
            process.wait()
            worker.endpoint.channel.close()
            raise ModelConfigError(
                f"model {self._name!r}: the Python worker {worker.exit_description()} before it was ready "
                f"(interpreter {self._python}; its output is in the server log)") from None
        if kind == ipc.ERROR:
            self._stop(worker)
            raise ModelConfigError(f"model {self._name!r}: {payload[1]}")
        worker.style = payload["style"]
        threading.Thread(target=self._monitor, args=(worker,), daemon=True,
                         name=f"{self._spec.name}-monitor").start()
        log.info("model %s: instance %s runs in worker pid %d (%s API)", self._name, self._spec.name,
                 process.pid, worker.style)
        return worker

    def _monitor(self, worker: _Worker) -> None:
        """Waits for the worker to exit; restarts it unless the instance is unloading."""
        worker.process.wait()
        if self._closing:
            return
        log.error("model %s: Python worker pid %d %s; restarting it", self._name, worker.process.pid,
                  worker.exit_description())
        delay = 0.5
        while not self._closing:
            with self._lock:
                if self._closing or self._worker is not worker:
                    return  # the next batch restarted it already
                if self._restart_locked():
                    return
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _restart_locked(self) -> bool:
        old = self._worker
        old.endpoint.channel.close()
        try:
            self._worker = self._start()
        except Exception as exc:  # noqa: BLE001 - reported on every request until it works
            self._broken = f"model {self._name!r}: the Python worker could not be restarted: {exc}"
            log.error("%s", self._broken)
            return False
        self._broken = None
        self.restarts += 1
        log.info("model %s: Python worker restarted (pid %d)", self._name, self._worker.process.pid)
        return True

    def _stop(self, worker: _Worker) -> None:
        try:
            if worker.process.poll() is None:
                self._exchange(worker, ipc.SHUTDOWN, None, (ipc.READY,))
                worker.process.wait(SHUTDOWN_TIMEOUT)
        except (ipc.ChannelClosed, subprocess.TimeoutExpired, InferenceServerError):
            pass
        finally:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
            worker.endpoint.channel.close()

    def unload(self) -> None:
        self._closing = True
        with self._lock:
            self._stop(self._worker)

    # -- the exchange -------------------------------------------------------------------

    def _exchange(self, worker: _Worker, kind: int, payload: Any, answers: tuple[int, ...]) -> tuple[int, Any]:
        """Send one message and wait for its answer, serving BLS requests meanwhile."""
        endpoint = worker.endpoint
        endpoint.channel.send(kind, payload)
        while True:
            got, reply = endpoint.recv()
            if got in answers:
                return got, reply
            if got == ipc.BLS_REQUEST:
                self._serve_bls(endpoint, reply)
                continue
            raise ipc.ChannelClosed(f"unexpected message kind {got} from the worker")

    def _serve_bls(self, endpoint: ipc.Endpoint, message: dict[str, Any]) -> None:
        inputs = dict(endpoint.segments.read(BLS_IN, message["inputs"], copy=False))
        outputs = message["outputs"]
        request = InferenceRequest(
            model_name=message["model"], model_version=message["version"], id=message["id"] or "",
            inputs=inputs, outputs=None if outputs is None else [RequestedOutput(n) for n in outputs],
            parameters=message["parameters"] or {},
        )
        try:
            response = self._backend.run_bls(request)
        except InferenceServerError as exc:
            endpoint.channel.send(ipc.BLS_REPLY, {"error": (exc.grpc_code, exc.message)})
            return
        except Exception as exc:  # noqa: BLE001 - the model gets the error, the server goes on
            endpoint.channel.send(ipc.BLS_REPLY, {"error": ("INTERNAL", f"{type(exc).__name__}: {exc}")})
            return
        refs = endpoint.write(BLS_OUT, list(response.outputs.items()))
        endpoint.channel.send(ipc.BLS_REPLY, {"outputs": refs})

    def _run(self, items: list[tuple[dict[str, np.ndarray], list[str], Any]]) -> list[Any]:
        with self._lock:
            if self._closing:
                raise UnavailableError(f"model {self._name!r} is unloading")
            worker = self._worker
            if worker.process.poll() is not None and not self._restart_locked():
                raise UnavailableError(self._broken or f"model {self._name!r}: no Python worker")
            if self._broken is not None:
                raise UnavailableError(self._broken, retry_after=1.0)
            worker = self._worker
            tensors: list[tuple[str, np.ndarray]] = []
            requests = []
            for inputs, outputs, request in items:
                start = len(tensors)
                tensors.extend(inputs.items())
                requests.append({
                    "inputs": (start, len(tensors)), "outputs": outputs, "model": self._name,
                    "version": self._version,
                    "id": getattr(request, "id", "") or "",
                    "parameters": _plain(getattr(request, "parameters", None)),
                })
            endpoint = worker.endpoint
            try:
                refs = endpoint.write(IN, tensors)
                kind, reply = self._exchange(worker, ipc.EXECUTE, {"requests": requests, "inputs": refs},
                                             (ipc.RESULT, ipc.ERROR))
            except ipc.ChannelClosed:
                try:
                    worker.process.wait(2.0)
                except subprocess.TimeoutExpired:
                    worker.process.kill()  # a worker that broke the protocol is not trusted again
                    worker.process.wait()
                raise InternalError(
                    f"model {self._name!r}: the Python worker (pid {worker.process.pid}) "
                    f"{worker.exit_description()} while executing the request; it is being restarted"
                ) from None
            if kind == ipc.ERROR:
                code, message = reply
                raise _error(code, f"model {self._name!r}: {message}")
            arrays = endpoint.segments.read(OUT, reply["outputs"], copy=True)
        results: list[Any] = []
        for result in reply["results"]:
            if isinstance(result[0], str):
                results.append(_error(result[0], f"model {self._name!r}: {result[1]}"))
            else:
                start, end = result
                results.append(self._checked(dict(arrays[start:end])))
        return results

    def _checked(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | InferenceServerError:
        for name, array in outputs.items():
            declared = self._output_dtypes.get(name)
            if declared is not None and array.dtype != declared[1]:
                try:
                    got = datatype_of(array)
                except InferenceServerError:
                    got = f"numpy {array.dtype}"
                return InternalError(
                    f"model {self._name!r}: output {name!r} has datatype {got}, "
                    f"the config declares {declared[0]}"
                )
        return outputs

    def execute(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        (result,) = self._run([(inputs, outputs, None)])
        if isinstance(result, InferenceServerError):
            raise result
        return result

    def execute_requests(self, items: list[tuple[dict[str, np.ndarray], list[str], Any]]) -> list[Any]:
        return self._run(items)


def _plain(parameters: Any) -> dict[str, Any]:
    """Request parameters the worker may see: JSON-like values only."""
    if not parameters:
        return {}
    return {k: v for k, v in parameters.items() if isinstance(v, (str, int, float, bool))}
