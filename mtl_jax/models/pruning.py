"""PAGCP: performance-aware global channel pruning of a multitask CNN, here the HPS LeNet.

Ye et al., "Performance-aware Approximation of Global Channel Pruning for Multitask CNNs" (2023).
The search (:func:`pagcp_search`) follows the official code's ``Sensitivity`` (HankYe/PAGCP,
``prune/sensitivity.py``); it is model-agnostic and sees the model only through ``evaluate(ratios) -> per-task losses`` and ``flops(ratios) -> FLOPs``:

1. Layer order: each prunable layer's FLOPs contribution is the FLOPs removed by pruning
   ``probe_ratio`` (0.3) of its filters alone; layers are visited from the largest contribution
   (the official order when the per-layer threshold decays, ``decay <= 1``; ascending otherwise).
2. Sequential greedy search on the model pruned so far: a layer tries the masking ratios in
   increasing order (its lowest-L1 filters); the first ratio at which some task's loss exceeds
   ``(1 + thres)`` x its base loss stops the layer, which keeps the previous ratio (none if it was
   the first). After a layer is pruned, ``thres *= decay`` and each task's base loss becomes the
   larger of the old base and its loss at the kept ratio. ``thres`` starts at ``initial_rate`` and
   ``decay`` solves prod_{i<L} (1 + initial_rate decay^i) = ``total_threshold`` (official
   ``ratio_compute``): the per-layer allowances compound to the total. This is the paper's
   performance-aware oracle: a filter set is kept if removing it hurts *any* task too much.
3. Layer filter (official ``get_ratio``): each pruned layer's loss increase (summed over tasks) per
   FLOP it saved; only the ``topk`` fraction of layers with the smallest value stay pruned.

One deviation, ours: a layer whose every ratio stays within the threshold keeps the largest ratio
(the official loop then leaves the working model unpruned at that layer but reports its second
largest ratio). Fine-tuning after pruning is the caller's (``experiments/pagcp_multimnist.py``).

The LeNet part: :func:`lenet_keep` picks the kept filters of ``conv_0``, ``conv_1``, ``dense_0`` by
L1 norm, each on the layer as already sliced by the earlier ones; :func:`mask_hps_lenet` zeroes the
pruned filters (their ReLU outputs are then 0, so the network computes exactly what the sliced one
does, without a recompile per candidate) and :func:`slice_hps_lenet` removes them, from the trunk and
from every head's first layer, for ``LeNet(channels=...)``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

LENET_LAYERS = ("conv_0", "conv_1", "dense_0")
LENET_FLAT_POSITIONS = 16  # conv_1's 4 x 4 output positions, flattened (position-major) into dense_0's input

Ratios = Mapping[str, float]


class PagcpResult(NamedTuple):
    """ratios: the final per-layer pruning ratios (layers left unpruned are absent); order: the visit
    order; searched: the ratio each layer kept in the sequential search (0 = none); stopped_by: the
    task whose loss stopped each layer (None: no ratio exceeded the threshold); efficiency: loss
    increase per FLOP saved of each layer pruned in the search; thresholds: ``thres`` at each layer."""

    ratios: dict
    order: tuple
    searched: dict
    stopped_by: dict
    efficiency: dict
    thresholds: dict


def layer_decay(initial_rate: float, num_layers: int, total_threshold: float) -> float:
    """x > 0 with prod_{i<L} (1 + initial_rate x^i) = total_threshold (bisection; official ``ratio_compute``)."""
    def gap(x):
        return math.prod(1.0 + initial_rate * x ** i for i in range(num_layers)) - total_threshold

    if num_layers < 2 or initial_rate <= 0:
        raise ValueError(f"the decay needs >= 2 layers and initial_rate > 0, got {num_layers}, {initial_rate}")
    if gap(0.0) >= 0:
        raise ValueError(f"total_threshold {total_threshold} must exceed 1 + initial_rate = {1 + initial_rate}")
    lo, hi = 0.0, 1.0
    while gap(hi) < 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def pagcp_search(
    layers: Sequence[str],
    ratios: Sequence[float],
    evaluate: Callable[[Ratios], np.ndarray],
    flops: Callable[[Ratios], float],
    *,
    initial_rate: float,
    total_threshold: float,
    topk: float = 0.8,
    probe_ratio: float = 0.3,
) -> PagcpResult:
    """PAGCP's sequential greedy search (module docstring, steps 1-3).

    ``evaluate(ratios)`` -> per-task losses [T] of the model with each named layer pruned at its ratio
    (lowest-L1 filters); ``flops(ratios)`` -> its FLOPs. ``ratios`` must increase.
    """
    ratios = [float(r) for r in ratios]
    if sorted(ratios) != ratios or not ratios or ratios[0] <= 0 or ratios[-1] >= 1:
        raise ValueError(f"ratios must increase within (0, 1), got {ratios}")
    decay = layer_decay(initial_rate, len(layers), total_threshold)
    full_flops = flops({})
    contribution = {layer: full_flops - flops({layer: probe_ratio}) for layer in layers}
    order = tuple(sorted(layers, key=lambda layer: contribution[layer], reverse=decay <= 1))
    base = np.asarray(evaluate({}), np.float64)
    thres, current = initial_rate, {}
    searched, stopped_by, efficiency, thresholds = {}, {}, {}, {}
    for layer in order:
        thresholds[layer] = thres
        kept, kept_losses, stopped_by[layer] = None, None, None
        for i, ratio in enumerate(ratios):
            losses = np.asarray(evaluate({**current, layer: ratio}), np.float64)
            relative = losses / base
            if relative.max() > 1.0 + thres:
                stopped_by[layer] = int(relative.argmax())
                break
            kept, kept_losses = ratio, losses
        searched[layer] = kept or 0.0
        if kept is None:
            continue
        saved = flops(current) - flops({**current, layer: kept})
        efficiency[layer] = float(kept_losses.sum() - base.sum()) / max(saved, 1e-20)
        current[layer] = kept
        thres *= decay
        base = np.maximum(base, kept_losses)
    ranked = sorted(efficiency, key=lambda layer: efficiency[layer])
    chosen = set(ranked[: min(len(ranked), int(len(layers) * topk))])
    final = {layer: current[layer] for layer in order if layer in chosen}
    return PagcpResult(final, order, searched, stopped_by, efficiency, thresholds)


# ------------------------------------------------------------------------------------ HPS LeNet


def num_pruned(channels: int, ratio: float) -> int:
    """Filters removed at ``ratio``: floor(ratio * C), at most C - 1 (torch-pruning's L1 strategy, round_to=1)."""
    return min(int(ratio * channels), channels - 1)


def l1_keep(filter_norms: np.ndarray, ratio: float) -> np.ndarray:
    """Sorted indices of the filters kept after removing the ``ratio`` with the smallest L1 norm."""
    order = np.argsort(filter_norms, kind="stable")
    return np.sort(order[num_pruned(len(filter_norms), ratio):])


def _dense_rows(kernel: np.ndarray, channels: int) -> np.ndarray:
    """dense_0's kernel [16 * C1, D] as [16, C1, D] (the flatten of conv_1's [4, 4, C1] output)."""
    return kernel.reshape(LENET_FLAT_POSITIONS, channels, kernel.shape[-1])


def lenet_keep(shared: Mapping, ratios: Ratios) -> dict[str, np.ndarray]:
    """Kept filter indices of conv_0, conv_1, dense_0 (all of a layer absent from ``ratios``), each
    ranked by L1 norm on the layer as sliced by the earlier layers' choices."""
    unknown = sorted(set(ratios) - set(LENET_LAYERS))
    if unknown:
        raise ValueError(f"unknown LeNet layers {unknown}; prunable: {list(LENET_LAYERS)}")
    k0 = np.asarray(shared["conv_0"]["kernel"])
    keep0 = l1_keep(np.abs(k0).sum((0, 1, 2)), ratios.get("conv_0", 0.0))
    k1 = np.asarray(shared["conv_1"]["kernel"])[:, :, keep0, :]
    keep1 = l1_keep(np.abs(k1).sum((0, 1, 2)), ratios.get("conv_1", 0.0))
    rows = _dense_rows(np.asarray(shared["dense_0"]["kernel"]), k1.shape[-1])[:, keep1, :]
    keep2 = l1_keep(np.abs(rows).sum((0, 1)), ratios.get("dense_0", 0.0))
    return {"conv_0": keep0, "conv_1": keep1, "dense_0": keep2}


def _first_head_layer(head: Mapping) -> str:
    return "dense_0" if "dense_0" in head else "out"


def slice_hps_lenet(params: Mapping, keep: Mapping[str, np.ndarray]) -> dict:
    """``{"shared": LeNet params, "heads": {task: ...}}`` with the pruned filters removed (and the
    matching inputs of the next layer and of every head's first layer); the trunk is then
    ``LeNet(channels=tuple(len(keep[l]) for l in LENET_LAYERS))``."""
    shared = params["shared"]
    c1 = np.asarray(shared["conv_1"]["kernel"]).shape[-1]
    k0, k1, k2 = (keep[layer] for layer in LENET_LAYERS)
    rows = _dense_rows(np.asarray(shared["dense_0"]["kernel"]), c1)[:, k1, :][:, :, k2]
    sliced = {
        "conv_0": {"kernel": np.asarray(shared["conv_0"]["kernel"])[..., k0],
                   "bias": np.asarray(shared["conv_0"]["bias"])[k0]},
        "conv_1": {"kernel": np.asarray(shared["conv_1"]["kernel"])[:, :, k0, :][..., k1],
                   "bias": np.asarray(shared["conv_1"]["bias"])[k1]},
        "dense_0": {"kernel": rows.reshape(-1, len(k2)), "bias": np.asarray(shared["dense_0"]["bias"])[k2]},
    }
    heads = {}
    for task, head in params["heads"].items():
        first = _first_head_layer(head)
        heads[task] = {**head, first: {**head[first], "kernel": np.asarray(head[first]["kernel"])[k2]}}
    return {"shared": sliced, "heads": heads}


def mask_hps_lenet(params: Mapping, keep: Mapping[str, np.ndarray]) -> dict:
    """The same shapes as ``params`` with every pruned filter's kernel column and bias zeroed: its ReLU
    output is 0, so the model computes what :func:`slice_hps_lenet`'s does."""
    shared = dict(params["shared"])
    for layer in LENET_LAYERS:
        kernel, bias = np.asarray(shared[layer]["kernel"]), np.asarray(shared[layer]["bias"])
        mask = np.zeros(bias.shape[-1], bool)
        mask[keep[layer]] = True
        shared[layer] = {"kernel": kernel * mask, "bias": bias * mask}
    return {"shared": shared, "heads": params["heads"]}


def lenet_channels(keep: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    return tuple(len(keep[layer]) for layer in LENET_LAYERS)

