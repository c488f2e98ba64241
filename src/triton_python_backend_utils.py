"""Triton's ``triton_python_backend_utils`` for models served by inferstack.

``import triton_python_backend_utils as pb_utils`` in a Triton Python model's
``model.py`` resolves here; the implementation is
:mod:`inferstack.python_backend.triton_utils`.
"""

from inferstack.python_backend.triton_utils import *
from inferstack.python_backend.triton_utils import __all__  # noqa: F401
