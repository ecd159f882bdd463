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

The names are loaded lazily (PEP 562): ``from mtl_jax.merging import ties_merging`` imports the
submodule defining it (and JAX) on first use, so the subpackages that need no JAX (e.g.
:mod:`mtl_jax.merging.mergekit`) start without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any, Callable

from mtl_jax.registry import lookup

_EXPORTS: dict[str, str] = {  # public name -> the submodule defining it
    "GreedySoupResult": "arithmetic", "GridSearchResult": "arithmetic", "greedy_soup": "arithmetic",
    "grid_search": "arithmetic", "task_arithmetic": "arithmetic", "task_arithmetic_vector": "arithmetic",
    "weight_average": "arithmetic",
    "BoomModel": "boom", "boom": "boom", "boom_update": "boom", "member_keys": "boom", "sample_indices": "boom",
    "take_examples": "boom",
    "EMRModel": "emr", "emr_elect": "emr", "emr_merging": "emr", "emr_rescalers": "emr", "emr_retrieve": "emr",
    "fisher_merging": "fisher_regmean", "regmean_merging": "fisher_regmean", "regmean_solve": "fisher_regmean",
    "model_stock": "interpolation", "model_stock_ratio": "interpolation", "multi_slerp": "interpolation",
    "multi_slerp_leaf": "interpolation", "slerp": "interpolation", "slerp_leaf": "interpolation",
    "LearnedMerge": "learned", "adamerging": "learned", "atlas": "learned", "coefficient_groups": "learned",
    "merge_with_coefficients": "learned", "prediction_entropy": "learned", "self_positioning": "learned",
    "ties_selected_entries": "learned",
    "lines_alpha": "lines", "lines_edit": "lines", "lines_merging": "lines", "lines_scale": "lines",
    "lines_schedule": "lines",
    "TallMaskModel": "masks", "consensus_mask": "masks", "consensus_merging": "masks", "pack_bits": "masks",
    "pack_mask_tree": "masks", "retrieve": "masks", "select_tall_lambdas": "masks", "tall_mask_compress": "masks",
    "tall_mask_models": "masks", "tall_masks": "masks", "task_slice": "masks", "unpack_bits": "masks",
    "unpack_mask_tree": "masks",
    "ScaLearnResult": "scalearn", "fit_scalearn": "scalearn", "init_omega": "scalearn",
    "omega_dropout": "scalearn", "omega_shape": "scalearn", "stack_source_adapters": "scalearn",
    "iso_c_matrix": "svd_merging", "iso_c_merging": "svd_merging", "iso_cts_factors": "svd_merging",
    "iso_cts_matrix": "svd_merging", "iso_cts_merging": "svd_merging", "polar_factor": "svd_merging",
    "tsv_factors": "svd_merging", "tsv_matrix": "svd_merging", "tsv_merging": "svd_merging",
    "apply_task_vector": "task_vectors", "as_stacked": "task_vectors", "gram_cosines": "task_vectors",
    "stacked_task_vectors": "task_vectors", "task_vector": "task_vectors", "task_vector_cosines": "task_vectors",
    "task_vector_gram": "task_vectors", "tree_l1_norm": "task_vectors",
    "kth_largest_abs": "threshold", "topk_mask": "threshold", "topk_trim": "threshold",
    "dare_drop": "ties", "dare_merging": "ties", "disjoint_mean": "ties", "elect_sign": "ties",
    "ties_merge_vector": "ties", "ties_merging": "ties",
    "check_compatible": "tree", "default_layer_index": "tree", "leaf_paths": "tree", "merge_subset": "tree",
    "merge_subset_per_task": "tree", "model_list": "tree", "num_layers": "tree", "select_mask": "tree",
    "stack_trees": "tree", "unstack_tree": "tree",
}

_METHOD_NAMES = {  # MERGE_METHODS: registry name -> public name
    "weight_average": "weight_average", "task_arithmetic": "task_arithmetic", "ties": "ties_merging",
    "dare": "dare_merging", "consensus": "consensus_merging", "lines": "lines_merging", "tsv": "tsv_merging",
    "iso_c": "iso_c_merging", "iso_cts": "iso_cts_merging", "fisher": "fisher_merging", "regmean": "regmean_merging",
    "slerp": "slerp", "multi_slerp": "multi_slerp", "model_stock": "model_stock",
}


def __getattr__(name: str) -> Any:
    """Loads an exported name (its submodule), ``MERGE_METHODS``, ``apply`` or a submodule."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name == "MERGE_METHODS":
        value = {key: __getattr__(fn) for key, fn in _METHOD_NAMES.items()}
    elif name == "apply":  # theta_0 + scale * tau, the name of Ilharco et al.'s API
        value = __getattr__("apply_task_vector")
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps an exported name over a submodule of the same name (``boom``: the function, not
    :mod:`mtl_jax.merging.boom`), which importing the submodule would otherwise set."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def get_merge_method(name: str) -> Callable:
    """Look up a merge method by name; UsageError (a ValueError) lists the valid names."""
    return lookup(__getattr__("MERGE_METHODS"), name, "merge method")


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
