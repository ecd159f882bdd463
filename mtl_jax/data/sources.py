"""Datasets as random-access sources (grain's contract: ``len(src)`` and ``src[i] -> dict``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from mtl_jax.tasks import TaskSpec


class ArraySource:
    """Random-access view of a dict of equal-length numpy arrays: ``src[i] = {k: v[i]}``."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must share their first dimension; got lengths {lengths}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.arrays.items()}

    def __getitems__(self, indices: Sequence[int]):
        return [self[i] for i in indices]


def read_all(source) -> dict[str, np.ndarray]:
    """Reads every record of a source into a dict of stacked arrays (for datasets that fit in memory)."""
    if isinstance(source, ArraySource):
        return source.arrays
    records = source.__getitems__(list(range(len(source)))) if hasattr(source, "__getitems__") else [
        source[i] for i in range(len(source))]
    return {k: np.stack([r[k] for r in records]) for k in records[0]}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A multi-task dataset: named splits of random-access sources and the tasks they label.

    Every record is a dict holding ``input_key`` (the model input) and one target per task
    (``task.label_key``). ``augment``: an optional training augmentation ``fn(record, rng:
    np.random.Generator) -> record`` (grain's ``random_map`` shape), applied to each training example
    after it is drawn (deterministic per seed and stream position); evaluation never sees it.
    """

    name: str
    tasks: tuple[TaskSpec, ...]
    splits: Mapping[str, Any]
    input_key: str = "image"
    augment: Any = None

    def __post_init__(self):
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset '{self.name}': duplicate task names {names}")
        for split, source in self.splits.items():
            record = source[0]
            missing = [k for k in [self.input_key] + [t.label_key for t in self.tasks] if k not in record]
            if missing:
                raise ValueError(f"dataset '{self.name}' split '{split}': records lack keys {missing}; "
                                 f"they have {sorted(record)}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def select_tasks(self, names: Sequence[str]) -> "Dataset":
        """The same data with only the named tasks (single-task baselines use this)."""
        unknown = [n for n in names if n not in self.task_names]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} for dataset '{self.name}'; valid: {list(self.task_names)}")
        return dataclasses.replace(self, tasks=tuple(t for t in self.tasks if t.name in names))

    def first(self, n: int) -> "Dataset":
        """The same dataset with every split cut to its first ``n`` examples (read into memory)."""
        def head(source):
            rows = list(range(min(n, len(source))))
            if isinstance(source, ArraySource):
                return ArraySource({k: v[: len(rows)] for k, v in source.arrays.items()})
            records = source.__getitems__(rows) if hasattr(source, "__getitems__") else [source[i] for i in rows]
            return ArraySource({k: np.stack([r[k] for r in records]) for k in records[0]})

        return dataclasses.replace(self, splits={k: head(v) for k, v in self.splits.items()})

    def cached(self) -> "Dataset":
        """The same dataset with every split read into memory once (fast random access)."""
        return dataclasses.replace(self, splits={k: ArraySource(read_all(v)) for k, v in self.splits.items()})


def from_arrays(name: str, splits: Mapping[str, Mapping[str, np.ndarray]], tasks: Sequence[TaskSpec],
                input_key: str = "image") -> Dataset:
    """Bring-your-own-data in one call: ``{split: {key: array}}`` + task specs -> Dataset.

    Example:
      ds = from_arrays('mine', {'train': {'x': X, 'y1': a, 'y2': b}, 'test': {...}},
                       [classification('y1', 10), regression('y2')], input_key='x')
    """
    return Dataset(name=name, tasks=tuple(tasks), splits={s: ArraySource(a) for s, a in splits.items()},
                   input_key=input_key)
