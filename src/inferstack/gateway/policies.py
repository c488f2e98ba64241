"""Per-model traffic policies: weighted split, header rules, sticky A/B, shadow.

A policy is keyed by the model name clients ask for. Each variant points at a
real model (name and optional version) on the replicas. Selection order for one
request: the first matching header rule wins; else, when the policy is sticky
and the request carries the sticky key, the key's hash picks the variant
(stable while the weights are); else a weighted random draw. Shadow traffic is
a separate draw: the mirrored copy goes to the shadow target and its answer is
only recorded.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

from inferstack.gateway.config import ConfigError

_HEADER = re.compile(r"^[A-Za-z0-9-]+$")


@dataclass(slots=True, frozen=True)
class Target:
    """A model (and version, "" for the replica's choice) on the replicas."""

    model: str
    version: str = ""


@dataclass(slots=True)
class Variant:
    name: str
    target: Target
    weight: float


@dataclass(slots=True)
class HeaderRule:
    header: str  # lower case
    equals: str
    variant: str


@dataclass(slots=True)
class Shadow:
    target: Target
    percent: float
    atol: float = 1e-5
    rtol: float = 1e-4


@dataclass(slots=True)
class Policy:
    model: str
    variants: list[Variant]
    rules: list[HeaderRule] = field(default_factory=list)
    sticky_header: str | None = None
    sticky_parameter: str | None = None
    shadow: Shadow | None = None
    timeout_s: float | None = None
    _cumulative: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        total = 0.0
        self._cumulative = []
        for variant in self.variants:
            total += variant.weight
            self._cumulative.append(total)

    @property
    def needs_body_key(self) -> bool:
        return self.sticky_parameter is not None

    def _by_position(self, position: float) -> Variant:
        """position in [0, 1) -> the variant whose cumulative weight band holds it."""
        total = self._cumulative[-1]
        point = position * total
        for variant, edge in zip(self.variants, self._cumulative):
            if point < edge and variant.weight > 0:
                return variant
        return next(v for v in reversed(self.variants) if v.weight > 0)

    def choose(self, headers: Any, sticky_value: str | None = None, rng: random.Random | None = None) -> Variant:
        """The variant for one request; ``headers`` is a mapping with lower-case names."""
        for rule in self.rules:
            value = headers.get(rule.header)
            if value is not None and value == rule.equals:
                return self.variant(rule.variant)
        if len(self.variants) == 1:
            return self.variants[0]
        key = sticky_value
        if key is None and self.sticky_header is not None:
            key = headers.get(self.sticky_header)
        if key is not None:
            digest = hashlib.blake2b(f"{self.model}\0{key}".encode(), digest_size=8).digest()
            return self._by_position(int.from_bytes(digest, "big") / 2**64)
        return self._by_position((rng or random).random())

    def shadow_hit(self, rng: random.Random | None = None) -> bool:
        return self.shadow is not None and (rng or random).random() * 100.0 < self.shadow.percent

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "variants": [
                {"name": v.name, "model": v.target.model, "version": v.target.version, "weight": v.weight}
                for v in self.variants
            ],
        }
        if self.rules:
            out["rules"] = [{"header": r.header, "equals": r.equals, "variant": r.variant} for r in self.rules]
        if self.sticky_header or self.sticky_parameter:
            out["sticky"] = {"header": self.sticky_header} if self.sticky_header else {
                "parameter": self.sticky_parameter}
        if self.shadow:
            out["shadow"] = {"model": self.shadow.target.model, "version": self.shadow.target.version,
                             "percent": self.shadow.percent, "atol": self.shadow.atol, "rtol": self.shadow.rtol}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        return out


