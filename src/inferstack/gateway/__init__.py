"""``inferstack gateway``: the access layer in front of inferstack (or Triton) replicas.

Clients speak the same KServe v2 API (HTTP and gRPC) to the gateway as to a
server. The gateway knows which replica has which model version READY and how
busy each one is, applies per-model traffic policies (weighted split, header
rules, sticky A/B, shadow), and protects the replicas (auth, rate limits,
retries within a budget, circuit breakers). See docs/gateway.md.
"""

from __future__ import annotations

__all__ = ["GatewayConfig", "load_config", "run_gateway"]


def __getattr__(name: str):  # lazy: the gateway's extra deps load only when it is used
    if name in ("GatewayConfig", "load_config"):
        from inferstack.gateway import config

        return getattr(config, name)
    if name == "run_gateway":
        from inferstack.gateway.server import run_gateway

        return run_gateway
    raise AttributeError(name)
