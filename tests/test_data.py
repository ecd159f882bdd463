"""Data: MultiMNIST construction, the TF-free tfds builder, in-memory datasets and grain pipelines."""

import numpy as np
import pytest

from mtl_jax import tasks as T
from mtl_jax.data import from_arrays, get_dataset
from mtl_jax.data import multimnist
from mtl_jax.data.pipeline import eval_batches, train_dataset, train_iterator
from mtl_jax.config import default_config


def test_multimnist_sources_are_disjoint_and_balanced():
    (tr_x, tr_y), (te_x, te_y) = multimnist.load_mnist_sources()
    assert tr_x.shape == (4000, 28, 28) and te_x.shape == (1000, 28, 28)
    assert np.bincount(tr_y).tolist() == [400] * 10 and np.bincount(te_y).tolist() == [100] * 10
    train_rows = {row.tobytes() for row in tr_x}
    assert not any(row.tobytes() in train_rows for row in te_x), "a test source digit also appears in train"


def test_multimnist_pairs_are_deterministic_and_labelled():
    (x, y), _ = multimnist.load_mnist_sources()
    a = multimnist.overlay_pairs(x, y, 300, seed=5)
    b = multimnist.overlay_pairs(x, y, 300, seed=5)
    c = multimnist.overlay_pairs(x, y, 300, seed=6)
    assert a["image"].shape == (300, 28, 28, 1) and a["image"].dtype == np.uint8
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    assert set(np.unique(a["left"])) <= set(range(10)) and len(np.unique(a["right"])) == 10


def test_overlay_places_left_digit_up_left_and_right_digit_down_right():
    # Sources: a digit with a bright centre (label 0) and a blank one (label 1). In a pair holding
    # one of each, all the ink belongs to the bright digit, so its centroid tells where it went.
    bright = np.zeros((28, 28), np.uint8)
    bright[12:16, 12:16] = 255
    pairs = multimnist.overlay_pairs(np.stack([bright, np.zeros_like(bright)]), np.array([0, 1]), 100, seed=1)
    img = pairs["image"][..., 0].astype(float)
    ys, xs = np.mgrid[:28, :28]
    cy = (img * ys).sum((1, 2)) / img.sum((1, 2))
    cx = (img * xs).sum((1, 2)) / img.sum((1, 2))
    left = pairs["left"] == 0
    assert left.any() and (~left).any()
    assert (cy[left] < 13.5).all() and (cx[left] < 13.5).all()
    assert (cy[~left] > 13.5).all() and (cx[~left] > 13.5).all()


def test_multimnist_tfds_builder_roundtrip(data_dir):
    cfg = default_config().data
    cfg.num_train, cfg.num_test = 256, 64
    ds = get_dataset(cfg)
    assert ds.task_names == ("left", "right")
    assert len(ds.splits["train"]) == 256 and len(ds.splits["test"]) == 64
    record = ds.splits["train"][3]
    assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
    # The prepared array_record files are reused: a second load reads the same records.
    again = get_dataset(cfg)
    np.testing.assert_array_equal(again.splits["train"][3]["image"], record["image"])
    direct = multimnist.make_multimnist(256, 64, 0)
    stored = {ds.splits["train"][i]["image"].tobytes() for i in range(256)}
    assert all(img.tobytes() in stored for img in direct["train"]["image"][:20])


def test_multimnist_derived_labels_follow_the_two_digits(data_dir):
    cfg = default_config().data
    cfg.name, cfg.num_train, cfg.num_test = "multimnist_derived", 256, 64
    cfg.derived_tasks = ("left", "sum", "difference", "max", "product_last_digit")
    ds = get_dataset(cfg)
    assert ds.task_names == cfg.derived_tasks
    assert [t.num_outputs for t in ds.tasks] == [10, 19, 10, 10, 10]
    plain = default_config().data
    plain.num_train, plain.num_test = 256, 64
    base_source = get_dataset(plain).splits["test"]
    base = {k: np.stack([base_source[i][k] for i in range(64)]) for k in ("image", "left", "right")}
    derived = {k: np.stack([ds.splits["test"][i][k] for i in range(64)]) for k in ("image",) + ds.task_names}
    # The test pairs are the MultiMNIST pairs, in order, with labels computed from (left, right).
    np.testing.assert_array_equal(derived["image"], base["image"])
    left, right = base["left"].astype(int), base["right"].astype(int)
    np.testing.assert_array_equal(derived["left"], left)
    np.testing.assert_array_equal(derived["sum"], left + right)
    np.testing.assert_array_equal(derived["difference"], np.abs(left - right))
    np.testing.assert_array_equal(derived["max"], np.maximum(left, right))
    np.testing.assert_array_equal(derived["product_last_digit"], (left * right) % 10)
    assert derived["sum"].max() > 9  # really a 19-way task
    cfg.derived_tasks = ("left", "colour")
    with pytest.raises(ValueError, match=r"derived_tasks.*unknown: \['colour'\].*difference"):
        get_dataset(cfg)


def test_unknown_dataset_and_task_errors(data_dir):
    cfg = default_config().data
    cfg.name = "imagenet"
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*digits.*multimnist"):
        get_dataset(cfg)
    cfg = default_config().data
    cfg.name, cfg.tasks = "digits", ("digit", "colour")
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['colour'\].*digit"):
        get_dataset(cfg)


