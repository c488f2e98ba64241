"""Helpers for tests, examples and benchmarks (need the ``onnx`` package: ``inferstack[tools]``)."""
