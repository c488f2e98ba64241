"""Gateway configuration: one YAML file (optional) plus command-line overrides.

Every section is optional; ``inferstack gateway --replica URL`` alone is a valid
configuration. Unknown keys are refused with their path (``auth.jwt.audiance``)
so a typo never silently turns a protection off. See docs/gateway.md for the
reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """An invalid gateway configuration; the message names the offending field."""


@dataclass(slots=True)
class ReplicaSpec:
    """Where one replica answers: HTTP base URL, gRPC ``host:port``, Prometheus metrics URL."""

    http: str
    grpc: str | None = None
    metrics: str | None = None

    @property
    def key(self) -> str:
        return self.http


@dataclass(slots=True)
class DnsDiscovery:
    """A DNS name (a Kubernetes headless Service) re-resolved every ``interval_s``."""

    name: str
    http_port: int = 8000
    grpc_port: int | None = 8001
    metrics_port: int | None = 8002
    interval_s: float = 10.0
    scheme: str = "http"


@dataclass(slots=True)
class ApiKey:
    name: str
    sha256: str
    models: list[str] = field(default_factory=lambda: ["*"])
    rps: float | None = None
    burst: float | None = None


@dataclass(slots=True)
class JwtConfig:
    hs256_secret: str | None = None
    rs256_public_key: str | None = None  # PEM text
    audience: str | None = None
    issuer: str | None = None
    models_claim: str = "models"
    leeway_s: float = 0.0


@dataclass(slots=True)
class Bucket:
    rps: float
    burst: float


@dataclass(slots=True)
class GatewayConfig:
    host: str = "0.0.0.0"
    http_port: int = 9000
    grpc_port: int = 9001
    metrics_port: int = 9002
    allow_grpc: bool = True
    allow_metrics: bool = True
    tls_cert: str | None = None
    tls_key: str | None = None
    max_request_bytes: int = 128 * 1024 * 1024
    replicas: list[ReplicaSpec] = field(default_factory=list)
    dns: list[DnsDiscovery] = field(default_factory=list)
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    # routing / resilience
    timeout_s: float = 60.0
    max_attempts: int = 3
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_s: float = 10.0
    breaker_failures: int = 5
    breaker_error_rate: float = 0.5
    breaker_min_requests: int = 20
    breaker_open_s: float = 5.0
    loading_retry_after_s: int = 2
    connections_per_replica: int = 256
    # protection
    api_keys: list[ApiKey] = field(default_factory=list)
    jwt: JwtConfig | None = None
    admin_tokens_sha256: list[str] = field(default_factory=list)
    key_rate: Bucket | None = None
    model_rates: dict[str, Bucket] = field(default_factory=dict)
    # policies, as written (validated by inferstack.gateway.policies)
    policies: dict[str, Any] = field(default_factory=dict)
    state_file: Path | None = None
    access_log: bool = False
    exit_timeout_s: float = 30.0
    config_path: Path | None = None

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) or self.jwt is not None


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_replica(text: str, where: str = "--replica") -> ReplicaSpec:
    """``http://host:8000[,grpc=host:8001][,metrics=http://host:8002/metrics]``.

    Without ``grpc=``/``metrics=`` Triton's port convention is assumed (HTTP port + 1
    and + 2); ``grpc=none`` / ``metrics=none`` turn them off for that replica.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{where}: empty replica address")
    http = parts[0]
    if "://" not in http:
        http = "http://" + http
    split = urlsplit(http)
    if split.scheme not in ("http", "https") or not split.hostname or split.port is None:
        raise ConfigError(f"{where}: {parts[0]!r} is not http(s)://host:port")
    http = f"{split.scheme}://{split.netloc}"
    host = split.hostname if ":" not in split.hostname else f"[{split.hostname}]"
    grpc: str | None = f"{host}:{split.port + 1}"
    metrics: str | None = f"http://{host}:{split.port + 2}/metrics"
    for extra in parts[1:]:
        key, sep, value = extra.partition("=")
        if not sep or key not in ("grpc", "metrics"):
            raise ConfigError(f"{where}: {extra!r}: expected grpc=HOST:PORT or metrics=URL")
        if value.lower() == "none":
            value_or_none = None
        elif key == "metrics":
            value_or_none = value if "://" in value else f"http://{value}"
            if urlsplit(value_or_none).path in ("", "/"):
                value_or_none = value_or_none.rstrip("/") + "/metrics"
        else:
            value_or_none = value
        if key == "grpc":
            grpc = value_or_none
        else:
            metrics = value_or_none
    return ReplicaSpec(http=http, grpc=grpc, metrics=metrics)


