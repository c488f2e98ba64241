"""The worker process of one Python model instance: ``python -m inferstack.python_backend.worker FD``.

The server starts one worker per instance and talks to it over the Unix socket
whose descriptor is ``FD``. The worker loads ``model.py``, then answers one
EXECUTE per batch until SHUTDOWN. Shared memory channels (see ipc.py):

* 1: server -> worker, a batch's inputs (read in place during ``execute``);
* 2: worker -> server, a batch's outputs (the server copies them out);
* 3: worker -> server, BLS request inputs (the worker waits for the reply);
* 4: server -> worker, BLS reply outputs (copied: a model may call many times).

A model that raises answers the batch with an error; anything that kills the
interpreter ends the process, and the server restarts it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from inferstack.python_backend import ipc
from inferstack.python_backend.api import InputError, ModelContext, PythonModel

IN, OUT, BLS_IN, BLS_OUT = 1, 2, 3, 4


class _Bls:
    """The worker's side of BLS calls: one exchange at a time over the channel."""

    def __init__(self, endpoint: ipc.Endpoint) -> None:
        self.endpoint = endpoint
        self.lock = threading.Lock()

    def infer(self, model: str, version: str, inputs: list[tuple[str, np.ndarray]], outputs: list[str] | None,
              request_id: str, parameters: dict[str, Any]) -> tuple[list[tuple[str, np.ndarray]], Any]:
        with self.lock:
            refs = self.endpoint.write(BLS_IN, inputs)
            self.endpoint.channel.send(ipc.BLS_REQUEST, {
                "model": model, "version": version, "inputs": refs, "outputs": outputs,
                "id": request_id, "parameters": parameters,
            })
            kind, payload = self.endpoint.recv()
            if kind != ipc.BLS_REPLY:
                raise ipc.ChannelClosed(f"expected a BLS reply, got message kind {kind}")
            if payload.get("error"):
                return [], payload["error"]
            return self.endpoint.segments.read(BLS_OUT, payload["outputs"], copy=True), None


