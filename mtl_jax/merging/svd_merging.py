"""SVD-based merging of 2-D task-vector matrices: TSV-M, Iso-C and Iso-CTS.

* TSV-M: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
  CVPR 2025 (arXiv 2412.00081), Sec. 4 / Alg. 1.
* Iso-C / Iso-CTS: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025 (arXiv 2502.04959), Sec. 4 (Iso-C, Iso-CTS).

A "matrix" is a leaf that is 2-D per task and not matched by the ``exclude`` regex (the reference
code excludes e.g. CLIP's ``text_projection``). All other leaves (biases, norms, conv kernels,
3-D DenseGeneral kernels) are averaged over tasks, as the reference implementations do. The whole
merged vector is then scaled by ``alpha`` and added to theta_0. SVDs run in float32.

Per-task SVDs of a (T, m, n) stack run as a loop of 2-D SVDs (:func:`task_svds`), not one batched
LAPACK call: jaxlib's batched CPU SVD fans its batch out into the XLA:CPU intra-op pool it runs on
and blocks until that work is done; with two such SVDs running at once on a 2-core machine both pool
threads were seen blocked so, for ever (the 8-task 4-block ViT merge, 64x64 / 64x128 layers; smaller
random cases did not hang, so the trigger depends on sizes and scheduling).
"""

from __future__ import annotations

from typing import Iterable, Optional

import jax
import jax.numpy as jnp

from mtl_jax.merging.task_vectors import apply_task_vector, stacked_task_vectors
from mtl_jax.merging.tree import Models, Params, map_with_path, path_selected, replicate_if_explicit


def polar_factor(a: jax.Array) -> jax.Array:
    """Closest matrix with orthonormal columns (rows if wide): ``U S V^T -> U V^T``
    (orthogonal Procrustes). a: (m, r) -> (m, r)."""
    u, _, vt = jnp.linalg.svd(a, full_matrices=False)
    return u @ vt


