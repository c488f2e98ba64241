"""Errors that cross layer boundaries.

Each error carries the HTTP status and gRPC status code it maps to, so a
transport turns any of them into the right answer without a lookup table of
its own. Messages name the offending model, input, shape or datatype: they are
shown to the client verbatim.
"""

from __future__ import annotations


class InferenceServerError(Exception):
    """Base class; ``http_status`` and ``grpc_code`` say how transports report it."""

    http_status: int = 500
    grpc_code: str = "INTERNAL"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Seconds a client should wait before retrying (sent as ``Retry-After``).
        self.retry_after = retry_after


class InvalidArgumentError(InferenceServerError):
    """The client sent something malformed or inconsistent with the model."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class NotFoundError(InferenceServerError):
    """Unknown model, version or endpoint."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class AlreadyExistsError(InvalidArgumentError):
    """The client tried to create something that exists (a shared memory region name).

    400 over HTTP like Triton (which has no other code for it); ALREADY_EXISTS over gRPC.
    """

    grpc_code = "ALREADY_EXISTS"


class PayloadTooLargeError(InferenceServerError):
    """The request body exceeds the configured limit."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class UnavailableError(InferenceServerError):
    """The model is not ready, the queue is full or the server is shutting down."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class ModelLoadError(InferenceServerError):
    """A load or reload requested through the API failed (Triton answers 400)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class RequestTimeoutError(UnavailableError):
    """A request waited in the queue past its timeout."""


class CancelledError(InferenceServerError):
    """The client went away before its request was executed."""

    http_status = 499
    grpc_code = "CANCELLED"


class UnsupportedError(InferenceServerError):
    """A protocol feature the server does not implement (yet)."""

    http_status = 400
    grpc_code = "UNIMPLEMENTED"


class InternalError(InferenceServerError):
    """A failure inside the server or the backend, not the client's fault."""

    http_status = 500
    grpc_code = "INTERNAL"
