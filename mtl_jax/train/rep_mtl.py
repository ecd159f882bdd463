"""Rep-MTL: representation-level task saliency regularisation (Wang, Li & Xu, ICCV 2025, arXiv 2507.21049).

Rep-MTL leaves the optimiser alone (equal weighting) and adds two regularisers computed from the
*task saliency* ``S_k = dL_k/dz`` of every task loss w.r.t. the shared representation ``z``:

* TSR (Task-specific Saliency Regulation): an entropy penalty that keeps the tasks' saliency
  distributions over representation positions distinct (mitigates negative transfer);
* CSA (Cross-task Saliency Alignment): a sample-wise contrastive (InfoNCE) alignment of affinity
  maps built from the saliencies (promotes complementary sharing).

The training objective is ``sum_k L_k + tsr_weight * L_TSR + csa_weight * L_CSA``; both regularisers
depend on ``S`` and are differentiated through it (double backprop).

Provenance -- read this before citing equation numbers. The paper has no released code, and the
stored copies of the paper reachable from this project (arXiv HTML, project page, the authors'
code-less repository Jacky1128/Rep-MTL, third-party reviews) only exposed the abstract and prose
summaries, not Section 3's equations. Verified from those sources: saliency is the gradient of each
task loss w.r.t. the shared representation; channel-wise saliency is aggregated into spatial
distributions; TSR is an entropy-based penalty against blurred / overlapping task saliency; CSA is a
sample-wise contrastive alignment of saliency affinity maps; both are added to an equally weighted
loss. Everything below that is more precise than that is *inferred* and may differ from the paper:

1. Saliency map (channel aggregation). ``S`` [K, B, *spatial, C] (channels last) is reshaped to
   [K, B, P, C] with P = prod(spatial) positions; ``M_kbp = mean_c |S_kbpc|``. A vector
   representation [B, D] has no spatial axis, so the aggregation degenerates: the D features are the
   positions (P = D, C = 1) and ``M_kbp = |S_kbp|``.
2. Spatial distribution per task and sample: ``q_kb(p) = (M_kbp + eps) / sum_p' (M_kbp' + eps)``.
   Normalising each task separately makes TSR invariant to the tasks' loss scales and to the 1/B
   factor of batch-mean losses (the paper may use a softmax instead).
3. TSR = the conditional entropy of the task given the position, for a uniform task prior::

       r_b(p)    = (1/K) sum_k q_kb(p)                  (task-averaged mixture)
       pi_kb(p)  = q_kb(p) / (K r_b(p))                  (task posterior at position p)
       L_TSR     = (1/B) sum_b sum_p r_b(p) H(pi_.b(p))
                 = -(1/B) sum_b (1/K) sum_k sum_p q_kb(p) log pi_kb(p)
                 = log K - JSD(q_1b, ..., q_Kb)            (generalised Jensen-Shannon)

   so L_TSR lies in [0, log K]: log K when all tasks share one saliency distribution, 0 when their
   supports are disjoint. Weighting the per-position entropy by the saliency mass r_b(p) (instead of a
   plain mean over positions) makes positions no task uses irrelevant.
4. Affinity maps (sample-wise): ``g_kb = S_kb / ||S_kb||`` (flattened over positions and channels),
   ``A_k = G_k G_k^T`` [B, B] -- the cosine affinity between samples' saliencies under task k; row
   ``a_kb = A_k[b, :] / ||A_k[b, :]||`` describes how sample b relates to the batch for task k.
5. CSA = symmetric InfoNCE over ordered task pairs (k, j), k != j, with the same sample as the
   positive and the batch's other samples as negatives::

       L_CSA = mean_{k != j} mean_b -log( exp(<a_kb, a_jb>/tau) / sum_b' exp(<a_kb, a_jb'>/tau) )

   With K = 1 there is no task pair and with B = 1 no negative; L_CSA = 0 in both cases.
6. Defaults ``tsr_weight = csa_weight = 0.1``, ``temperature = 0.5``, ``eps = 1e-8`` are *not* the
   paper's (which could not be verified); they keep both terms below the task losses at init
   (L_TSR <= log K, L_CSA ~ log B). ``eps`` must stay > 0 when saliencies can be exactly zero
   (0 log 0 in TSR, 0/0 in the cosine normalisation).

TSR (distinct *where* each task looks) and CSA (shared *relational structure* between samples)
act on different statistics of ``S``, so they do not cancel each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

DEFAULT_TSR_WEIGHT = 0.1
DEFAULT_CSA_WEIGHT = 0.1
DEFAULT_TEMPERATURE = 0.5
DEFAULT_EPS = 1e-8


def saliency_and_losses(decode_losses: Callable, z: jax.Array, has_aux: bool = False):
    """``(S [K, B, ...z dims], losses [K], aux)`` from one forward pass and one vmapped VJP.

    ``decode_losses(z) -> losses [K]`` (or ``(losses, aux)`` with ``has_aux``). Row k of ``S`` is
    ``dL_k/dz``; it stays differentiable, so a loss built from ``S`` backpropagates through this VJP
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
    """``S`` [K, B, ...z dims] with ``S_k = dL_k/dz`` (Rep-MTL's representation-level task saliency)."""
    return saliency_and_losses(decode_losses, z)[0]


