"""Task vectors as pytrees (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

A task vector is ``tau_t = theta_t - theta_0`` (Sec. 2 of the paper), leaf by leaf. Arithmetic is
done in float32 (or wider) so bf16 checkpoints do not lose the small deltas; results written back
to parameters are cast to the pretrained leaf dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.merging.tree import Models, Params, check_compatible, model_list, stack_trees


def accum_dtype(dtype: Any) -> Any:
    """Accumulation dtype for a leaf dtype: at least float32 (bf16/f16/ints -> f32, f64 stays)."""
    return jnp.promote_types(dtype, jnp.float32)


def _f32(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(accum_dtype(x.dtype))


def task_vector(finetuned: Params, pretrained: Params) -> Params:
    """``tau = theta_ft - theta_0`` leaf by leaf, in float32 (Ilharco et al. 2023).

    Raises ``ValueError`` naming the path and both shapes on a structure/shape mismatch.
    """
    check_compatible(pretrained, [finetuned])
    return jax.tree_util.tree_map(lambda f, p: _f32(f) - _f32(p), finetuned, pretrained)


def stacked_task_vectors(finetuned: Models, pretrained: Params) -> Params:
    """T task vectors as one stacked tree: every leaf has shape ``(T, *leaf_shape)``, float32."""
    finetuned = model_list(pretrained, finetuned)
    check_compatible(pretrained, finetuned)
    return jax.tree_util.tree_map(
        lambda p, *fs: jnp.stack([_f32(f) for f in fs]) - _f32(p)[None], pretrained, *finetuned
    )


def as_stacked(task_vectors: Sequence[Params] | Params, reference: Params) -> Params:
    """Accept a list of task vectors or an already stacked tree; return the stacked fp32 tree."""
    if isinstance(task_vectors, (list, tuple)):
        check_compatible(reference, task_vectors, other_name="task_vectors")
        return stack_trees(task_vectors, dtype=jnp.float32)
    check_compatible(reference, [task_vectors], other_name="stacked task_vectors", leading_dims=1)
    return jax.tree_util.tree_map(_f32, task_vectors)


def apply_task_vector(pretrained: Params, tau: Params, scale: float | jax.Array = 1.0) -> Params:
    """``theta = theta_0 + scale * tau`` (Ilharco et al. 2023), computed in fp32 and cast to
    each pretrained leaf's dtype. ``scale`` is a scalar (may be traced) or a tree of scalars."""
    check_compatible(pretrained, [tau], other_name="tau")
    if isinstance(scale, (int, float)) or (hasattr(scale, "ndim") and scale.ndim == 0):
        scale = jax.tree_util.tree_map(lambda _: scale, pretrained)
    return jax.tree_util.tree_map(
        lambda p, t, s: (_f32(p) + s * _f32(t)).astype(jnp.asarray(p).dtype), pretrained, tau, scale
    )


# --------------------------------------------------------------------- reductions over leaves


def tree_sum_tasks(stacked: Params) -> Params:
    """Sum over the leading task axis: ``sum_t tau_t``."""
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), stacked)


def tree_l1_norm(tree: Params) -> jax.Array:
    """``||tree||_1``: per-leaf fp32 sums of |x|, added over leaves (never one flat vector)."""
    return sum(jnp.sum(jnp.abs(_f32(x))) for x in jax.tree_util.tree_leaves(tree))


def task_vector_gram(stacked: Params) -> jax.Array:
    """``G[s, t] = <tau_s, tau_t>`` over the whole model, float32 [T, T]: per-leaf products of the
    (T, n_leaf) rows, added over leaves (never one T x N matrix)."""
    def leaf_gram(x):
        rows = _f32(x).reshape(x.shape[0], -1)
        return rows @ rows.T

    return sum(leaf_gram(x) for x in jax.tree_util.tree_leaves(stacked))


def gram_cosines(gram: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Cosines ``G[s, t] / (||tau_s|| ||tau_t||)`` from a [T, T] Gram matrix."""
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), eps))
    return gram / (norms[:, None] * norms[None, :])


def task_vector_cosines(stacked: Params, eps: float = 1e-12) -> jax.Array:
    """Pairwise cosine similarity of the task vectors, [T, T] (1 on the diagonal).

    The diagnostic Ilharco et al. 2023 use to show that task vectors of different tasks are close
    to orthogonal (which is why adding them interferes little); high cosines mean shared directions.
    """
    return gram_cosines(task_vector_gram(stacked), eps)
