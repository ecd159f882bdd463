"""Streaming model merging: checkpoints are read and the merged model written leaf by leaf.

A merge of T fine-tuned models then needs memory for about one leaf per input plus the output
leaf, not T + 1 whole models. Two kinds of per-leaf code:

* numpy kernels over chunks of ``CHUNK`` entries (weight averaging, task arithmetic, DARE with
  ``combine="ta"``, Consensus TA, global TIES): the inputs are zero-copy views of the mapped
  safetensors files, every temporary lives in a reused (T, CHUNK) workspace per worker thread
  (a leaf's chunks are split over ``threads`` workers; numpy releases the GIL in its loops), and
  each output leaf is written with one write by a writer thread while the next leaf is
  computed. They repeat the in-memory code's arithmetic operation for operation (tests:
  streaming == in-memory, and the same bytes for any number of threads);
* the in-memory jitted code of this package called on small ``{name: leaf}`` groups (per-tensor
  TIES, DARE-TIES, Consensus TIES, LiNeS).

Per-leaf methods read every input once. Methods with model-wide statistics:

  - global TIES (Yadav et al. 2023), exact, usually two passes: a sample pass reads every p-th
    entry (p >= 64 prime; ~1M entries per task at 100M parameters) and brackets each task's k-th
    largest |tau_t| by binomial order-statistic bounds (:func:`sampled_bracket`). The output pass
    then writes every position where no task has an entry inside its bracket (an entry outside
    is kept or dropped as by the exact threshold), keeps the others aside (or an exactly
    cancelling trimmed sum, where the model-wide majority sign decides), and counts exactly the
    entries above each bracket: if every threshold is inside its bracket, the bracket entries
    give the exact thresholds and the kept-aside positions are patched in; if one is not (or the
    model is too small for a useful sample), the output is rewritten from exact histogram
    buckets (pass 1 histograms the float32 bit pattern of every |tau_t|, ``bits >> 14``, exact
    int64 counts; monotone for non-negative floats, as in
    :func:`mtl_jax.merging.threshold.kth_largest_abs`). Same value and tie rule (keep
    ``|x| >= v_k``; NaN ranks above inf and is never kept) as the in-memory code
    (:func:`stream_ties_global`);
  - the TIES threshold alone for Consensus TIES / LiNeS: the sample pass and a pass that counts
    above and keeps the bracket entries (histogram first when the bracket misses)
    (:func:`ties_thresholds`), and a majority-sign pass (also for per-tensor TIES and DARE-TIES);
  - the LiNeS L1 norms ``||sum_t tau_t||_1`` and ``||tau_merged||_1`` (one pass).

Leaves are visited in sorted-name order, the order ``jax.tree_util`` gives a flat ``{name:
array}`` dict (what ``safetensors.numpy.load_file`` returns), so DARE's per-leaf masks
(:func:`mtl_jax.merging.ties.dare_keep`, leaf index i) and every result equal the in-memory merge
of the loaded flat dicts.

Formats: safetensors files (header parsed and checked by
:func:`mtl_jax.merging.safetensors_header.parse_header` on the handle the reader keeps, so every
leaf lies inside the file and no two overlap; the kernels map the file and drop each leaf's
pages from the process after use, ``read`` gives a fresh buffer filled by ``readinto``, or a
``np.memmap`` view with ``mmap=True``; bf16/fp8 via ml_dtypes) and orbax PyTree checkpoints
(metadata for shapes, then a partial restore of just the leaves of a group). Output:
safetensors written incrementally (header first, then each leaf as it is merged; with
``O_DIRECT`` through an aligned staging buffer, :class:`DirectAppender`, except for global TIES,
whose patches are cheaper on cached pages), or orbax (the output tree is collected and saved at
the end, so that format holds one output model in memory). Both are written to a hidden
temporary sibling, fsynced and renamed into place (:mod:`mtl_jax.merging.output_safety`, which
also says which output paths :func:`stream_merge` refuses).

Inputs holding NaN / inf are refused as they are read (:mod:`mtl_jax.merging.input_checks`)
unless ``allow_nonfinite=True``.

``memory_budget`` (bytes) groups consecutive leaves whose estimated working set
(:func:`leaf_working_set`) fits (orbax reads and jitted cores work per group; the numpy kernels
need less); a leaf that alone does not fit raises ``UsageError`` naming it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import mmap as mmap_module
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mtl_jax.errors import UsageError
from mtl_jax.merging.arithmetic import (
    per_task_weights,
    task_arithmetic,
    task_arithmetic_vector,
    weight_average,
)
from mtl_jax.merging.input_checks import FiniteCheck, check_hparams, check_inputs_exist
from mtl_jax.merging.lines import check_has_blocks, lines_scale
from mtl_jax.merging.masks import consensus_mask, consensus_merging, tall_masks
from mtl_jax.merging.output_safety import (
    check_output,
    commit,
    discard,
    fsync_tree,
    merge_metadata,
    temp_sibling,
    write_marker,
)
from mtl_jax.merging.safetensors_header import SAFETENSORS_DTYPES, parse_header
from mtl_jax.merging.safetensors_header import SafetensorsFormatError  # noqa: F401 (re-exported)
from mtl_jax.merging.task_vectors import (
    apply_task_vector,
    stacked_task_vectors,
    tree_l1_norm,
    tree_sum_tasks,
)
from mtl_jax.merging.threshold import (
    _INF_BITS,
    _threshold_mask,
    num_kept,
    topk_trim,
)
from mtl_jax.merging.ties import dare_keep, disjoint_mean
from mtl_jax.merging.tree import LayerIndexFn, default_layer_index

# ------------------------------------------------------------------------------ safetensors I/O

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """Name, shape and dtype of one checkpoint leaf (no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


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
    """Sequential file writes with ``O_DIRECT`` (no page cache for the output) through an aligned
    staging buffer: ``append`` copies bytes in and writes every full ``STAGE`` at once; the partial
    tail block is written padded (``sync``) and trimmed by ``finish``. Writing the output through
    the page cache allocates one fresh page per 4 KiB written; on a VM whose free memory is handed
    back to the host that made the 400 MB output of the 100M x 8 benchmark cost 1-1.4 s against 0.3 s
    direct, and for merges larger than memory it evicts the inputs from the cache.
    ``open_direct`` returns None where the file system refuses ``O_DIRECT`` (tmpfs)."""

    BLOCK = 4096
    STAGE = 8 << 20

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path
        raw = np.empty(self.STAGE + self.BLOCK, np.uint8)
        start = -raw.ctypes.data % self.BLOCK
        self._raw, self.stage = raw, raw[start : start + self.STAGE]  # block-aligned address
        self.pos = 0  # file offset of stage[0] (a multiple of BLOCK)
        self.fill = 0
        self._scratch: Optional[np.ndarray] = None

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

    def append(self, data: np.ndarray) -> None:
        data = data.reshape(-1).view(np.uint8)
        i = 0
        while i < data.size:
            k = min(data.size - i, self.STAGE - self.fill)
            self.stage[self.fill : self.fill + k] = data[i : i + k]
            self.fill, i = self.fill + k, i + k
            if self.fill == self.STAGE:
                self._write_blocks(self.STAGE)
                self.pos, self.fill = self.pos + self.STAGE, 0

    def sync(self) -> None:
        """Put the staged tail on disk too (padded; it is rewritten when more is appended)."""
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
        self.pos, self.fill = 0, 0
        self.append(np.frombuffer(prefix[:offset], np.uint8))

    def finish(self) -> None:
        self.sync()
        os.ftruncate(self.fd, self.pos + self.fill)
        os.fsync(self.fd)
        os.close(self.fd)

    def discard(self) -> None:
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
        """Overwrite entries ``flat_index`` of the ``dtype`` array written at byte ``offset``."""
        self._file.flush()
        leaf = np.memmap(self.path, dtype, "r+", offset, (int(np.max(flat_index)) + 1,))
        leaf[flat_index] = np.asarray(values).astype(dtype)
        del leaf  # the shared mapping's dirty pages go to the file through the page cache

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


# ---------------------------------------------------------------------------------- orbax I/O


class OrbaxReader:
    """Leaf-by-leaf reader of an orbax PyTree checkpoint directory: shapes/dtypes from its
    metadata, data by a partial restore of only the requested leaves (as numpy arrays). Leaf names
    are the '/'-joined key paths (:func:`mtl_jax.merging.tree.path_to_str`)."""

    def __init__(self, path: str):
        import orbax.checkpoint as ocp

        from mtl_jax.merging.tree import path_to_str

        self.path = os.path.abspath(str(path))
        self._ocp = ocp
        self._ckptr = ocp.PyTreeCheckpointer()
        meta = self._ckptr.metadata(self.path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        self._keys: dict[str, tuple] = {}
        self.specs: dict[str, LeafSpec] = {}
        for keypath, m in leaves:
            name = path_to_str(keypath)
            self._keys[name] = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keypath)
            self.specs[name] = LeafSpec(name, tuple(m.shape), np.dtype(m.dtype))

    def read_group(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        item: dict = {}
        for n in names:
            node = item
            *parents, last = self._keys[n]
            for k in parents:
                node = node.setdefault(k, {})
            node[last] = 0
        restore_args = jax.tree_util.tree_map(lambda _: self._ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = self._ckptr.restore(
            self.path,
            args=self._ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
        out = {}
        for n in names:
            node = restored
            for k in self._keys[n]:
                node = node[k]
            out[n] = np.asarray(node)
        return out

    def read(self, name: str) -> np.ndarray:
        return self.read_group([name])[name]

    def close(self) -> None:
        self._ckptr.close()


class OrbaxWriter:
    """Collects the merged leaves and saves them as one orbax PyTree checkpoint on close (this
    output format holds the output model in memory). Names are split on '/' into nested dicts.
    Saved into a hidden temporary sibling dir with the marker file of a merge output
    (:func:`mtl_jax.merging.output_safety.write_marker`), fsynced and renamed over ``path``
    (a previous merge output there, or anything with ``overwrite``, is replaced only once the new
    checkpoint is complete)."""

    def __init__(self, path: str, specs: Sequence[LeafSpec], overwrite: bool = False, method: str = ""):
        self.path = os.path.abspath(str(path))
        self._specs = {s.name: s for s in specs}
        self._tree: dict = {}
        self._overwrite, self._method = overwrite, method

    def write(self, name: str, array: Any) -> None:
        node = self._tree
        *parents, last = name.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = np.array(array, dtype=self._specs[name].dtype)  # a copy: callers reuse buffers

    def patch(self, name: str, flat_index: np.ndarray, values: np.ndarray) -> None:
        """Overwrite entries ``flat_index`` (C order) of an already written leaf with ``values``."""
        node = self._tree
        for k in name.split("/"):
            node = node[k]
        node.reshape(-1)[flat_index] = np.asarray(values).astype(node.dtype)

    def rewind(self) -> None:
        """Start again from the first leaf."""
        self._tree = {}

    def close(self) -> None:
        import orbax.checkpoint as ocp

        tmp = temp_sibling(self.path)
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                ckptr.save(tmp, args=ocp.args.PyTreeSave(self._tree))  # a new path: nothing is replaced
            write_marker(tmp, self._method)
            fsync_tree(tmp)
            commit(tmp, self.path, self._overwrite)
        except BaseException:
            discard(tmp)
            raise
        finally:
            self._tree = {}

    def abort(self) -> None:
        self._tree = {}


def open_checkpoint(path: Any, mmap: bool = False):
    """Reader for ``path``: a ``.safetensors`` file or an orbax checkpoint directory (a reader
    object is returned as is)."""
    if hasattr(path, "read_group"):
        return path
    path = str(path)
    if os.path.isdir(path):
        return OrbaxReader(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    return SafetensorsReader(path, mmap=mmap)


def output_format_of(path: str, output_format: Optional[str] = None) -> str:
    """'safetensors' or 'orbax': explicit, else from the extension (``.safetensors``)."""
    fmt = output_format or ("safetensors" if str(path).endswith(".safetensors") else "orbax")
    if fmt not in ("safetensors", "orbax"):
        raise UsageError(f"unknown output format {fmt!r}; valid: 'orbax', 'safetensors'")
    return fmt


# ------------------------------------------------------------------------------ leaf grouping

# fp32-sized (T, *leaf) arrays alive at the peak of a group's merge (task vectors, trimmed copy,
# bit patterns, masks and eager temporaries; TIES is the largest), in units of T * size * 4 bytes.
FP32_STACK_COPIES = 6


def leaf_working_set(specs: Sequence[LeafSpec], out_dtype: np.dtype) -> int:
    """Estimated peak bytes to merge one leaf, given its spec in each of the T + 1 inputs
    (pretrained first): the input leaves, ``FP32_STACK_COPIES`` fp32 (T, ...) stacks, the fp32
    result and the result in ``out_dtype``. Not counted: fixed costs independent of the leaves
    (the TIES histograms, T x 65536 int64, and the runtime's compiled kernels)."""
    n, num_tasks = specs[0].size, len(specs) - 1
    inputs = sum(s.nbytes for s in specs)
    return inputs + n * (4 * num_tasks * FP32_STACK_COPIES + 4 + np.dtype(out_dtype).itemsize)


def plan_groups(names: Sequence[str], working_sets: Sequence[int], memory_budget: Optional[int]) -> list[list[str]]:
    """Split leaves (in order) into consecutive groups whose summed working set fits
    ``memory_budget`` bytes (None: one leaf per group). ValueError names a leaf that alone
    exceeds the budget."""
    if memory_budget is None:
        return [[n] for n in names]
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, ws in zip(names, working_sets):
        if ws > memory_budget:
            raise UsageError(
                f"leaf '{name}' needs about {ws} bytes to merge, more than memory_budget={memory_budget}"
            )
        if current and used + ws > memory_budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += ws
    if current:
        groups.append(current)
    return groups


def dtype_class(dtype: Any) -> str:
    """'float' (bf16 / f16 / f32 / f64 alike), 'int', 'bool' or the numpy kind: leaves of one class merge."""
    for name, kind in (("bool", jnp.bool_), ("float", jnp.floating), ("int", jnp.integer)):
        if jnp.issubdtype(dtype, kind):
            return name
    return np.dtype(dtype).kind


def check_specs(readers: Sequence[Any], labels: Sequence[str]) -> list[str]:
    """Sorted leaf names shared by all readers; UsageError naming the first leaf whose names,
    shape or dtype kind differ and both files (``labels``: e.g. 'pretrained', 'finetuned[0]')."""
    ref = readers[0].specs
    names = sorted(ref)
    for reader, label in zip(readers[1:], labels[1:]):
        files = f"({getattr(readers[0], 'path', labels[0])} vs {getattr(reader, 'path', label)})"
        missing = [n for n in names if n not in reader.specs]
        extra = sorted(n for n in reader.specs if n not in ref)
        if missing or extra:
            raise UsageError(f"leaf names differ between {labels[0]} and {label}: missing {missing[:5]}, "
                             f"unexpected {extra[:5]} {files}")
        for n in names:
            a, b = ref[n], reader.specs[n]
            if a.shape != b.shape:
                raise UsageError(f"shape mismatch at '{n}': {labels[0]} {a.shape} vs {label} {b.shape} {files}")
            if dtype_class(a.dtype) != dtype_class(b.dtype):
                raise UsageError(f"dtype mismatch at '{n}': {labels[0]} {np.dtype(a.dtype).name} vs {label} "
                                 f"{np.dtype(b.dtype).name} {files}")
    return names


# ------------------------------------------------------------------------------- the stream


@dataclasses.dataclass
class Stream:
    """The inputs of one streaming merge and its leaf groups (readers hold file handles only)."""

    pretrained: Any
    finetuned: list
    names: list[str]
    groups: list[list[str]]
    progress: bool = False
    passes: int = 0
    threads: int = 1
    memory_budget: Optional[int] = None
    finite: Optional[FiniteCheck] = None  # refuse non-finite input values (None: allow them)

    @property
    def num_tasks(self) -> int:
        return len(self.finetuned)

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def iterate(self, desc: str) -> Iterator[tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]]:
        """One pass over the inputs: yields ``(pretrained_group, [finetuned_group_t])`` flat dicts."""
        self.passes += 1
        bar = tqdm(total=len(self.names), desc=desc, unit="leaf", disable=not self.progress, leave=False)
        try:
            for group in self.groups:
                p0, fts = self.pretrained.read_group(group), [r.read_group(group) for r in self.finetuned]
                if self.finite is not None:
                    self.finite.group(p0, fts)
                yield p0, fts
                bar.update(len(group))
        finally:
            bar.close()


def _host(tree: dict[str, Any]) -> dict[str, np.ndarray]:
    return {n: np.asarray(x) for n, x in tree.items()}


# ------------------------------------------------------------------ jitted per-group cores
#
# A core is ``core(p0, fts, offset, dyn, hp) -> {name: array}``: p0 / fts[t] are flat dicts of one
# group of leaves, ``offset`` the (traced) index of its first leaf, ``dyn`` a dict of traced
# model-wide statistics (TIES thresholds, majority sign, DARE key), ``hp`` static hyperparameters
# (a hashable tuple of items). Cores are jitted once at import; :func:`run_core` renames the leaves
# by position so that groups with the same shapes share one compiled program across leaves and
# across merges.


def hparams_key(**hp: Any) -> tuple:
    """Hashable static hyperparameters (sequences become tuples)."""
    fix = lambda v: tuple(np.asarray(v).reshape(-1).tolist()) if isinstance(v, (list, tuple, np.ndarray)) else v
    return tuple(sorted((k, fix(v)) for k, v in hp.items()))


def trim_with_threshold(stacked: dict[str, jax.Array], thresholds: jax.Array) -> dict[str, jax.Array]:
    """TIES trim with given per-task thresholds (T,): keep ``|tau_t| >= thr_t`` (as ``topk_trim``)."""
    thr = jnp.asarray(thresholds)
    return {n: jnp.where(_threshold_mask(x, thr, True), x, jnp.zeros_like(x)) for n, x in stacked.items()}


def elect_sign_with_majority(trimmed: dict[str, jax.Array], majority: Any) -> dict[str, jax.Array]:
    """TIES elect step (:func:`mtl_jax.merging.ties.elect_sign`) with the model-wide majority sign
    given (computed over all leaves by :func:`majority_sign`)."""
    out = {}
    for n, x in trimmed.items():
        s = jnp.sign(jnp.sum(x, axis=0))
        out[n] = jnp.where(s == 0, jnp.asarray(majority, s.dtype), s)
    return out


def dare_drop_leaf(key: jax.Array, index: Any, x: jax.Array, p: float) -> jax.Array:
    """Leaf ``index`` of :func:`mtl_jax.merging.ties.dare_drop` (Yu et al. 2024): the same
    Bernoulli mask ``bernoulli(fold_in(key, index), 1 - p)`` on the (T, ...) leaf, survivors scaled
    by ``1 / (1 - p)``."""
    n = int(np.prod(x.shape[1:], dtype=np.int64))
    keep = dare_keep(key, index, x.shape[0], jnp.arange(n, dtype=jnp.uint32), p).reshape(x.shape)
    return jnp.where(keep, x / (1.0 - p), jnp.zeros_like(x))


def _trimmed(p0, fts, offset, dyn, hp):
    """Stacked task vectors (T, ...) after the method's sparsification ``hp["trim"]``: "global"
    (TIES, thresholds in dyn), "per_tensor" (TIES per leaf), "dare" (key in dyn) or "none"."""
    tau = stacked_task_vectors(fts, p0)
    kind = hp["trim"]
    if kind == "global":
        return trim_with_threshold(tau, dyn["thresholds"])
    if kind == "per_tensor":
        return topk_trim(tau, hp["top_k"], batched=True, per_tensor=True)
    if kind == "dare":
        return {n: dare_drop_leaf(dyn["key"], offset + i, x, hp["p"]) for i, (n, x) in enumerate(tau.items())}
    return tau


def _ties_vector(p0, fts, offset, dyn, hp):
    trimmed = _trimmed(p0, fts, offset, dyn, hp)
    return disjoint_mean(trimmed, elect_sign_with_majority(trimmed, dyn["majority"]))


def _core_sign_sums(p0, fts, offset, dyn, hp):
    trimmed = _trimmed(p0, fts, offset, dyn, hp)
    return {n: jnp.sum(jnp.sign(jnp.sum(x, axis=0)), dtype=jnp.int32) for n, x in trimmed.items()}


def _core_ties(p0, fts, offset, dyn, hp):
    return apply_task_vector(p0, _ties_vector(p0, fts, offset, dyn, hp), hp["lam"])


def _core_consensus_ties(p0, fts, offset, dyn, hp):
    tau, mtl = stacked_task_vectors(fts, p0), _ties_vector(p0, fts, offset, dyn, hp)
    cons = consensus_mask(tall_masks(tau, mtl, hp["tall_lambda"]), hp["k"])
    return apply_task_vector(p0, {n: jnp.where(cons[n], mtl[n], 0.0) for n in mtl}, hp["lam"])


def _core_merged_vector(p0, fts, offset, dyn, hp):
    """LiNeS tau_merged: ``sum_t tau_t`` (base "ta") or the TIES vector."""
    if hp["base"] == "ta":
        return tree_sum_tasks(stacked_task_vectors(fts, p0))
    return _ties_vector(p0, fts, offset, dyn, hp)


def _core_lines_norms(p0, fts, offset, dyn, hp):
    """Per leaf (``||sum_t tau_t||_1``, ``||tau_merged||_1``) as fp32 scalars."""
    summed, merged = tree_sum_tasks(stacked_task_vectors(fts, p0)), _core_merged_vector(p0, fts, offset, dyn, hp)
    return {n: jnp.stack([tree_l1_norm([summed[n]]), tree_l1_norm([merged[n]])]) for n in p0}


def _jit_core(fn: Callable) -> Callable:
    return jax.jit(lambda p0, fts, offset, dyn, hp: fn(p0, fts, offset, dyn, dict(hp)), static_argnames=("hp",))


CORES: dict[str, Callable] = {
    name: _jit_core(fn)
    for name, fn in {
        "sign_sums": _core_sign_sums,
        "ties": _core_ties,
        "consensus_ties": _core_consensus_ties,
        "merged_vector": _core_merged_vector,
        "lines_norms": _core_lines_norms,
    }.items()
}


def run_core(core: str, p0: dict, fts: list, offset: int, dyn: dict, hp: tuple) -> dict[str, jax.Array]:
    """Run the jitted core on one group with positional leaf names; results keyed by leaf name."""
    names = list(p0)
    pos = lambda d: {f"{i:08d}": d[n] for i, n in enumerate(names)}
    out = CORES[core](pos(p0), [pos(f) for f in fts], jnp.asarray(offset, jnp.int32), dyn, hp=hp)
    return {n: out[f"{i:08d}"] for i, n in enumerate(names)}


def run_pass(stream: Stream, desc: str, core: str, dyn: dict, hp: tuple) -> Iterator[tuple[dict, dict]]:
    """One pass over the inputs; yields ``(pretrained_group, core result)`` per group."""
    offset = 0
    for p0, fts in stream.iterate(desc):
        yield p0, run_core(core, p0, fts, offset, dyn, hp)
        offset += len(p0)


def _write_pass(stream: Stream, writer: Any, core: str, dyn: dict, hp: tuple) -> None:
    for _, out in run_pass(stream, "merge", core, dyn, hp):
        _write_group(writer, _host(out))


# ------------------------------------------------------------ chunked numpy kernels (fast path)
#
# The per-leaf methods and the global TIES run as numpy kernels over chunks of CHUNK entries of
# zero-copy views of the inputs (safetensors files are mapped, not read into buffers): every
# temporary is a (T, CHUNK) workspace allocated once per pass and reused, so a merge touches each
# input byte once per pass, writes each output leaf with one write, and allocates no per-leaf
# arrays. The arithmetic is the in-memory code's, operation for operation (task vectors
# ``f32(theta_t) - f32(theta_0)``, sums over tasks in task order, the same comparisons), so the
# results equal the in-memory merges (tests/merging/test_streaming.py).

CHUNK = 1 << 16  # entries per chunk: a (T, CHUNK) fp32 workspace is T/4 MiB (cache-sized)
_HIST_SHIFT = 14  # the TIES histogram bins |tau| by its float32 bit pattern >> 14 (2**17 bins)
_NUM_BINS = 1 << (31 - _HIST_SHIFT)
SAMPLE_ENTRIES = 1 << 23  # |tau| entries (all tasks) in the TIES threshold sample: 32 MiB fp32
SAMPLE_Z = 4.0  # the sample bracket's half-width in binomial standard deviations
MAX_BAND_FRACTION = 0.02  # a wider bracket (kept aside per task) -> the histogram pass instead


class Workspace:
    """Reusable chunk buffers of one pass: ``tau`` / ``work`` fp32 (T, CHUNK), ``mask`` /
    ``mask2`` bool (T, CHUNK), ``row`` / ``row2`` fp32 (CHUNK,), ``flags`` bool (3, CHUNK),
    ``count`` (CHUNK,) uint8 (int32 for T >= 255), ``inputs`` fp32 (T + 1, CHUNK) for non-fp32 inputs.
    ``finite``: refuse NaN / inf inputs (:meth:`check`; ``leaf`` is the index of the leaf being
    worked on)."""

    def __init__(self, num_tasks: int, finite: Optional[FiniteCheck] = None):
        self.finite, self.leaf = finite, 0
        self.tau = np.empty((num_tasks, CHUNK), np.float32)
        self.work = np.empty((num_tasks, CHUNK), np.float32)
        self.mask = np.empty((num_tasks, CHUNK), np.bool_)
        self.mask2 = np.empty((num_tasks, CHUNK), np.bool_)
        self.row = np.empty((CHUNK,), np.float32)
        self.row2 = np.empty((CHUNK,), np.float32)
        self.flags = np.empty((3, CHUNK), np.bool_)
        self.count = np.empty((CHUNK,), np.uint8 if num_tasks < 255 else np.int32)
        self.inputs = np.empty((num_tasks + 1, CHUNK), np.float32)

    def f32(self, x: np.ndarray, i: int, s: int, e: int) -> np.ndarray:
        """Chunk ``[s, e)`` of flat input ``x`` as fp32 (a view if it is fp32; else cast into row
        ``i`` of ``inputs``)."""
        if x.dtype == np.float32:
            return x[s:e]
        out = self.inputs[i, : e - s]
        np.copyto(out, x[s:e], casting="unsafe")
        return out

    def task_vectors(self, p0: np.ndarray, fts: Sequence[np.ndarray], s: int, e: int,
                     check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(theta_0 chunk, tau chunk (T, n))`` with ``tau_t = f32(theta_t) - f32(theta_0)``;
        ``check``: :meth:`check` on tau (non-finite wherever theta_t or theta_0 is). Kernels with a
        cheaper witness (an (n,) result non-finite wherever tau is) pass False and check that."""
        p = self.f32(p0, 0, s, e)
        tau = self.tau[:, : e - s]
        for t, f in enumerate(fts):
            np.subtract(self.f32(f, t + 1, s, e), p, out=tau[t])
        if check:
            self.check(p0, fts, s, e, tau)
        return p, tau

    def check(self, p0: np.ndarray, fts: Sequence[np.ndarray], s: int, e: int, x: Optional[np.ndarray] = None) -> None:
        """With ``finite`` set, refuse NaN / inf in chunk ``[s, e)`` of the inputs: ``x`` is a chunk
        computed from them, in cache, non-finite wherever they are; only if its max or min is
        NaN / inf (2.5x faster than a sum each; or ``x`` is None) are the inputs looked at
        (NonFiniteInputError names file and tensor)."""
        if self.finite is not None and (x is None or not np.isfinite(np.max(x)) or not np.isfinite(np.min(x))):
            self.finite.chunk(self.leaf, p0, fts, s, e)


def spans(size: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` chunks of ``range(size)``."""
    for s in range(0, size, CHUNK):
        yield s, min(s + CHUNK, size)


def _flat_inputs(reader: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Flat (C-order) arrays of ``names``: zero-copy views where the reader has them."""
    if hasattr(reader, "view"):
        return {n: reader.view(n).reshape(-1) for n in names}
    return {n: np.asarray(x).reshape(-1) for n, x in reader.read_group(names).items()}


def leaf_pass(stream: Stream, desc: str) -> Iterator[tuple[int, str, np.ndarray, list[np.ndarray]]]:
    """One pass over the inputs leaf by leaf: ``(leaf index, name, flat theta_0, [flat theta_t])``.
    Views are released (and the next group prefetched) when the consumer moves on."""
    stream.passes += 1
    readers = [stream.pretrained] + list(stream.finetuned)
    bar = tqdm(total=len(stream.names), desc=desc, unit="leaf", disable=not stream.progress, leave=False)
    index = 0
    try:
        for g, group in enumerate(stream.groups):
            if g + 1 < len(stream.groups):
                for r in readers:
                    for n in stream.groups[g + 1] if hasattr(r, "prefetch") else ():
                        r.prefetch(n)
            arrays = [_flat_inputs(r, group) for r in readers]
            for name in group:
                yield index, name, arrays[0][name], [a[name] for a in arrays[1:]]
                index += 1
                bar.update(1)
            del arrays
            for r in readers:
                for n in group if hasattr(r, "release") else ():
                    r.release(n)
    finally:
        bar.close()


def _max_leaf_bytes(stream: Stream) -> int:
    return max(stream.pretrained.specs[n].nbytes for n in stream.names)


def default_threads() -> int:
    """Worker threads of the numpy kernels: the CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def chunk_pass(stream: Stream, desc: str, make_kernel: Callable[[], Callable], writer: Any = None) -> list:
    """One pass of a numpy kernel over every ``CHUNK`` of every leaf.

    ``make_kernel()`` is called once per worker thread; each kernel is called as
    ``kernel(ws, index, p0, fts, out, s, e)`` for chunk ``[s, e)`` of leaf ``index`` (flat inputs,
    ``ws`` that worker's own :class:`Workspace`) and fills ``out[s:e]`` of the flat output leaf
    (``None`` without a ``writer``). A leaf's chunks are split into ``stream.threads`` contiguous
    runs done in parallel (numpy releases the GIL in its loops); the leaf is written when all
    are done, by a writer thread (in order) while the next leaf is computed into a second output
    buffer. Returns the kernels, so that callers can combine what each one accumulated.
    """
    threads = max(1, stream.threads)
    kernels = [make_kernel() for _ in range(threads)]
    spaces = [Workspace(stream.num_tasks, stream.finite) for _ in range(threads)]
    # two output arenas: leaf i + 1 is computed while leaf i is written by the writer thread
    arenas = [np.empty(max(_max_leaf_bytes(stream), 1) if writer is not None else 0, np.uint8) for _ in range(2)]
    pending: list[Optional[concurrent.futures.Future]] = [None, None]

    def run(i, index, p0, fts, out, chunks):
        spaces[i].leaf = index
        for s, e in chunks:
            kernels[i](spaces[i], index, p0, fts, out, s, e)

    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(threads)) if threads > 1 else None
        io = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1)) if writer is not None else None
        for index, name, p0, fts in leaf_pass(stream, desc):
            spec = stream.pretrained.specs[name]
            out = None
            if writer is not None:
                slot = index % 2
                if pending[slot] is not None:
                    pending[slot].result()
                out = arenas[slot][: spec.nbytes].view(spec.dtype)
            chunks = list(spans(p0.size))
            runs = [chunks[i * len(chunks) // threads : (i + 1) * len(chunks) // threads] for i in range(threads)]
            if pool is None or len(chunks) < 2:
                run(0, index, p0, fts, out, chunks)
            else:
                for f in [pool.submit(run, i, index, p0, fts, out, c) for i, c in enumerate(runs) if c]:
                    f.result()
            if io is not None:
                pending[slot] = io.submit(writer.write, name, out.reshape(spec.shape))
        for f in pending:
            if f is not None:
                f.result()
    return kernels


def _masked(x: np.ndarray, mask: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``where(mask, x, 0)`` for fp32 ``x`` into ``out``: the bit patterns times the 0/1 mask
    (exact, +0.0 where dropped; several times faster than a masked ``copyto``)."""
    np.multiply(x.view(np.int32), mask, out=out.view(np.int32))
    return out


def _sign(x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """``sign(x)`` in {-1, 0, 1} for fp32 ``x`` (NaN -> 0) into ``out``; scratch bool (2, n)."""
    np.greater(x, 0, out=scratch[0])
    np.less(x, 0, out=scratch[1])
    return np.subtract(scratch[0], scratch[1], out=out, dtype=np.float32)


def _store(out: np.ndarray, s: int, e: int, value: np.ndarray) -> None:
    np.copyto(out[s:e], value, casting="unsafe")


def _fp32_slot(ws: Workspace, out: np.ndarray, s: int, e: int) -> np.ndarray:
    """Where to compute an fp32 result chunk: the output itself if it is fp32."""
    return out[s:e] if out.dtype == np.float32 else ws.row2[: e - s]


def task_arithmetic_kernel(lam: np.ndarray) -> Callable:
    """``theta_0 + sum_t lam_t tau_t`` per chunk (:func:`mtl_jax.merging.arithmetic.task_arithmetic`);
    lam: fp32 (T,)."""

    def kernel(ws, index, p0, fts, out, s, e):
        p, tau = ws.task_vectors(p0, fts, s, e, check=False)
        acc = _fp32_slot(ws, out, s, e)
        np.multiply(tau[0], lam[0], out=acc)
        for t in range(1, len(fts)):
            tau[t] *= lam[t]
            acc += tau[t]
        acc += p
        ws.check(p0, fts, s, e, acc)  # lam_t * (NaN or inf) is NaN or inf for any lam_t
        _store(out, s, e, acc)

    return kernel


def weight_average_kernel(w: np.ndarray) -> Callable:
    """``sum_t w_t f32(theta_t)`` per chunk (:func:`mtl_jax.merging.arithmetic.weight_average`);
    w: normalised fp32 (T,)."""

    def kernel(ws, index, p0, fts, out, s, e):
        acc = _fp32_slot(ws, out, s, e)
        np.multiply(ws.f32(fts[0], 1, s, e), w[0], out=acc)
        for t in range(1, len(fts)):
            tmp = ws.tau[0, : e - s]
            np.multiply(ws.f32(fts[t], t + 1, s, e), w[t], out=tmp)
            acc += tmp
        if ws.finite is not None:  # the average is non-finite wherever a theta_t is; theta_0 is not used
            ws.check(p0, fts, s, e, acc)
            ws.check(p0, fts, s, e, ws.f32(p0, 0, s, e))
        _store(out, s, e, acc)

    return kernel


@functools.partial(jax.jit, static_argnames=("num_tasks", "p"))
def _dare_keep_chunk(key: jax.Array, index: jax.Array, start: jax.Array, num_tasks: int, p: float) -> jax.Array:
    """:func:`mtl_jax.merging.ties.dare_keep` of entries ``[start, start + CHUNK)``: bool (T, CHUNK)."""
    return dare_keep(key, index, num_tasks, start + jnp.arange(CHUNK, dtype=jnp.uint32), p)


def dare_ta_kernel(key: jax.Array, p: float, lam: np.ndarray) -> Callable:
    """:func:`mtl_jax.merging.ties.dare_merging` with ``combine="ta"`` per chunk: the keep mask of
    each chunk is drawn by the same counter-based generator as the in-memory DARE (one fused
    jitted call for all T tasks), survivors scaled by ``1 / (1 - p)``, then task arithmetic."""
    scale = np.float32(1.0 - p)

    def kernel(ws, index, p0, fts, out, s, e):
        keep = np.asarray(_dare_keep_chunk(key, np.uint32(index), np.uint32(s), len(fts), p))[:, : e - s]
        p_, tau = ws.task_vectors(p0, fts, s, e)
        np.divide(tau, scale, out=tau)
        np.multiply(tau, lam[:, None], out=tau)
        dropped = _masked(tau, keep, ws.work[:, : e - s])
        acc = _fp32_slot(ws, out, s, e)
        np.sum(dropped, axis=0, out=acc)
        acc += p_
        _store(out, s, e, acc)

    return kernel


def consensus_ta_kernel(k: int, tall_lambda: np.ndarray, lam: float) -> Callable:
    """Consensus TA per chunk (:func:`mtl_jax.merging.masks.consensus_merging`, base "ta"): TALL
    masks ``|tau_t| > lam_t |tau_MTL - tau_t|`` around ``tau_MTL = sum_t tau_t``, kept where at
    least ``k`` masks agree; tall_lambda: fp32 (T,)."""

    def kernel(ws, index, p0, fts, out, s, e):
        n = e - s
        p, tau = ws.task_vectors(p0, fts, s, e, check=False)
        mtl, dist, agree, count = ws.row[:n], ws.work[:, :n], ws.mask[:, :n], ws.count[:n]
        np.sum(tau, axis=0, out=mtl)
        ws.check(p0, fts, s, e, mtl)  # a sum over tasks is non-finite wherever a tau_t is
        np.subtract(mtl[None], tau, out=dist)
        np.abs(dist, out=dist)
        dist *= tall_lambda[:, None]
        np.abs(tau, out=tau)
        np.greater(tau, dist, out=agree)
        np.add.reduce(agree.view(np.uint8), axis=0, dtype=count.dtype, out=count)
        merged = _masked(mtl, count >= k, _fp32_slot(ws, out, s, e))
        merged *= np.float32(lam)
        merged += p
        _store(out, s, e, merged)

    return kernel


# ------------------------------------------------------------------ exact global TIES statistics


def _select_from_top(hist: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a (T, B) histogram: the bin b holding the k-th largest entry (counting from the
    top bin) and the rank of that entry inside bin b (1-indexed)."""
    above = np.cumsum(hist[:, ::-1], axis=1)
    idx_from_top = np.argmax(above >= k[:, None], axis=1)
    bins = hist.shape[1] - 1 - idx_from_top
    before = np.take_along_axis(above, idx_from_top[:, None], 1)[:, 0] - hist[np.arange(len(k)), bins]
    return bins, k - before


@dataclasses.dataclass(frozen=True)
class ThresholdBuckets:
    """Where each task's exact TIES threshold (the k-th largest |tau_t| over the model) lies: in
    ``[lo_t, hi_t)`` (fp32 (T,)) as the ``rank_t``-th largest entry there. A task whose threshold
    is already exact has ``lo_t = hi_t = threshold`` (+inf for k = 0 or when the k-th largest is
    inf/NaN: the in-memory search clips at inf)."""

    lo: np.ndarray
    hi: np.ndarray
    rank: np.ndarray

    def threshold(self, candidates: Sequence[np.ndarray]) -> np.ndarray:
        """Exact thresholds from each task's entries in its bucket (all of them, any order)."""
        thr = self.lo.copy()
        for t, c in enumerate(candidates):
            if self.lo[t] < self.hi[t]:
                c = np.concatenate(c)
                thr[t] = np.partition(c, len(c) - self.rank[t])[len(c) - self.rank[t]]
        return thr


def bucket_entries(magnitudes: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """Per task, the entries of ``magnitudes`` (T, n) inside that task's bucket ``[lo_t, hi_t)``."""
    inside = (magnitudes >= lo[:, None]) & (magnitudes < hi[:, None])
    return [m[i] for m, i in zip(magnitudes, inside)]


def count_at_least(magnitudes: np.ndarray, hi: np.ndarray, kept: np.ndarray, counts: np.ndarray) -> bool:
    """Add to ``counts`` (int64 (T,)) the entries of ``magnitudes`` (T, n) that rank above
    ``hi_t``: ``|tau| >= hi_t`` (the bool (T, n) ``kept``, already computed) plus NaNs (which the
    in-memory bisection counts above +inf but never keeps). Returns False if ``magnitudes`` may
    hold NaN / inf (its sum is not finite)."""
    for t in range(len(counts)):
        counts[t] += np.count_nonzero(kept[t])
    if np.isfinite(magnitudes.sum()):
        return True
    counts += np.count_nonzero(np.isnan(magnitudes), axis=1)  # NaN or inf in the chunk (or an overflow)
    return False


def rank_in_bracket(lo: np.ndarray, hi: np.ndarray, k: int, above: np.ndarray,
                    candidates: Sequence[Sequence[np.ndarray]]) -> Optional[ThresholdBuckets]:
    """The buckets of a bracket ``[lo_t, hi_t)`` once a pass has counted ``above_t`` (entries
    ranking above ``hi_t``, :func:`count_at_least`) and collected every bucket entry; ``None`` if
    some task's k-th largest is not in its bracket (``above_t >= k`` or ``above_t + in_t < k``)."""
    inside = np.asarray([sum(len(x) for x in c) for c in candidates], np.int64)
    rank = k - above
    open_ = lo < hi
    if np.any(open_ & ((rank < 1) | (rank > inside))):
        return None
    return ThresholdBuckets(lo, hi, np.where(open_, rank, 0))


def threshold_buckets(stream: Stream, top_k: float) -> ThresholdBuckets:
    """Exact buckets by a histogram pass: per-task histograms of the float32 bit pattern
    of ``|tau_t|`` (monotone in the value; as :func:`mtl_jax.merging.threshold.kth_largest_abs`),
    ``bits >> 14``, exact int64 counts, then the bucket of the k-th largest,
    ``k = num_kept(N, top_k)``. About 2 ns per entry (``np.bincount``): the fallback of
    :func:`sampled_bracket`."""
    k = kept_count(stream, top_k)
    num = stream.num_tasks
    inf = np.full((num,), np.inf, np.float32)
    if k <= 0:
        return ThresholdBuckets(inf, inf, np.zeros((num,), np.int64))
    hist = np.zeros((num, _NUM_BINS), np.int64)
    ws = Workspace(num, stream.finite)
    staged = np.empty((num, 4 * CHUNK), np.intp)  # bins of several chunks (and small leaves) per bincount
    fill = 0

    def flush():
        for t in range(num):
            hist[t] += np.bincount(staged[t, :fill], minlength=_NUM_BINS)

    for ws.leaf, _, p0, fts in leaf_pass(stream, "ties threshold"):
        for s, e in spans(p0.size):
            if fill + e - s > staged.shape[1]:
                flush()
                fill = 0
            _, tau = ws.task_vectors(p0, fts, s, e)
            bits = tau.view(np.int32)
            np.bitwise_and(bits, 0x7FFFFFFF, out=bits)
            np.right_shift(bits, _HIST_SHIFT, out=staged[:, fill : fill + e - s])
            fill += e - s
    flush()
    bucket, rank = _select_from_top(hist, np.full((num,), k, np.int64))
    lo_bits = bucket.astype(np.int64) << _HIST_SHIFT
    exact = lo_bits >= _INF_BITS  # the k-th largest is inf or NaN: the threshold is +inf
    lo = np.where(exact, np.inf, np.minimum(lo_bits, _INF_BITS).astype(np.int32).view(np.float32))
    hi_bits = np.minimum(lo_bits + (1 << _HIST_SHIFT), _INF_BITS).astype(np.int32)
    hi = np.where(exact, np.inf, hi_bits.view(np.float32))
    return ThresholdBuckets(lo.astype(np.float32), hi.astype(np.float32), rank)


def model_size(stream: Stream) -> int:
    """Entries per model (every leaf)."""
    return sum(stream.pretrained.specs[n].size for n in stream.names)


def kept_count(stream: Stream, top_k: float) -> int:
    """TIES' k for the whole model: ``num_kept(N, top_k)``, at most N."""
    total = model_size(stream)
    return min(num_kept(total, top_k), total)


def _next_prime(n: int) -> int:
    n = max(n, 2)
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def sample_allowance(stream: Stream) -> int:
    """Bytes the TIES sample and the kept-aside positions may use: the memory budget, or the
    working set of the largest leaf when leaves go one at a time."""
    readers = [stream.pretrained] + list(stream.finetuned)
    largest = max(leaf_working_set([r.specs[n] for r in readers], stream.pretrained.specs[n].dtype) for n in stream.names)
    return max(stream.memory_budget or 0, largest)


def _kept_aside_bytes(fraction: float, total: int, num_tasks: int) -> float:
    """Memory of the TIES positions kept aside (index, theta_0, tau) for a fraction of positions."""
    return min(1.0, fraction) * total * (8 + 4 * (num_tasks + 1))


def sampled_bracket(stream: Stream, k: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """A cheap first pass for the exact global TIES threshold: a bracket ``[lo_t, hi_t)`` that holds
    each task's k-th largest |tau_t| with high probability, from a systematic sample.

    The sample is every p-th entry of the concatenated model, p the first prime >= 64 and >=
    N T / ``SAMPLE_ENTRIES`` (a prime does not alias with power-of-two or 3 * 2^j widths); n per
    task. With q = k / N a task's k-th largest ranks about r = q n in its sample, binomial standard
    deviation sqrt(n q (1 - q)); the bracket runs from the sample's ceil(r + z sd)-th to its
    floor(r - z sd)-th largest (``z = SAMPLE_Z``; hi just above it, so ties fall inside).
    Nothing here is trusted: the pass that uses the bracket counts the entries above ``hi_t``
    exactly and checks that the k-th largest lies inside (:func:`rank_in_bracket`); callers fall
    back to :func:`threshold_buckets` when it does not.

    Returns ``(lo, hi)`` fp32 (T,), or ``None`` (use the histogram pass) when the bracket would
    hold more than ``MAX_BAND_FRACTION`` of a task's entries, reaches a non-finite value, or the
    sample or the positions expected to be kept aside would exceed :func:`sample_allowance`
    (checked from n before the sample is read, so small models go straight to the histogram).
    """
    total = model_size(stream)
    num = stream.num_tasks
    allowance = sample_allowance(stream)
    stride = _next_prime(max(64, -(-total * num // SAMPLE_ENTRIES)))
    n, q = -(-total // stride), k / total
    expected_band = 2.0 * SAMPLE_Z * math.sqrt(q * (1.0 - q) / n)  # of each task's entries
    if (8 * num * n > allowance  # the sample, twice (parts + concatenation)
            or expected_band > MAX_BAND_FRACTION or _kept_aside_bytes(num * expected_band, total, num) > allowance):
        return None  # decided before reading anything
    parts, seen = [], 0
    for _, _, p0, fts in leaf_pass(stream, "ties threshold sample"):
        offset = -seen % stride
        seen += p0.size
        p = p0[offset::stride].astype(np.float32)
        if p.size:
            mag = np.stack([f[offset::stride].astype(np.float32) for f in fts]) - p
            parts.append(np.abs(mag, out=mag))
    sample = np.concatenate(parts, axis=1)
    del parts
    n = sample.shape[1]
    r, sd = q * n, SAMPLE_Z * math.sqrt(n * q * (1.0 - q))
    i_hi, i_lo = math.floor(r - sd), math.ceil(r + sd)  # ranks from the top, 1-indexed
    if i_hi < 1 or i_lo > n:
        return None
    ranks = [n - i_lo, n - i_hi]
    lo, hi = np.partition(sample, ranks, axis=1)[:, ranks].T
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        return None
    hi = np.nextafter(hi, np.float32(np.inf))
    band = np.mean((sample >= lo[:, None]) & (sample < hi[:, None]), axis=1)
    if np.any(band > MAX_BAND_FRACTION) or _kept_aside_bytes(float(np.sum(band)), total, num) > allowance:
        return None
    return lo.astype(np.float32), hi.astype(np.float32)


class _BracketKernel:
    """Counts one worker's entries above each ``hi_t`` and keeps those in ``[lo_t, hi_t)``."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray):
        self.lo, self.hi = lo, hi
        self.above = np.zeros(lo.shape, np.int64)
        self.candidates: list[list[np.ndarray]] = [[] for _ in lo]

    def __call__(self, ws, index, p0, fts, out, s, e):
        _, tau = ws.task_vectors(p0, fts, s, e, check=False)
        np.abs(tau, out=tau)
        kept = np.greater_equal(tau, self.hi[:, None], out=ws.mask[:, : e - s])
        if not count_at_least(tau, self.hi, kept, self.above):  # |tau| sums to NaN / inf
            ws.check(p0, fts, s, e)
        for t, x in enumerate(bucket_entries(tau, self.lo, self.hi)):
            self.candidates[t].append(x)


def _bracket_thresholds(stream: Stream, lo: np.ndarray, hi: np.ndarray, k: int) -> Optional[np.ndarray]:
    """Exact thresholds from one pass that counts the entries above each ``hi_t`` and collects
    the bucket entries; ``None`` if a task's k-th largest is outside its bracket."""
    return thresholds_from_workers(chunk_pass(stream, "ties threshold candidates", lambda: _BracketKernel(lo, hi)),
                                   lo, hi, k)


def thresholds_from_workers(kernels: Sequence[Any], lo: np.ndarray, hi: np.ndarray, k: int) -> Optional[np.ndarray]:
    """Exact thresholds from the workers' counts above ``hi_t`` (``kern.above``) and bracket entries
    (``kern.candidates``); ``None`` if a task's k-th largest is outside its bracket."""
    candidates = [[x for kern in kernels for x in kern.candidates[t]] for t in range(len(lo))]
    buckets = rank_in_bracket(lo, hi, k, sum(kern.above for kern in kernels), candidates)
    return None if buckets is None else buckets.threshold(candidates)


def ties_thresholds(stream: Stream, top_k: float) -> np.ndarray:
    """Exact per-task TIES threshold over the whole model: the k-th largest |tau_t| with
    ``k = num_kept(N, top_k)`` (identical to ``kth_largest_abs(stacked_tau, k, batched=True)``).

    A sample pass (:func:`sampled_bracket`, ~1/100 of the entries at 100M parameters) and one
    pass that counts the entries above the bracket and keeps those inside it, then selects the
    exact k-th among them; if the bracket missed (or none was drawn), the histogram pass
    (:func:`threshold_buckets`) and the same counting pass. Returns float32 (T,); +inf where k = 0.
    """
    k = kept_count(stream, top_k)
    if k <= 0:
        return np.full((stream.num_tasks,), np.inf, np.float32)
    bracket = sampled_bracket(stream, k)
    if bracket is not None:
        thr = _bracket_thresholds(stream, *bracket, k)
        if thr is not None:
            return thr
    buckets = threshold_buckets(stream, top_k)
    if np.array_equal(buckets.lo, buckets.hi):
        return buckets.lo
    return _bracket_thresholds(stream, buckets.lo, buckets.hi, k)


def majority_sign(stream: Stream, dyn: dict, hp: tuple) -> float:
    """Model-wide TIES majority ``sign(sum over entries of sign(sum_t trimmed_t))`` (one pass,
    exact integer count) for the sparsification ``hp["trim"]``."""
    total = 0
    for _, out in run_pass(stream, "ties majority sign", "sign_sums", dyn, hp):
        total += sum(int(s) for s in out.values())
    return float(np.sign(total))


def ties_statistics(stream: Stream, trim: str, top_k: float = 0.2, key: Any = None, p: float = 0.0) -> dict:
    """Model-wide statistics of a TIES-style vector as a ``dyn`` dict: thresholds (trim="global",
    2 passes) and the majority sign (1 pass)."""
    dyn: dict[str, Any] = {}
    if trim == "global":
        dyn["thresholds"] = jnp.asarray(ties_thresholds(stream, top_k))
    if trim == "dare":
        dyn["key"] = key
    dyn["majority"] = jnp.float32(majority_sign(stream, dyn, hparams_key(trim=trim, top_k=top_k, p=p)))
    return dyn


def _disjoint_mean_np(trimmed: np.ndarray, sign: np.ndarray, scratch: np.ndarray, agree: np.ndarray,
                      out: np.ndarray, count: np.ndarray) -> np.ndarray:
    """:func:`mtl_jax.merging.ties.disjoint_mean` of one chunk into ``out`` (n,): trimmed (T, n),
    sign (n,) in {-1, 0, 1}; ``scratch`` fp32 / ``agree`` bool (T, n), ``count`` integer (n,) (uint8
    when T < 255).

    ``A = {t : trimmed_t * s > 0}`` as in the in-memory code; the sum of the agreeing entries is
    computed as ``s * sum_{t in A} trimmed_t * s``: the same magnitudes added in the same task
    order (float addition is sign-symmetric), so the same value bit for bit.
    """
    np.multiply(trimmed, sign[None], out=scratch)
    np.greater(scratch, 0, out=agree)
    _masked(scratch, agree, scratch)
    np.sum(scratch, axis=0, out=out)
    out *= sign
    np.add.reduce(agree.view(np.uint8), axis=0, dtype=count.dtype, out=count)
    np.maximum(count, 1, out=count)
    out /= count.astype(np.float32)
    return out


@dataclasses.dataclass
class _Deferred:
    """Entries of one leaf whose TIES output needs the exact thresholds or the majority sign:
    flat positions, theta_0 (n,) and tau (T, n), fp32."""

    name: str
    index: np.ndarray
    p0: np.ndarray
    tau: np.ndarray


def stream_ties_global(stream: Stream, writer: Any, top_k: float, lam: float) -> None:
    """Global TIES (:func:`mtl_jax.merging.ties.ties_merging`, Yadav et al. 2023, Sec. 3), exact,
    in two passes over the inputs when the sample bracket holds (the usual case):

    1. :func:`sampled_bracket` (reads ~1/100 of the entries at 100M parameters): each task's k-th
       largest |tau_t| should lie in a bracket ``[lo_t, hi_t)``.
    2. the output pass (:func:`_ties_output_pass`): entries outside the bracket are kept or dropped
       as by the exact threshold; positions with a bracket entry are kept aside and patched once
       the pass has counted the entries above each ``hi_t`` exactly.

    If the counts show a bracket missed its threshold (or no bracket was drawn), the output is
    rewound and written again from the exact histogram buckets (:func:`threshold_buckets`): one
    or two more passes, the same result.
    """
    k = kept_count(stream, top_k)
    if k > 0:
        bracket = sampled_bracket(stream, k)
        if bracket is not None and _ties_output_pass(stream, writer, *bracket, k, lam):
            return
        writer.rewind()
    buckets = threshold_buckets(stream, top_k)
    if not _ties_output_pass(stream, writer, buckets.lo, buckets.hi, k, lam):
        raise AssertionError("TIES histogram buckets missed the k-th largest |tau| (a bug)")


class _TiesKernel:
    """The TIES output kernel of one worker (:func:`_ties_output_pass`) and what it accumulates:
    the majority count of the decided positions, the exact counts above ``hi_t`` and the
    kept-aside positions."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, lam: np.float32, names: Sequence[str]):
        self.lo, self.hi, self.lam, self.names = lo, hi, lam, names
        self.deferred: list[_Deferred] = []
        self.candidates: list[list[np.ndarray]] = [[] for _ in lo]
        self.majority = 0
        self.above = np.zeros(lo.shape, np.int64)

    def __call__(self, ws, index, p0, fts, out, s, e):
        n = e - s
        p, tau = ws.task_vectors(p0, fts, s, e, check=False)
        mag, kept, inside = ws.work[:, :n], ws.mask[:, :n], ws.mask2[:, :n]
        sign, undecided = ws.row[:n], ws.flags[0, :n]
        np.abs(tau, out=mag)
        np.greater_equal(mag, self.hi[:, None], out=kept)
        if not count_at_least(mag, self.hi, kept, self.above):  # |tau| sums to NaN / inf
            ws.check(p0, fts, s, e)
        np.greater_equal(mag, self.lo[:, None], out=inside)
        np.greater(inside, kept, out=inside)  # in the bracket: lo <= |tau| < hi
        np.any(inside, axis=0, out=undecided)
        trimmed = _masked(tau, kept, mag)
        np.sum(trimmed, axis=0, out=sign)
        _sign(sign, sign, ws.flags[1:, :n])
        # an exactly cancelling sum of kept (so non-zero) entries: the majority sign decides
        cancels = np.any(kept, axis=0, out=ws.flags[1, :n])
        cancels &= sign == 0
        undecided |= cancels
        pos = np.flatnonzero(undecided)
        self.majority += int(np.sum(sign)) - int(np.sum(sign[pos]))
        if len(pos):
            aside = _Deferred(self.names[index], pos + s, p[pos], tau[:, pos])
            self.deferred.append(aside)
            for t, x in enumerate(bucket_entries(np.abs(aside.tau), self.lo, self.hi)):
                self.candidates[t].append(x)
        merged = _disjoint_mean_np(trimmed, sign, tau, kept, _fp32_slot(ws, out, s, e), ws.count[:n])
        merged *= self.lam
        merged += p
        _store(out, s, e, merged)


def _ties_output_pass(stream: Stream, writer: Any, lo: np.ndarray, hi: np.ndarray, k: int, lam: float) -> bool:
    """The TIES output pass given a bracket ``[lo_t, hi_t)`` of each task's threshold (``lo = hi``:
    the exact threshold). Every position where no task has an entry in its bracket gets its
    elected sign, disjoint mean and output now, and adds its sign to the model-wide majority
    count. Positions with a bracket entry, and those whose trimmed sum is exactly 0 with non-zero
    entries (where the majority sign decides), are kept aside (position, theta_0, tau). After the
    pass the exact counts above ``hi_t`` and the bracket entries give the exact thresholds, the
    kept-aside positions complete the majority count, and their outputs are patched into the
    written leaves. Returns False (nothing patched) if some threshold is outside its bracket.
    """
    lam32 = np.float32(lam)
    kernels = chunk_pass(stream, "merge", lambda: _TiesKernel(lo, hi, lam32, stream.names), writer)
    deferred = [d for kern in kernels for d in kern.deferred]
    majority_count = sum(kern.majority for kern in kernels)
    thr = thresholds_from_workers(kernels, lo, hi, k)
    if thr is None:
        return False
    trimmed = [np.where(np.abs(d.tau) >= thr[:, None], d.tau, np.float32(0.0)) for d in deferred]
    signs = [np.sign(np.sum(x, axis=0)) for x in trimmed]
    majority = np.float32(np.sign(majority_count + sum(int(np.sum(x)) for x in signs)))
    patches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for d, x, sign in zip(deferred, trimmed, signs):
        n = len(d.index)
        merged = _disjoint_mean_np(x, np.where(sign == 0, majority, sign), np.empty_like(x),
                                   np.empty(x.shape, np.bool_), np.empty((n,), np.float32), np.empty((n,), np.int32))
        patches.setdefault(d.name, []).append((d.index, lam32 * merged + d.p0))
    for name, pieces in patches.items():  # one patch per leaf
        writer.patch(name, np.concatenate([i for i, _ in pieces]), np.concatenate([v for _, v in pieces]))
    return True


# ------------------------------------------------------------------------- streaming methods


def stream_weight_average(stream: Stream, writer: Any, weights: Optional[Sequence[float]] = None) -> None:
    """:func:`mtl_jax.merging.arithmetic.weight_average`, one pass (numpy kernel)."""
    w = per_task_weights(weights, stream.num_tasks)
    kernel = weight_average_kernel(np.asarray(w / jnp.sum(w)))
    chunk_pass(stream, "merge", lambda: kernel, writer)


def stream_task_arithmetic(stream: Stream, writer: Any, lam: float | Sequence[float] = 0.3) -> None:
    """:func:`mtl_jax.merging.arithmetic.task_arithmetic` (Ilharco et al. 2023), one pass (numpy
    kernel); ``lam`` a scalar or per task."""
    kernel = task_arithmetic_kernel(np.asarray(per_task_weights(lam, stream.num_tasks)))
    chunk_pass(stream, "merge", lambda: kernel, writer)


def stream_ties(stream: Stream, writer: Any, top_k: float = 0.2, lam: float = 1.0, per_tensor: bool = False) -> None:
    """:func:`mtl_jax.merging.ties.ties_merging` (Yadav et al. 2023). Global top-k: two passes
    (:func:`stream_ties_global`); ``per_tensor``: a majority-sign pass + the output pass."""
    if not per_tensor:
        num_kept(1, top_k)  # validates top_k
        stream_ties_global(stream, writer, top_k, lam)
        return
    dyn = ties_statistics(stream, "per_tensor", top_k)
    _write_pass(stream, writer, "ties", dyn, hparams_key(trim="per_tensor", top_k=top_k, lam=lam))


def stream_dare(
    stream: Stream,
    writer: Any,
    key: jax.Array,
    p: float = 0.9,
    combine: str = "ta",
    lam: Optional[float] = None,
) -> None:
    """:func:`mtl_jax.merging.ties.dare_merging` (Yu et al. 2024), the same keep masks
    (:func:`mtl_jax.merging.ties.dare_keep`, leaf i = i-th name in sorted order).
    ``combine="ta"``: one pass (numpy kernel); ``"ties"``: majority-sign pass + output pass."""
    if combine not in ("ta", "ties"):
        raise ValueError(f"unknown DARE combine {combine!r}; valid: 'ta', 'ties'")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate must be in [0, 1), got {p}")
    if combine == "ta":
        lam_t = np.asarray(per_task_weights(0.3 if lam is None else lam, stream.num_tasks))
        kernel = dare_ta_kernel(key, p, lam_t)
        chunk_pass(stream, "merge", lambda: kernel, writer)
        return
    dyn = ties_statistics(stream, "dare", key=key, p=p)
    _write_pass(stream, writer, "ties", dyn, hparams_key(trim="dare", p=p, lam=1.0 if lam is None else lam))


def stream_consensus(
    stream: Stream,
    writer: Any,
    k: int = 2,
    tall_lambda: float | Sequence[float] = 0.4,
    lam: Optional[float] = None,
    base: str = "ta",
    top_k: float = 0.2,
) -> None:
    """:func:`mtl_jax.merging.masks.consensus_merging` (Wang et al. 2024). ``base="ta"``: the
    TALL/consensus counts are per entry, one pass (numpy kernel); ``base="ties"``: the TIES
    threshold and majority passes first."""
    if base == "ta":
        tall = np.asarray(per_task_weights(tall_lambda, stream.num_tasks))
        kernel = consensus_ta_kernel(k, tall, 0.3 if lam is None else lam)
        chunk_pass(stream, "merge", lambda: kernel, writer)
        return
    if base != "ties":
        raise ValueError(f"unknown consensus base {base!r}; valid: 'ta', 'ties'")
    dyn = ties_statistics(stream, "global", top_k)
    hp = hparams_key(trim="global", top_k=top_k, k=k, tall_lambda=tall_lambda, lam=1.0 if lam is None else lam)
    _write_pass(stream, writer, "consensus_ties", dyn, hp)


def stream_lines(
    stream: Stream,
    writer: Any,
    beta: float = 0.5,
    base: str = "ta",
    top_k: float = 0.2,
    num_blocks: Optional[int] = None,
    layer_index_fn: LayerIndexFn = default_layer_index,
) -> None:
    """:func:`mtl_jax.merging.lines.lines_merging` (Wang et al. 2025): a pass for the L1 norms of
    ``sum_t tau_t`` and tau_merged (alpha), then the output pass (TIES base: TIES passes first).
    The layer scaling reads leaf names, so it runs eagerly after the jitted merged vector."""
    if base not in ("ta", "ties"):
        raise ValueError(f"unknown LiNeS base {base!r}; valid: 'ta', 'ties'")
    dyn = ties_statistics(stream, "global", top_k) if base == "ties" else {}
    hp = hparams_key(base=base, trim="global", top_k=top_k)
    if num_blocks is None:
        idx = [i for i in map(layer_index_fn, stream.names) if i is not None]
        num_blocks = max(idx) + 1 if idx else 0
    check_has_blocks(num_blocks, stream.names, layer_index_fn)
    norm_sum, norm_merged = 0, 0
    for _, out in run_pass(stream, "lines norms", "lines_norms", dyn, hp):
        for n in out:  # leaf by leaf, in order: the same fp32 additions as tree_l1_norm
            norm_sum, norm_merged = norm_sum + out[n][0], norm_merged + out[n][1]
    alpha = norm_sum / norm_merged / stream.num_tasks
    for p0, merged in run_pass(stream, "merge", "merged_vector", dyn, hp):
        _write_group(writer, _host(apply_task_vector(p0, lines_scale(merged, alpha, beta, num_blocks, layer_index_fn))))


# Methods whose output pass patches positions it kept aside (SafetensorsWriter.patch): they write
# through the page cache (buffered), where a patch touches cached pages; the others write O_DIRECT.
# TIES at 100M x 8: buffered 4.7 s, direct 5.8 s (its read-modify-write patch ~1.8 s).
PATCHED_OUTPUT = frozenset({"ties"})

STREAMING_METHODS: dict[str, Callable] = {
    "weight_average": stream_weight_average,
    "task_arithmetic": stream_task_arithmetic,
    "ties": stream_ties,
    "dare": stream_dare,
    "consensus": stream_consensus,
    "lines": stream_lines,
}


def get_streaming_method(name: str) -> Callable:
    """Look up a streaming merge by name; ValueError lists the valid names."""
    try:
        return STREAMING_METHODS[name]
    except KeyError:
        raise UsageError(
            f"unknown streaming merge method {name!r}; valid: {', '.join(sorted(STREAMING_METHODS))}"
        ) from None


def _write_group(writer: Any, group: dict[str, np.ndarray]) -> None:
    for name, x in group.items():
        writer.write(name, x)


def input_labels(num_finetuned: int) -> list[str]:
    """'pretrained', 'finetuned[0]', ...: how messages name the inputs."""
    return ["pretrained"] + [f"finetuned[{i}]" for i in range(num_finetuned)]


def open_inputs(paths: Sequence[Any], mmap: bool = False) -> list:
    """Readers of every input (all closed again if one fails to open)."""
    readers: list = []
    try:
        for p in paths:
            readers.append(open_checkpoint(p, mmap))
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def open_output(output: str, fmt: str, specs: Sequence[LeafSpec], method: str, *,
                metadata: Optional[dict[str, str]] = None, direct: bool = True, overwrite: bool = False):
    """The writer of a merge output, marked as ours (:mod:`mtl_jax.merging.output_safety`)."""
    if fmt == "safetensors":
        return SafetensorsWriter(output, specs, merge_metadata(method, metadata), direct=direct, overwrite=overwrite)
    return OrbaxWriter(output, specs, overwrite=overwrite, method=method)


def stream_merge(
    pretrained: Any,
    finetuned: Sequence[Any],
    output: str,
    method: str = "task_arithmetic",
    *,
    memory_budget: Optional[int] = None,
    output_format: Optional[str] = None,
    progress: bool = False,
    mmap: bool = False,
    metadata: Optional[dict[str, str]] = None,
    threads: Optional[int] = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    **hparams: Any,
) -> dict[str, Any]:
    """Merge checkpoints on disk into ``output`` leaf by leaf.

    Args:
      pretrained: path of a ``.safetensors`` file or orbax checkpoint dir (or a reader).
      finetuned: T such paths; every file must have the pretrained leaf names and shapes.
      output: output path; format from ``output_format`` or the ``.safetensors`` extension.
        Refused before anything is read (:func:`mtl_jax.merging.output_safety.check_output`):
        an input, a directory holding one, or an existing path that is not a previous merge
        output unless ``overwrite``. Written to a hidden temporary sibling and renamed into place.
      method: a key of :data:`STREAMING_METHODS`; ``hparams`` are the in-memory method's
        (e.g. ``top_k``, ``lam``; DARE needs ``key``), checked against its signature.
      memory_budget: bytes for one group of leaves (None: one leaf at a time).
      progress: tqdm bar over leaves for every pass. mmap: zero-copy safetensors reads.
      threads: worker threads of the numpy kernels (default: the cores this process may use;
        1 = none). The result does not depend on it.
      allow_nonfinite: merge inputs holding NaN / inf (default: refused as they are read,
        :class:`mtl_jax.merging.input_checks.NonFiniteInputError`, and nothing is written).

    Returns stats: ``{"method", "num_leaves", "num_groups", "passes", "seconds"}``.
    Output dtypes are the pretrained dtypes (bf16 stays bf16).
    """
    fn = get_streaming_method(method)
    if not finetuned:
        raise UsageError("need at least one fine-tuned checkpoint")
    check_hparams(fn, hparams, 2, f"merge method {method!r}")
    fmt = output_format_of(output, output_format)
    start = time.perf_counter()
    inputs = [pretrained] + list(finetuned)
    labels = input_labels(len(finetuned))
    check_inputs_exist(list(zip(labels, inputs)))
    check_output(output, list(zip(labels, inputs)), overwrite)
    readers = open_inputs(inputs, mmap)
    try:
        names = check_specs(readers, labels)
        specs = [readers[0].specs[n] for n in names]
        working = [leaf_working_set([r.specs[n] for r in readers], readers[0].specs[n].dtype) for n in names]
        finite = None if allow_nonfinite else FiniteCheck(
            [f"{getattr(r, 'path', label)} ({label})" for r, label in zip(readers, labels)], names)
        stream = Stream(readers[0], readers[1:], names, plan_groups(names, working, memory_budget), progress,
                        threads=threads or default_threads(), memory_budget=memory_budget, finite=finite)
        # global TIES patches its output after the pass: cheaper while the written pages are cached
        writer = open_output(output, fmt, specs, method, metadata=metadata, direct=method not in PATCHED_OUTPUT,
                             overwrite=overwrite)
        try:
            fn(stream, writer, **hparams)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    finally:
        for r in readers:
            r.close()
    return {
        "method": method,
        "num_leaves": len(names),
        "num_groups": len(stream.groups),
        "passes": stream.passes,
        "seconds": time.perf_counter() - start,
    }
