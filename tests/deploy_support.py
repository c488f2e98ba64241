"""Helpers for the deployment checks: render the Helm chart, validate objects, read PromQL and expositions.

The chart is rendered by Helm's own Go engine (helm-python-sdk bundles libhelm_c, Helm v4's SDK), so what CI
checks is what `helm install` would apply.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "inferstack"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
SCHEMAS = DEPLOY / "schemas"
DASHBOARD = DEPLOY / "grafana" / "inferstack.json"
ADAPTER_RULES = CHART / "files" / "prometheus-adapter-rules.yaml"
# Kubernetes versions every rendered object is validated against (kubernetes-validate's bundled schemas): the
# chart's floor that the big managed offerings still support, and the newest one the package knows.
KUBE_VERSIONS = ("1.30.0", "1.34.0")
RELEASE = "demo"
NAMESPACE = "ml"

# Pinned CRD schemas for the custom resources the chart can render (scripts/crd_to_schema.py).
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda.sh_scaledobjects-v2.20.2.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "monitoring.coreos.com_servicemonitors-v0.93.0.json",
}


def helm() -> Any:
    return pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) is not installed")


def load_values(path: Path | None) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path is not None else {}


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Render the chart like `helm template demo deploy/helm/inferstack -n ml -f values`."""
    helm_python = helm()
    with helm_python.Chart.load(str(CHART)) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render_error(values: dict[str, Any]) -> str:
    """Render values that must fail; returns the error text."""
    helm_python = helm()
    with helm_python.Chart.load(str(CHART)) as chart:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm_python.HelmError as exc:
            return str(exc)
    raise AssertionError(f"rendering {values} succeeded but should have failed")


def objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in the rendered manifests (NOTES.txt excluded)."""
    found: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                found.append(doc)
    return found


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {[o['metadata']['name'] for o in by_kind(objs, kind)]}"
    return matches[0]


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge (override wins), as Helm merges -f files and --set."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def strict_schema(schema: Any) -> Any:
    """A CRD openAPIV3Schema made strict: objects with listed properties reject unknown fields.

    The API server prunes unknown fields of structural schemas silently, which is how a typo in a chart
    (``minReplicaCounts``) ships unnoticed; here it is an error. ``x-kubernetes-preserve-unknown-fields`` and
    open maps (``additionalProperties`` given) stay open, as in the cluster.
    """
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


def crd_validator(api_version: str, kind: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = strict_schema(json.loads(CRD_SCHEMAS[(api_version, kind)].read_text()))
    schema.pop("$comment", None)
    schema.pop("x-group-version-kind", None)
    return jsonschema.Draft7Validator(schema)


# -- PromQL ----------------------------------------------------------------------------------------------------

_PROMQL_WORDS = {
    # aggregations, keywords and functions that can appear as bare identifiers
    "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and",
    "or", "unless", "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "quantile_over_time", "clamp_min", "clamp_max", "abs", "ceil", "floor", "round", "vector", "scalar",
    "label_replace", "label_join", "time", "timestamp", "absent", "changes", "resets", "sort", "sort_desc",
    "inf", "nan", "le",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers outside label matchers, ranges, strings and grouping clauses.

    Grafana's ``$__rate_interval`` / ``$model`` style variables are dropped first.
    """
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)      # strings
    text = re.sub(r"\{[^}]*\}", "", text)                  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                 # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)  # label lists
    text = re.sub(r"\$\{?\w+\}?", "", text)                # dashboard variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)", text):
        word = match.group(1)
        if word.lower() in _PROMQL_WORDS or re.fullmatch(r"\d+(ms|s|m|h|d|w|y)", word):
            continue
        names.add(word)
    return names


def exposition_names(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (histograms give _bucket/_sum/_count)."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def family_of(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]


def adapter_metric_sources() -> dict[str, str]:
    """HPA-facing metric name -> the exported series it is computed from (one per Prometheus Adapter rule)."""
    out = {}
    for rule in adapter_rules():
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
        assert re.fullmatch(rule["name"]["matches"], series), rule
        out[rule["name"]["as"]] = series
    return out


def iter_dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, rows included."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel.get("title", "?"), target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            inner = re.search(r"label_values\(([^,)]*)", query)
            yield f"variable {variable['name']}", inner.group(1) if inner else query
