"""The Python backend's worker side and its typed model API.

Everything in this package is imported by the *worker process* that runs a
Python model, possibly under another interpreter (``EXECUTION_ENV_PATH``), so
it depends on the standard library and numpy only — never on protobuf, gRPC
or the server. The server side lives in :mod:`inferstack.backends.python`.

New models subclass :class:`PythonModel` (``load`` / ``predict`` on numpy
arrays); models written for Triton define ``TritonPythonModel`` and import
``triton_python_backend_utils``, which this package implements.
"""

from __future__ import annotations

from inferstack.python_backend.api import InputError, ModelContext, PythonModel

__all__ = ["InputError", "ModelContext", "PythonModel"]
