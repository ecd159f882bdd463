"""What the ViT merging benchmark measures of its models: predictions and accuracy, the merge
space the merge methods act in, the Fisher / RegMean statistics of the fine-tuned backbones, and
the task vectors' geometry and interference.

The statistics themselves are ``mtl_jax.merging.fisher_regmean``'s (:func:`fisher_diagonal`,
:func:`regmean_grams`); here they are bound to the benchmark's trunk + head.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.merging.training import EvalSet, head_logits
from mtl_jax import merging as M
from mtl_jax.merging.fisher_regmean import fisher_diagonal, regmean_grams
from mtl_jax.merging.tree import map_with_path

# -------------------------------------------------------------------------------------- accuracy


@functools.partial(jax.jit, static_argnums=0)
def predictions(trunk: nn.Module, shared, head, x):
    """argmax class of every image of one batch x [B, 28, 28, 1] -> [B]."""
    return jnp.argmax(head_logits(head, trunk.apply({"params": shared}, x)), -1)


def predict_all(trunk, shared, head, data: EvalSet) -> np.ndarray:
    """Predicted class of every (unpadded) example of ``data`` -> [N]."""
    return np.concatenate([np.asarray(predictions(trunk, shared, head, xb)) for xb in data.x])[: len(data.y)]


def accuracy(trunk, shared, head, data: EvalSet) -> float:
    return float(np.mean(predict_all(trunk, shared, head, data) == data.y))


# ----------------------------------------------------------------------------------- merge space

ATTENTION_IN = ("query", "key", "value")


def _attention_leaf(path: str) -> tuple[str, str] | None:
    parts = path.split("/")
    if len(parts) >= 3 and parts[-3] == "attention":
        return parts[-2], parts[-1]
    return None


def to_merge_space(shared):
    """``{"shared": trunk}`` with attention DenseGeneral params flattened to the 2-D / 1-D layout of
    a fused linear layer (as CLIP's ``in_proj`` / ``out_proj``): q/k/v kernels (D, H, Dh) ->
    (D, H*Dh), biases (H, Dh) -> (H*Dh,); out kernel (H, Dh, D) -> (H*Dh, D). Elementwise methods
    are unaffected; the SVD methods (TSV-M, Iso-C/CTS) and RegMean see these as matrices."""

    def leaf(path, x):
        att = _attention_leaf(path)
        if att is None:
            return x
        name, kind = att
        if kind == "bias" or name not in ATTENTION_IN:
            return x.reshape(-1) if kind == "bias" else x.reshape(-1, x.shape[-1])
        return x.reshape(x.shape[0], -1)

    return map_with_path(leaf, {"shared": shared})


def from_merge_space(tree, template):
    """Inverse of :func:`to_merge_space`: trunk params shaped like ``template`` (the trunk tree)."""
    return jax.tree_util.tree_map(lambda x, t: x.reshape(t.shape), tree["shared"], template)


# ------------------------------------------------------------------------- Fisher / RegMean inputs


@functools.partial(jax.jit, static_argnums=0)
def backbone_fisher(trunk, shared, head, x, key):
    """:func:`mtl_jax.merging.fisher_regmean.fisher_diagonal` of the backbone ``shared`` under the
    task's head, on images x [N, ...]."""
    return fisher_diagonal(lambda params, xb: head_logits(head, trunk.apply({"params": params}, xb)), shared, x, key)


@functools.partial(jax.jit, static_argnums=0)
def backbone_grams(trunk, shared, x):
    """:func:`mtl_jax.merging.fisher_regmean.regmean_grams` of the backbone on images x [N, ...],
    keyed by the merge-space kernel paths ``shared/<module path>/kernel`` (the patch-embedding Conv
    has none: RegMean averages it)."""
    return regmean_grams(lambda: trunk.apply({"params": shared}, x), prefix=("shared",))


def merge_statistics(trunk, finetuned: Sequence[dict], heads: Sequence, tasks, num_examples: int, seed: int) -> dict:
    """``{"fisher": [merge-space tree per task], "grams": [{path: G} per task]}`` of the fine-tuned
    models ``finetuned[t]["shared"]`` on the first ``num_examples`` train images of each task (the
    papers use 256); Fisher labels are sampled with key ``100 * seed + t``."""
    images = [jnp.asarray(t.splits["train"][0][:num_examples]) for t in tasks]
    return {
        "fisher": [to_merge_space(backbone_fisher(trunk, ft["shared"], h, x, jax.random.key(seed * 100 + i)))
                   for i, (ft, h, x) in enumerate(zip(finetuned, heads, images))],
        "grams": [backbone_grams(trunk, ft["shared"], x) for ft, x in zip(finetuned, images)],
    }


def chunked_merge_statistics(trunk, shared: Sequence, heads: Sequence, tasks, num_examples: int, seed: int,
                             chunk: int, to_space: Callable = to_merge_space) -> dict:
    """:func:`merge_statistics` of the backbones ``shared[t]``, taken ``chunk`` examples at a time:
    the per-example Fisher gradients need chunk x the parameters, not N x (256 x ViT-B/32 is ~90 GB).
    The Fisher is the size-weighted mean of the chunks' Fishers (labels sampled with key
    ``fold_in(key(100 * seed + t), chunk index)``), in the merge space ``to_space``; the RegMean
    Grams (sums over examples) the sum of the chunks' Grams."""
    fishers, grams = [], []
    for i, (params, head, task) in enumerate(zip(shared, heads, tasks)):
        x = task.splits["train"][0][:num_examples]
        key = jax.random.key(seed * 100 + i)
        fisher, gram = None, None
        for j, start in enumerate(range(0, len(x), chunk)):
            xb = jnp.asarray(x[start:start + chunk])
            weight = len(xb) / len(x)
            f = jax.tree_util.tree_map(lambda a: weight * a,
                                       backbone_fisher(trunk, params, head, xb, jax.random.fold_in(key, j)))
            g = backbone_grams(trunk, params, xb)
            fisher = f if fisher is None else jax.tree_util.tree_map(jnp.add, fisher, f)
            gram = g if gram is None else {k: gram[k] + g[k] for k in gram}
        fishers.append(to_space(fisher))
        grams.append(gram)
    return {"fisher": fishers, "grams": grams}


# ------------------------------------------------------------------------------------ task vectors


class Context(NamedTuple):
    """Everything the merging stage of one seed needs."""

    trunk: nn.Module
    template: dict  # trunk params (shapes for from_merge_space)
    pretrained: dict  # merge space
    finetuned: list  # merge space, one per task
    heads: list  # fine-tuned heads, one per task
    val: list  # EvalSet per task
    test: list
    ft_val: np.ndarray  # individual fine-tuned validation accuracy per task (normaliser)


def task_vector_diagnostics(ctx: Context, lam: float) -> dict:
    """:func:`task_vector_geometry` and :func:`function_interference` from one stacked task-vector tree."""
    stacked = M.stacked_task_vectors(ctx.finetuned, ctx.pretrained)
    return task_vector_geometry(ctx, stacked) | function_interference(ctx, stacked, lam)


def function_interference(ctx: Context, stacked, lam: float) -> dict:
    """Interference in function space at task arithmetic's validated ``lam``, per task t on its test split:
    accuracy of the task's own edit ``theta_0 + lam tau_t`` and of the TA merge, and the fraction of test
    examples whose predicted class differs between the two (the weight-disentanglement error of
    Ortiz-Jimenez et al., NeurIPS 2023, with the 0-1 distance between predictions). ``stacked``: the
    (T, ...) backbone task vectors."""
    merged = from_merge_space(M.apply_task_vector(ctx.pretrained, M.task_arithmetic_vector(stacked, lam)), ctx.template)
    own_acc, merged_acc, disagree = [], [], []
    for t, (head, data) in enumerate(zip(ctx.heads, ctx.test)):
        own = from_merge_space(M.apply_task_vector(ctx.pretrained, M.task_slice(stacked, t), lam), ctx.template)
        pred_own, pred_merged = (predict_all(ctx.trunk, tree, head, data) for tree in (own, merged))
        own_acc.append(float(np.mean(pred_own == data.y)))
        merged_acc.append(float(np.mean(pred_merged == data.y)))
        disagree.append(float(np.mean(pred_own != pred_merged)))
    return {"ta_lambda": lam, "own_edit_acc": own_acc, "ta_acc": merged_acc, "disagreement": disagree}


def task_vector_geometry(ctx: Context, stacked) -> dict:
    """Pairwise cosines of the backbone task vectors ``stacked`` (T, ...) [T, T] and each one's norm
    relative to the pretrained backbone's (the interference diagnostic of Ilharco et al. 2023)."""
    gram = M.task_vector_gram(stacked)
    base = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(ctx.pretrained))))
    return {"cosine": np.round(np.asarray(M.gram_cosines(gram)), 4).tolist(),
            "relative_norm": np.round(np.sqrt(np.diag(np.asarray(gram))) / base, 4).tolist()}
