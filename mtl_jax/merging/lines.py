"""LiNeS: layer-increasing network scaling of task vectors.

Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret, Frossard, "LiNeS: Post-training Layer Scaling
Prevents Forgetting and Enhances Model Merging", ICLR 2025 (arXiv 2410.17146).
Shallow blocks keep little of the task vector, deep blocks keep more:
``lambda(l) = alpha + beta * l / (L - 1)`` for blocks ``l = 0..L-1`` (0-indexed here);
leaves outside numbered blocks (embeddings, final norm, heads) get ``alpha``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import numpy as np

from mtl_jax.merging.task_vectors import (
    apply_task_vector,
    stacked_task_vectors,
    task_vector,
    tree_l1_norm,
    tree_sum_tasks,
)
from mtl_jax.merging.ties import check_base, multitask_vector
from mtl_jax.merging.tree import (
    LayerIndexFn,
    Models,
    Params,
    default_layer_index,
    leaf_paths,
    map_with_path,
    num_layers_of_paths,
)


def lines_schedule(num_blocks: int, alpha: float, beta: float) -> np.ndarray:
    """``[alpha + beta * l / (L - 1) for l in range(L)]`` (LiNeS); a single block gets alpha."""
    if num_blocks <= 0:
        return np.zeros((0,), np.float64)
    frac = np.arange(num_blocks) / max(num_blocks - 1, 1)
    return alpha + beta * frac


def _block_fraction(path: str, num_blocks: int, layer_index_fn: LayerIndexFn) -> float:
    idx = layer_index_fn(path)
    if idx is None:
        return 0.0
    if not 0 <= idx < num_blocks:
        raise ValueError(f"leaf '{path}' has block index {idx}, outside [0, {num_blocks})")
    return idx / max(num_blocks - 1, 1)


def count_blocks(paths: Sequence[str], num_blocks: Optional[int], layer_index_fn: LayerIndexFn) -> int:
    """L: ``num_blocks``, or by default ``1 + max block index`` that ``layer_index_fn`` finds in
    ``paths``. Raises when that is 0 (no path has a block index): LiNeS would then scale every
    leaf by alpha alone."""
    if num_blocks is None:
        num_blocks = num_layers_of_paths(paths, layer_index_fn)
    if num_blocks == 0:
        name = getattr(layer_index_fn, "__name__", repr(layer_index_fn))
        raise ValueError(f"LiNeS found no block index in any leaf path (e.g. {list(paths[:3])}) with {name}; pass "
                         "layer_index_fn (path -> block index or None) that knows this model's layer names, or num_blocks")
    return num_blocks


def lines_scale(
    tau: Params,
    alpha: float | jax.Array,
    beta: float | jax.Array,
    num_blocks: Optional[int] = None,
    layer_index_fn: LayerIndexFn = default_layer_index,
) -> Params:
    """Scale every leaf of ``tau`` by ``lambda(l) = alpha + beta * l / (L - 1)`` of its block.

    Args:
      tau: task vector tree (any leaf shapes). alpha/beta: scalars (may be traced).
      num_blocks: L; default ``1 + max block index`` found by ``layer_index_fn`` over the paths.
      layer_index_fn: ``path -> block index or None``; None-index leaves are scaled by alpha.

    Raises when no leaf has a block index (and ``num_blocks`` is not given): LiNeS would then scale
    every leaf by alpha alone, which is a plain rescaling, not the layer-increasing schedule.
    """
    L = count_blocks(leaf_paths(tau), num_blocks, layer_index_fn)
    return map_with_path(
        lambda p, x: x * (alpha + beta * _block_fraction(p, L, layer_index_fn)), tau
    )


def lines_edit(
    pretrained: Params,
    finetuned: Params,
    lam: float = 0.5,
    num_blocks: Optional[int] = None,
    layer_index_fn: LayerIndexFn = default_layer_index,
) -> Params:
    """Single-task LiNeS edit (Sec. 3): ``theta_0 + lines_scale(tau, alpha=lam, beta=1-lam)``, so the
    first block keeps ``lam`` of its update and the last block all of it. The paper tunes
    ``lam`` for the target/control trade-off; 0.5 is a neutral starting point, not a paper value.
    """
    tau = task_vector(finetuned, pretrained)
    return apply_task_vector(pretrained, lines_scale(tau, lam, 1.0 - lam, num_blocks, layer_index_fn))


def lines_alpha(stacked_tau: Params, merged_tau: Params) -> jax.Array:
    """LiNeS merging rule for alpha (Sec. 4): ``(||sum_t tau_t||_1 / ||tau_merged||_1) / T``, so the
    shallow layers of the merged vector get the L1 mass of the *average* task vector. Norms are
    per-leaf reductions added over leaves."""
    num = jax.tree_util.tree_leaves(stacked_tau)[0].shape[0]
    return tree_l1_norm(tree_sum_tasks(stacked_tau)) / tree_l1_norm(merged_tau) / num


class LinesHParams(NamedTuple):
    """:func:`lines_merging`'s hyperparameters, checked (:meth:`validated`)."""

    beta: float | jax.Array
    base: str
    top_k: float
    num_blocks: Optional[int]
    layer_index_fn: LayerIndexFn

    @classmethod
    def validated(cls, beta: float | jax.Array, base: str, top_k: float, num_blocks: Optional[int],
                  layer_index_fn: LayerIndexFn) -> "LinesHParams":
        """ValueError unless ``base`` is "ta" or "ties"."""
        check_base(base, "LiNeS")
        return cls(beta, base, top_k, num_blocks, layer_index_fn)


def lines_merging(
    pretrained: Params,
    finetuned: Models,
    beta: float = 0.5,
    base: str = "ta",
    top_k: float = 0.2,
    num_blocks: Optional[int] = None,
    layer_index_fn: LayerIndexFn = default_layer_index,
) -> Params:
    """LiNeS for multi-task merging (Sec. 4): ``theta_0 + lines_scale(tau_merged, alpha, beta)`` with
    alpha from :func:`lines_alpha`.

    base="ta": tau_merged = ``sum_t tau_t`` (then alpha = 1/T); base="ties": the TIES vector with
    ``top_k``. The paper grid-searches beta on validation data; 0.5 is a starting point only.
    """
    hp = LinesHParams.validated(beta, base, top_k, num_blocks, layer_index_fn)
    tau = stacked_task_vectors(finetuned, pretrained)
    merged = multitask_vector(tau, hp.base, hp.top_k)
    alpha = lines_alpha(tau, merged)
    return apply_task_vector(pretrained, lines_scale(merged, alpha, hp.beta, hp.num_blocks, hp.layer_index_fn))