def _check_keys(section: dict[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _num(value: Any, where: str, *, minimum: float = 0.0, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value!r}")
    if integer and int(value) != value:
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return int(value) if integer else float(value)


def _bucket(value: Any, where: str) -> Bucket:
    _check_keys(value, {"rps", "burst"}, where)
    if "rps" not in value:
        raise ConfigError(f"{where}.rps: required")
    rps = _num(value["rps"], f"{where}.rps")
    if rps <= 0:
        raise ConfigError(f"{where}.rps: must be > 0")
    burst = _num(value.get("burst", max(1.0, rps)), f"{where}.burst", minimum=1.0)
    return Bucket(rps=rps, burst=burst)


_TOP = {"listen", "tls", "limits", "replicas", "routing", "auth", "admin", "rate_limits", "policies",
        "state_file", "access_log"}


def parse_config(document: dict[str, Any], *, base_dir: Path | None = None) -> GatewayConfig:
    """A GatewayConfig from a parsed YAML document; ConfigError names the bad field."""
    document = document or {}
    _check_keys(document, _TOP, "config")
    cfg = GatewayConfig()
    base = base_dir or Path.cwd()

    listen = document.get("listen", {}) or {}
    _check_keys(listen, {"host", "http_port", "grpc_port", "metrics_port", "allow_grpc", "allow_metrics"}, "listen")
    cfg.host = str(listen.get("host", cfg.host))
    for port in ("http_port", "grpc_port", "metrics_port"):
        if port in listen:
            setattr(cfg, port, _num(listen[port], f"listen.{port}", integer=True))
    cfg.allow_grpc = bool(listen.get("allow_grpc", True))
    cfg.allow_metrics = bool(listen.get("allow_metrics", True))

    tls = document.get("tls", {}) or {}
    _check_keys(tls, {"cert", "key"}, "tls")
    if bool(tls.get("cert")) != bool(tls.get("key")):
        raise ConfigError("tls: give both cert and key")
    if tls.get("cert"):
        cfg.tls_cert = str(base / tls["cert"])
        cfg.tls_key = str(base / tls["key"])

    limits = document.get("limits", {}) or {}
    _check_keys(limits, {"max_request_bytes"}, "limits")
    if "max_request_bytes" in limits:
        cfg.max_request_bytes = _num(limits["max_request_bytes"], "limits.max_request_bytes", minimum=1, integer=True)

    replicas = document.get("replicas", {}) or {}
    _check_keys(replicas, {"static", "dns", "health_interval_s", "health_timeout_s"}, "replicas")
    for i, entry in enumerate(replicas.get("static", []) or []):
        where = f"replicas.static[{i}]"
        if isinstance(entry, str):
            cfg.replicas.append(parse_replica(entry, where))
        else:
            _check_keys(entry, {"http", "grpc", "metrics"}, where)
            if "http" not in entry:
                raise ConfigError(f"{where}.http: required")
            text = str(entry["http"])
            for key in ("grpc", "metrics"):
                if key in entry:
                    text += f",{key}={entry[key] if entry[key] is not None else 'none'}"
            cfg.replicas.append(parse_replica(text, where))
    for i, entry in enumerate(replicas.get("dns", []) or []):
        where = f"replicas.dns[{i}]"
        _check_keys(entry, {"name", "http_port", "grpc_port", "metrics_port", "interval_s", "scheme"}, where)
        if not entry.get("name"):
            raise ConfigError(f"{where}.name: required")
        d = DnsDiscovery(name=str(entry["name"]))
        for key in ("http_port", "grpc_port", "metrics_port"):
            if key in entry:
                setattr(d, key, None if entry[key] is None else _num(entry[key], f"{where}.{key}", integer=True))
        if d.http_port is None:
            raise ConfigError(f"{where}.http_port: required")
        if "interval_s" in entry:
            d.interval_s = _num(entry["interval_s"], f"{where}.interval_s", minimum=0.1)
        d.scheme = str(entry.get("scheme", "http"))
        cfg.dns.append(d)
    for key in ("health_interval_s", "health_timeout_s"):
        if key in replicas:
            setattr(cfg, key, _num(replicas[key], f"replicas.{key}", minimum=0.05))

    routing = document.get("routing", {}) or {}
    allowed = {"timeout_s", "max_attempts", "retry_budget_ratio", "retry_budget_min_per_s", "breaker_failures",
               "breaker_error_rate", "breaker_min_requests", "breaker_open_s", "loading_retry_after_s",
               "connections_per_replica"}
    _check_keys(routing, allowed, "routing")
    for key in allowed:
        if key in routing:
            integer = key in ("max_attempts", "breaker_failures", "breaker_min_requests", "loading_retry_after_s",
                              "connections_per_replica")
            setattr(cfg, key, _num(routing[key], f"routing.{key}", minimum=1 if integer else 0, integer=integer))

    auth = document.get("auth", {}) or {}
    _check_keys(auth, {"api_keys", "jwt"}, "auth")
    for i, entry in enumerate(auth.get("api_keys", []) or []):
        where = f"auth.api_keys[{i}]"
        _check_keys(entry, {"name", "sha256", "models", "rps", "burst"}, where)
        digest = str(entry.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{where}.sha256: expected the key's SHA-256 as 64 hex digits (keys are stored hashed)")
        models = entry.get("models", ["*"])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ConfigError(f"{where}.models: expected a list of model names ('*' for all)")
        key = ApiKey(name=str(entry.get("name", f"key{i}")), sha256=digest, models=models)
        if "rps" in entry:
            bucket = _bucket({k: entry[k] for k in ("rps", "burst") if k in entry}, where)
            key.rps, key.burst = bucket.rps, bucket.burst
        cfg.api_keys.append(key)
    if auth.get("jwt"):
        jwt = auth["jwt"]
        where = "auth.jwt"
        _check_keys(jwt, {"hs256_secret", "rs256_public_key", "rs256_public_key_file", "audience", "issuer",
                          "models_claim", "leeway_s"}, where)
        j = JwtConfig(hs256_secret=jwt.get("hs256_secret"), audience=jwt.get("audience"), issuer=jwt.get("issuer"),
                      models_claim=str(jwt.get("models_claim", "models")),
                      leeway_s=_num(jwt.get("leeway_s", 0), f"{where}.leeway_s"))
        if jwt.get("rs256_public_key_file"):
            path = base / jwt["rs256_public_key_file"]
            try:
                j.rs256_public_key = path.read_text()
            except OSError as exc:
                raise ConfigError(f"{where}.rs256_public_key_file: cannot read {path}: {exc}") from None
        elif jwt.get("rs256_public_key"):
            j.rs256_public_key = str(jwt["rs256_public_key"])
        if not j.hs256_secret and not j.rs256_public_key:
            raise ConfigError(f"{where}: give hs256_secret and/or rs256_public_key(_file)")
        cfg.jwt = j

    admin = document.get("admin", {}) or {}
    _check_keys(admin, {"tokens_sha256"}, "admin")
    for i, digest in enumerate(admin.get("tokens_sha256", []) or []):
        digest = str(digest).lower()
        if len(digest) != 64:
            raise ConfigError(f"admin.tokens_sha256[{i}]: expected 64 hex digits")
        cfg.admin_tokens_sha256.append(digest)

    rates = document.get("rate_limits", {}) or {}
    _check_keys(rates, {"per_key", "per_model"}, "rate_limits")
    if rates.get("per_key"):
        cfg.key_rate = _bucket(rates["per_key"], "rate_limits.per_key")
    for model, bucket in (rates.get("per_model", {}) or {}).items():
        cfg.model_rates[str(model)] = _bucket(bucket, f"rate_limits.per_model.{model}")

    policies = document.get("policies", {}) or {}
    if not isinstance(policies, dict):
        raise ConfigError("policies: expected a mapping of model name -> policy")
    cfg.policies = policies
    if document.get("state_file"):
        cfg.state_file = base / str(document["state_file"])
    cfg.access_log = bool(document.get("access_log", False))
    return cfg


def load_config(path: Path | None) -> GatewayConfig:
    """Read the YAML file (or start from the defaults when there is none)."""
    if path is None:
        return GatewayConfig()
    try:
        import yaml
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError("reading --config needs PyYAML: pip install 'inferstack[gateway]'") from None
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {path} is not valid YAML: {exc}") from None
    cfg = parse_config(document, base_dir=Path(path).resolve().parent)
    cfg.config_path = Path(path)
    if cfg.state_file is None:
        cfg.state_file = Path(str(path) + ".state.json")
    return cfg
