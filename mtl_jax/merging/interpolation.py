"""Geometric interpolation between models: SLERP, Multi-SLERP and Model Stock."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.merging.arithmetic import per_task_weights
from mtl_jax.merging.task_vectors import accum_dtype, stacked_task_vectors
from mtl_jax.merging.tree import Models, Params, check_compatible, model_list, replicate_if_explicit


def _f32(x):
    x = jnp.asarray(x)
    return x.astype(accum_dtype(x.dtype))


def slerp_leaf(v0: jax.Array, v1: jax.Array, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> jax.Array:
    """Spherical linear interpolation of one tensor (Shoemake 1985, "Animating rotation with
    quaternion curves"; per tensor as in MergeKit):

        theta = arccos(<v0/|v0|, v1/|v1|>),
        slerp = sin((1-t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

    Falls back to ``(1-t) v0 + t v1`` when ``|cos theta| > dot_threshold`` (near-colinear, where
    sin(theta) ~ 0) or either tensor has ~zero norm. Works on fp32 copies; any shape.
    """
    a, b = _f32(v0), _f32(v1)
    na, nb = jnp.sqrt(jnp.sum(a * a)), jnp.sqrt(jnp.sum(b * b))
    dot = jnp.sum((a / jnp.maximum(na, eps)) * (b / jnp.maximum(nb, eps)))
    dot = jnp.clip(dot, -1.0, 1.0)
    colinear = (jnp.abs(dot) > dot_threshold) | (na < eps) | (nb < eps)
    theta = jnp.arccos(jnp.where(colinear, 0.0, dot))
    sin_theta = jnp.where(colinear, 1.0, jnp.sin(theta))
    s0 = jnp.where(colinear, 1.0 - t, jnp.sin((1.0 - t) * theta) / sin_theta)
    s1 = jnp.where(colinear, t, jnp.sin(t * theta) / sin_theta)
    return s0 * a + s1 * b


def slerp(
    pretrained: Params,
    finetuned: Models,
    t: float = 0.5,
    dot_threshold: float = 0.9995,
) -> Params:
    """SLERP of exactly two models, tensor by tensor (:func:`slerp_leaf`), ``t=0`` gives
    ``finetuned[0]``, ``t=1`` gives ``finetuned[1]``. ``pretrained`` only fixes structure/dtypes
    (SLERP interpolates the weights themselves, as MergeKit does)."""
    finetuned = model_list(pretrained, finetuned)
    if len(finetuned) != 2:
        raise ValueError(f"SLERP merges exactly 2 models, got {len(finetuned)}")
    check_compatible(pretrained, finetuned)
    return jax.tree_util.tree_map(
        lambda p, a, b: slerp_leaf(a, b, t, dot_threshold).astype(jnp.asarray(p).dtype),
        pretrained,
        *finetuned,
    )


def multi_slerp_leaf(stacked_tau: jax.Array, weights: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Barycentric interpolation of T tensors on the hypersphere (MergeKit's ``multislerp``,
    Goddard 2024), ``stacked_tau`` [T, ...] (fp32), ``weights`` [T] summing to 1:

        u_t = tau_t / ||tau_t||,  m = sum_t w_t u_t / ||sum_t w_t u_t||   (the weighted mean direction)
        v = sum_t w_t (u_t - <u_t, m> m)                                  (tangent vectors at m)
        result = (cos ||v|| m + sin ||v|| v / ||v||) * sum_t w_t ||tau_t||   (exponential map, mean norm)

    When ``||sum_t w_t u_t|| < eps`` (antipodal inputs that cancel) the weighted linear average is
    returned (MergeKit does so for T = 2 and raises for T > 2; under jit there is no raising).
    """
    flat = stacked_tau.reshape(stacked_tau.shape[0], -1)
    norms = jnp.sqrt(jnp.sum(flat * flat, axis=1))
    unit = flat / (norms[:, None] + eps)
    mean = weights @ unit
    mean_norm = jnp.sqrt(jnp.sum(mean * mean))
    direction = mean / jnp.maximum(mean_norm, eps)
    tangent = weights @ (unit - (unit @ direction)[:, None] * direction[None])
    tangent_norm = jnp.sqrt(jnp.sum(tangent * tangent)) + eps
    on_sphere = direction * jnp.cos(tangent_norm) + tangent * (jnp.sin(tangent_norm) / tangent_norm)
    result = jnp.where(mean_norm < eps, weights @ flat, on_sphere * (weights @ norms))
    return result.reshape(stacked_tau.shape[1:])


def multi_slerp(pretrained: Params, finetuned: Models, weights: Optional[Sequence[float]] = None,
                eps: float = 1e-8) -> Params:
    """Multi-SLERP of T models around ``pretrained`` (the origin of the hypersphere, MergeKit's
    ``base_model``), tensor by tensor: ``theta_0 + multi_slerp_leaf(tau, w)`` (:func:`multi_slerp_leaf`),
    ``w`` uniform or ``weights`` normalised to sum 1. One model gives that model."""
    finetuned = model_list(pretrained, finetuned)
    if len(finetuned) == 1:
        check_compatible(pretrained, finetuned)
        return jax.tree_util.tree_map(lambda p, f: jnp.asarray(f).astype(jnp.asarray(p).dtype), pretrained, finetuned[0])
    w = per_task_weights(weights, len(finetuned))
    w = w / jnp.sum(w)
    tau = stacked_task_vectors(finetuned, pretrained)
    return jax.tree_util.tree_map(
        lambda p, x: (_f32(p) + multi_slerp_leaf(replicate_if_explicit(x), w, eps)).astype(jnp.asarray(p).dtype),
        pretrained, tau)


def model_stock_ratio(cos: jax.Array, num: int) -> jax.Array:
    """Model Stock interpolation ratio (Jang et al. 2024): ``t = k cos / (1 + (k-1) cos)``."""
    return num * cos / (1.0 + (num - 1) * cos)


def _mean_pairwise_cos(x: jax.Array, eps: float) -> jax.Array:
    """cos of the mean pairwise angle between the T rows of x (T, ...) (T >= 2)."""
    num = x.shape[0]
    flat = replicate_if_explicit(x).reshape(num, -1)
    gram = flat @ flat.T
    norms = jnp.sqrt(jnp.diag(gram))
    cos = jnp.clip(gram / (norms[:, None] * norms[None, :] + eps), -1.0, 1.0)
    iu = jnp.triu_indices(num, k=1)
    return jnp.cos(jnp.mean(jnp.arccos(cos[iu])))


def model_stock(pretrained: Params, finetuned: Models, eps: float = 1e-8) -> Params:
    """Model Stock (Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models",
    ECCV 2024), per layer (leaf):

        cos = cos(angle between the fine-tuned deltas theta_t - theta_0),
        t = k cos / (1 + (k-1) cos),   theta = t * mean_t(theta_t) + (1 - t) * theta_0.

    With k > 2 models the angle is the mean of the pairwise angles (the reference code's rule).
    Needs k >= 2. Deltas in fp32; output in the pretrained dtypes.
    """
    finetuned = model_list(pretrained, finetuned)
    if len(finetuned) < 2:
        raise ValueError(f"Model Stock needs at least 2 fine-tuned models, got {len(finetuned)}")
    num = len(finetuned)
    tau = stacked_task_vectors(finetuned, pretrained)

    def leaf(p, d):
        ratio = model_stock_ratio(_mean_pairwise_cos(d, eps), num)
        p32 = _f32(p)
        avg = p32 + jnp.mean(d, axis=0)
        return (ratio * avg + (1.0 - ratio) * p32).astype(jnp.asarray(p).dtype)

    return jax.tree_util.tree_map(leaf, pretrained, tau)
