"""Rep-MTL: representation-level task saliency regularisation (Wang, Li & Xu, ICCV 2025, arXiv 2507.21049).

Rep-MTL leaves the optimiser alone (equal weighting) and adds two regularisers computed from the
*task saliency* of every task loss w.r.t. the shared representation ``Z`` (Sec. 3.1, Eq. 3)::

    S_t = dL_t/dZ                                                      [B, *spatial, C] per task

The formulas below are the paper's Sec. 3 (read from the arXiv v1 text; the authors released no
code). Shapes are channels-last as in flax: ``S`` [T, B, *spatial, C] is viewed as [T, B, P, C] with
P = prod(spatial) positions (P = 1 for a vector representation [B, C]; tokens [B, N, C] have P = N).

* Eq. 4, channel aggregation: ``S^_t[b, p] = (1/C) sum_c S_t[b, p, c]`` (a signed mean).
* Eq. 5, task-wise distribution at every one of the B*P positions i:
  ``P_{i,t} = |S^_{i,t}| / sum_k |S^_{i,k}|``.
* Eq. 6, TSR (Task-specific Saliency Regulation), the mean entropy over positions::

      L_tsr = 1/(B P) sum_i ( -sum_t P_{i,t} log P_{i,t} )          in [0, log T]

* Eq. 7, affinity maps ``M_t[b] = S_t[b]^T S_t[b]`` [C, C] (S_t[b] as [P, C]).
* Eq. 8, anchors ``A_b = (1/P) sum_p S[b, p]`` stacked over tasks as [C, T] (the figure's "Mean(HW),
  C x T"), ``A^_b = A_b A_b^T`` [C, C]. ``z^a_b`` / ``z^t_b`` are A^_b / M_t[b] flattened and L2-normalised.
* Eq. 9, CSA (Cross-task Saliency Alignment), with sim the cosine similarity::

      L_csa = 1/(B T) sum_b sum_t -log( exp(sim(z^a_b, z^t_b)/tau) / sum_{k != b} exp(sim(z^a_b, z^a_k)/tau) )

  The same sample's task affinities are the positives (B x T pairs), the other samples' anchors the
  negatives (B x (B-1) pairs), as in Fig. 2. The printed Eq. 9 shows one t; we average over t (the
  figure's B x T positive pairs). As printed, the positive is not in the denominator, so L_csa can be
  negative. With B = 1 there is no negative and L_csa = 0.
* Spatial representations (the paper's NYUv2 / Cityscapes setting, the shared decoder feature map
  [B, H, W, C]): Eqs. 4-6 run at every pixel, so TSR asks each position's saliency to be owned by few
  tasks; Eqs. 7-9 compare each sample's position-aggregated affinities. Positions where no task's loss
  depends on z (e.g. invalid pixels under 1x1 heads) have S = 0: their distribution is uniform
  (entropy log T, through ``eps``) and contributes a constant without gradient.
* Eq. 10: ``L = sum_t L_t + lambda_tsr L_tsr + lambda_csa L_csa``; gradients flow through S (double
  backprop) into the heads and the trunk.

No C x C matrix is formed: every Frobenius inner product of Eqs. 7-9 is a Gram of the thin factors,
``<X X^T, Y Y^T> = ||X^T Y||_F^2`` (P x P or C x C for ||M_t[b]||, whichever is smaller; T x T for the
anchors; T x P between an anchor and an affinity).

Defaults: the paper grid-searches lambda_tsr and lambda_csa over {0.7, 0.9, 1.1, 1.3, 1.5} and fixes
the other at 0.9 in its sensitivity study (App. D.1, Sec. 4.5); it reports neither the chosen values
nor tau. ``DEFAULT_*_WEIGHT = 0.9`` follows the sensitivity study; ``DEFAULT_TEMPERATURE = 0.5`` is our
choice. ``eps`` keeps |S^| and the norms away from 0 (0 log 0, 0/0); saliencies are first divided by
their RMS over the whole batch, which leaves Eqs. 5-9 unchanged (they are invariant
to one common scale) and keeps the 4th powers of small batch-mean gradients out of float32 underflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

DEFAULT_TSR_WEIGHT = 0.9
DEFAULT_CSA_WEIGHT = 0.9
DEFAULT_TEMPERATURE = 0.5
DEFAULT_EPS = 1e-8


def saliency_and_losses(decode_losses: Callable, z: jax.Array, has_aux: bool = False):
    """``(S [T, B, ...z dims], losses [T], aux)`` from one forward pass and one vmapped VJP.

    ``decode_losses(z) -> losses [T]`` (or ``(losses, aux)`` with ``has_aux``). Row t of ``S`` is
    ``dL_t/dz``; it stays differentiable, so a loss built from ``S`` backpropagates through this VJP
    into the heads and, via ``z``, into the trunk (double backprop). ``aux`` is None without
    ``has_aux``.
    """
    if has_aux:
        losses, vjp_fn, aux = jax.vjp(decode_losses, z, has_aux=True)
    else:
        losses, vjp_fn = jax.vjp(decode_losses, z)
        aux = None
    basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
    (saliency,) = jax.vmap(vjp_fn)(basis)
    return saliency, losses, aux


def task_saliency(decode_losses: Callable, z: jax.Array) -> jax.Array:
    """``S`` [T, B, ...z dims] with ``S_t = dL_t/dz`` (Rep-MTL's representation-level task saliency)."""
    return saliency_and_losses(decode_losses, z)[0]


def positions_by_channels(saliency: jax.Array) -> jax.Array:
    """[T, B, *spatial, C] -> [T, B, P, C] with P = prod(spatial); a vector representation [T, B, C] gives P = 1."""
    if saliency.ndim < 3:
        raise ValueError(f"saliency needs shape [T, B, ..., C]; got {saliency.shape}")
    num_tasks, batch, channels = saliency.shape[0], saliency.shape[1], saliency.shape[-1]
    return saliency.reshape(num_tasks, batch, -1, channels)


def rms_normalized(saliency: jax.Array) -> jax.Array:
    """``S / RMS(S)``, the RMS over every entry (Eqs. 5-9 are invariant to this common scale; only the
    ``eps`` terms see it). Differentiated through, so gradients are those of the value computed."""
    rms = jnp.sqrt(jnp.mean(jnp.square(saliency)))
    return saliency / jnp.maximum(rms, jnp.finfo(saliency.dtype).tiny)


def task_distribution(saliency: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    """``P`` [T, B, P] (Eqs. 4-5): the channel mean of S, then |.| normalised over the T tasks at
    every (sample, position). ``saliency`` [T, B, *spatial, C]."""
    channel_mean = jnp.mean(positions_by_channels(saliency), axis=-1)  # Eq. 4
    magnitude = jnp.abs(channel_mean) + eps
    return magnitude / jnp.sum(magnitude, axis=0, keepdims=True)  # Eq. 5


def task_distribution_map(saliency: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    """``P`` [T, B, *spatial]: Eq. 5's task distribution at every position of a spatial saliency
    [T, B, *spatial, C] (the per-pixel task-saliency maps the paper visualises on NYUv2)."""
    return task_distribution(saliency, eps).reshape(saliency.shape[:-1])


def tsr_loss(distribution: jax.Array) -> jax.Array:
    """Eq. 6: the entropy over tasks, averaged over the B * P positions. ``distribution`` [T, B, P]."""
    positions = distribution.shape[1] * distribution.shape[2]
    return -jnp.sum(distribution * jnp.log(distribution)) / positions


def _gram_norm_sq(s: jax.Array) -> jax.Array:
    """``||S^T S||_F^2`` per (task, sample) for ``s`` [T, B, P, C], from the smaller Gram (P x P or C x C)."""
    spec = "tbpc,tbqc->tbpq" if s.shape[2] <= s.shape[3] else "tbpc,tbpd->tbcd"
    return jnp.sum(jnp.square(jnp.einsum(spec, s, s)), axis=(-2, -1))


def csa_loss(saliency: jax.Array, temperature: float = DEFAULT_TEMPERATURE,
             eps: float = DEFAULT_EPS) -> jax.Array:
    """Eqs. 7-9: the contrastive alignment of each sample's task affinities ``M_t[b] = S_t[b]^T S_t[b]``
    with its anchor ``A^_b = A_b A_b^T`` against the other samples' anchors. ``saliency`` [T, B, *spatial, C]."""
    s = positions_by_channels(saliency)
    batch = s.shape[1]
    if batch < 2:
        return jnp.zeros((), s.dtype)
    anchor_columns = jnp.mean(s, axis=2)  # [T, B, C]: A_b's columns (Eq. 8)
    affinity_sq = _gram_norm_sq(s)  # [T, B]: ||M_t[b]||^2
    # <A^_b, A^_k> = ||A_b^T A_k||_F^2 for every pair of samples
    anchor_inner = jnp.sum(jnp.square(jnp.einsum("tbc,ukc->bktu", anchor_columns, anchor_columns)), axis=(-2, -1))
    anchor_norm = jnp.sqrt(jnp.diagonal(anchor_inner) + eps)  # [B]
    # <A^_b, M_t[b]> = sum_u ||S_t[b] A_b[:, u]||^2
    positive_inner = jnp.sum(jnp.square(jnp.einsum("tbpc,ubc->tbup", s, anchor_columns)), axis=(-2, -1))
    positive = positive_inner / (anchor_norm[None, :] * jnp.sqrt(affinity_sq + eps))  # [T, B]
    negative = anchor_inner / (anchor_norm[:, None] * anchor_norm[None, :])  # [B, B]
    others = jnp.where(jnp.eye(batch, dtype=bool), -jnp.inf, negative / temperature)
    log_denominator = jax.nn.logsumexp(others, axis=1)  # [B]: sum over k != b
    return jnp.mean(log_denominator[None, :] - positive / temperature)


def rep_mtl_regularizer(saliency: jax.Array, *, tsr_weight: float = DEFAULT_TSR_WEIGHT,
                        csa_weight: float = DEFAULT_CSA_WEIGHT, temperature: float = DEFAULT_TEMPERATURE,
                        eps: float = DEFAULT_EPS):
    """``(tsr_weight * L_tsr + csa_weight * L_csa, aux)`` from ``S`` [T, B, *spatial, C] (Eq. 10's terms).

    ``aux``: ``tsr`` and ``csa`` (unweighted) and ``tsr_normalized`` = L_tsr / log T in [0, 1] (0 for
    T = 1). Computed in float32 at least, on the RMS-normalised saliency.
    """
    dtype = jnp.promote_types(saliency.dtype, jnp.float32)
    saliency = rms_normalized(saliency.astype(dtype))
    tsr = tsr_loss(task_distribution(saliency, eps))
    csa = csa_loss(saliency, temperature, eps)
    num_tasks = saliency.shape[0]
    normalized = tsr / math.log(num_tasks) if num_tasks > 1 else jnp.zeros((), dtype)
    aux = {"tsr": tsr, "csa": csa, "tsr_normalized": normalized}
    return tsr_weight * tsr + csa_weight * csa, aux


def rep_mtl_loss(decode_losses: Callable, z: jax.Array, *, has_aux: bool = False,
                 tsr_weight: float = DEFAULT_TSR_WEIGHT, csa_weight: float = DEFAULT_CSA_WEIGHT,
                 temperature: float = DEFAULT_TEMPERATURE, eps: float = DEFAULT_EPS):
    """``(regulariser, aux)`` for ``z`` [B, ...]; the train step adds ``sum(aux["losses"])`` (EW).

    ``aux`` holds the regulariser's terms (see ``rep_mtl_regularizer``), the task ``losses`` [T]
    from the same forward pass, and ``decode_aux`` (e.g. predictions) when ``has_aux``.
    Differentiate the total w.r.t. the head params (closed over by ``decode_losses``) and the
    trunk params (through ``z``) with one ``jax.grad``.
    """
    saliency, losses, decode_aux = saliency_and_losses(decode_losses, z, has_aux)
    reg, aux = rep_mtl_regularizer(saliency, tsr_weight=tsr_weight, csa_weight=csa_weight,
                                   temperature=temperature, eps=eps)
    aux = dict(aux, losses=losses)
    if has_aux:
        aux["decode_aux"] = decode_aux
    return reg, aux