def _load_module(path: Path) -> Any:
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("model", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module
    spec.loader.exec_module(module)
    return module


def _typed_class(module: Any) -> type[PythonModel] | None:
    found = [obj for obj in vars(module).values()
             if inspect.isclass(obj) and issubclass(obj, PythonModel) and obj is not PythonModel
             and obj.__module__ == module.__name__]
    if len(found) > 1:
        raise TypeError(f"model.py defines several PythonModel classes ({', '.join(c.__name__ for c in found)}); "
                        "keep exactly one")
    return found[0] if found else None


class _Error(Exception):
    """An error to report with a protocol code (INVALID_ARGUMENT, INTERNAL ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_TRITON_CODES = {0: "INTERNAL", 1: "INTERNAL", 2: "NOT_FOUND", 3: "INVALID_ARGUMENT", 4: "UNAVAILABLE",
                 5: "UNIMPLEMENTED", 6: "ALREADY_EXISTS", 7: "CANCELLED"}


class TritonRunner:
    """A ``TritonPythonModel``: one ``execute`` call per batch, one request object each."""

    style = "triton"

    def __init__(self, cls: type, args: dict[str, Any]) -> None:
        from inferstack.python_backend import triton_utils as pb

        self.pb = pb
        self._loop: asyncio.AbstractEventLoop | None = None
        self.model = cls()
        if hasattr(self.model, "initialize"):
            self.model.initialize(args)

    def execute(self, requests: list[dict[str, Any]], inputs: list[tuple[str, np.ndarray]]) -> list[Any]:
        pb = self.pb
        built = []
        for request in requests:
            start, end = request["inputs"]
            built.append(pb.InferenceRequest(
                model_name=request["model"], requested_output_names=request["outputs"],
                inputs=[pb.Tensor(name, array) for name, array in inputs[start:end]],
                request_id=request["id"], parameters=request["parameters"],
                model_version=request["version"],
            ))
        responses = self.model.execute(built)
        if inspect.isawaitable(responses):  # `async def execute` (Triton allows it, for async_exec BLS)
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            responses = self._loop.run_until_complete(responses)
        if responses is None or len(responses) != len(built):
            got = "None" if responses is None else f"{len(responses)} responses"
            raise _Error("INTERNAL", f"execute() returned {got} for {len(built)} requests "
                         "(it must return one InferenceResponse per request, in order)")
        results: list[Any] = []
        for request, response in zip(requests, responses):
            if not isinstance(response, pb.InferenceResponse):
                kind = type(response).__name__
                results.append(("INTERNAL", f"execute() returned a {kind}, not an InferenceResponse"))
                continue
            if response.has_error():
                error = response.error()
                results.append((_TRITON_CODES.get(error.code(), "INTERNAL"), error.message()))
                continue
            produced = {t.name(): t.as_numpy() for t in response.output_tensors()}
            missing = [name for name in request["outputs"] if name not in produced]
            if missing:
                results.append(("INTERNAL", f"the response has no output(s) {missing}; it has {sorted(produced)}"))
                continue
            results.append([(name, produced[name]) for name in request["outputs"]])
        return results

    def finalize(self) -> None:
        if hasattr(self.model, "finalize"):
            self.model.finalize()


class TypedRunner:
    """A :class:`PythonModel`: one ``predict`` on the concatenated batch."""

    style = "typed"

    def __init__(self, cls: type[PythonModel], args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.model = cls()
        self.model.load(ModelContext(
            model_name=args["model_name"], model_version=int(args["model_version"]),
            model_dir=Path(args["model_repository"]),
            version_dir=Path(args["model_repository"]) / args["model_version"],
            instance_name=args["model_instance_name"], instance_kind=args["model_instance_kind"],
            device_id=int(args["model_instance_device_id"]), config=config,
            parameters={k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()},
        ))

    def execute(self, requests: list[dict[str, Any]], inputs: list[tuple[str, np.ndarray]]) -> list[Any]:
        (request,) = requests
        try:
            produced = self.model.predict(dict(inputs))
        except InputError as exc:
            raise _Error("INVALID_ARGUMENT", str(exc)) from None
        if not isinstance(produced, dict):
            raise _Error("INTERNAL", f"predict() returned a {type(produced).__name__}, expected a dict of arrays")
        missing = [name for name in request["outputs"] if name not in produced]
        if missing:
            raise _Error("INTERNAL", f"predict() did not return output(s) {missing}; it returned {sorted(produced)}")
        return [[(name, np.asarray(produced[name])) for name in request["outputs"]]]

    def finalize(self) -> None:
        self.model.unload()


def _load(args: dict[str, Any]) -> TritonRunner | TypedRunner:
    from inferstack.python_backend import triton_utils

    triton_utils._model_dir = args["model_repository"]
    module = _load_module(Path(args["model_file"]))
    if hasattr(module, "TritonPythonModel"):
        return TritonRunner(module.TritonPythonModel, args)
    typed = _typed_class(module)
    if typed is not None:
        return TypedRunner(typed, args)
    raise TypeError(f"{args['model_file']} defines neither a TritonPythonModel class nor a "
                    "subclass of inferstack.python_backend.PythonModel")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def serve(endpoint: ipc.Endpoint) -> None:
    from inferstack.python_backend import triton_utils

    channel = endpoint.channel
    kind, args = endpoint.recv()
    if kind != ipc.INIT:
        raise SystemExit(f"inferstack python worker: expected INIT, got message kind {kind}")
    triton_utils._bls = _Bls(endpoint)
    try:
        runner = _load(args)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the server
        traceback.print_exc()
        channel.send(ipc.ERROR, ("INTERNAL", f"initialize failed: {_describe(exc)}"))
        return
    channel.send(ipc.READY, {"style": runner.style, "pid": os.getpid()})
    while True:
        kind, payload = endpoint.recv()
        if kind == ipc.SHUTDOWN:
            try:
                runner.finalize()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            channel.send(ipc.READY, None)
            return
        if kind != ipc.EXECUTE:
            raise SystemExit(f"inferstack python worker: unexpected message kind {kind}")
        try:
            inputs = endpoint.segments.read(IN, payload["inputs"], copy=False)
            results = runner.execute(payload["requests"], inputs)
            del inputs
            tensors: list[tuple[str, np.ndarray]] = []
            answer: list[Any] = []
            for result in results:
                if isinstance(result, tuple):  # (code, message)
                    answer.append(result)
                    continue
                answer.append((len(tensors), len(tensors) + len(result)))
                tensors.extend(result)
            refs = endpoint.write(OUT, tensors)
        except _Error as exc:
            channel.send(ipc.ERROR, (exc.code, exc.message))
            continue
        except ipc.ChannelClosed:
            raise
        except Exception as exc:  # noqa: BLE001 - the model's error goes to the client
            traceback.print_exc()
            channel.send(ipc.ERROR, ("INTERNAL", _describe(exc)))
            continue
        channel.send(ipc.RESULT, {"results": answer, "outputs": refs})


def main(argv: list[str]) -> None:
    fd = int(argv[1])
    endpoint = ipc.Endpoint(ipc.Channel(socket.socket(fileno=fd)))
    try:
        serve(endpoint)
    except ipc.ChannelClosed:
        pass  # the server went away: nothing left to answer


if __name__ == "__main__":
    main(sys.argv)