def task_svds(stack: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD of every task matrix, one after another: stack (T, m, n) ->
    ``(U (T, m, r), S (T, r), Vt (T, r, n))``, ``r = min(m, n)``."""
    return jax.lax.map(lambda a: jnp.linalg.svd(a, full_matrices=False), stack)


def _is_matrix(path: str, x: jax.Array, exclude) -> bool:
    return x.ndim == 3 and not (exclude and path_selected(path, include=exclude))


def _svd_merge(stacked_tau: Params, matrix_fn, exclude) -> Params:
    return map_with_path(
        lambda p, x: matrix_fn(replicate_if_explicit(x)) if _is_matrix(p, x, exclude) else jnp.mean(x, axis=0),
        stacked_tau,
    )


# ------------------------------------------------------------------------------------------ TSV


def tsv_factors(stack: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """TSV-M factors of one layer (TSV paper, Alg. 1).

    stack: (T, m, n) task matrices. Each task keeps its top ``k = min(m, n) // T`` singular
    triplets; the U's and V's are concatenated and orthogonalised by their polar factors.
    Returns ``(U_perp (m, T*k), S (T*k,), V_perp (T*k, n))``; the layer is ``U_perp diag(S) V_perp``.
    """
    num, m, n = stack.shape
    k = min(m, n) // num
    u, s, vt = task_svds(stack)
    u_cat = jnp.transpose(u[:, :, :k], (1, 0, 2)).reshape(m, num * k)
    s_cat = s[:, :k].reshape(num * k)
    v_cat = vt[:, :k, :].reshape(num * k, n)
    return polar_factor(u_cat), s_cat, polar_factor(v_cat)


def tsv_matrix(stack: jax.Array) -> jax.Array:
    """TSV-M merged matrix ``U_perp diag(S) V_perp`` (zero when ``min(m, n) < T``, as the reference
    keeps ``int(r / T)`` = 0 vectors per task there)."""
    num, m, n = stack.shape
    if min(m, n) // num == 0:
        return jnp.zeros((m, n), stack.dtype)
    u, s, v = tsv_factors(stack)
    return (u * s[None, :]) @ v


def tsv_merging(
    pretrained: Params,
    finetuned: Models,
    alpha: float = 1.0,
    exclude: Optional[str | Iterable[str]] = None,
) -> Params:
    """TSV-Merge: ``theta_0 + alpha * tau_TSV``; matrices via :func:`tsv_matrix`, other leaves
    averaged over tasks. The paper reports alpha=1.0 without validation tuning."""
    tau = stacked_task_vectors(finetuned, pretrained)
    return apply_task_vector(pretrained, _svd_merge(tau, tsv_matrix, exclude), alpha)


# ---------------------------------------------------------------------------------------- Iso-C


def iso_c_matrix(stack: jax.Array) -> jax.Array:
    """Iso-C layer (Iso paper): SVD of ``sum_t tau_t = U S V^T``, spectrum replaced by its
    mean: ``mean(S) * U V^T`` (every non-zero singular value equal). stack: (T, m, n) -> (m, n)."""
    u, s, vt = jnp.linalg.svd(jnp.sum(stack, axis=0), full_matrices=False)
    return jnp.mean(s) * (u @ vt)


def iso_c_merging(
    pretrained: Params,
    finetuned: Models,
    alpha: float = 1.0,
    exclude: Optional[str | Iterable[str]] = None,
) -> Params:
    """Iso-C: ``theta_0 + alpha * tau_Iso-C``. alpha is tuned on validation in the paper
    (1.0 is the neutral default); non-matrix leaves are averaged."""
    tau = stacked_task_vectors(finetuned, pretrained)
    return apply_task_vector(pretrained, _svd_merge(tau, iso_c_matrix, exclude), alpha)


# -------------------------------------------------------------------------------------- Iso-CTS


def iso_cts_sizes(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(k_common, k_per_task)`` with ``k_common + T * k_per_task = rank``: start from
    ``int(rank * common_fraction)`` and round the task-specific part to a multiple of T, as the
    reference implementation does."""
    common = int(rank * common_fraction)
    ts_total = round((rank - common) / num_tasks) * num_tasks
    if ts_total > rank:
        ts_total = (rank // num_tasks) * num_tasks
    return rank - ts_total, ts_total // num_tasks


def iso_cts_factors(stack: jax.Array, common_fraction: float = 0.8) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Iso-CTS subspaces of one layer (Iso paper).

    1. Common subspace: top ``k_common`` left/right singular vectors of ``sum_t tau_t``.
    2. Task-specific: for each task, the top ``k_per_task`` singular vectors of
       ``tau_t - U_c U_c^T tau_t`` (the part outside the common subspace).
    3. Concatenate (tasks first, then common), orthogonalise U and V by polar factors.
    4. Isotropic spectrum: every singular value set to the mean of the concatenated ones.
    Returns ``(U_perp (m, r), sigma (scalar), V_perp (r, n))`` with ``r = min(m, n)``.
    """
    num, m, n = stack.shape
    rank = min(m, n)
    k_c, k_t = iso_cts_sizes(rank, num, common_fraction)
    u, s, vt = jnp.linalg.svd(jnp.sum(stack, axis=0), full_matrices=False)
    u_c, s_c, v_c = u[:, :k_c], s[:k_c], vt[:k_c, :]
    residual = stack - jnp.einsum("ik,jk,tjn->tin", u_c, u_c, stack)
    ut, st, vtt = task_svds(residual)
    u_ts = jnp.transpose(ut[:, :, :k_t], (1, 0, 2)).reshape(m, num * k_t)
    v_ts = vtt[:, :k_t, :].reshape(num * k_t, n)
    u_all = jnp.concatenate([u_ts, u_c], axis=1)
    v_all = jnp.concatenate([v_ts, v_c], axis=0)
    s_all = jnp.concatenate([st[:, :k_t].reshape(-1), s_c])
    return polar_factor(u_all), jnp.mean(s_all), polar_factor(v_all)


def iso_cts_matrix(stack: jax.Array, common_fraction: float = 0.8) -> jax.Array:
    """Iso-CTS merged layer ``sigma * U_perp V_perp``. stack: (T, m, n) -> (m, n)."""
    u, sigma, v = iso_cts_factors(stack, common_fraction)
    return sigma * (u @ v)


def iso_cts_merging(
    pretrained: Params,
    finetuned: Models,
    alpha: float = 1.0,
    common_fraction: float = 0.8,
    exclude: Optional[str | Iterable[str]] = None,
) -> Params:
    """Iso-CTS: ``theta_0 + alpha * tau_Iso-CTS`` with common-subspace fraction 0.8 (paper default);
    alpha tuned on validation in the paper. Non-matrix leaves are averaged."""
    tau = stacked_task_vectors(finetuned, pretrained)
    fn = lambda x: iso_cts_matrix(x, common_fraction)  # noqa: E731
    return apply_task_vector(pretrained, _svd_merge(tau, fn, exclude), alpha)
