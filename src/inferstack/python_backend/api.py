"""The typed Python model API: ``load`` once, ``predict`` per batch, on numpy arrays.

A model file defines one subclass of :class:`PythonModel`::

    import numpy as np
    from inferstack.python_backend import PythonModel

    class Model(PythonModel):
        def load(self, context):
            self.scale = float(context.parameters.get("scale", "2"))

        def predict(self, inputs):
            return {"OUTPUT0": inputs["INPUT0"] * self.scale}

The server's dynamic batcher concatenates queued requests along the batch
dimension, so ``predict`` sees one array per input for the whole batch and
returns arrays with the same leading dimension; splitting the results back to
the requests is the server's job. Raising :class:`InputError` answers the
batch with HTTP 400 / INVALID_ARGUMENT; any other exception with 500 / INTERNAL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class InputError(ValueError):
    """The inputs are unacceptable for the model (answered as a client error, 400)."""


@dataclass(slots=True)
class ModelContext:
    """What ``load`` gets to know about the instance it is loading."""

    #: The model's name and version as served.
    model_name: str
    model_version: int
    #: ``REPO/<model>`` and ``REPO/<model>/<version>``.
    model_dir: Path
    version_dir: Path
    #: Instance name (``<model>_<group>_<n>``), kind (``CPU`` / ``GPU``) and device id.
    instance_name: str
    instance_kind: str
    device_id: int
    #: The config as Triton's JSON (every field, enums by name).
    config: dict[str, Any] = field(default_factory=dict)
    #: ``parameters { key: ... value: { string_value: ... } }`` as a plain dict.
    parameters: dict[str, str] = field(default_factory=dict)


class PythonModel:
    """Base class of typed Python models; override ``load`` and ``predict``."""

    def load(self, context: ModelContext) -> None:
        """Called once in the worker process before the first batch."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch: input arrays by name -> output arrays by name."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict()")

    def unload(self) -> None:
        """Called once when the instance is unloaded."""
