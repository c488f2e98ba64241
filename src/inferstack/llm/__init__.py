"""Generation and embedding models: the continuous-batching engine, the OpenAI-compatible
API and the KServe generate extension (see docs/llm.md).

Nothing here imports torch at import time except the engine modules themselves
(``engine``, ``runner``, ``sampling``, ``backend.build_engine``), which only
load when a generation model does.
"""
