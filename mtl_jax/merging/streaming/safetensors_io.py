"""Safetensors I/O leaf by leaf: a reader that maps or reads one leaf at a time, and an
incremental writer (header first, then each leaf as it is merged).

Headers are parsed and checked by :func:`mtl_jax.merging.safetensors_header.parse_header` on the
handle the reader keeps, so every leaf lies inside the file and no two overlap; bf16 / fp8 via
ml_dtypes. The writer writes a hidden temporary sibling with ``O_DIRECT`` through an aligned
staging buffer (:class:`DirectAppender`; buffered, :class:`BufferedAppender`, where the file
system refuses it or the output is patched after the pass), fsyncs it and renames it into place
(:mod:`mtl_jax.merging.output_safety`).
"""

from __future__ import annotations

import concurrent.futures
import json
import mmap as mmap_module
import os
import struct
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from mtl_jax.merging.output_safety import commit, discard, temp_sibling
from mtl_jax.merging.safetensors_header import SAFETENSORS_DTYPES, parse_header
from mtl_jax.merging.streaming.planning import LeafSpec

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _header_of(path: str, fd: int) -> tuple[dict[str, tuple[LeafSpec, int, int]], int]:
    entries, _, data_start = parse_header(path, fd)
    return {n: (LeafSpec(n, shape, dtype), b, e) for n, (dtype, shape, b, e) in entries.items()}, data_start


