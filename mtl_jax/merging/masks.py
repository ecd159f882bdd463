"""TALL masks, bit-packed mask storage and Consensus merging.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024
(arXiv 2405.07813): per-task binary masks that localise each task's information inside the
multi-task vector (TALL masks), used to compress T fine-tuned models into
``(theta_0, tau_MTL, T packed masks)`` and to drop "selfish"/"catastrophic" weights when merging
(Consensus merging).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.merging.task_vectors import apply_task_vector, stacked_task_vectors, tree_sum_tasks
from mtl_jax.merging.ties import check_base, multitask_vector
from mtl_jax.merging.tree import Models, Params, check_compatible, model_list, num_stacked, replicate_if_explicit


# -------------------------------------------------------------------------------- bit packing


def pack_bits(mask: jax.Array, batch_dims: int = 0) -> jax.Array:
    """Pack a boolean array into uint8, 8 entries per byte, big-endian bit order, C-order
    flattening (byte-for-byte ``np.packbits(mask.reshape(-1))``).

    mask: shape ``(*batch, *shape)`` -> uint8 ``(*batch, ceil(prod(shape) / 8))``.
    """
    batch = mask.shape[:batch_dims]
    flat = replicate_if_explicit(jnp.asarray(mask, jnp.bool_)).reshape(batch + (-1,))
    return jnp.packbits(flat, axis=-1)


def unpack_bits(packed: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Inverse of :func:`pack_bits`: uint8 ``(*batch, nbytes)`` -> bool ``(*batch, *shape)``."""
    shape = tuple(shape)
    n = int(np.prod(shape, dtype=np.int64))
    bits = jnp.unpackbits(packed, axis=-1, count=n)
    return bits.reshape(packed.shape[:-1] + shape).astype(jnp.bool_)


def pack_mask_tree(masks: Params, batch_dims: int = 0) -> Params:
    """:func:`pack_bits` on every leaf of a boolean tree (1/8 of the bool storage)."""
    return jax.tree_util.tree_map(lambda m: pack_bits(m, batch_dims), masks)


def unpack_mask_tree(packed: Params, like: Params) -> Params:
    """Unpack a packed tree to boolean leaves shaped like the (unstacked) leaves of ``like``."""
    return jax.tree_util.tree_map(lambda p, l: unpack_bits(p, jnp.shape(l)), packed, like)


def task_slice(stacked: Params, t: int | jax.Array) -> Params:
    """Slice ``t`` of a stacked tree (e.g. task t's packed masks); ``t`` may be traced."""
    return jax.tree_util.tree_map(lambda x: x[t], stacked)


# ----------------------------------------------------------------------------------- TALL masks


def _per_task(lam: float | Sequence[float], num: int) -> jax.Array:
    lam = jnp.asarray(lam, jnp.float32)
    return jnp.broadcast_to(lam.reshape(-1) if lam.ndim else lam, (num,))


def tall_masks(
    stacked_tau: Params, merged_tau: Optional[Params] = None, lam: float | Sequence[float] = 0.4
) -> Params:
    """TALL masks (Wang et al. 2024): ``m_t = |tau_t| > lam_t * |tau_MTL - tau_t|`` (strict).

    stacked_tau: fp32 leaves (T, ...). merged_tau: the multi-task vector tau_MTL (leaves (...));
    defaults to ``sum_t tau_t``. lam: scalar or per-task (T,); the paper selects lam_t in
    {0.2, ..., 0.6} per task on validation data, 0.4 is the middle of that grid.
    Returns boolean leaves (T, ...).
    """
    mtl = tree_sum_tasks(stacked_tau) if merged_tau is None else merged_tau
    lam_t = _per_task(lam, num_stacked(stacked_tau))

    def leaf(x, m):
        lam_b = lam_t.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.abs(x) > lam_b * jnp.abs(jnp.asarray(m, jnp.float32)[None] - x)

    return jax.tree_util.tree_map(leaf, stacked_tau, mtl)


class TallMaskModel(NamedTuple):
    """Compressed multi-task model: ``theta_0``, tau_MTL and T bit-packed masks.

    merged_tau: fp32 leaves (...). packed_masks: uint8 leaves (T, ceil(leaf_size / 8)).
    """

    merged_tau: Params
    packed_masks: Params


def tall_mask_compress(
    pretrained: Params,
    finetuned: Models,
    lam: float | Sequence[float] = 0.4,
    merged_tau: Optional[Params] = None,
) -> TallMaskModel:
    """Build TALL masks for every task and store them bit-packed (Wang et al. 2024, Sec. 4).

    ``merged_tau`` defaults to the task-arithmetic sum ``sum_t tau_t``; pass e.g. a TIES vector
    to build masks around it. Task t is rebuilt by :func:`retrieve`.
    """
    tau = stacked_task_vectors(finetuned, pretrained)
    mtl = tree_sum_tasks(tau) if merged_tau is None else merged_tau
    check_compatible(pretrained, [mtl], other_name="merged_tau")
    masks = tall_masks(tau, mtl, lam)
    return TallMaskModel(merged_tau=mtl, packed_masks=pack_mask_tree(masks, batch_dims=1))


