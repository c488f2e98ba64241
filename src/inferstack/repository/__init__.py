"""The model repository: Triton's directory layout and ``config.pbtxt``."""

from inferstack.repository.config import ModelConfigError, TensorSpec
from inferstack.repository.repository import ModelRepository

__all__ = ["ModelConfigError", "ModelRepository", "TensorSpec"]
