"""Weight averaging (uniform and greedy soups) and task arithmetic, plus a validation grid search
for their coefficient."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.merging.task_vectors import (
    accum_dtype,
    apply_task_vector,
    stacked_task_vectors,
)
from mtl_jax.merging.tree import Models, Params, check_compatible, model_list


def per_task_weights(weights: Optional[Sequence[float] | jax.Array], num: int) -> jax.Array:
    if weights is None:
        return jnp.ones((num,), jnp.float32)
    w = jnp.asarray(weights, jnp.float32).reshape(-1) if np.ndim(weights) else jnp.full((num,), weights, jnp.float32)
    if w.shape[0] != num:
        raise ValueError(f"got {w.shape[0]} per-task weights for {num} models")
    return w


def normalized_weights(weights: Optional[Sequence[float] | jax.Array], num: int) -> jax.Array:
    """``w / sum(w)`` of :func:`per_task_weights` (uniform for ``None``): fp32 (num,)."""
    w = per_task_weights(weights, num)
    return w / jnp.sum(w)


class WeightAverageHParams(NamedTuple):
    """:func:`weight_average`'s hyperparameters (checked against the number of models by
    :func:`normalized_weights`)."""

    weights: Optional[Sequence[float]]


def weight_average(
    pretrained: Params, finetuned: Models, weights: Optional[Sequence[float]] = None
) -> Params:
    """Weighted parameter average ``theta = sum_t w_t theta_t / sum_t w_t`` (uniform by default).

    Model soups / "Averaging weights leads to wider optima" (Wortsman et al. 2022;
    Izmailov et al. 2018). ``pretrained`` only fixes structure and output dtypes.
    Leaves: any shape; output has the pretrained structure and dtypes; sums in fp32.
    """
    finetuned = model_list(pretrained, finetuned)
    check_compatible(pretrained, finetuned)
    w = normalized_weights(weights, len(finetuned))

    def avg(p, *fs):
        stacked = jnp.stack([jnp.asarray(f).astype(accum_dtype(jnp.asarray(f).dtype)) for f in fs])
        return jnp.tensordot(w, stacked, axes=1).astype(jnp.asarray(p).dtype)

    return jax.tree_util.tree_map(avg, pretrained, *finetuned)


def is_per_leaf_coefficients(lam: Any, stacked_tau: Params) -> bool:
    """Whether ``lam`` is a tree of per-(task, leaf) coefficients: the structure of ``stacked_tau``
    with a 1-D (T,) array at every leaf (scalars or a flat per-task sequence are not)."""
    if isinstance(lam, (int, float)) or (hasattr(lam, "ndim") and not isinstance(lam, (list, tuple, dict))):
        return False
    if jax.tree_util.tree_structure(lam) != jax.tree_util.tree_structure(stacked_tau):
        return False
    return all(np.ndim(c) == 1 for c in jax.tree_util.tree_leaves(lam))


def task_arithmetic_vector(stacked_tau: Params, lam: float | Sequence[float] | Params = 0.3) -> Params:
    """``lam * sum_t tau_t`` (or ``sum_t lam_t tau_t`` for per-task coefficients) from a stacked
    (T, ...) fp32 task-vector tree.

    ``lam`` may also be a tree with the structure of ``stacked_tau`` holding a (T,) array per leaf:
    ``sum_t lam_t^l tau_t^l`` with one coefficient per (task, leaf), as layer-wise AdaMerging
    (Yang et al., ICLR 2024, Eq. 6) and aTLAS (Zhang et al., NeurIPS 2024) need. Coefficients may
    be traced, so ``jax.grad`` flows to them.
    """
    num = jax.tree_util.tree_leaves(stacked_tau)[0].shape[0]
    if is_per_leaf_coefficients(lam, stacked_tau):
        check_compatible(
            jax.tree_util.tree_map(lambda _: jnp.zeros((num,)), stacked_tau), [lam],
            reference_name="per-task coefficients (T,)", other_name="lam",
        )
        return jax.tree_util.tree_map(
            lambda x, c: jnp.tensordot(jnp.asarray(c, x.dtype), x, axes=1), stacked_tau, lam
        )
    lam_t = per_task_weights(lam, num)
    return jax.tree_util.tree_map(lambda x: jnp.tensordot(lam_t, x, axes=1), stacked_tau)


class TaskArithmeticHParams(NamedTuple):
    """:func:`task_arithmetic`'s hyperparameters (checked against the number of models by
    :func:`per_task_weights` or :func:`task_arithmetic_vector`)."""

    lam: float | Sequence[float] | Params


def task_arithmetic(
    pretrained: Params, finetuned: Models, lam: float | Sequence[float] = 0.3
) -> Params:
    """Task arithmetic: ``theta = theta_0 + lam * sum_t (theta_t - theta_0)``.

    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, Sec. 2 (addition of task
    vectors). The paper picks ``lam`` on validation data (see :func:`grid_search`); 0.3 is the
    fixed value used by AdaMerging/FusionBench. ``lam`` may be a per-task sequence, or a tree of
    (T,) arrays with the pretrained structure for one coefficient per (task, leaf).
    """
    tau = task_arithmetic_vector(stacked_task_vectors(finetuned, pretrained), lam)
    return apply_task_vector(pretrained, tau)


class GridSearchResult(NamedTuple):
    best_value: Any
    best_params: Params
    scores: list[tuple[Any, float]]


def grid_search(
    merge_fn: Callable[[Any], Params],
    values: Sequence[Any],
    validation_fn: Callable[[Params], float],
) -> GridSearchResult:
    """Pick the coefficient maximising a validation score.

    Args:
      merge_fn: ``value -> merged params`` (e.g. ``lambda lam: task_arithmetic(p0, fts, lam)``).
      values: candidates, e.g. ``np.linspace(0, 1, 11)[1:]`` as in tall_masks / LiNeS for TA.
      validation_fn: ``params -> score`` (higher is better, e.g. mean normalised accuracy).

    Returns the best value (first one on ties), its merged params, and all ``(value, score)``.
    Runs eagerly on the host: one merge and one evaluation per candidate.
    """
    if len(values) == 0:
        raise ValueError("grid_search needs at least one candidate value")
    best = None
    scores = []
    for v in values:
        params = merge_fn(v)
        score = float(validation_fn(params))
        scores.append((v, score))
        if best is None or score > best[1]:
            best = (v, score, params)
    return GridSearchResult(best_value=best[0], best_params=best[2], scores=scores)


class GreedySoupResult(NamedTuple):
    params: Params
    ingredients: list[int]  # indices into ``finetuned`` of the models in the soup, in the order added
    individual_scores: list[float]  # validation score of every finetuned model, in input order
    soup_score: float  # validation score of the returned soup


def greedy_soup(
    pretrained: Params, finetuned: Models, validation_fn: Callable[[Params], float]
) -> GreedySoupResult:
    """Greedy model soup: add models in order of validation score, keep each only if it helps.

    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time", ICML 2022, Algorithm 1 (GreedySoup): sort the
    ingredients by held-out score, start from the best one, and add ``theta_i`` to the soup when
    ``ValAcc(average(soup + {theta_i})) >= ValAcc(average(soup))``. The soup is the uniform
    :func:`weight_average` of the kept models; by construction it scores no worse on validation
    than the best single model. Ties in the individual scores keep the input order.

    Costs ``2T - 1`` validation calls (T individual, T - 1 candidate soups), run eagerly.
    ``validation_fn``: ``params -> score``, higher is better.
    """
    finetuned = model_list(pretrained, finetuned)
    if len(finetuned) == 0:
        raise ValueError("greedy_soup needs at least one finetuned model")
    check_compatible(pretrained, finetuned)
    individual = [float(validation_fn(f)) for f in finetuned]
    order = sorted(range(len(finetuned)), key=lambda i: -individual[i])
    chosen, best_params, best_score = [order[0]], finetuned[order[0]], individual[order[0]]
    for i in order[1:]:
        candidate = weight_average(pretrained, [finetuned[j] for j in chosen + [i]])
        score = float(validation_fn(candidate))
        if score >= best_score:
            chosen, best_params, best_score = chosen + [i], candidate, score
    return GreedySoupResult(params=best_params, ingredients=chosen, individual_scores=individual,
                            soup_score=best_score)