def test_from_arrays_checks_keys():
    x = np.zeros((10, 3), np.float32)
    ds = from_arrays("mine", {"train": {"x": x, "a": np.zeros(10, np.int64)}}, [T.classification("a", 2)], "x")
    assert ds.splits["train"][4]["x"].shape == (3,)
    with pytest.raises(ValueError, match=r"lack keys \['b'\]"):
        from_arrays("mine", {"train": {"x": x, "a": np.zeros(10)}}, [T.regression("b")], "x")
    with pytest.raises(ValueError, match="share their first dimension"):
        from_arrays("mine", {"train": {"x": x, "a": np.zeros(9)}}, [T.regression("a")], "x")


def test_train_stream_reshuffles_epochs_and_resumes_from_iterator_state():
    src = from_arrays("n", {"train": {"x": np.arange(20), "y": np.arange(20)}}, [T.regression("y")], "x").splits["train"]
    ds = train_dataset(src, keys=["x"], global_batch_size=5, seed=1)
    epoch1 = np.concatenate([ds[i]["x"] for i in range(4)])
    epoch2 = np.concatenate([ds[i]["x"] for i in range(4, 8)])
    assert sorted(epoch1.tolist()) == list(range(20)) and sorted(epoch2.tolist()) == list(range(20))
    assert not np.array_equal(epoch1, epoch2)
    it = train_iterator(src, keys=["x"], global_batch_size=5, seed=1)
    for _ in range(3):
        next(it)
    saved = it.get_state()
    expected = [next(it)["x"] for _ in range(3)]
    resumed = train_iterator(src, keys=["x"], global_batch_size=5, seed=1)
    resumed.set_state(saved)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["x"], want)


def test_eval_batches_pad_and_mask_every_example_once():
    src = from_arrays("n", {"test": {"x": np.arange(11), "y": np.arange(11)}}, [T.regression("y")], "x").splits["test"]
    batches = list(eval_batches(src, keys=["x", "y"], global_batch_size=4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 4]
    mask = np.concatenate([b["mask"] for b in batches])
    seen = np.concatenate([b["x"] for b in batches])[mask > 0]
    assert sorted(seen.tolist()) == list(range(11)) and mask.sum() == 11


def _marked(name, task, classes, n, sign, test_n=7):
    """A one-task dataset whose every input is filled with sign * (label + 1): the example's source and
    label can be read back from its input."""
    rng = np.random.default_rng(len(name))

    def split(size):
        labels = rng.integers(0, classes, size)
        return {"x": (sign * (labels + 1.0))[:, None, None, None] * np.ones((size, 2, 2, 1), np.float32), task: labels}

    return from_arrays(name, {"train": split(n), "test": split(test_n)}, [T.classification(task, classes)], input_key="x")


def test_mixture_of_task_datasets_draws_tasks_by_ratio_and_labels_one_task_per_example(tmp_path):
    from mtl_jax.config import load_config
    from mtl_jax.data.datasets import mixture_of_task_datasets
    from mtl_jax.train.trainer import train_and_evaluate

    a, b = _marked("a", "digit", 10, 300, 1.0), _marked("bb", "parity", 2, 40, -1.0)
    mix = mixture_of_task_datasets("mix", {"digit": a, "parity": b}, ratios=(0.75, 0.25), size=2000, seed=1)
    train = mix.splits["train"].arrays
    x = train["input"][:, 0, 0, 0]
    from_a, from_b = train["digit"] >= 0, train["parity"] >= 0
    assert np.all(from_a ^ from_b) and abs(from_a.mean() - 0.75) < 0.03  # one task each, drawn 3:1
    np.testing.assert_array_equal(x[from_a], train["digit"][from_a] + 1.0)  # the input is that task's own example
    np.testing.assert_array_equal(x[from_b], -(train["parity"][from_b] + 1.0))
    assert len(np.unique(np.flatnonzero(from_b))) == from_b.sum() > 40  # 40 parity examples cycled
    test = mix.splits["test"].arrays  # both test splits, each example labelled for its own task
    assert len(test["input"]) == 14 and (test["digit"][:7] >= 0).all() and (test["parity"][:7] == -1).all()
    assert (test["digit"][7:] == -1).all() and (test["parity"][7:] >= 0).all()
    default = mixture_of_task_datasets("mix", {"digit": a, "parity": b})  # sizes 300 : 40
    assert len(default.splits["train"].arrays["input"]) == 340
    with pytest.raises(ValueError, match="inputs differ in shape / dtype per example"):
        wide = from_arrays("w", {"train": {"x": np.zeros((5, 3), np.float32), "parity": np.zeros(5, np.int64)}},
                           [T.classification("parity", 2)], input_key="x")
        mixture_of_task_datasets("mix", {"digit": a, "parity": wide})
    with pytest.raises(ValueError, match="dataset 'a' has no classification task 'size'"):
        mixture_of_task_datasets("mix", {"size": a})
    config = load_config("configs/digits_mlp.py:smoke", ["num_steps=5", "checkpoint.enabled=False", "mesh.data=1",
                                                         "batch_size=32", "eval_batch_size=8"])
    out = train_and_evaluate(config, str(tmp_path), dataset=mix)
    assert all(np.isfinite(v) for m in out["results"].values() for v in m.values())
