"""Streaming model merging: checkpoints are read and the merged model written leaf by leaf.

A merge of T fine-tuned models then needs memory for about one leaf per input plus the output
leaf (and the fp32 task-vector stack of that leaf), not T + 1 whole models. The merge math is the
in-memory code of this package, called on small ``{name: leaf}`` groups:

* per-leaf methods (weight averaging, task arithmetic, DARE with ``combine="ta"``, Consensus TA)
  read every input once;
* methods with model-wide statistics first stream the inputs to compute those statistics
  exactly, then stream again to write the output:

  - the TIES top-k threshold per task (Yadav et al. 2023): the exact k-th largest |tau_t| over
    the whole model, found by the same search as :func:`mtl_jax.merging.threshold.kth_largest_abs`
    (count of int32 bit patterns ``bits(|x|) >= v``, monotone for non-negative floats), resolved
    16 bits per pass as a radix select: pass 1 sums per-leaf histograms of the high 16 bits, pass
    2 histograms the low 16 bits inside the bin holding the k-th value. Same value, same tie rule
    (keep ``|x| >= v_k``) as the in-memory code;
  - the TIES model-wide majority sign used where ``sum_t tau_t`` is exactly 0 (one counting pass,
    also for per-tensor TIES and DARE-TIES);
  - the LiNeS L1 norms ``||sum_t tau_t||_1`` and ``||tau_merged||_1`` (one pass).

Leaves are visited in sorted-name order, the order ``jax.tree_util`` gives a flat ``{name:
array}`` dict (what ``safetensors.numpy.load_file`` returns), so DARE's per-leaf keys
``fold_in(key, i)`` and every result equal the in-memory merge of the loaded flat dicts.

Formats: safetensors files (header parsed here, leaves read with ``pread`` into a fresh buffer,
or ``mmap=True`` for zero-copy ``np.memmap`` views; bf16/fp8 via ml_dtypes) and orbax PyTree
checkpoints (metadata for shapes, then a partial restore of just the leaves of a group). Output:
safetensors written incrementally (header first, then each leaf as it is merged; renamed into
place on success), or orbax (the output tree is collected and saved at the end, so that format
holds one output model in memory).

``memory_budget`` (bytes) groups consecutive leaves whose estimated working set
(:func:`leaf_working_set`) fits; a leaf that alone does not fit raises ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from mtl_jax.merging.arithmetic import (
    task_arithmetic,
    task_arithmetic_vector,
    weight_average,
)
from mtl_jax.merging.lines import lines_scale
from mtl_jax.merging.masks import consensus_mask, consensus_merging, tall_masks
from mtl_jax.merging.task_vectors import (
    apply_task_vector,
    stacked_task_vectors,
    tree_l1_norm,
    tree_sum_tasks,
)
from mtl_jax.merging.threshold import (
    _INF_BITS,
    _threshold_mask,
    abs_bits,
    num_kept,
    topk_trim,
)
from mtl_jax.merging.ties import disjoint_mean
from mtl_jax.merging.tree import LayerIndexFn, default_layer_index

# ------------------------------------------------------------------------------ safetensors I/O

SAFETENSORS_DTYPES: dict[str, Any] = {
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
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """Name, shape and dtype of one checkpoint leaf (no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


def read_safetensors_header(path: str) -> tuple[dict[str, tuple[LeafSpec, int, int]], int]:
    """Parse a safetensors header: ``({name: (spec, begin, end)}, data_start)``; offsets are
    relative to ``data_start`` (format: u64 little-endian header length, JSON header, data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: leaf '{name}' has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        spec = LeafSpec(name, tuple(int(s) for s in info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
        if end - begin != spec.nbytes:
            raise ValueError(f"{path}: leaf '{name}' has {end - begin} bytes for {spec.shape} {spec.dtype}")
        out[name] = (spec, begin, end)
    return out, 8 + n


class SafetensorsReader:
    """Leaf-by-leaf reader of one safetensors file (holds a file handle, never the tensors).

    ``read(name)`` returns a fresh array filled with one ``readinto`` (only that leaf is resident);
    with ``mmap=True`` it returns a read-only ``np.memmap`` view (zero copy; the touched file pages
    then count in the process RSS as page cache).
    """

    def __init__(self, path: str, mmap: bool = False):
        self.path = str(path)
        self._entries, self._data_start = read_safetensors_header(self.path)
        self.specs = {n: e[0] for n, e in self._entries.items()}
        self._mmap = mmap
        self._file = open(self.path, "rb", buffering=0)

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


class SafetensorsWriter:
    """Incremental safetensors writer: the header (all offsets) is written first, then each leaf in
    ``specs`` order as soon as it is merged. Writes ``path + '.partial'`` and renames on close."""

    def __init__(self, path: str, specs: Sequence[LeafSpec], metadata: Optional[dict[str, str]] = None):
        self.path = str(path)
        self._specs = list(specs)
        self._next = 0
        self._tmp = self.path + ".partial"
        self._file = open(self._tmp, "wb")
        self._file.write(_safetensors_header_bytes(self._specs, metadata))

    def write(self, name: str, array: Any) -> None:
        spec = self._specs[self._next]
        if name != spec.name:
            raise ValueError(f"leaves must be written in order: expected '{spec.name}', got '{name}'")
        arr = np.ascontiguousarray(np.asarray(array).astype(spec.dtype, copy=False))
        if arr.shape != spec.shape:
            raise ValueError(f"leaf '{name}': writing shape {arr.shape}, header says {spec.shape}")
        self._file.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._specs):
            os.remove(self._tmp)
            raise ValueError(f"{self.path}: only {self._next} of {len(self._specs)} leaves written")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


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
    output format holds the output model in memory; an existing checkpoint at ``path`` is
    replaced, as a safetensors output file is). Names are split on '/' into nested dicts."""

    def __init__(self, path: str, specs: Sequence[LeafSpec]):
        self.path = os.path.abspath(str(path))
        self._specs = {s.name: s for s in specs}
        self._tree: dict = {}

    def write(self, name: str, array: Any) -> None:
        node = self._tree
        *parents, last = name.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = np.asarray(array).astype(self._specs[name].dtype, copy=False)

    def close(self) -> None:
        import orbax.checkpoint as ocp

        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(self.path, args=ocp.args.PyTreeSave(self._tree), force=True)
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
        raise ValueError(f"unknown output format {fmt!r}; valid: 'orbax', 'safetensors'")
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
            raise ValueError(
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


def check_specs(readers: Sequence[Any], labels: Sequence[str]) -> list[str]:
    """Sorted leaf names shared by all readers; ValueError naming the first leaf whose names,
    shape or dtype kind differ (``labels``: e.g. 'pretrained', 'finetuned[0]')."""
    ref = readers[0].specs
    names = sorted(ref)
    for reader, label in zip(readers[1:], labels[1:]):
        missing = [n for n in names if n not in reader.specs]
        extra = sorted(n for n in reader.specs if n not in ref)
        if missing or extra:
            raise ValueError(f"leaf names differ between {labels[0]} and {label}: missing {missing[:5]}, unexpected {extra[:5]}")
        for n in names:
            a, b = ref[n], reader.specs[n]
            if a.shape != b.shape:
                raise ValueError(
                    f"shape mismatch at '{n}': {labels[0]} {a.shape} vs {label} {b.shape} ({getattr(reader, 'path', '')})"
                )
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
                yield self.pretrained.read_group(group), [r.read_group(group) for r in self.finetuned]
                bar.update(len(group))
        finally:
            bar.close()


Writer = Callable[[dict[str, Any]], None]


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
    keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - p, x.shape)
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


def _core_weight_average(p0, fts, offset, dyn, hp):
    return weight_average(p0, fts, hp["weights"])


def _core_task_arithmetic(p0, fts, offset, dyn, hp):
    return task_arithmetic(p0, fts, hp["lam"])


def _core_abs_bits(p0, fts, offset, dyn, hp):
    return {n: abs_bits(x) for n, x in stacked_task_vectors(fts, p0).items()}


def _core_sign_sums(p0, fts, offset, dyn, hp):
    trimmed = _trimmed(p0, fts, offset, dyn, hp)
    return {n: jnp.sum(jnp.sign(jnp.sum(x, axis=0)), dtype=jnp.int32) for n, x in trimmed.items()}


def _core_ties(p0, fts, offset, dyn, hp):
    return apply_task_vector(p0, _ties_vector(p0, fts, offset, dyn, hp), hp["lam"])


def _core_dare_ta(p0, fts, offset, dyn, hp):
    return apply_task_vector(p0, task_arithmetic_vector(_trimmed(p0, fts, offset, dyn, hp), hp["lam"]))


def _core_consensus_ta(p0, fts, offset, dyn, hp):
    return consensus_merging(p0, fts, hp["k"], hp["tall_lambda"], hp["lam"], base="ta")


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
        "weight_average": _core_weight_average,
        "task_arithmetic": _core_task_arithmetic,
        "abs_bits": _core_abs_bits,
        "sign_sums": _core_sign_sums,
        "ties": _core_ties,
        "dare_ta": _core_dare_ta,
        "consensus_ta": _core_consensus_ta,
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


def _write_pass(stream: Stream, write: Writer, core: str, dyn: dict, hp: tuple) -> None:
    for _, out in run_pass(stream, "merge", core, dyn, hp):
        write(_host(out))


# ------------------------------------------------------------------ exact global TIES statistics


def _select_from_top(hist: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a (T, B) histogram: the bin b holding the k-th largest entry (counting from the
    top bin) and the rank of that entry inside bin b (1-indexed)."""
    above = np.cumsum(hist[:, ::-1], axis=1)
    idx_from_top = np.argmax(above >= k[:, None], axis=1)
    bins = hist.shape[1] - 1 - idx_from_top
    before = np.take_along_axis(above, idx_from_top[:, None], 1)[:, 0] - hist[np.arange(len(k)), bins]
    return bins, k - before


def ties_thresholds(stream: Stream, top_k: float) -> np.ndarray:
    """Exact per-task TIES threshold over the whole model: the k-th largest |tau_t| with
    ``k = num_kept(N, top_k)`` (identical to ``kth_largest_abs(stacked_tau, k, batched=True)``).

    Two counting passes (radix select on the float32 bit pattern, 16 bits per pass); each pass
    sums exact per-leaf histograms (int64). Returns float32 (T,); +inf where k = 0.
    """
    total = sum(stream.pretrained.specs[n].size for n in stream.names)
    k = min(num_kept(total, top_k), total)
    num = stream.num_tasks
    if k <= 0:
        return np.full((num,), np.inf, np.float32)
    hp = hparams_key()
    hist = np.zeros((num, 1 << 15), np.int64)
    for _, out in run_pass(stream, "ties threshold 1/2", "abs_bits", {}, hp):
        for x in out.values():
            bits = np.asarray(x).reshape(num, -1)
            for t in range(num):
                hist[t] += np.bincount(bits[t] >> 16, minlength=1 << 15)
    hi, rank = _select_from_top(hist, np.full((num,), k, np.int64))
    hist = np.zeros((num, 1 << 16), np.int64)
    for _, out in run_pass(stream, "ties threshold 2/2", "abs_bits", {}, hp):
        for x in out.values():
            bits = np.asarray(x).reshape(num, -1)
            for t in range(num):
                sel = bits[t][(bits[t] >> 16) == hi[t]]
                hist[t] += np.bincount(sel & 0xFFFF, minlength=1 << 16)
    lo, _ = _select_from_top(hist, rank)
    thr_bits = np.minimum((hi.astype(np.int64) << 16) | lo, _INF_BITS).astype(np.int32)
    return thr_bits.view(np.float32)


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


# ------------------------------------------------------------------------- streaming methods


def stream_weight_average(stream: Stream, write: Writer, weights: Optional[Sequence[float]] = None) -> None:
    """:func:`mtl_jax.merging.arithmetic.weight_average`, one pass."""
    _write_pass(stream, write, "weight_average", {}, hparams_key(weights=weights))


def stream_task_arithmetic(stream: Stream, write: Writer, lam: float | Sequence[float] = 0.3) -> None:
    """:func:`mtl_jax.merging.arithmetic.task_arithmetic` (Ilharco et al. 2023), one pass."""
    _write_pass(stream, write, "task_arithmetic", {}, hparams_key(lam=lam))


def stream_ties(stream: Stream, write: Writer, top_k: float = 0.2, lam: float = 1.0, per_tensor: bool = False) -> None:
    """:func:`mtl_jax.merging.ties.ties_merging` (Yadav et al. 2023). Global top-k: two threshold
    passes + one majority-sign pass + the output pass; ``per_tensor``: majority + output."""
    trim = "per_tensor" if per_tensor else "global"
    dyn = ties_statistics(stream, trim, top_k)
    _write_pass(stream, write, "ties", dyn, hparams_key(trim=trim, top_k=top_k, lam=lam))


def stream_dare(
    stream: Stream,
    write: Writer,
    key: jax.Array,
    p: float = 0.9,
    combine: str = "ta",
    lam: Optional[float] = None,
) -> None:
    """:func:`mtl_jax.merging.ties.dare_merging` (Yu et al. 2024) with the same per-leaf keys.
    ``combine="ta"``: one pass; ``"ties"``: majority-sign pass + output pass."""
    if combine not in ("ta", "ties"):
        raise ValueError(f"unknown DARE combine {combine!r}; valid: 'ta', 'ties'")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate must be in [0, 1), got {p}")
    if combine == "ta":
        hp = hparams_key(trim="dare", p=p, lam=0.3 if lam is None else lam)
        _write_pass(stream, write, "dare_ta", {"key": key}, hp)
        return
    dyn = ties_statistics(stream, "dare", key=key, p=p)
    _write_pass(stream, write, "ties", dyn, hparams_key(trim="dare", p=p, lam=1.0 if lam is None else lam))


def stream_consensus(
    stream: Stream,
    write: Writer,
    k: int = 2,
    tall_lambda: float | Sequence[float] = 0.4,
    lam: Optional[float] = None,
    base: str = "ta",
    top_k: float = 0.2,
) -> None:
    """:func:`mtl_jax.merging.masks.consensus_merging` (Wang et al. 2024). ``base="ta"``: the
    TALL/consensus counts are per entry, one pass; ``base="ties"``: the TIES passes first."""
    if base == "ta":
        _write_pass(stream, write, "consensus_ta", {}, hparams_key(k=k, tall_lambda=tall_lambda, lam=lam))
        return
    if base != "ties":
        raise ValueError(f"unknown consensus base {base!r}; valid: 'ta', 'ties'")
    dyn = ties_statistics(stream, "global", top_k)
    hp = hparams_key(trim="global", top_k=top_k, k=k, tall_lambda=tall_lambda, lam=1.0 if lam is None else lam)
    _write_pass(stream, write, "consensus_ties", dyn, hp)


def stream_lines(
    stream: Stream,
    write: Writer,
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
    norm_sum, norm_merged = 0, 0
    for _, out in run_pass(stream, "lines norms", "lines_norms", dyn, hp):
        for n in out:  # leaf by leaf, in order: the same fp32 additions as tree_l1_norm
            norm_sum, norm_merged = norm_sum + out[n][0], norm_merged + out[n][1]
    alpha = norm_sum / norm_merged / stream.num_tasks
    for p0, merged in run_pass(stream, "merge", "merged_vector", dyn, hp):
        write(_host(apply_task_vector(p0, lines_scale(merged, alpha, beta, num_blocks, layer_index_fn))))


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
        raise ValueError(
            f"unknown streaming merge method {name!r}; valid: {', '.join(sorted(STREAMING_METHODS))}"
        ) from None


def _write_group(writer: Any, group: dict[str, np.ndarray]) -> None:
    for name, x in group.items():
        writer.write(name, x)


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
    **hparams: Any,
) -> dict[str, Any]:
    """Merge checkpoints on disk into ``output`` leaf by leaf.

    Args:
      pretrained: path of a ``.safetensors`` file or orbax checkpoint dir (or a reader).
      finetuned: T such paths; every file must have the pretrained leaf names and shapes.
      output: output path; format from ``output_format`` or the ``.safetensors`` extension.
      method: a key of :data:`STREAMING_METHODS`; ``hparams`` are the in-memory method's
        (e.g. ``top_k``, ``lam``; DARE needs ``key``).
      memory_budget: bytes for one group of leaves (None: one leaf at a time).
      progress: tqdm bar over leaves for every pass. mmap: zero-copy safetensors reads.

    Returns stats: ``{"method", "num_leaves", "num_groups", "passes", "seconds"}``.
    Output dtypes are the pretrained dtypes (bf16 stays bf16).
    """
    fn = get_streaming_method(method)
    if not finetuned:
        raise ValueError("need at least one fine-tuned checkpoint")
    start = time.perf_counter()
    readers = [open_checkpoint(pretrained, mmap)] + [open_checkpoint(f, mmap) for f in finetuned]
    labels = ["pretrained"] + [f"finetuned[{i}]" for i in range(len(finetuned))]
    try:
        names = check_specs(readers, labels)
        specs = [readers[0].specs[n] for n in names]
        working = [leaf_working_set([r.specs[n] for r in readers], readers[0].specs[n].dtype) for n in names]
        stream = Stream(readers[0], readers[1:], names, plan_groups(names, working, memory_budget), progress)
        fmt = output_format_of(output, output_format)
        writer = SafetensorsWriter(output, specs, metadata) if fmt == "safetensors" else OrbaxWriter(output, specs)
        try:
            fn(stream, functools.partial(_write_group, writer), **hparams)
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
