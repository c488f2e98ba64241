"""Finding models and versions on disk, without ever leaving the repository root.

Also the cheap fingerprints (file names, sizes, mtimes; the config's content)
that poll mode compares between scans and that a reload compares to decide
which versions really changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from inferstack.core.errors import InvalidArgumentError, NotFoundError

# Model names are directory names; refuse anything that could address a path
# outside the repository (separators, "..", absolute paths, NUL).
_MODEL_NAME = re.compile(r"^(?!\.)[A-Za-z0-9_.\-]+$")
# Triton's rule: a version directory is a positive integer without a leading 0.
# ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
_VERSION = re.compile(r"^[1-9][0-9]*$")

#: Files under a model directory that one fingerprint looks at, at most; a
#: model directory holding more is fingerprinted by the first ones found.
MAX_FINGERPRINT_FILES = 10_000


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
            if _VERSION.fullmatch(entry.name) and entry.is_dir():
                found.append(int(entry.name))
        return sorted(found)

    def version_dir(self, name: str, version: int) -> Path:
        """A version directory; 400 if it (a symlink, say) resolves outside the repository."""
        path = self.model_dir(name) / str(version)
        self.check_inside(path, f"model {name!r} version {version}")
        return path

    def check_inside(self, path: Path, what: str) -> Path:
        """``path`` resolved; 400 naming ``what`` if that is outside the repository root."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise InvalidArgumentError(f"{what} resolves outside the repository")
        return resolved

    def snapshot(self, name: str) -> ModelSnapshot:
        """The fingerprint of a model directory as it is now (file metadata, no content
        except the config's); cheap enough to take every poll interval."""
        model_dir = self.root / name
        try:
            resolved = model_dir.resolve()
        except OSError:
            return ModelSnapshot(shared=(("<unreadable>",),), versions=())
        if resolved.parent != self.root:
            # Never walked: the load refuses it and says why.
            return ModelSnapshot(shared=(("<outside>", str(resolved)),), versions=())
        shared: list[tuple] = []
        versions: dict[int, list[tuple]] = {}
        budget = [MAX_FINGERPRINT_FILES]
        try:
            entries = sorted(os.scandir(resolved), key=lambda e: e.name)
        except OSError as exc:
            return ModelSnapshot(shared=(("<unreadable>", str(exc)),), versions=())
        for entry in entries:
            if _VERSION.fullmatch(entry.name) and _is_dir(entry):
                versions[int(entry.name)] = _walk(Path(entry.path), entry.name, budget, set())
            elif _is_dir(entry):
                shared.extend(_walk(Path(entry.path), entry.name, budget, set()))
            else:
                shared.append(_file_entry(Path(entry.path), entry.name, digest=entry.name == "config.pbtxt"))
        return ModelSnapshot(
            shared=tuple(shared),
            versions=tuple((number, tuple(files)) for number, files in sorted(versions.items())),
        )


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """What a model directory holds, cheaply: ``(path, size, mtime_ns)`` per file.

    ``shared`` covers everything outside the version directories
    (``config.pbtxt``, with a digest of its content since an edit may keep
    size and mtime, plus ``warmup/`` and label files); ``versions`` has one
    entry per version directory. Two equal snapshots mean nothing a load
    reads has changed, as far as metadata can tell.
    """

    shared: tuple
    versions: tuple[tuple[int, tuple], ...]

    def version(self, number: int) -> tuple | None:
        for found, files in self.versions:
            if found == number:
                return files
        return None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _file_entry(path: Path, relative: str, *, digest: bool = False) -> tuple:
    try:
        info = path.stat()
    except OSError as exc:  # a dangling symlink, a file removed mid-scan
        return (relative, "<missing>", type(exc).__name__)
    if digest and stat.S_ISREG(info.st_mode):
        try:
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            content = "<unreadable>"
        return (relative, info.st_size, info.st_mtime_ns, content)
    return (relative, info.st_size, info.st_mtime_ns)


def _walk(directory: Path, relative: str, budget: list[int], seen: set[tuple[int, int]]) -> list[tuple]:
    """Every file below ``directory``, symlinks followed once (a link loop ends the walk there)."""
    try:
        info = directory.stat()
    except OSError:
        return [(relative, "<missing>")]
    key = (info.st_dev, info.st_ino)
    if key in seen:
        return [(relative, "<loop>")]
    seen = seen | {key}
    # A directory's own mtime is left out: it changes with every temporary
    # file an editor creates and removes, and the files themselves are listed.
    files: list[tuple] = [(relative, "<dir>")]
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        return [(relative, "<unreadable>", type(exc).__name__)]
    for entry in entries:
        if budget[0] <= 0:
            break
        child = f"{relative}/{entry.name}"
        if _is_dir(entry):
            files.extend(_walk(Path(entry.path), child, budget, seen))
        else:
            budget[0] -= 1
            files.append(_file_entry(Path(entry.path), child))
    return files
