"""Finding models and versions on disk, without ever leaving the repository root."""

from __future__ import annotations

import re
from pathlib import Path

from inferstack.core.errors import InvalidArgumentError, NotFoundError

# Model names are directory names; refuse anything that could address a path
# outside the repository (separators, "..", absolute paths, NUL).
_MODEL_NAME = re.compile(r"^(?!\.)[A-Za-z0-9_.\-]+$")


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a plain directory name; raise 400 otherwise."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name) or name in {".", ".."}:
        raise InvalidArgumentError(f"invalid model name {name!r}")
    return name


class ModelRepository:
    """A Triton-layout repository: ``ROOT/<model>/config.pbtxt``, ``ROOT/<model>/<n>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def model_names(self) -> list[str]:
        """Every model directory, sorted; hidden entries are skipped."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and not entry.name.startswith(".") and _MODEL_NAME.fullmatch(entry.name)
        )

    def model_dir(self, name: str) -> Path:
        """The directory of a model; 404 if absent, 400 if it would escape the root."""
        check_model_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InvalidArgumentError(f"model {name!r} resolves outside the repository")
        if not path.is_dir():
            raise NotFoundError(f"model {name!r} is not in the repository {self.root}")
        return path

    def versions(self, name: str) -> list[int]:
        """Numeric version directories of a model, ascending."""
        model_dir = self.model_dir(name)
        found = []
        for entry in model_dir.iterdir():
            # Triton ignores names that are not numbers or that start with 0.
            if entry.is_dir() and entry.name.isdigit() and not entry.name.startswith("0"):
                found.append(int(entry.name))
        return sorted(found)

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(version)
