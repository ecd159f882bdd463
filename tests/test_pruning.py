"""PAGCP (Ye et al. 2023): the sequential greedy search on hand-made losses, the decay rule, and the
LeNet filter selection / slicing (the sliced network computes what the masked one does)."""

import math
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from mtl_jax.config import load_config
from mtl_jax.models import build_model
from mtl_jax.models.pruning import (
    LENET_LAYERS,
    l1_keep,
    layer_decay,
    lenet_channels,
    lenet_keep,
    mask_hps_lenet,
    pagcp_search,
    slice_hps_lenet,
)

RATIOS = (0.2, 0.4, 0.6, 0.8)


def test_layer_decay_compounds_to_the_total_threshold():
    x = layer_decay(0.1, 2, 1.155)
    np.testing.assert_allclose(x, 0.5, rtol=1e-9)  # (1 + 0.1)(1 + 0.1 * 0.5) = 1.155
    x = layer_decay(0.05, 5, 1.3)
    np.testing.assert_allclose(math.prod(1 + 0.05 * x ** i for i in range(5)), 1.3, rtol=1e-9)
    assert x > 1  # five layers at 5% compound to 1.28 < 1.3: the allowance grows
    with pytest.raises(ValueError, match="must exceed 1 \\+ initial_rate"):
        layer_decay(0.1, 3, 1.05)


def test_search_stops_each_layer_at_the_first_task_over_its_threshold():
    # Task 0 depends on layer a (1 + r_a^2), task 1 on layer b (1 + 0.5 r_b); FLOPs 100 - 60 r_a - 40 r_b.
    calls = []

    def evaluate(r):
        calls.append(dict(r))
        return np.array([1 + r.get("a", 0) ** 2, 1 + 0.5 * r.get("b", 0)])

    def flops(r):
        return 100 - 60 * r.get("a", 0) - 40 * r.get("b", 0)

    out = pagcp_search(("b", "a"), RATIOS, evaluate, flops, initial_rate=0.1, total_threshold=1.155, topk=1.0)
    assert out.order == ("a", "b")  # a removes more FLOPs at 30%, visited first (decay 0.5 <= 1)
    # a: 1.04 at 0.2, 1.16 > 1.1 at 0.4 -> keeps 0.2, stopped by task 0; thres 0.1 -> 0.05, base [1.04, 1].
    # b: task 1 at 0.2 is 1.1 > 1.05 -> no ratio kept, stopped by task 1.
    assert out.searched == {"a": 0.2, "b": 0.0} and out.stopped_by == {"a": 0, "b": 1}
    np.testing.assert_allclose([out.thresholds["a"], out.thresholds["b"]], [0.1, 0.05])
    assert out.ratios == {"a": 0.2}
    np.testing.assert_allclose(out.efficiency["a"], 0.04 / 12)
    assert calls[-1] == {"a": 0.2, "b": 0.2}  # b was searched on the model with a pruned


def test_search_keeps_the_largest_ratio_when_no_task_degrades_and_filters_by_efficiency():
    def evaluate(r):  # layer a costs task 0 0.1 r_a, b is free; the threshold allows both to the top ratio
        return np.array([1 + 0.1 * r.get("a", 0), 1.0])

    def flops(r):
        return 100 - 50 * r.get("a", 0) - 10 * r.get("b", 0)

    out = pagcp_search(("a", "b"), RATIOS, evaluate, flops, initial_rate=0.2, total_threshold=1.5, topk=0.5)
    assert out.searched == {"a": 0.8, "b": 0.8} and out.stopped_by == {"a": None, "b": None}
    # Efficiency: a 0.08 / 40, b 0 / 8: only the cheaper half (int(2 * 0.5) = 1 layer), b, stays pruned.
    assert out.ratios == {"b": 0.8}
    with pytest.raises(ValueError, match="ratios must increase"):
        pagcp_search(("a", "b"), (0.4, 0.2), evaluate, flops, initial_rate=0.2, total_threshold=1.5)


def test_l1_keep_removes_the_smallest_filters():
    np.testing.assert_array_equal(l1_keep(np.array([3.0, 1.0, 4.0, 0.5, 2.0]), 0.4), [0, 2, 4])
    np.testing.assert_array_equal(l1_keep(np.array([1.0, 2.0]), 0.99), [1])  # at least one filter stays


def _hps_lenet():
    config = load_config("configs/multimnist.py")
    tasks = [SimpleNamespace(name=n, num_outputs=10) for n in ("left", "right")]
    return config, tasks, build_model(config.model, tasks)


def test_sliced_lenet_computes_what_the_masked_one_does():
    config, tasks, model = _hps_lenet()
    x = np.random.default_rng(0).uniform(0, 1, (6, 28, 28, 1)).astype(np.float32)
    params = jax.device_get(model.init(jax.random.key(0), x[:1])["params"])
    keep = lenet_keep(params["shared"], {"conv_0": 0.3, "conv_1": 0.5, "dense_0": 0.45})
    assert lenet_channels(keep) == (14, 20, 55)  # width 2: 20 - 6, 40 - 20, 100 - 45
    norms = np.abs(params["shared"]["conv_0"]["kernel"]).sum((0, 1, 2))
    np.testing.assert_array_equal(keep["conv_0"], np.sort(np.argsort(norms)[6:]))
    config.model.trunk_kwargs.channels = lenet_channels(keep)
    small = build_model(config.model, tasks)
    masked = model.apply({"params": mask_hps_lenet(params, keep)}, x)
    sliced = small.apply({"params": slice_hps_lenet(params, keep)}, x)
    full = model.apply({"params": params}, x)
    for task in ("left", "right"):
        np.testing.assert_allclose(sliced[task], masked[task], rtol=1e-5, atol=1e-5)
        assert float(np.abs(np.asarray(full[task]) - np.asarray(masked[task])).max()) > 1e-3
    with pytest.raises(ValueError, match=r"unknown LeNet layers \['conv_2'\]"):
        lenet_keep(params["shared"], {"conv_2": 0.5})
    assert set(keep) == set(LENET_LAYERS)


def test_pagcp_experiment_smoke(tmp_path):
    import json

    from experiments import pagcp_multimnist

    out = str(tmp_path / "pagcp")
    pagcp_multimnist.main(["--steps", "20", "--finetune_steps", "5", "--num_train", "256", "--num_test", "128",
                           "--num_calibration", "128", "--seeds", "0", "--allowances", "0.2:1.6", "--out", out])
    with open(out + ".json") as f:
        rows = json.load(f)["results"]["0"]["rows"]
    names = list(rows)
    assert names[:2] == ["Dense", "Dense + fine-tuning"] and names[2].startswith("PAGCP (allowance 0.2, total 1.6)")
    dense, pruned = rows["Dense"], rows[names[2]]
    assert pruned["flops_per_example"] <= dense["flops_per_example"] and pruned["params"] <= dense["params"]
    assert all(c <= d for c, d in zip(pruned["channels"], dense["channels"]))
    with open(out + ".md") as f:
        table = f.read()
    assert "| Dense | (20, 40, 100) |" in table and "--allowances 0.2:1.6" in table