def read_safetensors_header(path: str) -> tuple[dict[str, tuple[LeafSpec, int, int]], int]:
    """Parse and check a safetensors header (:func:`mtl_jax.merging.safetensors_header.parse_header`;
    :class:`SafetensorsFormatError` names the file and tensor): ``({name: (spec, begin, end)},
    data_start)``; offsets relative to ``data_start``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _header_of(str(path), fd)
    finally:
        os.close(fd)


class SafetensorsReader:
    """Leaf-by-leaf reader of one safetensors file (holds a file handle, never the tensors).

    ``read(name)`` returns a fresh array filled with one ``readinto`` (only that leaf is resident);
    with ``mmap=True`` it returns a read-only ``np.memmap`` view (zero copy; the touched file pages
    then count in the process RSS as page cache).
    """

    def __init__(self, path: str, mmap: bool = False):
        self.path = str(path)
        self._file = open(self.path, "rb", buffering=0)  # the header is checked on this handle
        try:
            self._entries, self._data_start = _header_of(self.path, self._file.fileno())
        except BaseException:
            self._file.close()
            raise
        self.specs = {n: e[0] for n, e in self._entries.items()}
        self._mmap = mmap
        self._map: Optional[mmap_module.mmap] = None

    def _mapping(self) -> mmap_module.mmap:
        if self._map is None:
            self._map = mmap_module.mmap(self._file.fileno(), 0, access=mmap_module.ACCESS_READ)
        return self._map

    def _page_range(self, name: str) -> tuple[int, int]:
        _, begin, end = self._entries[name]
        start = (self._data_start + begin) // mmap_module.PAGESIZE * mmap_module.PAGESIZE
        return start, self._data_start + end - start

    def view(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of leaf ``name`` in a mapping of the whole file (the pages come
        from the page cache; :meth:`release` drops them from this process again)."""
        spec, begin, _ = self._entries[name]
        return np.frombuffer(self._mapping(), spec.dtype, spec.size, self._data_start + begin).reshape(spec.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read leaf ``name`` ahead (``MADV_WILLNEED``; returns at once)."""
        if self._entries[name][0].nbytes:
            self._mapping().madvise(mmap_module.MADV_WILLNEED, *self._page_range(name))

    def release(self, name: str) -> None:
        """Unmap the pages of leaf ``name`` from this process (``MADV_DONTNEED`` on a read-only
        file mapping: they stay in the page cache; a later :meth:`view` maps them again)."""
        if self._map is not None and self._entries[name][0].nbytes:
            self._map.madvise(mmap_module.MADV_DONTNEED, *self._page_range(name))

    def read(self, name: str) -> np.ndarray:
        spec, begin, _ = self._entries[name]
        if self._mmap:
            return np.memmap(self.path, spec.dtype, "r", self._data_start + begin, spec.shape)
        buf = np.empty(spec.shape, spec.dtype)
        view = memoryview(buf.reshape(-1).view(np.uint8))
        self._file.seek(self._data_start + begin)
        done = 0
        while done < spec.nbytes:
            got = self._file.readinto(view[done:])
            if not got:
                raise ValueError(f"{self.path}: truncated data for leaf '{name}'")
            done += got
        return buf

    def read_group(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {n: self.read(n) for n in names}

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive: the mapping goes when it does
                pass
            self._map = None
        self._file.close()


def _safetensors_header_bytes(specs: Sequence[LeafSpec], metadata: Optional[dict[str, str]]) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data start aligned to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class DirectAppender:
    """Sequential file writes with ``O_DIRECT`` (no page cache for the output) through two aligned
    staging buffers: ``append`` copies bytes into one and hands every full ``STAGE`` to an I/O
    thread, which writes it while the next is filled (the copy overlaps the write); the partial
    tail block is written padded (``sync``) and trimmed by ``finish``. Writing the output through
    the page cache would allocate one fresh page per 4 KiB written (slow on a VM whose free memory
    is handed back to the host) and, for merges larger than memory, evict the inputs from the
    cache. ``open_direct`` returns None where the file system refuses ``O_DIRECT`` (tmpfs)."""

    BLOCK = 4096
    STAGE = 8 << 20

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path
        raw = np.empty(2 * self.STAGE + self.BLOCK, np.uint8)
        start = -raw.ctypes.data % self.BLOCK
        self._raw = raw
        self._stages = [raw[start + i * self.STAGE : start + (i + 1) * self.STAGE] for i in range(2)]  # block-aligned
        self.stage = self._stages[0]
        self.pos = 0  # file offset of stage[0] (a multiple of BLOCK)
        self.fill = 0
        self._scratch: Optional[np.ndarray] = None
        self._io: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._writing: Optional[concurrent.futures.Future] = None  # the write of the other stage

    @classmethod
    def open_direct(cls, path: str) -> Optional["DirectAppender"]:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        except OSError:
            return None
        appender = cls(fd, path)
        try:  # some file systems accept the flag at open and refuse the first write
            appender._write_blocks(1)
        except OSError:
            os.close(fd)
            return None
        return appender

    def _aligned(self, num_bytes: int) -> int:
        return -(-num_bytes // self.BLOCK) * self.BLOCK

    def _pwrite(self, buf: np.ndarray, offset: int) -> None:
        view, done = memoryview(buf), 0
        while done < buf.size:
            done += os.pwrite(self.fd, view[done:], offset + done)

    def _write_blocks(self, num_bytes: int) -> None:
        """Write ``stage[:num_bytes]`` rounded up to whole blocks (zero padding) at ``pos``."""
        size = self._aligned(num_bytes)
        self.stage[num_bytes:size] = 0
        self._pwrite(self.stage[:size], self.pos)

    def _wait(self) -> None:
        """Wait for the write in flight (re-raising its error)."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()

    def _close_io(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None

    def append(self, data: np.ndarray) -> None:
        data = data.reshape(-1).view(np.uint8)
        i = 0
        while i < data.size:
            k = min(data.size - i, self.STAGE - self.fill)
            self.stage[self.fill : self.fill + k] = data[i : i + k]
            self.fill, i = self.fill + k, i + k
            if self.fill == self.STAGE:  # write it in the background; fill the other stage
                self._wait()
                if self._io is None:
                    self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mtl_jax-direct-write")
                self._writing = self._io.submit(self._pwrite, self.stage, self.pos)
                self.stage = self._stages[1] if self.stage is self._stages[0] else self._stages[0]
                self.pos, self.fill = self.pos + self.STAGE, 0

    def sync(self) -> None:
        """Finish the write in flight and put the staged tail on disk too (padded; it is rewritten
        when more is appended)."""
        self._wait()
        if self.fill:
            self._write_blocks(self.fill)

    def _read_into(self, buf: np.ndarray, offset: int) -> None:
        view, done = memoryview(buf), 0
        while done < buf.size:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if not got:
                break
            done += got

    def patch(self, offset: int, dtype: np.dtype, flat_index: np.ndarray, values: np.ndarray) -> None:
        """Overwrite entries ``flat_index`` of the ``dtype`` array written at byte ``offset``: a
        read-modify-write of the blocks holding them, ``STAGE`` bytes at a time (the written
        blocks are not in the page cache, so a mapping would read them one page at a time)."""
        dtype = np.dtype(dtype)
        order = np.argsort(flat_index, kind="stable")
        where = offset + np.asarray(flat_index, np.int64)[order] * dtype.itemsize
        data = np.ascontiguousarray(np.asarray(values)[order].astype(dtype)).view(np.uint8).reshape(-1, dtype.itemsize)
        self.sync()
        end = self._aligned(self.pos + self.fill)
        if self._scratch is None:  # one window: entries starting in STAGE bytes, + a block for the last one's end
            raw = np.empty(self.STAGE + 2 * self.BLOCK, np.uint8)
            self._scratch = raw[-raw.ctypes.data % self.BLOCK :][: self.STAGE + self.BLOCK]
        lanes, i = np.arange(dtype.itemsize), 0
        while i < len(where):
            start = int(where[i]) // self.BLOCK * self.BLOCK
            j = int(np.searchsorted(where, start + self.STAGE))
            buf = self._scratch[: min(start + self.STAGE + self.BLOCK, end) - start]
            self._read_into(buf, start)
            buf[(where[i:j] - start)[:, None] + lanes] = data[i:j]
            self._pwrite(buf, start)
            i = j
        if self.fill:  # the staged tail may hold patched entries
            self._read_into(self.stage[: self._aligned(self.fill)], self.pos)

    def seek(self, offset: int, prefix: bytes) -> None:
        """Continue writing at ``offset``; ``prefix`` is the file's first ``offset`` bytes."""
        self._wait()
        self.pos, self.fill = 0, 0
        self.append(np.frombuffer(prefix[:offset], np.uint8))

    def finish(self) -> None:
        try:
            self.sync()
        finally:
            self._close_io()
        os.ftruncate(self.fd, self.pos + self.fill)
        os.fsync(self.fd)
        os.close(self.fd)

    def discard(self) -> None:
        try:
            self._wait()
        except OSError:
            pass  # the file is removed anyway
        finally:
            self._close_io()
            os.close(self.fd)


class BufferedAppender:
    """:class:`DirectAppender`'s interface over a plain buffered file (the page cache): where
    ``O_DIRECT`` is refused, and for outputs patched after the pass (:data:`PATCHED_OUTPUT`)."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "wb")

    def append(self, data: np.ndarray) -> None:
        self._file.write(memoryview(data.reshape(-1).view(np.uint8)))

    def patch(self, offset: int, dtype: np.dtype, flat_index: np.ndarray, values: np.ndarray) -> None:
        """Overwrite entries ``flat_index`` of the ``dtype`` array written at byte ``offset``, then
        start writing the patched range back (``POSIX_FADV_DONTNEED`` starts the writeback of dirty
        pages without waiting for it): the disk writes it while the caller patches the next leaf,
        and :meth:`finish`'s ``fsync`` has less left to do."""
        self._file.flush()
        size = int(np.max(flat_index)) + 1
        leaf = np.memmap(self.path, dtype, "r+", offset, (size,))
        leaf[flat_index] = np.asarray(values).astype(dtype)
        del leaf  # the shared mapping's dirty pages go to the file through the page cache
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), offset, size * np.dtype(dtype).itemsize, os.POSIX_FADV_DONTNEED)

    def seek(self, offset: int, prefix: bytes) -> None:
        self._file.seek(offset)

    def finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()