def _check(section: Any, allowed: set[str], where: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _target(entry: dict[str, Any], where: str, default_model: str) -> Target:
    model = entry.get("model", default_model)
    if not isinstance(model, str) or not model or "/" in model:
        raise ConfigError(f"{where}.model: expected a model name, got {model!r}")
    version = entry.get("version", "")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or (version and not version.isdigit()):
        raise ConfigError(f"{where}.version: expected a version number, got {version!r}")
    return Target(model, version)


def parse_policy(model: str, document: Any) -> Policy:
    """A validated Policy; ConfigError names the offending field (``policies.mlp.variants[1].weight``)."""
    where = f"policies.{model}"
    _check(document, {"variants", "rules", "sticky", "shadow", "timeout_s"}, where)
    variants_doc = document.get("variants")
    if not isinstance(variants_doc, list) or not variants_doc:
        raise ConfigError(f"{where}.variants: expected a non-empty list")
    variants: list[Variant] = []
    for i, entry in enumerate(variants_doc):
        w = f"{where}.variants[{i}]"
        _check(entry, {"name", "model", "version", "weight"}, w)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{w}.name: required")
        if any(v.name == name for v in variants):
            raise ConfigError(f"{w}.name: duplicate variant {name!r}")
        weight = _number(entry.get("weight", 0 if len(variants_doc) > 1 else 100), f"{w}.weight")
        if weight < 0 or weight > 100:
            raise ConfigError(f"{w}.weight: must be within 0..100, got {weight}")
        variants.append(Variant(name, _target(entry, w, model), weight))
    total = sum(v.weight for v in variants)
    if abs(total - 100.0) > 1e-6:
        raise ConfigError(f"{where}.variants: weights must sum to 100, they sum to {total:g}")
    rules: list[HeaderRule] = []
    for i, entry in enumerate(document.get("rules", []) or []):
        w = f"{where}.rules[{i}]"
        _check(entry, {"header", "equals", "variant"}, w)
        header = entry.get("header")
        if not isinstance(header, str) or not _HEADER.match(header):
            raise ConfigError(f"{w}.header: expected a header name, got {header!r}")
        if entry.get("variant") not in {v.name for v in variants}:
            raise ConfigError(f"{w}.variant: {entry.get('variant')!r} is not one of this policy's variants")
        equals = entry.get("equals")
        if isinstance(equals, bool):
            equals = "true" if equals else "false"
        if not isinstance(equals, (str, int)):
            raise ConfigError(f"{w}.equals: expected a string")
        rules.append(HeaderRule(header.lower(), str(equals), entry["variant"]))
    policy = Policy(model=model, variants=variants, rules=rules)
    sticky = document.get("sticky")
    if sticky is not None:
        _check(sticky, {"header", "parameter"}, f"{where}.sticky")
        if bool(sticky.get("header")) == bool(sticky.get("parameter")):
            raise ConfigError(f"{where}.sticky: give exactly one of header or parameter")
        if sticky.get("header"):
            if not isinstance(sticky["header"], str) or not _HEADER.match(sticky["header"]):
                raise ConfigError(f"{where}.sticky.header: expected a header name")
            policy.sticky_header = sticky["header"].lower()
        else:
            policy.sticky_parameter = str(sticky["parameter"])
    shadow = document.get("shadow")
    if shadow is not None:
        w = f"{where}.shadow"
        _check(shadow, {"model", "version", "percent", "atol", "rtol"}, w)
        if "model" not in shadow:
            raise ConfigError(f"{w}.model: required")
        percent = _number(shadow.get("percent", 100), f"{w}.percent")
        if not 0 <= percent <= 100:
            raise ConfigError(f"{w}.percent: must be within 0..100")
        policy.shadow = Shadow(_target(shadow, w, model), percent,
                               atol=_number(shadow.get("atol", 1e-5), f"{w}.atol"),
                               rtol=_number(shadow.get("rtol", 1e-4), f"{w}.rtol"))
    if document.get("timeout_s") is not None:
        timeout = _number(document["timeout_s"], f"{where}.timeout_s")
        if timeout <= 0:
            raise ConfigError(f"{where}.timeout_s: must be > 0")
        policy.timeout_s = timeout
    return policy


def check_targets_exist(policy: Policy, known: dict[str, set[str]]) -> None:
    """Refuse a policy whose variants name a model (version) no replica has.

    ``known``: model name -> versions some replica lists (any state).
    """
    targets = [(f"policies.{policy.model}.variants[{i}]", v.target) for i, v in enumerate(policy.variants)]
    if policy.shadow:
        targets.append((f"policies.{policy.model}.shadow", policy.shadow.target))
    for where, target in targets:
        if target.model not in known:
            raise ConfigError(f"{where}.model: no replica has a model named {target.model!r}")
        if target.version and target.version not in known[target.model]:
            raise ConfigError(f"{where}.version: no replica has {target.model!r} version {target.version}")
