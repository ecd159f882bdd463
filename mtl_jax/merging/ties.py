"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023) and DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", ICML 2024)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.counter_random import GOLDEN32, counter_words, key_seed, mix32, stream_increment
from mtl_jax.merging.arithmetic import task_arithmetic_vector
from mtl_jax.merging.task_vectors import apply_task_vector, stacked_task_vectors, tree_sum_tasks
from mtl_jax.merging.threshold import num_kept, topk_trim
from mtl_jax.merging.tree import Models, Params
from mtl_jax.registry import lookup


def _summed_signs(stacked_tau: Params) -> Params:
    return jax.tree_util.tree_map(lambda x: jnp.sign(jnp.sum(x, axis=0)), stacked_tau)


def _fill_zero_signs(signs: Params, majority: jax.Array) -> Params:
    return jax.tree_util.tree_map(lambda s: jnp.where(s == 0, majority, s), signs)


def elect_sign(stacked_tau: Params) -> Params:
    """TIES "elect" (Sec. 3, step 2): ``gamma_m = sign(sum_t tau_t)`` -- the sign with the larger
    total mass. Entries where the sum is exactly 0 get the model-wide majority sign
    ``sign(sum over entries of gamma_m)``, as in the reference implementation.

    stacked_tau: leaves (T, ...) -> leaves (...) in {-1, 0, +1} (0 only if the majority is 0).
    """
    signs = _summed_signs(stacked_tau)
    return _fill_zero_signs(signs, jnp.sign(sum(jnp.sum(s) for s in jax.tree_util.tree_leaves(signs))))


def elect_sign_with_majority(stacked_tau: Params, majority: jax.Array) -> Params:
    """:func:`elect_sign` with the model-wide majority sign given (a scalar computed over every
    leaf of the model, e.g. while ``stacked_tau`` holds only some of them)."""
    return _fill_zero_signs(_summed_signs(stacked_tau), majority)


def disjoint_mean(stacked_tau: Params, sign: Params) -> Params:
    """TIES "disjoint merge" (Sec. 3, step 3): mean over the tasks whose entry is
    non-zero and agrees with the elected sign, ``sum_{t in A^p} tau_t^p / |A^p|``, with
    ``A^p = {t : sign(tau_t^p) = gamma_m^p}``; entries with empty A^p are 0."""

    def leaf(x, s):
        agree = x * s[None] > 0
        total = jnp.sum(jnp.where(agree, x, 0.0), axis=0)
        count = jnp.sum(agree, axis=0)
        return total / jnp.maximum(count, 1).astype(x.dtype)

    return jax.tree_util.tree_map(leaf, stacked_tau, sign)


def ties_merge_vector(
    stacked_tau: Params, top_k: float = 0.2, per_tensor: bool = False, trim: bool = True
) -> Params:
    """TIES merged task vector tau_m (no lambda) from stacked fp32 task vectors (T, ...).

    Steps (Yadav et al. 2023, Sec. 3 / Alg. 1): trim each tau_t to its top ``top_k`` fraction by
    magnitude over the whole model (``per_tensor=True``: per leaf, as MergeKit), elect the sign by
    mass, disjoint mean. Threshold ties are kept (see :mod:`mtl_jax.merging.threshold`).
    ``trim=False`` skips step 1 (used by DARE-TIES).
    """
    trimmed = topk_trim(stacked_tau, top_k, batched=True, per_tensor=per_tensor) if trim else stacked_tau
    return disjoint_mean(trimmed, elect_sign(trimmed))


class TiesHParams(NamedTuple):
    """:func:`ties_merging`'s hyperparameters, checked (:meth:`validated`)."""

    top_k: float
    lam: float | jax.Array
    per_tensor: bool

    @classmethod
    def validated(cls, top_k: float, lam: float | jax.Array, per_tensor: bool) -> "TiesHParams":
        """ValueError unless ``top_k`` is in [0, 1]."""
        num_kept(1, top_k)
        return cls(top_k, lam, per_tensor)


def ties_merging(
    pretrained: Params,
    finetuned: Models,
    top_k: float = 0.2,
    lam: float = 1.0,
    per_tensor: bool = False,
) -> Params:
    """TIES-Merging: ``theta = theta_0 + lam * tau_m`` (Yadav et al. 2023, Alg. 1, line 8).

    Defaults follow the paper's no-validation setting: keep the top 20% (``top_k=0.2``) of each
    task vector over the whole model, ``lam=1``. Per-tensor trimming via ``per_tensor=True``.
    """
    hp = TiesHParams.validated(top_k, lam, per_tensor)
    tau = ties_merge_vector(stacked_task_vectors(finetuned, pretrained), hp.top_k, hp.per_tensor)
    return apply_task_vector(pretrained, tau, hp.lam)


BASES = ("ta", "ties")


def check_base(base: str, method: str) -> None:
    """ValueError unless ``base`` (the multi-task vector ``method`` works on) is "ta" or "ties"."""
    lookup(BASES, base, f"{method} base")


def multitask_vector(stacked_tau: Params, base: str, top_k: float) -> Params:
    """tau_MTL of a ``base``: ``sum_t tau_t`` ("ta") or the TIES vector trimmed to ``top_k`` ("ties");
    stacked_tau: leaves (T, ...) -> leaves (...)."""
    return tree_sum_tasks(stacked_tau) if base == "ta" else ties_merge_vector(stacked_tau, top_k)


# ------------------------------------------------------------------------------------------ DARE


