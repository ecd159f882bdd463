"""Smoke run of the ViT merging benchmark (``python -m experiments.merging.run``) on its `:smoke` config."""

import json

import numpy as np

from experiments.merging import run as bench
from experiments.merging import tasks as task_lib
from experiments.merging.statistics import backbone_grams, from_merge_space, to_merge_space
from experiments.merging.training import frozen_heads
from mtl_jax.config import config_from_file
from mtl_jax.merging.tree import flatten_with_paths
from mtl_jax.models.trunks import ViT

METHODS = ("Greedy soup", "Task arithmetic", "TIES", "TALL-mask retrieval", "EMR")
BASELINES = ("Pretrained (linear probe)", "Individual (fine-tuned)", "Multi-task trained")


def smoke_config(tmp_path):
    config = config_from_file(bench.CONFIG + ":smoke")
    config.methods = METHODS
    config.workdir = str(tmp_path / "runs")
    config.out = str(tmp_path / "results" / "merging_vit")
    return config


def test_tasks_transform_real_digits():
    sources = task_lib.load_sources(("digits",), seed=0)
    plain, mirror = task_lib.build_tasks(("digits", "digits_mirror"), sources)
    x, y = plain.splits["train"]
    assert x.shape[1:] == (28, 28, 1) and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(mirror.splits["train"][0], x[:, :, ::-1])
    np.testing.assert_array_equal(mirror.splits["train"][1], y)
    sizes = {k: len(v[1]) for k, v in plain.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] > sizes["val"] > 0
    images, k = task_lib.rotation_pretext(x[:5], seed=0)
    assert list(np.bincount(k)) == [5, 5, 5, 5]
    for rot in range(4):  # un-rotating the label-k copies gives back the five source images
        back = np.rot90(images[k == rot], -rot, axes=(1, 2)).reshape(5, -1)
        dist = np.abs(back[:, None] - x[:5].reshape(1, 5, -1)).sum(-1)
        assert sorted(np.argmin(dist, axis=1)) == [0, 1, 2, 3, 4] and np.all(dist.min(axis=1) == 0)


def test_merge_space_round_trip_and_attention_matrices():
    import jax

    trunk = ViT(patch_size=7, dim=16, depth=2, num_heads=2, mlp_dim=32)
    params = jax.jit(trunk.init)(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
    space = to_merge_space(params)
    att = space["shared"]["block_0"]["attention"]
    assert att["query"]["kernel"].shape == (16, 16) and att["query"]["bias"].shape == (16,)
    assert att["out"]["kernel"].shape == (16, 16)
    back = from_merge_space(space, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    # RegMean Grams are keyed by the merge-space kernel paths and match their input sizes.
    grams = backbone_grams(trunk, params, np.zeros((2, 28, 28, 1), np.float32))
    flat = dict(flatten_with_paths(space))
    assert "shared/block_1/attention/out/kernel" in grams
    for path, g in grams.items():
        assert g.shape == (flat[path].shape[0],) * 2


def test_smoke_benchmark_writes_table_and_finetuning_beats_probe(tmp_path):
    config = smoke_config(tmp_path)
    out = bench.run_benchmark(config)
    rows = out["results"][0]
    names = out["tasks"]
    for row in BASELINES + METHODS:
        assert len(rows[row]["acc"]) == len(names)
    probe = np.array(rows["Pretrained (linear probe)"]["acc"])
    individual = np.array(rows["Individual (fine-tuned)"]["acc"])
    assert np.all(individual > probe), (individual, probe)
    np.testing.assert_allclose(rows["Individual (fine-tuned)"]["normalised"], 1.0)
    cos = np.array(rows["_task_vectors"]["cosine"])
    assert cos.shape == (len(names), len(names))
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-3)
    np.testing.assert_allclose(cos, cos.T, atol=1e-4)
    tv = rows["_task_vectors"]
    assert tv["ta_lambda"] == rows["Task arithmetic"]["hparams"]["lam"]
    np.testing.assert_allclose(tv["ta_acc"], rows["Task arithmetic"]["acc"], atol=0.011)  # the same merge, re-made
    assert all(0.0 <= d <= 1.0 for d in tv["disagreement"])
    # disagreement bounds the accuracy gap between the task's own edit and the merge
    assert all(abs(a - b) <= d + 1e-9 for a, b, d in zip(tv["own_edit_acc"], tv["ta_acc"], tv["disagreement"]))
    soup = rows["Greedy soup"]["hparams"]["ingredients"]
    assert soup and set(soup) <= set(names) and len(set(soup)) == len(soup), soup
    with open(config.out + ".md") as f:
        table = f.read()
    for row in BASELINES + ("Task arithmetic", "TIES", "TALL-mask retrieval (per-task models)"):
        assert f"| {row} |" in table
    assert "| method | " + " | ".join(names) + " | avg |" in table
    with open(config.out + ".json") as f:
        assert json.load(f)["results"]["0"]["TIES"]["acc"] == rows["TIES"]["acc"]
    # A second run loads the cached checkpoints and rows: same baselines, nothing retrained, only the
    # row the cache lacks is computed.
    config.methods = ("EMR", "Weight averaging")
    again = bench.run_benchmark(config)["results"][0]
    for row in BASELINES + ("EMR",):
        assert again[row]["acc"] == rows[row]["acc"]
    assert again["_timings"]["finetune"] < rows["_timings"]["finetune"]
    assert "Weight averaging" in again["_timings"] and "EMR" not in again["_timings"]
    assert "TIES" not in again  # cached, but not asked for
    with open(config.out + ".md") as f:
        assert "| Weight averaging |" in f.read()


def test_frozen_heads_train_only_the_backbone():
    """``freeze_heads``: the optimiser moves ``shared`` and leaves every head exactly at its probe."""
    import jax
    import jax.numpy as jnp
    import optax

    params = {"shared": {"w": jnp.ones((3, 2))}, "heads": {"a": {"kernel": jnp.ones((2, 4))}, "b": {"kernel": jnp.ones((2,))}}}
    loss = lambda p: jnp.sum((p["shared"]["w"] @ p["heads"]["a"]["kernel"]) ** 2) + jnp.sum(p["heads"]["b"]["kernel"] ** 2)  # noqa: E731
    tx = frozen_heads(optax.adamw(0.1, weight_decay=0.5))
    state = tx.init(params)
    new = params
    for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(new), state, new)
        new = optax.apply_updates(new, updates)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), new["heads"], params["heads"]))
    assert float(jnp.max(jnp.abs(new["shared"]["w"] - params["shared"]["w"]))) > 0.1


