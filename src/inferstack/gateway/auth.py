"""Client authentication: hashed API keys scoped to models, and JWT (HS256, RS256).

A credential arrives as ``Authorization: Bearer <token>`` or ``x-api-key:
<key>`` (HTTP headers, or gRPC metadata of the same names). A bearer value
with two dots is a JWT; anything else is an API key, compared by its SHA-256
(the configuration never holds a key in clear). No or bad credential: 401;
a valid one not scoped to the model asked for: 403.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from inferstack.gateway.config import ApiKey, GatewayConfig


@dataclass(slots=True, frozen=True)
class Principal:
    name: str
    models: tuple[str, ...]  # ("*",) for all
    rps: float | None = None
    burst: float | None = None

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


ANONYMOUS = Principal("anonymous", ("*",))


class Authenticator:
    def __init__(self, config: GatewayConfig) -> None:
        self.enabled = config.auth_enabled
        self._keys: dict[str, ApiKey] = {k.sha256: k for k in config.api_keys}
        self._jwt = config.jwt
        self._cache: dict[str, Principal] = {}
        self._rs256_key: Any = None
        if self._jwt is not None:
            try:
                import jwt  # noqa: F401
            except ImportError:  # pragma: no cover - depends on the install
                raise RuntimeError("JWT auth needs PyJWT: pip install 'inferstack[gateway]'") from None
            if self._jwt.rs256_public_key:
                from cryptography.hazmat.primitives.serialization import load_pem_public_key

                self._rs256_key = load_pem_public_key(self._jwt.rs256_public_key.encode())

    def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        """The caller, or AuthError(401)."""
        if not self.enabled:
            return ANONYMOUS
        token = api_key
        if token is None and authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError(401, "Authorization must be 'Bearer <token>'")
            token = value.strip()
        if not token:
            raise AuthError(401, "missing credentials: send 'Authorization: Bearer <token>' or 'x-api-key'")
        if token.count(".") == 2 and self._jwt is not None:
            return self._verify_jwt(token)
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        digest = hashlib.sha256(token.encode()).hexdigest()
        for stored, key in self._keys.items():
            if hmac.compare_digest(stored, digest):
                principal = Principal(f"key:{key.name}", tuple(key.models), key.rps, key.burst)
                if len(self._cache) < 10_000:
                    self._cache[token] = principal
                return principal
        raise AuthError(401, "invalid API key")

    def _verify_jwt(self, token: str) -> Principal:
        import jwt

        cfg = self._jwt
        assert cfg is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid token: {exc}") from None
        algorithm = header.get("alg")
        if algorithm == "HS256" and cfg.hs256_secret:
            key: Any = cfg.hs256_secret
        elif algorithm == "RS256" and self._rs256_key is not None:
            key = self._rs256_key
        else:
            raise AuthError(401, f"invalid token: algorithm {algorithm!r} is not accepted")
        options = {"require": ["exp"]}
        try:
            claims = jwt.decode(token, key, algorithms=[algorithm], audience=cfg.audience, issuer=cfg.issuer,
                                leeway=cfg.leeway_s, options=options)
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "invalid token: expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, f"invalid token: audience is not {cfg.audience!r}") from None
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid token: {exc}") from None
        models = claims.get(cfg.models_claim, ["*"])
        if isinstance(models, str):
            models = models.split()
        if not isinstance(models, list):
            raise AuthError(401, f"invalid token: claim {cfg.models_claim!r} must be a list of model names")
        return Principal(f"jwt:{claims.get('sub', '?')}", tuple(str(m) for m in models))

    @staticmethod
    def authorize(principal: Principal, model: str) -> None:
        if not principal.may_use(model):
            raise AuthError(403, f"credential '{principal.name}' may not use model '{model}'")


def check_admin(tokens_sha256: list[str], authorization: str | None) -> None:
    """The admin API takes its own tokens (never a client key): 401 without, 403 when it is disabled."""
    if not tokens_sha256:
        raise AuthError(403, "admin API disabled: configure admin.tokens_sha256")
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError(401, "admin API needs 'Authorization: Bearer <admin token>'")
    digest = hashlib.sha256(value.strip().encode()).hexdigest()
    if not any(hmac.compare_digest(digest, stored) for stored in tokens_sha256):
        raise AuthError(401, "invalid admin token")
