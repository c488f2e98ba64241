"""The backend interface: what a model runtime has to provide.

Three calls carry a model through its life — ``load`` (once per instance),
``execute`` (once per batch, on the instance's own thread) and ``unload``.
``complete_config`` lets a backend fill a missing or partial config from the
model file itself (Triton's auto-complete).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferstack._proto import model_config_pb2 as mc


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """Where one instance runs: its name, device kind and device id."""

    name: str
    kind: str  # "KIND_CPU" | "KIND_GPU"
    device_id: int = 0
    #: How many instances of this model share the machine (for thread defaults).
    total_instances: int = 1


class ModelInstance(ABC):
    """One loaded copy of a model. ``execute`` is never called concurrently on it."""

    @abstractmethod
    def execute(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run one batch; return the requested outputs by name."""

    def unload(self) -> None:  # noqa: B027 - optional hook
        """Release the instance's resources."""


class Backend(ABC):
    """A model runtime; one object per backend, shared by all its models."""

    #: Name used in ``backend: "..."``.
    name: str
    #: File looked up in a version directory when ``default_model_filename`` is unset.
    default_model_filename: str

    def model_path(self, config: mc.ModelConfig, version_dir: Path) -> Path:
        return version_dir / (config.default_model_filename or self.default_model_filename)

    @abstractmethod
    def complete_config(self, config: mc.ModelConfig, model_path: Path, *, strict: bool) -> None:
        """Fill missing inputs/outputs/max_batch_size from the model; check the rest against it.

        Raises ModelConfigError when config and model disagree.
        """

    @abstractmethod
    def load(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> ModelInstance:
        """Create one instance (may take long: always called off the event loop)."""
