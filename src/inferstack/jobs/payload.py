"""Turning a v2 request body into a job payload, and a payload into a result.

At submission the body is checked exactly as ``/infer`` would check it (so a
malformed request is refused with 400 at once, not failed minutes later) and
normalised: the result of a job is always a JSON v2 response (it is stored
and fetched later, so binary output framing and shared memory regions make
no sense), and ``callback_url`` is taken out of the request parameters.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson

from inferstack.core.errors import InvalidArgumentError, UnsupportedError
from inferstack.core.types import InferenceRequest, InferenceResponse
from inferstack.jobs.types import Payload
from inferstack.protocol import rest

#: Request parameter naming the webhook URL (``{"parameters": {"callback_url": ...}}``).
CALLBACK_PARAMETER = "callback_url"


def _split(body: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        if header_length < 0 or header_length > len(body):
            raise InvalidArgumentError(
                f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
            )
        json_part, binary = body[:header_length], body[header_length:]
    try:
        document = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"malformed JSON in the request body: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    return document, binary


def check_callback_url(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise InvalidArgumentError(f"request parameter {CALLBACK_PARAMETER!r} must be a non-empty string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgumentError(
            f"request parameter {CALLBACK_PARAMETER!r} must be an absolute http(s) URL, got {url!r}"
        )
    return url


def prepare(body: bytes, header_length: int | None, model: str, version: str) -> tuple[Payload, str | None]:
    """Validate and normalise a request body; returns the payload and the callback URL, if any."""
    document, binary = _split(body, header_length)
    parameters = document.get("parameters")
    callback_url = None
    if isinstance(parameters, dict):
        if CALLBACK_PARAMETER in parameters:
            callback_url = check_callback_url(parameters.pop(CALLBACK_PARAMETER))
        parameters.pop("binary_data_output", None)
        if not parameters:
            document.pop("parameters")
    outputs = document.get("outputs")
    if isinstance(outputs, list):
        for item in outputs:
            if isinstance(item, dict) and isinstance(item.get("parameters"), dict):
                item["parameters"].pop("binary_data", None)
    header = orjson.dumps(document)
    payload = Payload(header + binary, len(header) if binary else None)
    try:
        decode(payload, model, version)  # every 400 /infer would give, now
    except UnsupportedError as exc:
        raise UnsupportedError(f"{exc.message} (async jobs cannot use shared memory)") from None
    return payload, callback_url


def decode(payload: Payload, model: str, version: str) -> InferenceRequest:
    request, _ = rest.decode_request(payload.body, payload.header_length, model, version)
    return request


def encode_result(response: InferenceResponse) -> bytes:
    """The v2 JSON response stored as the job's result."""
    content, _ = rest.encode_response(response, rest.OutputFormat())
    return content
