"""Pin a CustomResourceDefinition's openAPIV3Schema as JSON for the chart's CI checks.

Usage: python scripts/crd_to_schema.py CRD.yaml VERSION SOURCE OUT.json

The tests validate rendered custom resources (KEDA ScaledObject, ServiceMonitor) against these pinned copies with
unknown fields rejected, so a typo in the chart fails CI instead of being silently pruned by the API server.
SOURCE (e.g. "kedacore/keda v2.20.2 config/crd/bases/keda.sh_scaledobjects.yaml") is recorded in $comment.
"""

from __future__ import annotations

import json
import sys

import yaml


def main() -> None:
    crd_path, version, source, out = sys.argv[1:5]
    with open(crd_path) as handle:
        crd = next(doc for doc in yaml.safe_load_all(handle) if doc)
    spec = crd["spec"]
    served = next(v for v in spec["versions"] if v["name"] == version)
    schema = {
        "$comment": f"openAPIV3Schema of {spec['names']['kind']} {spec['group']}/{version} from {source}",
        "x-group-version-kind": {"group": spec["group"], "version": version, "kind": spec["names"]["kind"]},
        **served["schema"]["openAPIV3Schema"],
    }
    with open(out, "w") as handle:
        json.dump(schema, handle, indent=1, sort_keys=True)
        handle.write("\n")


if __name__ == "__main__":
    main()
