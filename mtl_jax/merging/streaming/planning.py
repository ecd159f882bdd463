"""What a streaming merge reads, and in which groups: leaf specs, the per-leaf working-set
estimate, groups of consecutive leaves under a ``memory_budget``, the check that every input has
the same leaves, and :class:`Stream`, the opened inputs of one merge with their groups."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mtl_jax.errors import UsageError
from mtl_jax.merging.input_checks import FiniteCheck


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
