"""BOOM: bagging-based robust model merging, and its incremental update.

Zhang, Bi, Guo, Zhang, Yang, Shi, Cheng, "Bagging-Based Model Merging for Robust General Text
Embeddings", arXiv 2602.05787 (2026). Static setting: draw M subsets ``D^(m)`` of the training
data with sampling ratios ``k_1..k_M``, train one model per subset independently from the same
starting point, and merge their parameters into one model (single-model inference cost).
Incremental setting: train a lightweight update model on the new data plus a small sample of the
historical data, starting from the existing model, and merge it into the existing model.

Training is the caller's: ``train_fn(params, data, key) -> params``, where ``data`` is a dict (any
pytree) of arrays sharing their leading (example) axis. Members are trained one after another on
the host (each ``train_fn`` call may itself be jitted; equal subset sizes do not retrace it).

Merging: the default ``merge`` is Multi-SLERP around the members' common starting point
(:func:`~mtl_jax.merging.interpolation.multi_slerp`, uniform weights), the operator of the
released BOOM models (their model cards; the paper's method section could not be read here). Any
package merge method ``merge(base, models)`` can be passed, e.g. ``weight_average``. For an
incremental update the base is the existing model, whose own task vector is zero, so Multi-SLERP
with one update model gives ``theta + tau_update / 2``, the average. Deviations, stated: subsets
are bootstrap samples (with replacement, ratio 1 by default) unless ``replace=False``; the paper's ratio values and historical-sample size are not
reproduced here (``history_ratio=0.1`` is our choice).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.merging.interpolation import multi_slerp
from mtl_jax.merging.tree import Params, check_compatible, flatten_with_paths

Data = dict
TrainFn = Callable[[Params, Data, jax.Array], Params]
MergeFn = Callable[[Params, Sequence[Params]], Params]


class BoomModel(NamedTuple):
    """params: the merged model. members: the trained models that were merged (list of trees).
    subsets: for each member, the int indices of the examples it was trained on (numpy, may repeat
    for bootstrap samples; for :func:`boom_update`, indices into the concatenation of the new data
    and the historical data)."""

    params: Params
    members: list
    subsets: list


def num_examples(data: Data) -> int:
    """Size of the shared leading axis of every array in ``data``; ValueError naming the leaves
    and their sizes when they disagree."""
    items = flatten_with_paths(data)
    if not items:
        raise ValueError("data has no arrays")
    sizes = {p: int(np.shape(x)[0]) if np.ndim(x) else None for p, x in items}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"data arrays must share their leading (example) axis; got sizes {sizes}")
    return next(iter(sizes.values()))


def take_examples(data: Data, indices: np.ndarray | jax.Array) -> Data:
    """``data`` restricted to the examples ``indices`` (rows gathered from every array)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[jnp.asarray(indices)], data)


def concat_examples(first: Data, second: Data) -> Data:
    """Examples of ``first`` followed by those of ``second`` (same keys and per-example shapes)."""
    _check_same_examples(first, second)
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)]), first, second)


def _check_same_examples(first: Data, second: Data) -> None:
    a = {p: tuple(np.shape(x)[1:]) for p, x in flatten_with_paths(first)}
    b = {p: tuple(np.shape(x)[1:]) for p, x in flatten_with_paths(second)}
    if a != b:
        raise ValueError(f"new and historical data differ in keys or per-example shapes: {a} vs {b}")


def member_keys(key: jax.Array, member: int) -> tuple[jax.Array, jax.Array]:
    """``(sample_key, train_key)`` of member ``m``: ``split(fold_in(key, m))``."""
    sample_key, train_key = jax.random.split(jax.random.fold_in(key, member))
    return sample_key, train_key


def sample_indices(key: jax.Array, num: int, ratio: float, replace: bool = True) -> np.ndarray:
    """``round(ratio * num)`` (at least 1) example indices in ``[0, num)``: a bootstrap sample
    (uniform with replacement) or, with ``replace=False``, a subsample without replacement
    (then ``ratio <= 1``)."""
    if ratio <= 0 or (not replace and ratio > 1):
        raise ValueError(f"sampling ratio must be in (0, {'inf' if replace else 1}], got {ratio}")
    size = max(1, int(round(ratio * num)))
    if replace:
        return np.asarray(jax.random.randint(key, (size,), 0, num))
    return np.asarray(jax.random.permutation(key, num)[:size])


def boom(
    init_params: Params,
    train_fn: TrainFn,
    data: Data,
    key: jax.Array,
    *,
    num_models: int = 4,
    ratios: Optional[Sequence[float]] = None,
    replace: bool = True,
    merge: MergeFn = multi_slerp,
) -> BoomModel:
    """BOOM (arXiv 2602.05787, Sec. "BOOM", static setting): M models trained on sampled subsets
    of ``data``, merged into one.

    Member ``m`` draws ``round(ratios[m] * N)`` examples (bootstrap with replacement by default,
    ratio 1 for every member when ``ratios`` is None) with the sample key of
    :func:`member_keys`, and is ``train_fn(init_params, subset_m, train_key_m)``. The result is
    ``merge(init_params, members)``: Multi-SLERP around ``init_params`` by default.
    """
    if num_models < 1:
        raise ValueError(f"num_models must be >= 1, got {num_models}")
    ratios = [1.0] * num_models if ratios is None else list(ratios)
    if len(ratios) != num_models:
        raise ValueError(f"got {len(ratios)} sampling ratios for num_models={num_models}")
    n = num_examples(data)
    members, subsets = [], []
    for m, ratio in enumerate(ratios):
        sample_key, train_key = member_keys(key, m)
        idx = sample_indices(sample_key, n, ratio, replace)
        member = train_fn(init_params, take_examples(data, idx), train_key)
        check_compatible(init_params, [member], reference_name="init_params", other_name="trained member")
        members.append(member)
        subsets.append(idx)
    return BoomModel(merge(init_params, members), members, subsets)


def boom_update(
    params: Params,
    train_fn: TrainFn,
    new_data: Data,
    history_data: Data,
    key: jax.Array,
    *,
    history_ratio: float = 0.1,
    num_models: int = 1,
    merge: MergeFn = multi_slerp,
) -> BoomModel:
    """BOOM incremental update (arXiv 2602.05787, incremental setting).

    Each of ``num_models`` update models starts from the existing ``params`` and is trained on all
    of ``new_data`` plus ``round(history_ratio * N_hist)`` historical examples sampled without
    replacement (member keys from :func:`member_keys`). The result is
    ``merge(params, [params, *updates])``: with the default Multi-SLERP (or the uniform average) and
    one update model, ``(theta_existing + theta_update) / 2``. The structure, shapes and dtypes of
    ``params`` are kept.
    """
    if num_models < 1:
        raise ValueError(f"num_models must be >= 1, got {num_models}")
    _check_same_examples(new_data, history_data)
    n_new, n_hist = num_examples(new_data), num_examples(history_data)
    updates, subsets = [], []
    for m in range(num_models):
        sample_key, train_key = member_keys(key, m)
        hist_idx = sample_indices(sample_key, n_hist, history_ratio, replace=False)
        idx = np.concatenate([np.arange(n_new), n_new + hist_idx])
        mixed = concat_examples(new_data, take_examples(history_data, hist_idx))
        update = train_fn(params, mixed, train_key)
        check_compatible(params, [update], reference_name="params", other_name="update model")
        updates.append(update)
        subsets.append(idx)
    return BoomModel(merge(params, [params, *updates]), updates, subsets)
