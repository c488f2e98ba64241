"""Token streaming over gRPC ``ModelStreamInfer`` for generation models.

Triton's decoupled-model convention (as its vLLM backend uses it): a request
carries ``text_input`` (BYTES, one element), optionally ``stream`` (BOOL) and
``sampling_parameters`` (BYTES, JSON); sampling fields may also come as request
parameters. With ``stream`` true (the default on this RPC) every step's new
text is sent as its own response with a ``text_output`` output; the last one
carries the parameter ``triton_final_response: true`` and ``finish_reason``.
With ``stream`` false one response holds the whole text. Cancelling the RPC
aborts the generation; its KV-cache slot is freed at the engine's next step.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from inferstack._proto import grpc_service_pb2 as pb
from inferstack.core.errors import InvalidArgumentError
from inferstack.core.types import InferenceResponse
from inferstack.protocol.grpc_codec import decode_infer_request, encode_infer_response

_SAMPLING_KEYS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "stop_token_ids",
                  "max_new_tokens"}


def generation_version(manager: Any, request: pb.ModelInferRequest) -> Any | None:
    """The version serving this request if it is a generation model, else None (errors left to /infer)."""
    try:
        version = manager.get(request.model_name, request.model_version)
    except Exception:
        return None
    return version if getattr(version, "engines", None) else None


async def stream_generation(version: Any, request: pb.ModelInferRequest,
                            put: Callable[[pb.ModelStreamInferResponse], Awaitable[None]]) -> None:
    from inferstack.llm.backend import sampling_from_json

    decoded, _ = decode_infer_request(request)
    inputs = decoded.inputs
    texts = inputs.get("text_input")
    if texts is None or texts.size != 1:
        raise InvalidArgumentError("a generation request needs input 'text_input' (BYTES) with exactly one element")
    raw = texts.reshape(-1)[0]
    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    stream = True
    if "stream" in inputs:
        stream = bool(inputs["stream"].reshape(-1)[0])
    elif isinstance(decoded.parameters.get("stream"), bool):
        stream = decoded.parameters["stream"]
    document: dict[str, Any] = {k: v for k, v in decoded.parameters.items() if k in _SAMPLING_KEYS}
    if "sampling_parameters" in inputs:
        raw_params = inputs["sampling_parameters"].reshape(-1)[0]
        try:
            extra = json.loads(raw_params)
        except ValueError as exc:
            raise InvalidArgumentError(f"input 'sampling_parameters' is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise InvalidArgumentError("input 'sampling_parameters' must hold a JSON object")
        extra.pop("stream", None)
        document.update(extra)
    engine = min(version.engines, key=lambda e: e.load)
    params = sampling_from_json(engine, document, "sampling_parameters: ")
    outputs = engine.stream(engine.encode(text), params)

    def answer(piece: str, final: bool, output: Any) -> pb.ModelStreamInferResponse:
        parameters: dict[str, Any] = {"triton_final_response": final}
        if final:
            parameters.update(finish_reason=output.finish_reason, prompt_tokens=output.prompt_tokens,
                              completion_tokens=output.completion_tokens)
        response = InferenceResponse(
            model_name=version.name, model_version=version.version_str, id=request.id,
            outputs={"text_output": np.array([piece.encode("utf-8")], dtype=np.object_)}, parameters=parameters,
        )
        return pb.ModelStreamInferResponse(infer_response=encode_infer_response(response))

    try:
        pieces = []
        async for output in outputs:
            final = output.finish_reason is not None
            if stream:
                if output.text or final:
                    await put(answer(output.text, final, output))
            else:
                pieces.append(output.text)
                if final:
                    await put(answer("".join(pieces), True, output))
    finally:
        outputs.close()