class SafetensorsWriter:
    """Incremental safetensors writer: the header (all offsets) is written first, then each leaf in
    ``specs`` order as soon as it is merged. Writes a hidden temporary sibling
    (:func:`mtl_jax.merging.output_safety.temp_sibling`), fsyncs it and renames it over ``path``
    on close (:func:`mtl_jax.merging.output_safety.commit`: a file is replaced atomically; a
    directory only with ``overwrite`` or if it is a previous merge output). ``direct`` (default):
    ``O_DIRECT`` writes (:class:`DirectAppender`) where the file system takes them, else buffered
    ones (:class:`BufferedAppender`)."""

    def __init__(self, path: str, specs: Sequence[LeafSpec], metadata: Optional[dict[str, str]] = None,
                 direct: bool = True, overwrite: bool = False):
        self.path = str(path)
        self._specs = list(specs)
        self._next = 0
        self._overwrite = overwrite
        self._tmp = temp_sibling(self.path)
        self._header = _safetensors_header_bytes(self._specs, metadata)
        self._out = None
        try:
            self._out = (DirectAppender.open_direct(self._tmp) if direct else None) or BufferedAppender(self._tmp)
            self._out.append(np.frombuffer(self._header, np.uint8))
        except BaseException:
            self.abort()
            raise
        self._offsets, offset = {}, len(self._header)
        for spec in self._specs:
            self._offsets[spec.name] = offset
            offset += spec.nbytes

    def write(self, name: str, array: Any) -> None:
        spec = self._specs[self._next]
        if name != spec.name:
            raise ValueError(f"leaves must be written in order: expected '{spec.name}', got '{name}'")
        arr = np.ascontiguousarray(np.asarray(array).astype(spec.dtype, copy=False))
        if arr.shape != spec.shape:
            raise ValueError(f"leaf '{name}': writing shape {arr.shape}, header says {spec.shape}")
        self._out.append(arr)
        self._next += 1

    def patch(self, name: str, flat_index: np.ndarray, values: np.ndarray) -> None:
        """Overwrite entries ``flat_index`` (C order) of an already written leaf with ``values``."""
        if len(flat_index):
            spec = next(s for s in self._specs if s.name == name)
            self._out.patch(self._offsets[name], spec.dtype, flat_index, values)

    def rewind(self) -> None:
        """Start again from the first leaf (a second attempt overwrites the first in place)."""
        self._out.seek(self._offsets[self._specs[0].name] if self._specs else len(self._header), self._header)
        self._next = 0

    def close(self) -> None:
        if self._next != len(self._specs):
            self.abort()
            raise ValueError(f"{self.path}: only {self._next} of {len(self._specs)} leaves written")
        try:
            self._out.finish()  # fsyncs the file
            self._out = None
            commit(self._tmp, self.path, self._overwrite)  # renames, fsyncs the directory
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and remove the temporary file: nothing of this output remains."""
        if self._out is not None:
            self._out.discard()
            self._out = None
        discard(self._tmp)


def save_safetensors(tree: dict[str, Any], path: str, metadata: Optional[dict[str, str]] = None) -> None:
    """Write a flat ``{name: array}`` dict as safetensors (sorted names; bf16 kept as BF16)."""
    arrays = {n: np.asarray(tree[n]) for n in sorted(tree)}
    writer = SafetensorsWriter(path, [LeafSpec(n, a.shape, a.dtype) for n, a in arrays.items()], metadata)
    for n, a in arrays.items():
        writer.write(n, a)
    writer.close()


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read a whole safetensors file into a flat ``{name: array}`` dict (bf16 via ml_dtypes)."""
    reader = SafetensorsReader(path)
    try:
        return reader.read_group(sorted(reader.specs))
    finally:
        reader.close()
