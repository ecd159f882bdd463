"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging",
NeurIPS 2024, arXiv 2405.17461): Elect a unified task vector, then per-task Mask and Rescale.

The result is not one model but ``(tau_uni, masks, rescalers)``; :func:`emr_retrieve` builds
task t's model ``theta_0 + s_t * M_t * tau_uni``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.merging.masks import pack_mask_tree, unpack_mask_tree
from mtl_jax.merging.task_vectors import apply_task_vector, stacked_task_vectors
from mtl_jax.merging.tree import Models, Params


class EMRModel(NamedTuple):
    """tau_uni: fp32 leaves (...). packed_masks: uint8 leaves (T, ceil(size / 8)) (bit-packed M_t).
    rescalers: fp32 (T,)."""

    tau_uni: Params
    packed_masks: Params
    rescalers: jax.Array


def emr_elect(stacked_tau: Params) -> tuple[Params, Params]:
    """Elect: ``sigma = sign(sum_t tau_t)``; ``tau_uni = sigma * max_t |tau_t|`` over the
    tasks whose entry agrees with sigma; ``M_t = [tau_t * sigma > 0]``.

    stacked_tau: leaves (T, ...) -> (tau_uni leaves (...), masks bool leaves (T, ...)).
    Entries where the sum is exactly 0 get sigma = 0, so tau_uni = 0 and every M_t = 0 there
    (FusionBench maps sign 0 to -1 instead; the two differ only on exact cancellations).
    """
    sigma = jax.tree_util.tree_map(lambda x: jnp.sign(jnp.sum(x, axis=0)), stacked_tau)
    masks = jax.tree_util.tree_map(lambda x, s: x * s[None] > 0, stacked_tau, sigma)
    tau_uni = jax.tree_util.tree_map(
        lambda x, m, s: s * jnp.max(jnp.where(m, jnp.abs(x), 0.0), axis=0), stacked_tau, masks, sigma
    )
    return tau_uni, masks


def emr_rescalers(stacked_tau: Params, tau_uni: Params, masks: Params) -> jax.Array:
    """Rescale: ``s_t = sum|tau_t| / sum|M_t * tau_uni|`` over all entries of the model
    (per-leaf sums added over leaves). Returns (T,) fp32."""
    num = sum(jnp.sum(jnp.abs(x), axis=tuple(range(1, x.ndim))) for x in jax.tree_util.tree_leaves(stacked_tau))
    den = sum(
        jnp.sum(jnp.where(m, jnp.abs(u)[None], 0.0), axis=tuple(range(1, m.ndim)))
        for m, u in zip(jax.tree_util.tree_leaves(masks), jax.tree_util.tree_leaves(tau_uni))
    )
    return num / den


def emr_merging(pretrained: Params, finetuned: Models) -> EMRModel:
    """EMR-Merging (Alg. 1): elect tau_uni, bit-packed masks M_t and rescalers s_t. Tuning-free."""
    tau = stacked_task_vectors(finetuned, pretrained)
    tau_uni, masks = emr_elect(tau)
    scales = emr_rescalers(tau, tau_uni, masks)
    return EMRModel(tau_uni=tau_uni, packed_masks=pack_mask_tree(masks, batch_dims=1), rescalers=scales)


def emr_retrieve(pretrained: Params, model: EMRModel, t: int | jax.Array) -> Params:
    """Task t's model ``theta_0 + s_t * (M_t * tau_uni)``, in the pretrained dtypes."""
    packed_t = jax.tree_util.tree_map(lambda p: p[t], model.packed_masks)
    mask = unpack_mask_tree(packed_t, pretrained)
    masked = jax.tree_util.tree_map(lambda m, u: jnp.where(m, u, 0.0), mask, model.tau_uni)
    return apply_task_vector(pretrained, masked, model.rescalers[t])
