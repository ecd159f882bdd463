"""Jitted per-group cores: the in-memory merge code of :mod:`mtl_jax.merging` run on a group of
leaves with the model-wide statistics given (per-tensor TIES, DARE-TIES, Consensus TIES, LiNeS).

A core is ``core(p0, fts, offset, dyn, hp) -> {name: array}``: p0 / fts[t] are flat dicts of one
group of leaves, ``offset`` the (traced) index of its first leaf, ``dyn`` a dict of traced
model-wide statistics (TIES thresholds, majority sign, DARE key), ``hp`` static hyperparameters
(a hashable tuple of items, :func:`hparams_key`). Cores are jitted once at import;
:func:`run_core` renames the leaves by position so that groups with the same shapes share one
compiled program across leaves and across merges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.merging.masks import consensus_vector
from mtl_jax.merging.streaming.planning import Stream
from mtl_jax.merging.task_vectors import apply_task_vector, stacked_task_vectors, tree_l1_norm, tree_sum_tasks
from mtl_jax.merging.threshold import topk_trim, trim_at_threshold
from mtl_jax.merging.ties import dare_drop_leaf, disjoint_mean, elect_sign_with_majority


def hparams_key(**hp: Any) -> tuple:
    """Hashable static hyperparameters (sequences become tuples)."""
    fix = lambda v: tuple(np.asarray(v).reshape(-1).tolist()) if isinstance(v, (list, tuple, np.ndarray)) else v
    return tuple(sorted((k, fix(v)) for k, v in hp.items()))


def _trimmed(p0, fts, offset, dyn, hp):
    """Stacked task vectors (T, ...) after the method's sparsification ``hp["trim"]``: "global"
    (TIES, thresholds in dyn), "per_tensor" (TIES per leaf), "dare" (key in dyn) or "none"."""
    tau = stacked_task_vectors(fts, p0)
    kind = hp["trim"]
    if kind == "global":
        return trim_at_threshold(tau, dyn["thresholds"], batched=True)
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
    return apply_task_vector(p0, consensus_vector(tau, mtl, hp["tall_lambda"], hp["k"]), hp["lam"])


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


def write_group(writer: Any, group: dict[str, Any]) -> None:
    """Write one group's merged leaves (fetched to the host) in order."""
    for name, x in group.items():
        writer.write(name, np.asarray(x))


def write_pass(stream: Stream, writer: Any, core: str, dyn: dict, hp: tuple) -> None:
    """The output pass of a core: every group merged and written."""
    for _, out in run_pass(stream, "merge", core, dyn, hp):
        write_group(writer, out)
