"""Checkpoint files: :func:`read_checkpoint` reads safetensors, PyTorch zip (torch >= 1.6) and PyTorch
legacy ``.pth`` / ``.bin`` files, told apart by their first bytes (not their names);
:func:`write_safetensors` writes one atomically.

Safetensors (https://github.com/huggingface/safetensors): ``u64 N`` little endian, ``N`` bytes of
JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}``, then the data;
headers are checked by :func:`mtl_jax.merging.safetensors_header.parse_header`. PyTorch files go
through the restricted unpickler of :mod:`mtl_jax.checkpoints.torch_pickle`.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections.abc import Mapping
from typing import Optional

import numpy as np

from mtl_jax.checkpoints.torch_pickle import (
    LEGACY_MAGIC, CheckpointFormatError, read_torch_legacy, read_torch_zip)
from mtl_jax.errors import UsageError
from mtl_jax.merging.safetensors_header import SAFETENSORS_DTYPES, parse_header

FORMATS = ("safetensors", "torch_zip", "torch_legacy")
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_HEAD_BYTES = 64


def checkpoint_format(path: str) -> str:
    """One of :data:`FORMATS`, from the first bytes of the file ``path``.

    Raises CheckpointFormatError (missing file, a directory, or content of no known format)."""
    if os.path.isdir(path):
        raise CheckpointFormatError(f"{path} is a directory; name the weights file inside it "
                                    f"(e.g. model.safetensors or pytorch_model.bin)")
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as e:
        raise CheckpointFormatError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if head.startswith(b"PK\x03\x04"):
        return "torch_zip"
    if head.startswith(b"\x80") and LEGACY_MAGIC.to_bytes(10, "little") in head:
        return "torch_legacy"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"\x80"):
        raise CheckpointFormatError(f"{path} is a pickle but not a torch.save file (no torch magic number)")
    raise CheckpointFormatError(f"{path} is not a checkpoint: neither safetensors, a torch zip nor a "
                                f"legacy torch file (starts with {head[:8]!r})")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of a safetensors file, in header order; the arrays share one writable
    host buffer. Raises SafetensorsFormatError (a UsageError) for a malformed file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        entries, _, data_start = parse_header(path, fd)
        size = os.fstat(fd).st_size - data_start
        buffer = bytearray(size)
        with os.fdopen(os.dup(fd), "rb") as f:
            f.seek(data_start)
            if f.readinto(buffer) != size:
                raise CheckpointFormatError(f"{path} shrank while it was read")
    finally:
        os.close(fd)
    return {name: np.frombuffer(buffer, dtype, count=(end - begin) // dtype.itemsize, offset=begin).reshape(shape)
            for name, (dtype, shape, begin, end) in entries.items()}


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """``{name: np.ndarray}`` of a checkpoint file: safetensors, or a PyTorch state dict saved by
    ``torch.save`` (zip or legacy), told apart by content.

    PyTorch files are read by a restricted unpickler that builds only tensors: any other global
    (code) is refused. A state dict nested under ``state_dict`` / ``model`` / ``module`` (with no
    tensors beside it) is unwrapped; non-tensor values (step counts, strings) are dropped.

    Raises CheckpointFormatError (or SafetensorsFormatError), both UsageErrors naming the file.
    """
    kind = checkpoint_format(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind == "torch_zip":
        return read_torch_zip(path)
    return read_torch_legacy(path)


def _header(state: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]], path: str) -> bytes:
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise UsageError(f"{path}: safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, array in state.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise UsageError(f"{path}: tensor name {name!r} is not allowed (a string other than __metadata__)")
        dtype = _DTYPE_NAMES.get(array.dtype)
        if dtype is None:
            raise UsageError(f"{path}: tensor {name!r} has dtype {array.dtype}, which safetensors cannot "
                             f"hold here (supported: {', '.join(map(str, _DTYPE_NAMES))})")
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    return struct.pack("<Q", len(raw)) + raw


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(path: str, state: Mapping[str, np.ndarray], *, metadata: Optional[Mapping[str, str]] = None,
                      overwrite: bool = False) -> None:
    """Write ``state`` (``{name: array}``, numpy or jax; any dtype of safetensors incl. bfloat16) to
    the safetensors file ``path``: to a hidden temporary sibling, fsynced, then renamed into place,
    so a crash leaves the old file or the new one. An existing ``path`` is refused unless
    ``overwrite``."""
    arrays = {name: np.asarray(a) for name, a in state.items()}
    arrays = {name: a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("=")) for name, a in arrays.items()}
    header = _header(arrays, metadata, path)
    if not overwrite and os.path.lexists(path):
        raise UsageError(f"{path} exists; pass overwrite=True to replace it")
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            f.write(header)
            for a in arrays.values():
                f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile (no clobbering race)
            except FileExistsError:
                raise UsageError(f"{path} exists; pass overwrite=True to replace it") from None
            except OSError:  # a filesystem without hard links
                os.replace(tmp, path)
        _fsync_dir(path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


__all__ = ["FORMATS", "CheckpointFormatError", "checkpoint_format", "read_checkpoint", "read_safetensors",
           "write_safetensors"]
