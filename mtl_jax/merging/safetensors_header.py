"""Checked parsing of a safetensors header: every reader of :mod:`mtl_jax.merging.streaming` goes
through :func:`parse_header`.

The file is ``u64 N`` (little endian), ``N`` bytes of UTF-8 JSON, then the data. A file is
refused (:class:`SafetensorsFormatError`, one line naming the file and, where there is one, the
tensor) where the ``safetensors`` library (0.4 - 0.8) refuses it:

* shorter than 8 bytes; ``N > 100_000_000`` (the library's limit); ``8 + N`` past the end;
* a header that is not UTF-8, not JSON (``NaN``, trailing bytes, a lone surrogate escape), not an
  object, or whose ``__metadata__`` is not ``null`` or an object of strings;
* an entry that is not ``{"dtype", "shape", "data_offsets"}``; a dtype outside
  :data:`SAFETENSORS_DTYPES`; a shape that is not a list of integers in ``[0, 2**64)``, or whose
  byte size overflows 64 bits; ``data_offsets`` that are not two such integers;
* tensors that, sorted by ``(begin, end)``, do not tile the data area exactly: each starts where
  the one before ended (no overlap, no gap), ``end - begin`` is the shape's byte size, and the
  last ends at the file's end (a truncated file or trailing bytes are refused).

Stricter than the library (also refused): duplicate keys anywhere, extra fields in an entry,
``-0``, and the dtypes numpy cannot hold here (F4, F6_*, F8_E8M0, C64). The library's own parser
(``safetensors.safe_open``) does not give the data offsets that the zero-copy views need, and
calling it as well as this parser costs more than this parser alone (measured in
``tests/merging/test_safetensors_validation.py``'s module docstring).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Optional

import ml_dtypes
import numpy as np

from mtl_jax.errors import UsageError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE
_U64 = 1 << 64

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_INT = {int}


class SafetensorsFormatError(UsageError):
    """A safetensors file the format does not allow; the message names the file (and tensor)."""


class _Bad(Exception):
    """Internal: a header problem, turned into one SafetensorsFormatError line by parse_header."""


def _object(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Bad(f"duplicate key {dup!r}")
    return out


def _constant(name: str) -> None:
    raise _Bad(f"header is not valid JSON: {name} is not a JSON value")


def _int(text: str) -> int:
    value = int(text)
    return -0.0 if value == 0 and text.startswith("-") else value  # the library reads -0 as a float


def _text(s: Any) -> bool:
    """A JSON string the library can hold (UTF-8: no lone surrogate)."""
    if not isinstance(s, str):
        return False
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _u64s(xs: Any) -> bool:
    """A list of integers in [0, 2**64) (bools and floats are not integers here)."""
    if type(xs) is not list:
        return False
    return not xs or (set(map(type, xs)) == _INT and min(xs) >= 0 and max(xs) < _U64)


def _nbytes(shape: list[int], itemsize: int) -> int:
    """Byte size of ``shape``; ``_U64`` where the library's left-to-right checked product (the
    shape, then the item size) overflows 64 bits."""
    n = math.prod(shape) * itemsize
    if 0 < n < _U64:
        return n
    n = 1
    for d in shape + [itemsize]:
        n *= d
        if n >= _U64:
            return _U64
    return n


def _entry(name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """One tensor's ``(dtype, shape, begin, end)``, checked (but not against the other tensors)."""
    if not _text(name):
        raise _Bad(f"tensor name {name!r} is not valid UTF-8")
    if type(info) is not dict or info.keys() != _FIELDS:
        got = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise _Bad(f"tensor {name!r}: entry must hold exactly dtype, shape, data_offsets (got {got})")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    np_dtype = SAFETENSORS_DTYPES.get(dtype) if type(dtype) is str else None
    if np_dtype is None:
        raise _Bad(f"tensor {name!r}: unsupported dtype {dtype!r}; supported: {', '.join(SAFETENSORS_DTYPES)}")
    if not _u64s(shape):
        raise _Bad(f"tensor {name!r}: shape {shape!r} is not a list of non-negative 64-bit integers")
    if not _u64s(offsets) or len(offsets) != 2:
        raise _Bad(f"tensor {name!r}: data_offsets {offsets!r} is not two non-negative 64-bit integers")
    nbytes = _nbytes(shape, np_dtype.itemsize)
    if nbytes == _U64:
        raise _Bad(f"tensor {name!r}: shape {shape} {dtype} overflows 64 bits")
    begin, end = offsets
    if end - begin != nbytes:
        raise _Bad(f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, shape {shape} {dtype} needs {nbytes}")
    return np_dtype, tuple(shape), begin, end


def _metadata(meta: Any) -> Optional[dict[str, str]]:
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(_text(k) and _text(v) for k, v in meta.items()):
        raise _Bad(f"__metadata__ must be an object of strings, got {meta!r:.80}")
    return meta


def _tile(entries: dict[str, tuple], data_size: int) -> None:
    """Sorted by (begin, end), the tensors must cover ``[0, data_size)`` exactly, one after another."""
    order = sorted(entries, key=lambda n: entries[n][2:])
    pos, prev = 0, None
    for name in order:
        begin, end = entries[name][2:]
        if begin < pos:
            raise _Bad(f"tensor {name!r}: data_offsets [{begin}, {end}] overlap tensor {prev!r} (ends at {pos})")
        if begin > pos:
            raise _Bad(f"tensor {name!r}: data_offsets [{begin}, {end}] leave bytes [{pos}, {begin}) of no tensor")
        pos, prev = end, name
    if pos > data_size:
        raise _Bad(f"tensor {prev!r} ends at data byte {pos}, the file has {data_size} (truncated?)")
    if pos < data_size:
        raise _Bad(f"{data_size - pos} bytes after the last tensor belong to no tensor")


def parse_header(path: str, fd: int) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], Optional[dict[str, str]], int]:
    """Parse and check the header of the open safetensors file ``fd`` (``path`` for messages):
    ``({name: (dtype, shape, begin, end)}, metadata or None, data_start)``, offsets relative to
    ``data_start``. Raises :class:`SafetensorsFormatError`."""
    size = os.fstat(fd).st_size
    try:
        if size < 8:
            raise _Bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > MAX_HEADER_BYTES:
            raise _Bad(f"header length {n} is over the format's limit of {MAX_HEADER_BYTES} bytes")
        if 8 + n > size:
            raise _Bad(f"header length {n} runs past the end of the file ({size} bytes)")
        raw = os.pread(fd, n, 8)
        if len(raw) != n:
            raise _Bad(f"file shrank while its header was read ({len(raw)} of {n} bytes)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(f"header is not UTF-8 (byte {e.start})") from None
        try:
            header = json.loads(text, object_pairs_hook=_object, parse_constant=_constant,
                                parse_int=_int if "-0" in text else None)  # the hook costs 30%
        except ValueError as e:  # JSONDecodeError; int() of a 4300+ digit number
            raise _Bad(f"header is not valid JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(header, dict):
            raise _Bad(f"header must be a JSON object, got {type(header).__name__}")
        metadata = _metadata(header.get("__metadata__"))
        entries = {name: _entry(name, info) for name, info in header.items() if name != "__metadata__"}
        _tile(entries, size - 8 - n)
    except _Bad as e:
        raise SafetensorsFormatError(f"{path}: not a valid safetensors file: {e}") from None
    return entries, metadata, 8 + n


def has_metadata_key(path: str, key: str) -> bool:
    """Whether ``path`` is a valid safetensors file whose ``__metadata__`` holds ``key`` (False for
    anything else: a directory, a missing, unreadable or malformed file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return key in (parse_header(path, fd)[1] or {})
    except (OSError, SafetensorsFormatError):
        return False
    finally:
        os.close(fd)


__all__ = ["MAX_HEADER_BYTES", "SAFETENSORS_DTYPES", "SafetensorsFormatError", "has_metadata_key", "parse_header"]