def positions_by_channels(saliency: jax.Array) -> jax.Array:
    """[K, B, D] -> [K, B, D, 1] (features are positions); [K, B, *spatial, C] -> [K, B, P, C]."""
    if saliency.ndim < 3:
        raise ValueError(f"saliency needs shape [K, B, ...]; got {saliency.shape}")
    if saliency.ndim == 3:
        return saliency[..., None]
    k, b, c = saliency.shape[0], saliency.shape[1], saliency.shape[-1]
    return saliency.reshape(k, b, -1, c)


def spatial_distribution(saliency: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    """``q`` [K, B, P]: channel-mean |S| normalised over positions, per task and sample (item 1-2)."""
    magnitude = jnp.mean(jnp.abs(positions_by_channels(saliency)), axis=-1) + eps
    return magnitude / jnp.sum(magnitude, axis=-1, keepdims=True)


def tsr_loss(q: jax.Array) -> jax.Array:
    """TSR: conditional entropy H(task | position) in nats, mean over the batch (item 3). q [K, B, P]."""
    num_tasks = q.shape[0]
    log_posterior = jnp.log(q) - jnp.log(jnp.sum(q, axis=0, keepdims=True))
    return -jnp.sum(q * log_posterior) / (num_tasks * q.shape[1])


def _unit_rows(x: jax.Array, eps: float) -> jax.Array:
    """x / ||x|| over the last axis, smooth at 0 (the norm is sqrt(sum x^2 + eps))."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def sample_affinity(saliency: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    """``A`` [K, B, B]: cosine affinity between the samples' saliencies, per task (item 4)."""
    flat = saliency.reshape(saliency.shape[0], saliency.shape[1], -1)
    unit = _unit_rows(flat, eps)
    return jnp.einsum("kbd,kcd->kbc", unit, unit)


def csa_loss(affinity: jax.Array, temperature: float = DEFAULT_TEMPERATURE,
             eps: float = DEFAULT_EPS) -> jax.Array:
    """CSA: InfoNCE between tasks' affinity rows, same sample = positive (item 5). affinity [K, B, B]."""
    num_tasks, batch = affinity.shape[0], affinity.shape[1]
    if num_tasks < 2:
        return jnp.zeros((), affinity.dtype)
    rows = _unit_rows(affinity, eps)
    logits = jnp.einsum("kbd,jcd->kjbc", rows, rows) / temperature
    log_prob = jax.nn.log_softmax(logits, axis=-1)
    positive = jnp.diagonal(log_prob, axis1=-2, axis2=-1)  # [K, K, B]
    off_diagonal = 1.0 - jnp.eye(num_tasks, dtype=affinity.dtype)
    return -jnp.sum(positive * off_diagonal[..., None]) / (num_tasks * (num_tasks - 1) * batch)


def rep_mtl_regularizer(saliency: jax.Array, *, tsr_weight: float = DEFAULT_TSR_WEIGHT,
                        csa_weight: float = DEFAULT_CSA_WEIGHT, temperature: float = DEFAULT_TEMPERATURE,
                        eps: float = DEFAULT_EPS):
    """``(tsr_weight * L_TSR + csa_weight * L_CSA, aux)`` from ``S`` [K, B, ...z dims].

    ``aux``: ``tsr`` and ``csa`` (unweighted, in nats) and ``tsr_normalized`` = L_TSR / log K in
    [0, 1] (0 for K = 1). Computed in float32 at least.
    """
    dtype = jnp.promote_types(saliency.dtype, jnp.float32)
    saliency = saliency.astype(dtype)
    tsr = tsr_loss(spatial_distribution(saliency, eps))
    csa = csa_loss(sample_affinity(saliency, eps), temperature, eps)
    num_tasks = saliency.shape[0]
    normalized = tsr / math.log(num_tasks) if num_tasks > 1 else jnp.zeros((), dtype)
    aux = {"tsr": tsr, "csa": csa, "tsr_normalized": normalized}
    return tsr_weight * tsr + csa_weight * csa, aux


def rep_mtl_loss(decode_losses: Callable, z: jax.Array, *, has_aux: bool = False,
                 tsr_weight: float = DEFAULT_TSR_WEIGHT, csa_weight: float = DEFAULT_CSA_WEIGHT,
                 temperature: float = DEFAULT_TEMPERATURE, eps: float = DEFAULT_EPS):
    """``(regulariser, aux)`` for ``z`` [B, ...]; the train step adds ``sum(aux["losses"])`` (EW).

    ``aux`` holds the regulariser's terms (see ``rep_mtl_regularizer``), the task ``losses`` [K]
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
