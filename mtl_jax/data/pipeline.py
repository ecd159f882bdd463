"""grain input pipelines: per-host shards of shuffled training batches, padded evaluation batches,
and placement of host-local batches on the device mesh."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import grain
import jax
import numpy as np


def _host_batch_size(global_batch_size: int) -> int:
    count = jax.process_count()
    if global_batch_size % count:
        raise ValueError(f"batch_size {global_batch_size} is not divisible by the {count} processes")
    return global_batch_size // count


def _select(keys: Sequence[str]):
    return lambda record: {k: np.asarray(record[k]) for k in keys}


def train_dataset(source, *, keys: Sequence[str], global_batch_size: int, seed: int,
                  augment: Optional[Callable] = None) -> grain.MapDataset:
    """Infinite, reshuffled-every-epoch stream of this host's share of each global batch.

    Element ``i`` of the result is the host-local part of global batch ``i`` (random access, so the
    stream position is a single integer that checkpoints exactly). ``augment(record, rng) -> record``
    (optional) runs on every example with an rng that grain derives from ``seed`` and the example's
    stream position, so an augmented stream resumes exactly too.
    """
    local = _host_batch_size(global_batch_size)
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    ds = ds[jax.process_index()::jax.process_count()].map(_select(keys))
    if augment is not None:
        ds = ds.random_map(lambda record, rng: _select(keys)(augment(record, rng)))
    return ds.batch(local, drop_remainder=True)


def train_iterator(source, *, keys: Sequence[str], global_batch_size: int, seed: int,
                   prefetch: int = 4, threads: int = 2, augment: Optional[Callable] = None):
    """A grain ``DatasetIterator`` (``get_state()`` / ``set_state()`` for checkpoints) over train_dataset."""
    ds = train_dataset(source, keys=keys, global_batch_size=global_batch_size, seed=seed, augment=augment)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))


def eval_batches(source, *, keys: Sequence[str], global_batch_size: int) -> Iterator[dict]:
    """Every example once, in order, in host-local batches padded to full size.

    Each batch holds ``mask`` (float32 [local]): 1 for a real example, 0 for padding. Every host
    yields the same number of batches, so collective evaluation steps stay in lockstep.
    """
    local = _host_batch_size(global_batch_size)
    n = len(source)
    select = _select(keys)
    for start in range(0, n, global_batch_size):
        idx = start + jax.process_index() * local + np.arange(local)
        valid = idx < n
        idx = np.where(valid, idx, 0)
        records = source.__getitems__(idx.tolist()) if hasattr(source, "__getitems__") else [source[i] for i in idx]
        records = [select(r) for r in records]
        batch = {k: np.stack([r[k] for r in records]) for k in keys}
        batch["mask"] = valid.astype(np.float32)
        yield batch


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """Host-local numpy batch -> global jax.Arrays laid out with ``sharding`` (batch dim on 'data')."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
