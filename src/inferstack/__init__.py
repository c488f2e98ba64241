"""inferstack: a Python-first, Triton-compatible ML inference server."""

__version__ = "0.1.0"

__all__ = ["__version__"]
