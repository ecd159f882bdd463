"""PyTorch ``torch.save`` files read without torch: a restricted unpickler that builds only tensors
(as numpy arrays) and plain containers.

Two serialisations (``torch/serialization.py``):

* zip (torch >= 1.6): ``<archive>/data.pkl`` is the pickled object, each tensor a
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` call
  whose storage is the persistent id ``('storage', torch.FloatStorage, key, location, numel)``;
  ``<archive>/data/<key>`` holds that storage's raw bytes, ``<archive>/byteorder`` their order.
* legacy (before 1.6, or ``_use_new_zipfile_serialization=False``): a stream of pickles: the magic
  number :data:`LEGACY_MAGIC`, the protocol version 1001, a sys-info dict (``little_endian``, ...),
  the object (persistent ids ``('storage', type, key, location, numel, view_metadata)``), the list
  of storage keys, then per key an 8-byte little-endian element count and the raw bytes.

The unpickler resolves only the globals in :data:`ALLOWED_GLOBALS` (tensor and parameter rebuild
functions, ``collections.OrderedDict``, the typed ``torch.*Storage`` classes); any other global
(``os.system``, ``builtins.eval``, a module class) is refused before anything runs. Tensors honour
the storage offset, size and stride, and come back as contiguous arrays that own their memory
(bfloat16 via ml_dtypes).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO, Callable, NamedTuple

import ml_dtypes
import numpy as np

from mtl_jax.errors import UsageError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
LEGACY_HEAD = b"\x80\x02\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")  # pickled magic number
UNWRAPPED_KEYS = ("state_dict", "model", "module")  # training checkpoints nest the state dict here

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class CheckpointFormatError(UsageError):
    """A checkpoint file that cannot be read, or holds something other than tensors; the message
    names the file."""


class _Bad(Exception):
    """Internal: a problem in the pickled data, raised as one CheckpointFormatError naming the file."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` etc. unpickle to: only its element dtype matters."""
    name: str
    dtype: np.dtype


class _StorageRef(NamedTuple):
    """Elements ``[start, start + length)`` of the storage ``key`` (a legacy storage view or all of it)."""
    key: str
    dtype: np.dtype
    start: int
    length: int


class _TensorRef(NamedTuple):
    """A tensor before its storage bytes are read: ``storage[offset + sum(i * stride)]``."""
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _is_int(x: Any) -> bool:
    return type(x) is int


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _TensorRef:
    """``torch._utils._rebuild_tensor_v2``: a tensor view of ``storage``."""
    del requires_grad, metadata
    if not isinstance(storage, _StorageRef):
        raise _Bad(f"tensor storage is a {type(storage).__name__}, not a storage")
    if backward_hooks:
        raise _Bad("tensor has backward hooks")
    if not (_is_int(storage_offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(map(_is_int, size + stride))):
        raise _Bad(f"tensor offset / size / stride {storage_offset!r} {size!r} {stride!r} are not integers")
    if storage_offset < 0 or min(size + stride, default=0) < 0:
        raise _Bad(f"tensor offset / size / stride {storage_offset} {size} {stride} are negative")
    if math.prod(size) and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.length:
        raise _Bad(f"tensor of size {size}, stride {stride}, offset {storage_offset} reaches past its "
                   f"storage of {storage.length} elements")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride) -> _TensorRef:
    """``torch._utils._rebuild_tensor`` (torch < 0.4)."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _TensorRef:
    """``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is its tensor here."""
    del requires_grad
    if not isinstance(data, _TensorRef):
        raise _Bad(f"parameter data is a {type(data).__name__}, not a tensor")
    if backward_hooks:
        raise _Bad("parameter has backward hooks")
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None) -> _TensorRef:
    """``torch._utils._rebuild_parameter_with_state``: the attribute ``state`` is dropped."""
    del state
    return _rebuild_parameter(data, requires_grad, backward_hooks)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS`; ``persistent_load`` turns storage ids into
    :class:`_StorageRef` and records each storage's dtype and size in ``storages``."""

    def __init__(self, file: BinaryIO, path: str):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, tuple[np.dtype, int]] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise CheckpointFormatError(f"refusing to unpickle global {module}.{name} in {self.path}: "
                                        f"only tensor state dicts are read")
        return found

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _Bad(f"persistent id {pid!r:.100} is not a tensor storage")
        storage_type, key, _, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise _Bad(f"storage type {storage_type!r:.60} is not a typed torch storage")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise _Bad(f"storage id {pid!r:.100} has no string key and element count")
        known = self.storages.setdefault(key, (storage_type.dtype, numel))
        if known != (storage_type.dtype, numel):
            raise _Bad(f"storage {key!r} is declared twice with different types or sizes")
        if view is None:
            return _StorageRef(key, storage_type.dtype, 0, numel)
        if not (isinstance(view, tuple) and len(view) == 3 and _is_int(view[1]) and _is_int(view[2])
                and 0 <= view[1] and view[1] + view[2] <= numel and view[2] >= 0):
            raise _Bad(f"storage view {view!r:.100} is not (key, offset, size) inside storage {key!r}")
        return _StorageRef(key, storage_type.dtype, view[1], view[2])


def _unpickle(file: BinaryIO, path: str) -> tuple[Any, dict[str, tuple[np.dtype, int]]]:
    unpickler = _Unpickler(file, path)
    return unpickler.load(), unpickler.storages


