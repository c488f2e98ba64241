"""Inference requests and responses as the core sees them.

Transports decode wire formats into these and encode them back; schedulers
and backends only ever see numpy arrays. Plain slotted classes rather than
validated models: tensor data is never walked element by element here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, with its per-output parameters."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceRequest:
    """One inference request for one model.

    ``inputs`` maps input names to arrays whose dtypes already correspond to
    the declared v2 datatypes (BYTES tensors are object arrays of ``bytes``).
    ``outputs`` is ``None`` when the client wants every output.
    """

    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def priority(self) -> int:
        """Triton's ``priority`` request parameter; 0 means the model's default."""
        value = self.parameters.get("priority", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    @property
    def timeout_us(self) -> int | None:
        """Triton's ``timeout`` request parameter in microseconds, if given."""
        value = self.parameters.get("timeout")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return None


@dataclass(slots=True)
class InferenceResponse:
    """The result of one request: named output arrays in the order requested."""

    model_name: str
    model_version: str
    id: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
