"""Backends execute models; the rest of the server sees only :class:`Backend`.

A backend is registered by name (``backend: "onnxruntime"`` in a config) and
by the Triton platforms it serves (``platform: "onnxruntime_onnx"``). Adding
the Python, PyTorch or LLM backends means adding a module here and one entry
to :data:`BACKENDS`; transports and the scheduler do not change.
"""

from __future__ import annotations

from inferstack.backends.base import Backend, ModelInstance
from inferstack.core.errors import NotFoundError

__all__ = ["Backend", "ModelInstance", "backend_for"]


def _onnxruntime() -> Backend:
    from inferstack.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend()


def _pytorch() -> Backend:
    # The module imports torch only when a model loads (inferstack[pytorch]).
    from inferstack.backends.pytorch import PyTorchBackend

    return PyTorchBackend()


def _python() -> Backend:
    from inferstack.backends.python import PythonBackend

    return PythonBackend()


def _transformers() -> Backend:
    from inferstack.llm.backend import TransformersBackend

    return TransformersBackend()


def _vllm() -> Backend:
    from inferstack.llm.backend import VllmBackend

    return VllmBackend()


def _embedding() -> Backend:
    from inferstack.llm.embeddings import EmbeddingBackend

    return EmbeddingBackend()


# name -> factory; imported lazily so an optional backend's heavy dependency
# is only needed by models that use it.
BACKENDS = {"onnxruntime": _onnxruntime}
BACKENDS["python"] = _python
# Generation (torch/transformers, vLLM) and embedding models: see docs/llm.md.
BACKENDS.update(transformers=_transformers, vllm=_vllm, embedding=_embedding)
PLATFORMS = {"onnxruntime_onnx": "onnxruntime"}
BACKENDS["pytorch"] = _pytorch
PLATFORMS["pytorch_libtorch"] = "pytorch"

_instances: dict[str, Backend] = {}


def backend_for(backend: str, platform: str, *, default: str = "onnxruntime") -> Backend:
    """The backend a config asks for through ``backend`` or ``platform``."""
    name = backend or PLATFORMS.get(platform, "" if platform else default)
    if not name:
        raise NotFoundError(
            f"platform {platform!r} is not supported; supported: {', '.join(sorted(PLATFORMS))}"
        )
    factory = BACKENDS.get(name)
    if factory is None:
        raise NotFoundError(
            f"backend {name!r} is not available; available: {', '.join(sorted(BACKENDS))}"
        )
    if name not in _instances:
        _instances[name] = factory()
    return _instances[name]