def _tensor_mapping(obj: Any, path: str) -> dict[str, _TensorRef]:
    """The state dict inside the unpickled ``obj``: its tensor values (a state dict nested alone
    under one of :data:`UNWRAPPED_KEYS` is unwrapped); other values are dropped."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    seen = {id(obj)}  # a pickle may hold a dict that contains itself
    while not any(isinstance(v, _TensorRef) for v in obj.values()):
        inner = next((obj[k] for k in UNWRAPPED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, _TensorRef)}
    if not tensors and obj:
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise CheckpointFormatError(f"{path} holds no tensors at its top level or under "
                                    f"{'/'.join(UNWRAPPED_KEYS)} (keys: {keys})")
    return tensors


def _materialise(tensors: Mapping[str, _TensorRef], storages: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Contiguous arrays (owning their memory) of the tensor views."""
    out = {}
    for name, t in tensors.items():
        base = storages[t.storage.key][t.storage.start:t.storage.start + t.storage.length]
        if math.prod(t.size) == 0:
            out[name] = np.zeros(t.size, base.dtype)
            continue
        view = np.lib.stride_tricks.as_strided(
            base[t.offset:], shape=t.size, strides=[s * base.itemsize for s in t.stride], writeable=False)
        out[name] = np.array(view, order="C")
    return out


def _storage_array(raw: bytes, dtype: np.dtype, numel: int, key: str, big_endian: bool) -> np.ndarray:
    if len(raw) != numel * dtype.itemsize:
        raise _Bad(f"storage {key!r} holds {len(raw)} bytes, {numel} x {dtype} needs {numel * dtype.itemsize}")
    if big_endian and dtype.itemsize > 1:
        return np.frombuffer(raw, f">u{dtype.itemsize}").astype(f"<u{dtype.itemsize}").view(dtype)
    return np.frombuffer(raw, dtype)


def _wrap(path: str, read: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``read()``, with damaged-data errors turned into one CheckpointFormatError naming ``path``."""
    try:
        return read()
    except CheckpointFormatError:
        raise
    except _Bad as e:
        raise CheckpointFormatError(f"{path}: not a readable torch checkpoint: {e}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, KeyError, TypeError,
            ValueError, IndexError, AttributeError, RecursionError) as e:
        raise CheckpointFormatError(f"{path}: damaged torch checkpoint ({type(e).__name__}: {e})") from None


def read_torch_zip(path: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of a zip-serialised ``torch.save`` state dict (torch >= 1.6)."""
    def read() -> dict[str, np.ndarray]:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise _Bad(f"expected one <archive>/data.pkl, found {len(pickles)}")
            prefix = pickles[0][: -len("data.pkl")]
            names = set(archive.namelist())
            order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
            if order not in ("little", "big"):
                raise _Bad(f"byteorder {order!r:.20} is neither 'little' nor 'big'")
            obj, declared = _unpickle(io.BytesIO(archive.read(pickles[0])), path)
            tensors = _tensor_mapping(obj, path)
            storages = {}
            for key in {t.storage.key for t in tensors.values()}:
                dtype, numel = declared[key]
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise _Bad(f"storage {key!r} has no {member}")
                if archive.getinfo(member).file_size != numel * dtype.itemsize:
                    raise _Bad(f"{member} holds {archive.getinfo(member).file_size} bytes, {numel} x "
                               f"{dtype} needs {numel * dtype.itemsize}")
                storages[key] = _storage_array(archive.read(member), dtype, numel, key, order == "big")
            return _materialise(tensors, storages)
    return _wrap(path, read)


def read_torch_legacy(path: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of a legacy-serialised ``torch.save`` state dict (torch < 1.6 or
    ``_use_new_zipfile_serialization=False``)."""
    def read() -> dict[str, np.ndarray]:
        with open(path, "rb") as f:
            magic, _ = _unpickle(f, path)
            if magic != LEGACY_MAGIC:
                raise _Bad("no torch magic number")
            protocol, _ = _unpickle(f, path)
            if protocol != LEGACY_PROTOCOL:
                raise _Bad(f"protocol version {protocol!r:.20}, expected {LEGACY_PROTOCOL}")
            sys_info, _ = _unpickle(f, path)
            big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
            obj, declared = _unpickle(f, path)
            keys, _ = _unpickle(f, path)
            if not isinstance(keys, list) or set(keys) != set(declared) or len(keys) != len(declared):
                raise _Bad("the storage key list does not match the storages the state dict uses")
            tensors = _tensor_mapping(obj, path)
            storages = {}
            for key in keys:
                dtype, numel = declared[key]
                head = f.read(8)
                if len(head) != 8:
                    raise _Bad(f"the file ends before storage {key!r} (truncated?)")
                (count,) = struct.unpack(">q" if big_endian else "<q", head)
                if count != numel:
                    raise _Bad(f"storage {key!r} holds {count} elements, the state dict says {numel}")
                left = os.fstat(f.fileno()).st_size - f.tell()
                if numel * dtype.itemsize > left:
                    raise _Bad(f"storage {key!r} needs {numel * dtype.itemsize} bytes, the file has {left} left (truncated?)")
                raw = f.read(numel * dtype.itemsize)
                storages[key] = _storage_array(raw, dtype, numel, key, big_endian)
            return _materialise(tensors, storages)
    return _wrap(path, read)


__all__ = ["ALLOWED_GLOBALS", "LEGACY_HEAD", "LEGACY_MAGIC", "STORAGE_DTYPES", "UNWRAPPED_KEYS",
           "CheckpointFormatError", "read_torch_legacy", "read_torch_zip"]
