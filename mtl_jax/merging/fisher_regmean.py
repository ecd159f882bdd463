"""Data-statistics merging: Fisher merging and RegMean (statistics are inputs here; computing them
from data is the caller's job).

* Fisher merging: Matena & Raffel, "Merging Models with Fisher Weighting", NeurIPS 2022
  (Fisher-weighted average with the diagonal Fisher).
* RegMean: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
  ICLR 2023: closed-form least squares per linear layer, off-diagonal Gram entries scaled by alpha.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.merging.arithmetic import per_task_weights
from mtl_jax.merging.task_vectors import accum_dtype
from mtl_jax.merging.tree import (
    Models,
    Params,
    check_compatible,
    leaf_paths,
    map_with_path,
    model_list,
    replicate_if_explicit,
)


def _f32(x):
    x = jnp.asarray(x)
    return x.astype(accum_dtype(x.dtype))


def fisher_merging(
    pretrained: Params,
    finetuned: Models,
    fishers: Sequence[Params],
    fisher_floor: float = 1e-6,
    weights: Optional[Sequence[float]] = None,
) -> Params:
    """Diagonal-Fisher weighted average (Matena & Raffel 2022):

        theta* = sum_t w_t F_t theta_t / sum_t w_t F_t,   F_t <- max(F_t, fisher_floor)

    fishers: one tree per model, same structure/shapes as the params (e.g. mean squared gradients
    of the log-likelihood over ~256 examples). The floor 1e-6 (reference code) keeps entries with
    zero Fisher in every model well defined (they fall back to the weighted average).
    ``pretrained`` fixes structure and output dtypes.
    """
    finetuned = model_list(pretrained, finetuned)
    if len(fishers) != len(finetuned):
        raise ValueError(f"got {len(fishers)} Fisher trees for {len(finetuned)} models")
    check_compatible(pretrained, finetuned)
    check_compatible(pretrained, fishers, other_name="fishers")
    w = per_task_weights(weights, len(finetuned))

    def leaf(p, *rest):
        num = len(rest) // 2
        theta = jnp.stack([_f32(x) for x in rest[:num]])
        fisher = jnp.maximum(jnp.stack([_f32(f) for f in rest[num:]]), fisher_floor)
        fisher = fisher * w.reshape((-1,) + (1,) * (fisher.ndim - 1))
        return (jnp.sum(fisher * theta, axis=0) / jnp.sum(fisher, axis=0)).astype(jnp.asarray(p).dtype)

    return jax.tree_util.tree_map(leaf, pretrained, *finetuned, *fishers)


def regmean_solve(kernels: jax.Array, grams: jax.Array, alpha: float = 0.95) -> jax.Array:
    """RegMean closed form for one linear layer (Jin et al. 2023):

        W* = (sum_t G~_t)^-1 sum_t G~_t W_t,   G~_t = alpha * G_t + (1 - alpha) * diag(G_t)

    kernels: (T, d_in, d_out) in the flax layout ``y = x @ W``; grams: (T, d_in, d_in) = X_t^T X_t.
    """
    diag = jnp.eye(grams.shape[-1], dtype=grams.dtype)[None] * grams
    g = alpha * grams + (1.0 - alpha) * diag
    return jnp.linalg.solve(jnp.sum(g, axis=0), jnp.einsum("tij,tjk->ik", g, kernels))


def regmean_merging(
    pretrained: Params,
    finetuned: Models,
    grams: Sequence[Mapping[str, jax.Array]],
    alpha: float = 0.95,
) -> Params:
    """RegMean (Jin et al. 2023): linear layers with a Gram matrix by the closed form of
    :func:`regmean_solve` (off-diagonals scaled by alpha=0.95, the paper's default); every other
    leaf by the plain average (as in the paper).

    grams: one ``{path: G}`` dict per model, keyed by the '/'-joined kernel path (e.g.
    ``shared/Dense_0/kernel``), ``G = X^T X`` of shape (d_in, d_in) for that layer's inputs
    (~256 examples in the paper). Kernels may have trailing output axes (DenseGeneral): they are
    reshaped to (d_in, -1). Raises ValueError naming the path and shapes on mismatch.
    """
    finetuned = model_list(pretrained, finetuned)
    if len(grams) != len(finetuned):
        raise ValueError(f"got {len(grams)} Gram dicts for {len(finetuned)} models")
    check_compatible(pretrained, finetuned)
    paths = set(grams[0])
    for i, g in enumerate(grams[1:], 1):
        if set(g) != paths:
            raise ValueError(f"grams[{i}] names layers {sorted(set(g) ^ paths)} not shared with grams[0]")

    def leaf(path, p, *fs):
        theta = jnp.stack([_f32(f) for f in fs])
        if path not in paths:
            return jnp.mean(theta, axis=0).astype(jnp.asarray(p).dtype)
        g = jnp.stack([_f32(gr[path]) for gr in grams])
        d_in = np.shape(p)[0] if np.ndim(p) else 0
        if g.shape[1:] != (d_in, d_in):
            raise ValueError(
                f"Gram shape mismatch at '{path}': kernel {np.shape(p)} needs ({d_in}, {d_in}), "
                f"got {tuple(g.shape[1:])}"
            )
        theta = replicate_if_explicit(theta)
        merged = regmean_solve(theta.reshape(theta.shape[0], d_in, -1), replicate_if_explicit(g), alpha)
        return merged.reshape(np.shape(p)).astype(jnp.asarray(p).dtype)

    missing = paths - set(leaf_paths(pretrained))
    if missing:
        raise ValueError(f"Gram matrices given for paths not in the params: {sorted(missing)[:5]}")
    return map_with_path(leaf, pretrained, *finetuned)

