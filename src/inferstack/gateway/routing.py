"""The gateway's core, shared by HTTP and gRPC: policy -> target, replica choice, retries.

``Gateway.send`` runs one client request: pick a replica (power of two
choices among those with the target READY, breaker closed), call it, and on a
connection failure or a 503 retry on a different replica while the retry
budget allows. A 4xx is the model refusing the input: it is never retried.
A timeout is not retried either (the replica may still be running it).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferstack.gateway.auth import Authenticator
from inferstack.gateway.config import ConfigError, GatewayConfig
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.policies import Policy, Target, check_targets_exist, parse_policy
from inferstack.gateway.ratelimit import RateLimiter
from inferstack.gateway.replicas import NoReplica, Replica, ReplicaPool
from inferstack.gateway.resilience import RetryBudget

log = logging.getLogger("inferstack.gateway")


@dataclass(slots=True)
class Result:
    """One attempt's answer in HTTP terms (gRPC maps its codes onto these)."""

    status: int
    body: bytes = b""
    headers: Any = None
    #: transport failure (no HTTP status): connect=True means nothing reached the replica
    failure: str | None = None
    connect_failure: bool = False
    timed_out: bool = False
    replica: Replica | None = None
    extra: Any = None

    @property
    def retryable(self) -> bool:
        return (self.failure is not None and not self.timed_out) or self.status == 503


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.pool = ReplicaPool(config)
        for spec in config.replicas:
            self.pool.add(spec)
        self.metrics = GatewayMetrics(self.pool)
        self.auth = Authenticator(config)
        self.limiter = RateLimiter(config)
        self.budget = RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s)
        self.policies: dict[str, Policy] = {}
        self.history: dict[str, list[dict[str, Any] | None]] = {}
        #: replicas added/removed through the admin API (persisted with the policies)
        self._replica_changes: dict[str, Any] = {}
        for model, document in config.policies.items():
            self.policies[str(model)] = parse_policy(str(model), document)
        self._load_state()
        self.draining = False
        self.shadow_tasks: set[Any] = set()

    # -- policies --------------------------------------------------------------------

    def resolve(self, model: str, version: str, headers: Any, sticky_value: str | None = None
                ) -> tuple[Target, str, Policy | None]:
        """The target for a request to ``model`` (``version``: the client's, "" for none)."""
        policy = self.policies.get(model)
        if policy is None or version:
            # An explicit version bypasses the split: the client asked for exactly that.
            return Target(model, version), "", None
        variant = policy.choose(headers, sticky_value)
        return variant.target, variant.name, policy

    def set_policy(self, model: str, document: dict[str, Any] | None, *, check: bool = True) -> Policy | None:
        """Validate and apply (``None`` removes), keep the previous one for rollback, persist."""
        policy = None
        if document is not None:
            policy = parse_policy(model, document)
            if check:
                known = self.pool.known_models()
                if not known:
                    raise ConfigError("no replica has been polled yet: cannot check that the variants exist")
                check_targets_exist(policy, known)
        previous = self.policies.get(model)
        self.history.setdefault(model, []).append(previous.to_dict() if previous else None)
        del self.history[model][:-20]
        if policy is None:
            self.policies.pop(model, None)
        else:
            self.policies[model] = policy
        self.save_state()
        log.info("policy for %s %s", model, "removed" if policy is None else f"set: {policy.to_dict()}")
        return policy

    def rollback(self, model: str) -> Policy | None:
        history = self.history.get(model)
        if not history:
            raise ConfigError(f"policies.{model}: no earlier policy to roll back to")
        previous = history.pop()
        if previous is None:
            self.policies.pop(model, None)
            policy = None
        else:
            policy = self.policies[model] = parse_policy(model, previous)
        self.save_state()
        log.info("policy for %s rolled back", model)
        return policy

    def _load_state(self) -> None:
        path = self.config.state_file
        if path is None or not Path(path).exists():
            return
        try:
            state = json.loads(Path(path).read_text())
            policies = state.get("policies", {})
            for model, document in policies.items():
                if document is None:
                    self.policies.pop(model, None)
                else:
                    self.policies[model] = parse_policy(model, document)
            for spec in state.get("replicas_added", []):
                from inferstack.gateway.config import parse_replica

                self.pool.add(parse_replica(spec, "state_file.replicas_added"), source="admin")
            for key in state.get("replicas_removed", []):
                self.pool.remove(key)
            self._replica_changes = state
        except (OSError, ValueError, ConfigError) as exc:
            raise ConfigError(f"state file {path}: {exc}") from None
        log.info("restored %d policies from %s", len(policies), path)

    def save_state(self) -> None:
        """Write the runtime state atomically (temp file + rename) so a crash never leaves half a file."""
        path = self.config.state_file
        if path is None:
            return
        state = {
            "policies": {model: policy.to_dict() for model, policy in self.policies.items()},
            "replicas_added": list(self._replica_changes.get("replicas_added", [])),
            "replicas_removed": list(self._replica_changes.get("replicas_removed", [])),
        }
        # Policies in the config file that were removed at runtime stay removed after a restart.
        for model in self.config.policies:
            if model not in self.policies:
                state["policies"][model] = None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    def record_replica_change(self, added: str | None = None, removed: str | None = None) -> None:
        changes = dict(self._replica_changes)
        adds = [a for a in changes.get("replicas_added", []) if a.split(",")[0] != removed]
        removes = [r for r in changes.get("replicas_removed", []) if r != (added or "").split(",")[0]]
        if added:
            adds.append(added)
        if removed and any(r.http == removed for r in self.config.replicas):
            removes.append(removed)
        changes["replicas_added"], changes["replicas_removed"] = adds, removes
        self._replica_changes = changes
        self.save_state()

    # -- sending ---------------------------------------------------------------------

    async def send(self, target: Target, call: Callable[[Replica], Awaitable[Result]], model: str) -> Result:
        """Run ``call`` on a replica for ``target``, retrying elsewhere within the budget."""
        pool = self.pool
        self.budget.record_request()
        tried: set[Replica] = set()
        attempts = 0
        last: Result | None = None
        while True:
            try:
                replica = pool.pick(target, tried)
            except NoReplica as exc:
                if last is not None:
                    return last
                raise exc from None
            breaker = replica.breaker
            breaker.on_attempt()
            replica.inflight += 1
            try:
                result = await call(replica)
            finally:
                replica.inflight -= 1
            result.replica = replica
            attempts += 1
            if result.failure is not None:
                breaker.on_failure()
                if result.connect_failure:
                    pool.eject(replica, result.failure)
            elif result.status >= 500 and result.status != 503:
                breaker.on_failure()
            else:
                breaker.on_success()
            if not result.retryable:
                return result
            last = result
            tried.add(replica)
            reason = "connect" if result.connect_failure else ("transport" if result.failure else "503")
            if attempts >= self.config.max_attempts:
                return result
            if not pool.candidates(target) or all(r in tried for r in pool.candidates(target)):
                return result
            if not self.budget.try_retry():
                self.metrics.budget_exhausted.labels(model).inc()
                return result
            self.metrics.retries.labels(model, reason).inc()
            log.info("retrying %s on another replica after %s from %s", target.model,
                     result.failure or result.status, replica.key)
