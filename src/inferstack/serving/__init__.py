"""Model lifecycle and request execution: the server's core, independent of transports."""

from inferstack.serving.manager import ModelManager, ServerOptions
from inferstack.serving.model import ModelState, ModelVersion

__all__ = ["ModelManager", "ModelState", "ModelVersion", "ServerOptions"]
