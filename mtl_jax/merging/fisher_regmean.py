"""Data-statistics merging: Fisher merging and RegMean, and the statistics they take.

* Fisher merging: Matena & Raffel, "Merging Models with Fisher Weighting", NeurIPS 2022
  (Fisher-weighted average with the diagonal Fisher, :func:`fisher_diagonal`).
* RegMean: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
  ICLR 2023: closed-form least squares per linear layer, off-diagonal Gram entries scaled by alpha
  (the Gram matrices of the layers' inputs: :func:`regmean_grams`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
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


def fisher_diagonal(logits_fn: Callable[[Params, jax.Array], jax.Array], params: Params, x: jax.Array,
                    key: jax.Array) -> Params:
    """Diagonal Fisher of ``params`` (Matena & Raffel 2022, Sec. 2): the mean over the N examples of
    ``x`` of the squared gradient of ``log p(y_hat | x_n)``, with ``y_hat ~ p(. | x_n)`` sampled from
    the model (one sample per example: an unbiased estimate of the expectation over labels).

    logits_fn: ``(params, x [B, ...]) -> logits [B, C]``; x: [N, ...]. Returns one tree shaped like
    ``params`` (the ``fishers`` entry of :func:`fisher_merging` for this model). The per-example
    gradients are vmapped: memory N x the parameters.
    """
    labels = jax.random.categorical(key, logits_fn(params, x))

    def log_likelihood(p, xi, yi):
        return jax.nn.log_softmax(logits_fn(p, xi[None]))[0, yi]

    grads = jax.vmap(jax.grad(log_likelihood), in_axes=(None, 0, 0))(params, x, labels)
    return jax.tree_util.tree_map(lambda g: jnp.mean(g * g, axis=0), grads)


def regmean_grams(apply_fn: Callable[[], Any], prefix: Sequence[str] = ()) -> dict[str, jax.Array]:
    """RegMean Gram matrices (Jin et al. 2023, Sec. 3.2) of the flax linen model run by ``apply_fn()``
    (e.g. ``lambda: model.apply({"params": params}, x)``): ``G = X^T X`` of the inputs X of every
    ``nn.Dense`` / ``nn.DenseGeneral`` call, summed over examples and tokens (and over the calls of a
    layer applied more than once), keyed by ``'/'.join(prefix + module path + ('kernel',))``: the
    ``grams`` entry of :func:`regmean_merging` for this model. A DenseGeneral contracting k axes has
    its last k input axes flattened (attention ``out``: (H, Dh) -> H*Dh), matching its kernel viewed
    as (d_in, d_out). Other layers (convolutions, embeddings) get none: RegMean averages them.
    """
    grams = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
            axis = module.axis if isinstance(module, nn.DenseGeneral) else -1
            num_axes = len(axis) if isinstance(axis, tuple) else 1
            inputs = args[0]
            flat = inputs.reshape(-1, int(np.prod(inputs.shape[inputs.ndim - num_axes:])))
            path = "/".join(tuple(prefix) + tuple(module.path) + ("kernel",))
            gram = flat.T @ flat
            grams[path] = grams[path] + gram if path in grams else gram
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        apply_fn()
    return grams


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