def retrieve(pretrained: Params, merged_tau: Params, packed_mask_t: Params) -> Params:
    """Rebuild task t's model ``theta_t ~= theta_0 + m_t * tau_MTL`` (Wang et al. 2024).

    packed_mask_t: uint8 leaves (ceil(leaf_size / 8),), e.g. ``task_slice(model.packed_masks, t)``.
    Output has the pretrained dtypes.
    """
    check_compatible(pretrained, [merged_tau], other_name="merged_tau")
    mask = unpack_mask_tree(packed_mask_t, pretrained)
    masked = jax.tree_util.tree_map(lambda m, x: jnp.where(m, x, 0.0), mask, merged_tau)
    return apply_task_vector(pretrained, masked)


def tall_mask_models(pretrained: Params, finetuned: Models, lam: float | Sequence[float] = 0.4) -> list[Params]:
    """Every task's TALL-mask reconstruction ``theta_0 + m_t * tau_MTL`` (tau_MTL = sum of the task
    vectors; masks bit-packed in between, as stored); ``lam`` scalar or per task (T,)."""
    model = tall_mask_compress(pretrained, finetuned, lam=lam)
    num = num_stacked(model.packed_masks)
    return [retrieve(pretrained, model.merged_tau, task_slice(model.packed_masks, t)) for t in range(num)]


def select_tall_lambdas(
    pretrained: Params,
    finetuned: Models,
    task_scores: Callable[[list[Params]], Sequence[float]],
    lambdas: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6),
) -> tuple[list[float], np.ndarray]:
    """lambda_t per task from a grid (Wang et al. 2024, Sec. 4: each task's own validation data).

    For every ``lam`` of the grid, the T reconstructions :func:`tall_mask_models` are scored by
    ``task_scores(models) -> [T]`` (model t on task t's validation data; higher is better). Returns
    (the best lambda per task, first on ties; the [len(lambdas), T] score matrix). The default grid
    is the paper's {0.2, ..., 0.6}.
    """
    finetuned = model_list(pretrained, finetuned)
    build = jax.jit(tall_mask_models)
    scores = np.stack([np.asarray(task_scores(build(pretrained, finetuned, jnp.full((len(finetuned),), lam,
                                                                                 jnp.float32))), np.float64)
                       for lam in lambdas])
    if scores.shape != (len(lambdas), len(finetuned)):
        raise ValueError(f"task_scores must return one score per task ({len(finetuned)}); got shape {scores.shape[1:]}")
    return [float(lambdas[i]) for i in np.argmax(scores, axis=0)], scores


# ----------------------------------------------------------------------------- Consensus merging


def consensus_mask(masks: Params, k: int = 2) -> Params:
    """Consensus mask (Wang et al. 2024): ``m_cons = [sum_t m_t >= k]``.

    masks: boolean leaves (T, ...) -> boolean leaves (...). k=2 drops "selfish" weights (used by
    one task only) and "catastrophic" ones (used by none).
    """
    return jax.tree_util.tree_map(lambda m: jnp.sum(m, axis=0, dtype=jnp.int32) >= k, masks)


def consensus_vector(stacked_tau: Params, merged_tau: Params, tall_lambda: float | Sequence[float], k: int) -> Params:
    """``m_cons * tau_MTL``: ``merged_tau`` (tau_MTL, leaves (...)) where at least ``k`` TALL masks
    (:func:`tall_masks` of ``stacked_tau``, leaves (T, ...), with ``tall_lambda``) keep the entry, else 0."""
    cons = consensus_mask(tall_masks(stacked_tau, merged_tau, tall_lambda), k)
    return jax.tree_util.tree_map(lambda m, x: jnp.where(m, x, 0.0), cons, merged_tau)


class ConsensusHParams(NamedTuple):
    """:func:`consensus_merging`'s hyperparameters, checked, with ``lam``'s default for ``base``
    filled in (:meth:`validated`)."""

    k: int
    tall_lambda: float | Sequence[float]
    lam: float | jax.Array
    base: str
    top_k: float

    @classmethod
    def validated(cls, k: int, tall_lambda: float | Sequence[float], lam: Optional[float | jax.Array], base: str,
                  top_k: float) -> "ConsensusHParams":
        """ValueError unless ``base`` is "ta" or "ties"; ``lam=None`` becomes 0.3 ("ta") or 1.0 ("ties")."""
        check_base(base, "consensus")
        return cls(k, tall_lambda, (0.3 if base == "ta" else 1.0) if lam is None else lam, base, top_k)


def consensus_merging(
    pretrained: Params,
    finetuned: Models,
    k: int = 2,
    tall_lambda: float | Sequence[float] = 0.4,
    lam: Optional[float] = None,
    base: str = "ta",
    top_k: float = 0.2,
) -> Params:
    """Consensus merging (Wang et al. 2024, Sec. 5): ``theta_0 + lam * (m_cons * tau_MTL)``.

    base="ta": tau_MTL = ``sum_t tau_t`` (Consensus TA), lam default 0.3 (as task arithmetic).
    base="ties": tau_MTL = the TIES vector with ``top_k`` (Consensus TIES), lam default 1.0.
    TALL masks use ``tall_lambda`` around that tau_MTL; entries kept by >= ``k`` masks survive.
    The paper tunes lam on validation data.
    """
    hp = ConsensusHParams.validated(k, tall_lambda, lam, base, top_k)
    tau = stacked_task_vectors(finetuned, pretrained)
    merged = consensus_vector(tau, multitask_vector(tau, hp.base, hp.top_k), hp.tall_lambda, hp.k)
    return apply_task_vector(pretrained, merged, hp.lam)
