"""``inferstack gateway``: command-line flags over the YAML configuration."""

from __future__ import annotations

from pathlib import Path

import typer


def run(*, config: Path | None, replicas: list[str], host: str | None, http_port: int | None,
        grpc_port: int | None, metrics_port: int | None, state_file: Path | None, health_interval: float | None,
        access_log: bool, log_level: str, log_format: str) -> int:
    from inferstack.gateway.config import ConfigError, load_config, parse_replica
    from inferstack.observability.logs import setup_logging

    setup_logging(log_level, log_format)
    try:
        cfg = load_config(config)
        for text in replicas:
            cfg.replicas.append(parse_replica(text))
        from inferstack.gateway.policies import parse_policy

        for model, document in cfg.policies.items():
            parse_policy(str(model), document)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    for name, value in (("host", host), ("http_port", http_port), ("grpc_port", grpc_port),
                        ("metrics_port", metrics_port), ("state_file", state_file),
                        ("health_interval_s", health_interval)):
        if value is not None:
            setattr(cfg, name, value)
    cfg.access_log = cfg.access_log or access_log
    if not cfg.replicas and not cfg.dns:
        typer.echo("error: no replicas: give --replica URL or replicas.static / replicas.dns in --config", err=True)
        return 2
    from inferstack.gateway.server import run_gateway

    try:
        return run_gateway(cfg)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