def dare_streams(key: jax.Array, index: int | jax.Array, num_tasks: int) -> tuple[jax.Array, jax.Array]:
    """Per-task stream constants of leaf ``index`` for :func:`dare_keep`: (offset, odd increment),
    each uint32 (T,), hashed from the key's words, the leaf index and the task."""
    seed = key_seed(key)
    leaf = mix32(seed + (jnp.asarray(index).astype(jnp.uint32) + jnp.uint32(1)) * jnp.uint32(GOLDEN32))
    offset = mix32(leaf ^ mix32(jnp.arange(num_tasks, dtype=jnp.uint32) + jnp.uint32(GOLDEN32)))
    return offset, stream_increment(offset)


def drop_threshold(p: float) -> int:
    """uint32 cut ``c = round(p * 2**32)`` (at most 2**32 - 1): an entry is dropped iff its
    uniform 32-bit word is < c, i.e. with probability ``c / 2**32``, within 2**-33 of ``p``
    (exactly ``p`` when ``p * 2**32`` is an integer, e.g. 0.5 or 0.75)."""
    return min(int(round(p * 2.0**32)), 2**32 - 1)


def dare_keep(key: jax.Array, index: int | jax.Array, num_tasks: int, counters: jax.Array, p: float) -> jax.Array:
    """DARE keep mask of leaf ``index`` at flat entry positions ``counters`` (uint32 (n,), the
    C-order index inside one task's slice): bool (T, n).

    A counter-based generator: word ``u = fmix32(counter * g_t + o_t)`` with per-(leaf, task)
    stream constants (:func:`dare_streams`); keep iff ``u >= drop_threshold(p)``. Every entry is
    an independent Bernoulli(1 - p) draw (p rounded to a multiple of 2**-32; the independence is
    the statistical quality of the hash, not a cryptographic guarantee), fixed by the key, the
    leaf index and the position, so any chunk of a leaf can be drawn on its own (the streaming
    merge draws chunk by chunk and gets the in-memory mask bit for bit). One task's slice of a
    leaf must have < 2**32 entries.
    """
    offset, inc = dare_streams(key, index, num_tasks)
    u = counter_words(counters[None, :], offset[:, None], inc[:, None])
    return u >= jnp.uint32(drop_threshold(p))


def _check_drop_rate(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate must be in [0, 1), got {p}")


def dare_drop_leaf(key: jax.Array, index: int | jax.Array, x: jax.Array, p: float) -> jax.Array:
    """Leaf ``index`` of :func:`dare_drop`: entries of the (T, ...) leaf ``x`` kept by
    :func:`dare_keep` are scaled by ``1 / (1 - p)``, the others are 0."""
    n = int(np.prod(x.shape[1:], dtype=np.int64))
    keep = dare_keep(key, index, x.shape[0], jnp.arange(n, dtype=jnp.uint32), p).reshape(x.shape)
    return jnp.where(keep, x / (1.0 - p), jnp.zeros_like(x))


def dare_drop(key: jax.Array, stacked_tau: Params, p: float = 0.9) -> Params:
    """DARE "drop and rescale" (Yu et al. 2024, Sec. 3, Eq. 1-2): ``m ~ Bernoulli(p)`` drops each
    delta entry, survivors are rescaled by ``1 / (1 - p)`` so ``E[dare(tau)] = tau``.

    key: PRNG key (any impl); leaf i (in tree-leaf order) draws its mask with :func:`dare_keep`
    (index i); entries of all tasks and leaves are independent.
    stacked_tau: leaves (T, ...), fp32. p in [0, 1).
    """
    _check_drop_rate(p)
    leaves, treedef = jax.tree_util.tree_flatten(stacked_tau)
    return treedef.unflatten([dare_drop_leaf(key, i, x, p) for i, x in enumerate(leaves)])


class DareHParams(NamedTuple):
    """:func:`dare_merging`'s hyperparameters, checked, with ``lam``'s default for ``combine``
    filled in (:meth:`validated`)."""

    key: jax.Array
    p: float
    combine: str
    lam: float | jax.Array

    @classmethod
    def validated(cls, key: jax.Array, p: float, combine: str, lam: Optional[float | jax.Array]) -> "DareHParams":
        """ValueError unless ``combine`` is "ta" or "ties" and ``p`` is in [0, 1); ``lam=None``
        becomes 0.3 ("ta", as task arithmetic) or 1.0 ("ties")."""
        lookup(BASES, combine, "DARE combine")
        _check_drop_rate(p)
        return cls(key, p, combine, (0.3 if combine == "ta" else 1.0) if lam is None else lam)


def dare_merging(
    pretrained: Params,
    finetuned: Models,
    key: jax.Array,
    p: float = 0.9,
    combine: str = "ta",
    lam: Optional[float] = None,
) -> Params:
    """DARE: drop-and-rescale every task vector, then combine (Yu et al. 2024, Sec. 3-4).

    ``combine="ta"``: ``theta_0 + lam * sum_t dare(tau_t)`` (lam default 0.3, as task arithmetic).
    ``combine="ties"``: TIES sign election + disjoint mean on the DARE vectors, DARE replacing the
    top-k trim (MergeKit's ``dare_ties``), lam default 1.0.
    ``p=0.9``: the paper's headline drop rate (90% of delta parameters removed).
    """
    hp = DareHParams.validated(key, p, combine, lam)
    dropped = dare_drop(hp.key, stacked_task_vectors(finetuned, pretrained), hp.p)
    if hp.combine == "ta":
        return apply_task_vector(pretrained, task_arithmetic_vector(dropped, hp.lam))
    return apply_task_vector(pretrained, ties_merge_vector(dropped, trim=False), hp.lam)
