"""Write the chart README's values table from the `# --` comments in values.yaml.

    python scripts/chart_values_doc.py          # rewrite deploy/helm/inferstack/README.md between the markers
    python scripts/chart_values_doc.py --check  # exit 1 if the README is stale or a key is undocumented

Every key that holds a value (a scalar, a list, or a map written inline like `{}`) must have a `# --` comment
right above it; a key that only groups others may have none.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "inferstack"
_MISSING = object()
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"


def documented_keys(text: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for each key in file order."""
    rows: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    whole: list[str] = []  # maps documented as one value (resources, probes.startup, behavior)
    values = yaml.safe_load(text)
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and comment:
            comment.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^( *)([A-Za-z0-9_.-]+):(.*)$", line)
        if not match or line.lstrip().startswith("-"):
            if not stripped.startswith("-"):
                comment = []
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        node: object = values
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                node = _MISSING  # a key inside a list item (part of a documented list value)
                break
            node = node[part]
        if node is _MISSING:
            continue
        stack.append((indent, key))
        if any(path.startswith(prefix + ".") for prefix in whole):
            comment = []
            continue  # inside a map documented as a whole
        stack.pop()
        is_group = isinstance(node, dict) and rest == "" and node
        if not is_group or comment:
            default = yaml.safe_dump(node, default_flow_style=True, width=10_000).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
            rows.append((path, default, " ".join(comment)))
            if isinstance(node, dict) and node:
                whole.append(path)
        stack.append((indent, key))
        comment = []
    return rows


def table(rows: list[tuple[str, str, str]]) -> str:
    out = ["| key | default | description |", "|---|---|---|"]
    for key, default, description in rows:
        if len(default) > 60:
            default = default[:57] + "..."
        default, description = default.replace("|", r"\|"), description.replace("|", r"\|")
        out.append(f"| `{key}` | `{default}` | {description} |")
    return "\n".join(out)


def main() -> int:
    rows = documented_keys((CHART / "values.yaml").read_text())
    missing = [key for key, _, description in rows if not description]
    if missing:
        print("undocumented values keys:", ", ".join(missing))
        return 1
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    updated = readme[:start] + "\n" + table(rows) + "\n" + readme[end:]
    if "--check" in sys.argv:
        if updated != readme:
            print("deploy/helm/inferstack/README.md is stale: run python scripts/chart_values_doc.py")
            return 1
        return 0
    readme_path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