def test_compare_runs_side_by_side(tmp_path):
    from experiments.merging import compare

    cos = [[1.0, 0.2], [0.2, 1.0]]
    a = {"results": {"0": {"TA": {"acc": [0.5, 0.7]}, "_task_vectors": {"cosine": cos}},
                     "1": {"TA": {"acc": [0.7, 0.9]}, "_task_vectors": {"cosine": cos}}}}
    b = {"results": {"0": {"TA": {"acc": [0.6, 0.6]}, "TIES": {"acc": [1.0, 0.5]}}}}
    paths = []
    for name, run in (("a", a), ("b", b)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(run, f)
    out = str(tmp_path / "t.md")
    compare.main(["--runs", f"A={paths[0]},B={paths[1]}", "--out", out])
    with open(out) as f:
        text = f.read()
    assert "| method | A (2 seeds) | B (1 seed) |" in text
    assert "| TA | 70.0 ± 10.0 | 60.0 |" in text  # seed means 60 and 80
    assert "| TIES |  | 75.0 |" in text
    assert "| task-vector cosine (mean off-diagonal) | 0.200 |  |" in text


def test_scalearn_smoke_transfer_rows_and_cache(tmp_path):
    from experiments.merging import scalearn

    config = smoke_config(tmp_path)
    config.scalearn.update(dict(variants=("scalearn", "scalearn_uniform++"), workdir=str(tmp_path / "scalearn"),
                                out=str(tmp_path / "results" / "scalearn_vit")))
    out = scalearn.run(config, ["--config=smoke"])
    rows = out["results"][0]
    assert list(rows) == ["Linear probe", "Fine-tuning (full)", "Adapter", "scalearn", "scalearn_uniform++",
                          scalearn.LEAVE_OUT]
    for row in rows.values():
        assert len(row["acc"]) == 2 and all(0.0 <= a <= 1.0 for a in row["acc"])
    # omega sizes: depth 2 x K sources x dim 16, K = 2 (both tasks) or 1 (the target's adapter left out).
    assert [i["transfer_params"] for i in rows["scalearn"]["info"]] == [64, 64]
    assert [i["transfer_params"] for i in rows["scalearn_uniform++"]["info"]] == [2, 2]
    assert [i["transfer_params"] for i in rows[scalearn.LEAVE_OUT]["info"]] == [32, 32]
    assert np.mean(rows["Fine-tuning (full)"]["acc"]) > np.mean(rows["Linear probe"]["acc"])
    with open(str(tmp_path / "results" / "scalearn_vit.json")) as f:
        assert json.load(f)["results"]["0"]["Adapter"]["acc"] == rows["Adapter"]["acc"]
    assert "| scalearn_uniform++ |" in out["table"] and "--config=smoke" in out["table"]
    again = scalearn.run(config, ["--config=smoke"])  # the seed's rows come from the cache
    assert again["results"][0]["scalearn"]["acc"] == rows["scalearn"]["acc"]


def test_fisher_diagonal_and_regmean_grams_of_a_dense_layer():
    """``mtl_jax.merging.fisher_regmean``'s statistics on one Dense layer: the Fisher is the mean of the
    per-example squared gradients of log p(y_hat | x) (kernel gradient x_n (e_y - p_n)^T), the Gram is
    X^T X keyed by the kernel path, summed over the calls of a layer applied twice."""
    import flax.linen as nn
    import jax

    from mtl_jax.merging.fisher_regmean import fisher_diagonal, regmean_grams

    model = nn.Dense(3)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    logits_fn = lambda p, xb: model.apply({"params": p}, xb)  # noqa: E731
    key = jax.random.key(1)
    fisher = fisher_diagonal(logits_fn, params, x, key)
    logits = np.asarray(logits_fn(params, x))
    labels = np.asarray(jax.random.categorical(key, logits))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    residual = np.eye(3)[labels] - probs  # [N, C]: d log p(y_n | x_n) / d logits
    np.testing.assert_allclose(fisher["kernel"], np.mean((x[:, :, None] * residual[:, None, :]) ** 2, 0), rtol=1e-5)
    np.testing.assert_allclose(fisher["bias"], np.mean(residual ** 2, 0), rtol=1e-5)

    grams = regmean_grams(lambda: model.apply({"params": params}, x), prefix=("shared",))
    assert list(grams) == ["shared/kernel"]
    np.testing.assert_allclose(grams["shared/kernel"], x.T @ x, rtol=1e-5)
    twice = regmean_grams(lambda: [model.apply({"params": params}, x) for _ in range(2)])
    np.testing.assert_allclose(twice["kernel"], 2 * x.T @ x, rtol=1e-5)
