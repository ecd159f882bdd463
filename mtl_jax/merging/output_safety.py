"""Where a merge may write, and how it puts its output in place.

Rules (:func:`check_output`, before anything is read or written):

* refused always: an output that is an input, contains an input (a directory holding one, e.g.
  the model pool), lies inside an input (an orbax checkpoint dir), or is the current directory,
  one above it, or ``/``;
* an existing output is replaced only if it is a previous merge output of ours (a safetensors
  file whose ``__metadata__`` has :data:`MARKER_KEY`, an orbax dir holding :data:`MARKER_FILE`)
  or ``overwrite`` is set.

Every output is written to a hidden temporary sibling (``.<name>.partial-<pid>-<random>``, same
directory), fsynced, and renamed into place (:func:`commit`); an output being replaced is
renamed aside first and deleted only once the new one is in place. On failure the temporary is
removed (:func:`discard`); a crash leaves only a hidden ``.partial`` sibling.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Sequence
from typing import Any, Optional

from mtl_jax.errors import UsageError
from mtl_jax.merging.safetensors_header import has_metadata_key

MARKER_KEY = "mtl_jax.merge"  # in the __metadata__ of our safetensors outputs: the method
MARKER_FILE = "mtl_jax_merge.json"  # inside our orbax output dirs


class OutputPathError(UsageError):
    """The output path would destroy or overwrite something not ours to replace."""


def merge_metadata(method: str, metadata: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Safetensors ``__metadata__`` of a merge output: ``metadata`` plus our marker."""
    return {**(metadata or {}), MARKER_KEY: method}


def is_previous_output(path: str) -> bool:
    """True for a safetensors file or orbax dir that a merge of ours wrote (it carries the marker)."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, MARKER_FILE))
    return has_metadata_key(path, MARKER_KEY)


def _inside(child: str, parent: str) -> bool:
    return child != parent and os.path.commonpath([child, parent]) == parent


def _forms(path: str) -> set[str]:
    return {os.path.abspath(path), os.path.realpath(path)}


def check_output(output: str, inputs: Sequence[tuple[str, Any]], overwrite: bool = False) -> None:
    """Raise :class:`OutputPathError` (one line naming the output and what it hits) unless a merge
    may write ``output`` given ``inputs`` (``(label, path)`` pairs; reader objects give their
    ``path``). See the module docstring."""
    output = str(output)
    outs = _forms(output)
    try:
        here = os.path.realpath(os.getcwd())
    except FileNotFoundError:  # the working directory was removed
        here = None
    if here is not None and any(o == here or _inside(here, o) for o in outs):
        raise OutputPathError(f"output '{output}' is the current directory or one above it; name a new path")
    for label, path in inputs:
        path = getattr(path, "path", path)
        if not isinstance(path, (str, os.PathLike)):
            continue
        for i in _forms(str(path)):
            for o in outs:
                if i == o:
                    raise OutputPathError(f"output '{output}' is the input {label} '{path}'; name a new path")
                if _inside(i, o):
                    raise OutputPathError(f"output '{output}' contains the input {label} '{path}'; name a new path")
                if _inside(o, i):
                    raise OutputPathError(f"output '{output}' is inside the input {label} '{path}'; name a new path")
    if os.path.lexists(output) and not overwrite and not is_previous_output(output):
        kind = "directory" if os.path.isdir(output) else "file"
        raise OutputPathError(
            f"output '{output}' is an existing {kind} that is not a previous merge output "
            f"(no '{MARKER_KEY}' metadata / {MARKER_FILE}); pass --overwrite to replace it"
        )


def temp_sibling(path: str, tag: str = "partial") -> str:
    """A hidden, unused name next to ``path``: ``.<name>.<tag>-<pid>-<random>``."""
    head, name = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_path(path: str) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (an orbax checkpoint before its rename)."""
    for root, _, files in os.walk(path):
        for f in files:
            fsync_path(os.path.join(root, f))
        fsync_path(root)


def write_marker(directory: str, method: str) -> None:
    """Mark an orbax output dir as ours (:func:`is_previous_output`)."""
    with open(os.path.join(directory, MARKER_FILE), "w") as f:
        json.dump({"written_by": "mtl_jax merge", "method": method}, f)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def discard(tmp: str) -> None:
    """Remove a temporary output (file or dir) if it is there."""
    _remove(tmp)


def commit(tmp: str, final: str, overwrite: bool = False) -> None:
    """Put the complete, fsynced ``tmp`` at ``final``. A file replaces a file atomically; where a
    directory is involved the old output is renamed aside, the new one renamed in, and the old
    one deleted last. An existing directory that is not ours is replaced only with ``overwrite``
    (else OutputPathError, ``tmp`` removed)."""
    parent = os.path.dirname(os.path.abspath(final))
    if not os.path.lexists(final) or not (os.path.isdir(tmp) or os.path.isdir(final)):
        os.replace(tmp, final)
        fsync_path(parent)
        return
    if os.path.isdir(final) and not os.path.islink(final) and not (overwrite or is_previous_output(final)):
        discard(tmp)
        raise OutputPathError(f"output '{final}' is an existing directory that is not a previous merge output; "
                              "pass --overwrite to replace it")
    aside = temp_sibling(final, "old")
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    fsync_path(parent)
    _remove(aside)


__all__ = ["MARKER_FILE", "MARKER_KEY", "OutputPathError", "check_output", "commit", "discard", "fsync_path",
           "fsync_tree", "is_previous_output", "merge_metadata", "temp_sibling", "write_marker"]
