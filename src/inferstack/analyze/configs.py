"""Candidate ``config.pbtxt`` files: the model's own config with the swept fields replaced.

Everything the sweep does not touch (inputs, outputs, warmup, queue policies,
version policy, optimization, ...) is kept as the model's config has it. The
swept fields are:

* ``instance_group``: the first group's ``count`` (its ``kind`` and ``gpus``
  are kept; further groups are dropped); a config without groups gets one
  ``KIND_CPU`` group;
* ``parameters { key: "intra_op_thread_count" }``;
* ``max_batch_size``, ``dynamic_batching.preferred_batch_size`` and
  ``dynamic_batching.max_queue_delay_microseconds`` (a ``dynamic_batching``
  block is added when a batching candidate needs one). ``model_warmup``
  samples larger than the candidate's ``max_batch_size`` are cut down to it,
  or the load would fail.

Rendering uses protobuf text format (``text_format.MessageToString``), so a
written file parses with :func:`inferstack.repository.config.parse_config_text`;
comments of the original file are not carried over.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from google.protobuf import text_format

from inferstack._proto import model_config_pb2 as mc
from inferstack.analyze.grid import Candidate
from inferstack.repository.config import CONFIG_FILENAME, ModelConfigError, parse_config_text

THREADS_PARAMETER = "intra_op_thread_count"


class OutputExistsError(FileExistsError):
    """An output file exists and ``--overwrite`` was not given."""


def read_original(model_dir: Path) -> tuple[mc.ModelConfig, str | None]:
    """The model's config and its text (None, and an empty config, when there is no config.pbtxt)."""
    path = model_dir / CONFIG_FILENAME
    if not path.is_file():
        return mc.ModelConfig(), None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config_text(text, str(path)), text


def render(original: mc.ModelConfig, candidate: Candidate) -> mc.ModelConfig:
    """``original`` with the candidate's fields replaced (a new message; ``original`` is untouched)."""
    config = copy.deepcopy(original)
    if candidate.original:
        return config
    if config.instance_group:
        group = copy.deepcopy(config.instance_group[0])
        del config.instance_group[:]
        config.instance_group.append(group)
    else:
        group = config.instance_group.add()
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    config.instance_group[0].count = candidate.instances
    if candidate.threads is not None:
        config.parameters[THREADS_PARAMETER].string_value = str(candidate.threads)
    size = candidate.max_batch_size
    if size is None:
        return config
    config.max_batch_size = size
    if size > 1 or config.HasField("dynamic_batching"):
        batching = config.dynamic_batching
        batching.SetInParent()
        del batching.preferred_batch_size[:]
        batching.preferred_batch_size.extend(candidate.preferred)
        if candidate.delay_us is not None and size > 1:
            batching.max_queue_delay_microseconds = candidate.delay_us
    for sample in config.model_warmup:
        sample.batch_size = min(sample.batch_size, size)
    return config


def config_text(config: mc.ModelConfig, header: list[str] | None = None) -> str:
    """Protobuf text format, optionally after ``#`` comment lines."""
    lines = "".join(f"# {line}\n" if line else "#\n" for line in (header or []))
    return lines + text_format.MessageToString(config)


def same_config(a: mc.ModelConfig, b: mc.ModelConfig) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def check_writable(path: Path, overwrite: bool, option: str) -> None:
    """Refuse an existing output file unless ``--overwrite``; checked before the sweep starts."""
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{option} {path} already exists; not overwriting it. Choose another path or add --overwrite.")
    if path.exists() and path.is_dir():
        raise OutputExistsError(f"{option} {path} is a directory")


def write_text(path: Path, text: str, overwrite: bool, option: str = "--output-config") -> None:
    """Write a file; an existing one is replaced only with ``overwrite`` (never silently).

    Without ``overwrite`` the file is created exclusively, so a file that
    appeared since :func:`check_writable` is not clobbered either.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
        except FileExistsError:
            raise OutputExistsError(
                f"{option} {path} already exists; not overwriting it. Choose another path or add --overwrite."
            ) from None
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


__all__ = [
    "THREADS_PARAMETER",
    "OutputExistsError",
    "check_writable",
    "config_text",
    "read_original",
    "render",
    "same_config",
    "write_text",
]
