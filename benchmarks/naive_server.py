#!/usr/bin/env python
"""The reference baseline: a model server written the "traditional" way.

FastAPI + pydantic request models + one onnxruntime ``InferenceSession`` per model
(default session options, CPUExecutionProvider), no batching, JSON in and out in the
KServe v2 shape::

    POST /v2/models/{model}/infer   {"inputs": [{"name", "shape", "datatype", "data"}], "outputs": [...]}
                                 -> {"model_name", "outputs": [{"name", "shape", "datatype", "data"}]}
    GET  /v2/health/ready

served by uvicorn, one worker, uvloop + httptools, access log off (inferstack's is off too).
The handler is a plain ``def``, so FastAPI runs it on its thread pool and ``session.run``
(which releases the GIL) never blocks the event loop: FastAPI's documented way for blocking
work. ``--handler async`` runs ``session.run`` inline in an ``async def`` instead, the other
common pattern (faster for tiny models, serialises big ones on the loop).

``bench_compare.py`` starts it in a subprocess; on its own::

    .venv/bin/python benchmarks/naive_server.py --model-repository /tmp/repo --port 8100

Every ``<repo>/<model>/1/model.onnx`` is loaded. Needs the ``bench`` extra (``fastapi``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


def create_app(repository: Path, handler: str = "sync") -> FastAPI:
    sessions: dict[str, ort.InferenceSession] = {}
    for model_file in sorted(repository.glob("*/1/model.onnx")):
        sessions[model_file.parent.parent.name] = ort.InferenceSession(
            str(model_file), providers=["CPUExecutionProvider"])
    app = FastAPI(title="naive onnxruntime server")

    def infer(model: str, request: InferRequest) -> dict[str, Any]:
        session = sessions.get(model)
        if session is None:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}")
        try:
            feeds = {t.name: np.asarray(t.data, dtype=DTYPES[t.datatype]).reshape(t.shape) for t in request.inputs}
        except (KeyError, ValueError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        names = [o.name for o in request.outputs] if request.outputs else [o.name for o in session.get_outputs()]
        results = session.run(names, feeds)
        return {
            "model_name": model,
            "id": request.id or "",
            "outputs": [
                {"name": name, "shape": list(y.shape), "datatype": "FP32", "data": y.ravel().tolist()}
                for name, y in zip(names, results, strict=True)
            ],
        }

    if handler == "sync":
        app.post("/v2/models/{model}/infer")(infer)
    else:

        async def infer_async(model: str, request: InferRequest) -> dict[str, Any]:
            return infer(model, request)

        app.post("/v2/models/{model}/infer")(infer_async)

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--handler", choices=["sync", "async"], default="sync",
                    help="def handler on the thread pool (default) or async def running the model inline")
    args = ap.parse_args()
    app = create_app(args.model_repository, args.handler)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, loop="uvloop", http="httptools",
                access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
