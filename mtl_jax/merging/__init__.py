"""Model merging as pure pytree arithmetic.

Every merge method is ``fn(pretrained, finetuned, **hparams) -> params``: ``pretrained`` is a
pytree of arrays, ``finetuned`` a list of trees with the same structure and shapes (or a dict
``{task name: tree}``, taken in its order; task vectors go to the ``*_vector`` functions, e.g.
``task_arithmetic_vector``, ``ties_merge_vector``, stacked by ``as_stacked``), and the result
has the pretrained structure and dtypes (bf16 stays bf16; arithmetic runs in fp32). Methods are
jittable with the hyperparameters bound statically, e.g.
``jax.jit(functools.partial(ties_merging, top_k=0.2, lam=1.0))(pretrained, finetuned)``, and
work on sharded leaves (NamedSharding) under jit.

Per-task reconstructions (TALL masks, EMR) return compressed state plus a ``retrieve`` function
and are not in :data:`MERGE_METHODS`; nor are the learned-coefficient methods (AdaMerging,
aTLAS, Self Positioning: they take an objective; ScaLearn, which learns the scales of source
adapters' outputs rather than of weights), the greedy soup and grid search (they take a
validation function) and BOOM (it takes a training function).
Leaf selection: :func:`merge_subset` / :func:`merge_subset_per_task`.
"""

from __future__ import annotations

from typing import Callable

from mtl_jax.merging.arithmetic import (
    GreedySoupResult,
    GridSearchResult,
    greedy_soup,
    grid_search,
    task_arithmetic,
    task_arithmetic_vector,
    weight_average,
)
from mtl_jax.merging.boom import BoomModel, boom, boom_update, member_keys, sample_indices, take_examples
from mtl_jax.merging.emr import EMRModel, emr_elect, emr_merging, emr_rescalers, emr_retrieve
from mtl_jax.merging.fisher_regmean import fisher_merging, regmean_merging, regmean_solve
from mtl_jax.merging.interpolation import model_stock, model_stock_ratio, multi_slerp, multi_slerp_leaf, slerp, slerp_leaf
from mtl_jax.merging.learned import (
    LearnedMerge,
    adamerging,
    atlas,
    coefficient_groups,
    merge_with_coefficients,
    prediction_entropy,
    self_positioning,
    ties_selected_entries,
)
from mtl_jax.merging.lines import lines_alpha, lines_edit, lines_merging, lines_scale, lines_schedule
from mtl_jax.merging.masks import (
    TallMaskModel,
    consensus_mask,
    consensus_merging,
    pack_bits,
    pack_mask_tree,
    retrieve,
    select_tall_lambdas,
    tall_mask_compress,
    tall_mask_models,
    tall_masks,
    task_slice,
    unpack_bits,
    unpack_mask_tree,
)
from mtl_jax.merging.scalearn import (
    ScaLearnResult,
    fit_scalearn,
    init_omega,
    omega_dropout,
    omega_shape,
    stack_source_adapters,
)
from mtl_jax.merging.svd_merging import (
    iso_c_matrix,
    iso_c_merging,
    iso_cts_factors,
    iso_cts_matrix,
    iso_cts_merging,
    polar_factor,
    tsv_factors,
    tsv_matrix,
    tsv_merging,
)
from mtl_jax.merging.task_vectors import (
    apply_task_vector,
    as_stacked,
    gram_cosines,
    stacked_task_vectors,
    task_vector,
    task_vector_cosines,
    task_vector_gram,
    tree_l1_norm,
)
from mtl_jax.merging.threshold import kth_largest_abs, topk_mask, topk_trim
from mtl_jax.merging.ties import (
    dare_drop,
    dare_merging,
    disjoint_mean,
    elect_sign,
    ties_merge_vector,
    ties_merging,
)
from mtl_jax.merging.tree import (
    check_compatible,
    default_layer_index,
    leaf_paths,
    merge_subset,
    merge_subset_per_task,
    model_list,
    num_layers,
    select_mask,
    stack_trees,
    unstack_tree,
)
from mtl_jax.registry import lookup

apply = apply_task_vector  # theta_0 + scale * tau, the name of Ilharco et al.'s API

MERGE_METHODS: dict[str, Callable] = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties_merging,
    "dare": dare_merging,
    "consensus": consensus_merging,
    "lines": lines_merging,
    "tsv": tsv_merging,
    "iso_c": iso_c_merging,
    "iso_cts": iso_cts_merging,
    "fisher": fisher_merging,
    "regmean": regmean_merging,
    "slerp": slerp,
    "multi_slerp": multi_slerp,
    "model_stock": model_stock,
}


def get_merge_method(name: str) -> Callable:
    """Look up a merge method by name; UsageError (a ValueError) lists the valid names."""
    return lookup(MERGE_METHODS, name, "merge method")


__all__ = [
    "adamerging", "apply", "apply_task_vector", "as_stacked", "atlas", "boom", "boom_update", "BoomModel",
    "check_compatible", "coefficient_groups", "consensus_mask", "consensus_merging", "dare_drop",
    "dare_merging", "default_layer_index", "disjoint_mean", "elect_sign", "emr_elect", "emr_merging",
    "emr_rescalers", "emr_retrieve", "EMRModel", "fisher_merging", "fit_scalearn", "get_merge_method",
    "gram_cosines", "greedy_soup", "GreedySoupResult", "grid_search", "GridSearchResult", "init_omega",
    "iso_c_matrix", "iso_c_merging", "iso_cts_factors", "iso_cts_matrix", "iso_cts_merging",
    "kth_largest_abs", "leaf_paths", "LearnedMerge", "lines_alpha", "lines_edit", "lines_merging",
    "lines_scale", "lines_schedule", "member_keys", "MERGE_METHODS", "merge_subset", "merge_subset_per_task",
    "merge_with_coefficients", "model_list", "model_stock", "model_stock_ratio", "multi_slerp",
    "multi_slerp_leaf", "num_layers", "omega_dropout", "omega_shape", "pack_bits", "pack_mask_tree",
    "polar_factor", "prediction_entropy", "regmean_merging", "regmean_solve", "retrieve", "sample_indices",
    "ScaLearnResult", "select_mask", "select_tall_lambdas", "self_positioning", "slerp", "slerp_leaf",
    "stack_source_adapters", "stack_trees", "stacked_task_vectors", "take_examples", "tall_mask_compress",
    "tall_mask_models", "tall_masks", "TallMaskModel", "task_arithmetic", "task_arithmetic_vector",
    "task_slice", "task_vector", "task_vector_cosines", "task_vector_gram", "ties_merge_vector",
    "ties_merging", "ties_selected_entries", "topk_mask", "topk_trim", "tree_l1_norm", "tsv_factors",
    "tsv_matrix", "tsv_merging", "unpack_bits", "unpack_mask_tree", "unstack_tree", "weight_average",
]
