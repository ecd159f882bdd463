"""Dense-prediction losses and metrics (segmentation, depth, normals; CelebA's F1) against hand-computed
cases and LibMTL's code (``fixtures/dense/make_libmtl_metric_reference.py``), accumulated evaluation
with padded batches, Delta-m% over all metrics, and training / evaluation end to end on dense tasks."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtl_jax import tasks as T
from mtl_jax.config import apply_overrides, load_config
from mtl_jax.data import from_arrays
from mtl_jax.data.pipeline import eval_batches, to_global
from mtl_jax.models import MODELS
from mtl_jax.train import dense_metrics as D
from mtl_jax.train import losses as L
from mtl_jax.train.forward import batch_metrics, make_task_losses, metric_sums
from mtl_jax.train.reporting import delta_m, delta_m_terms, results_table
from mtl_jax.train.trainer import build_experiment, train_and_evaluate

REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "dense", "libmtl_metric_reference.npz")
DENSE = (T.segmentation("segmentation", 5), T.depth("depth"), T.normal("normal"))
NINE = ["miou", "pixel_accuracy", "abs_err", "rel_err", "angle_mean", "angle_median", "within_11_25", "within_22_5",
        "within_30"]


def libmtl_numpy(batches):
    """LibMTL's NYUv2 scores (examples/nyu/utils.py: SegMetric, DepthMetric, NormalMetric) in numpy over
    a list of NHWC batches ``(seg_logits, labels, depth_pred, depth, normal_pred, normal)``: the
    nine metrics in ``NINE`` order."""
    classes = batches[0][0].shape[-1]
    h = np.zeros((classes, classes), np.int64)
    abs_rec, rel_rec, sizes, angles = [], [], [], []
    for logits, labels, dpred, dgt, npred, ngt in batches:
        pred, gt = logits.argmax(-1).ravel(), labels.ravel()
        k = (gt >= 0) & (gt < classes)
        h += np.bincount(classes * gt[k] + pred[k], minlength=classes ** 2).reshape(classes, classes)
        mask = dgt[..., 0] != 0
        err = np.abs(dpred[..., 0][mask] - dgt[..., 0][mask])
        abs_rec.append(err.sum() / mask.sum())
        rel_rec.append((err / dgt[..., 0][mask]).sum() / mask.sum())
        sizes.append(mask.sum())
        unit = npred / np.linalg.norm(npred, axis=-1, keepdims=True)
        valid = ngt.sum(-1) != 0
        angles.append(np.degrees(np.arccos(np.clip((unit * ngt).sum(-1)[valid], -1, 1))))
    h = h.astype(np.float64)
    iu = np.diag(h) / (h.sum(1) + h.sum(0) - np.diag(h))
    sizes = np.array(sizes, np.float64)
    a = np.concatenate(angles)
    return [iu.mean(), np.diag(h).sum() / h.sum(), (np.array(abs_rec) * sizes).sum() / sizes.sum(),
            (np.array(rel_rec) * sizes).sum() / sizes.sum(), a.mean(), np.median(a), (a < 11.25).mean(),
            (a < 22.5).mean(), (a < 30).mean()]


def load_reference():
    if not os.path.exists(REFERENCE):
        pytest.skip(f"{REFERENCE} missing: cd tests && ../.peers-venv/bin/python -m "
                    f"fixtures.dense.make_libmtl_metric_reference")
    return dict(np.load(REFERENCE))


def as_batch(ref, index=slice(None)):
    return ({t.name: jnp.asarray(ref[k][index]) for t, k in zip(DENSE, ("seg_logits", "depth_pred", "normal_pred"))},
            {t.name: jnp.asarray(ref[k][index]) for t, k in zip(DENSE, ("seg_labels", "depth", "normal"))})


def evaluate_arrays(tasks, preds, targets, batch_size):
    """The trainer's evaluation (metric_sums per padded batch, summed, finalised) on fixed predictions."""
    n = len(next(iter(targets.values())))
    arrays = {"idx": np.arange(n), **{f"pred_{k}": v for k, v in preds.items()}, **targets}
    keys = list(arrays)
    totals = None
    sums_fn = jax.jit(metric_sums, static_argnums=0)
    for batch in eval_batches(_Source(arrays), keys=keys, global_batch_size=batch_size):
        out = sums_fn(tasks, {t.name: jnp.asarray(batch[f"pred_{t.name}"]) for t in tasks},
                          {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(batch["mask"]))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    sums, counts = jax.device_get(totals)
    fns = {t.name: L.task_metric_fns(t) for t in tasks}
    return {name: {m: D.finalize_sums(fns[name][m], v, counts[name]) for m, v in ms.items()} for name, ms in sums.items()}


class _Source:
    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays["idx"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


def flat(results):
    return [results[t.name][m] for t in DENSE for m in t.metrics]


# ---- task specs -------------------------------------------------------------------------------------

def test_dense_task_specs_have_libmtls_losses_metrics_and_directions():
    seg, dep, nor = DENSE
    assert (seg.kind, seg.num_outputs, seg.loss, seg.metrics) == ("segmentation", 5, "pixel_cross_entropy",
                                                                  ("miou", "pixel_accuracy"))
    assert (dep.num_outputs, dep.loss, dep.metrics, dep.higher_is_better) == (1, "depth_l1", ("abs_err", "rel_err"),
                                                                              (False, False))
    assert nor.num_outputs == 3 and nor.loss == "normal_cosine"
    assert nor.higher_is_better == (False, False, True, True, True)
    assert all(t.dense and t.delta_m_metrics == t.metrics for t in DENSE)
    assert T.classification("c", 3).delta_m_metrics == ("accuracy",) and not T.classification("c", 3).dense
    assert T.segmentation("s", 7, label_key="label_7").label_key == "label_7"
    attr = T.binary("Smiling")
    assert (attr.kind, attr.num_outputs, attr.loss, attr.metrics) == ("classification", 1, "binary_cross_entropy",
                                                                      ("f1", "binary_accuracy"))
    with pytest.raises(ValueError, match="delta_m_metrics \\['mse'\\] are not among its metrics"):
        T.depth("d", delta_m_metrics=("mse",))
    with pytest.raises(ValueError, match="unknown metric\\(s\\) \\['iou'\\]"):
        T.segmentation("s", 3, metrics=("iou",))


# ---- hand-computed cases ----------------------------------------------------------------------------

def test_segmentation_hand_computed():
    """labels [[0, 1], [-1, 1]], predictions [[0, 0], [1, 1]] (class 2 never seen): h = [[1, 0], [1, 1]]."""
    logits = jnp.asarray(np.eye(3)[[[0, 0], [1, 1]]][None] * 2.0, jnp.float32)  # [1, 2, 2, 3]
    labels = jnp.array([[[0, 1], [-1, 1]]])
    h = D.confusion_matrix(logits, labels, jnp.ones(1))["h"]
    np.testing.assert_array_equal(h, [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    assert float(D.miou_from_confusion(h)) == pytest.approx(0.5)  # IoU 1/2 and 1/2; class 2 has no union
    assert float(D.pixel_accuracy_from_confusion(h)) == pytest.approx(2 / 3)
    assert int(D.confusion_matrix(logits, labels, jnp.zeros(1))["h"].sum()) == 0  # weight 0: not counted
    nan_logits = logits.at[0, 1, 1, 0].set(jnp.nan)
    assert np.isnan(float(D.ACCUMULATED["miou"].finalize(D.confusion_matrix(nan_logits, labels, jnp.ones(1)))))
    assert not np.isnan(float(D.ACCUMULATED["miou"].finalize(D.confusion_matrix(nan_logits, -labels ** 2, jnp.ones(1)))))
    # cross-entropy of logits (2, 0, 0) at the three labelled pixels: right, wrong, right
    right, wrong = np.log(np.exp(2) + 2) - 2, np.log(np.exp(2) + 2)
    np.testing.assert_allclose(L.pixel_cross_entropy(logits, labels), [(2 * right + wrong) / 3], rtol=1e-6)
    assert float(L.pixel_cross_entropy(logits, -jnp.ones_like(labels))[0]) == 0.0  # nothing labelled: 0, not NaN


def test_depth_hand_computed_and_batch_pixel_mean_loss():
    pred = jnp.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 2, 2, 1)
    depth = jnp.array([[2.0, 0.0, 1.0, 4.0], [6.0, 0.0, 0.0, 0.0]]).reshape(2, 2, 2, 1)
    # example 0: valid errors 1, 2, 0 (rel 1/2, 2, 0); example 1: error 5 (rel 5/6)
    s = D.depth_error_sums(pred, depth, jnp.ones(2))
    np.testing.assert_allclose([s["abs"], s["rel"], s["count"]], [8.0, 2.5 + 5 / 6, 4])
    assert float(D.ACCUMULATED["abs_err"].finalize(s)) == pytest.approx(2.0)
    one = D.depth_error_sums(pred, depth, jnp.array([1.0, 0.0]))
    assert float(D.ACCUMULATED["rel_err"].finalize(one)) == pytest.approx(2.5 / 3)
    # LibMTL's loss: sum over the batch's valid pixels / their number = 8 / 4; per-example shares 2*3/4, 2*5/4
    np.testing.assert_allclose(L.depth_l1(pred, depth), [1.5, 2.5])
    np.testing.assert_allclose(make_task_losses((T.depth("d"),))({"d": pred}, {"d": depth}), [2.0])
    np.testing.assert_allclose(L.depth_l1_sums(pred, depth), [[3.0, 5.0], [3.0, 1.0]])


def test_normal_hand_computed():
    """Angles 0, 45, 60, 90 degrees on four valid pixels; an all-zero and a sum-zero target are invalid."""
    c, s = np.cos(np.pi / 3), np.sin(np.pi / 3)
    pred = jnp.array([[1, 0, 0], [3, 3, 0], [c, s, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]], jnp.float32).reshape(1, 2, 3, 3)
    gt = jnp.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0], [0.6, -0.6, 0]],
                   jnp.float32).reshape(1, 2, 3, 3)
    angle, valid = D.normal_angles(pred, gt, jnp.ones(1))
    np.testing.assert_array_equal(valid.ravel(), [1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(angle.ravel()[:4], [0, 45, 60, 90], atol=1e-3)
    stats = {m: D.ACCUMULATED[m].stats(pred, gt, jnp.ones(1)) for m in T.normal("n").metrics}
    values = {m: float(D.ACCUMULATED[m].finalize(v)) for m, v in stats.items()}
    assert values["angle_mean"] == pytest.approx(48.75, abs=1e-3)
    assert values["angle_median"] == pytest.approx(52.5, abs=D.ANGLE_BIN_DEGREES / 2 + 1e-4)  # mean of 45 and 60
    assert (values["within_11_25"], values["within_22_5"], values["within_30"]) == pytest.approx((0.25, 0.25, 0.25))
    np.testing.assert_allclose(L.normal_cosine(pred, gt), [(1 - np.cos(np.pi / 4)) / 4 + 0.5 / 4 + 1 / 4], rtol=1e-5)
    odd = D.median_from_histogram(jnp.zeros(D.ANGLE_BINS, jnp.int32).at[jnp.array([100, 250, 9000])].add(1))
    assert float(odd) == pytest.approx(2.505)  # the middle of three, at its bin's centre
    assert float(D.median_from_histogram(jnp.zeros(D.ANGLE_BINS, jnp.int32))) == 0.0


def test_binary_f1_accuracy_and_bce_hand_computed():
    """logits (2, -1, 3, -2, 1) vs labels (1, 1, 0, 0, -1): tp 1, fn 1, fp 1, tn 1; the -1 is not labelled."""
    task = T.binary("attr")
    logits = jnp.array([[2.0], [-1.0], [3.0], [-2.0], [1.0]])
    labels = jnp.array([1, 1, 0, 0, -1])
    means = batch_metrics((task,), {"attr": logits}, {"attr": labels})["attr"]
    p = 1 / (1 + 1e-8)
    assert float(means["f1"]) == pytest.approx(2 * (0.5 * p) ** 2 / (p + 1e-8), rel=1e-6)
    assert float(means["binary_accuracy"]) == pytest.approx(0.5)
    sp = lambda x: np.log1p(np.exp(x))  # softplus: BCE(x, 1) = sp(-x), BCE(x, 0) = sp(x)
    expected = np.mean([sp(-2.0), sp(1.0), sp(3.0), sp(-2.0)])
    np.testing.assert_allclose(make_task_losses((task,))({"attr": logits}, {"attr": labels}), [expected], rtol=1e-6)
    sums, counts = metric_sums((task,), {"attr": logits}, {"attr": labels}, jnp.array([1.0, 1.0, 1.0, 0.0, 1.0]))
    assert {k: int(v) for k, v in sums["attr"]["f1"].items()} == {"tp": 1, "fp": 1, "fn": 1, "nonfinite": 0}
    assert float(counts["attr"]) == 3


def test_batch_without_valid_pixels_gives_finite_train_metrics():
    preds = {"s": jnp.zeros((2, 2, 2, 3)), "d": jnp.ones((2, 2, 2, 1)), "n": jnp.ones((2, 2, 2, 3))}
    batch = {"s": -jnp.ones((2, 2, 2), jnp.int32), "d": jnp.zeros((2, 2, 2, 1)), "n": jnp.zeros((2, 2, 2, 3))}
    tasks = (T.segmentation("s", 3, metrics=("miou", "pixel_accuracy", "loss")), T.depth("d"), T.normal("n"))
    values = jax.tree.leaves(batch_metrics(tasks, preds, batch))
    assert all(np.isfinite(float(v)) for v in values) and all(float(v) == 0.0 for v in values)
    assert np.isfinite(np.asarray(make_task_losses(tasks)(preds, batch))).all()


# ---- LibMTL's code -----------------------------------------------------------------------------------

def test_numpy_transcription_matches_libmtls_torch_code():
    ref = load_reference()
    keys = ("seg_logits", "seg_labels", "depth_pred", "depth", "normal_pred", "normal")
    starts = np.cumsum([0] + list(ref["batches"]))
    batches = [tuple(ref[k][a:b] for k in keys) for a, b in zip(starts[:-1], starts[1:])]
    np.testing.assert_allclose(libmtl_numpy(batches), ref["scores"], rtol=1e-5)
    np.testing.assert_allclose(ref["mtan_seg_scores"], ref["scores"][:2], rtol=1e-6)  # MTAN's ConfMatrix agrees


@pytest.mark.parametrize("batch_size", [3, 4])
def test_accumulated_evaluation_matches_libmtl_for_any_batch_size(batch_size):
    """Split-wide values over padded batches (3: LibMTL's own batching, last batch 1 real + 2 padding)."""
    ref = load_reference()
    preds, targets = as_batch(ref)
    res = evaluate_arrays(DENSE, {k: np.asarray(v) for k, v in preds.items()},
                          {k: np.asarray(v) for k, v in targets.items()}, batch_size)
    got, want = np.array(flat(res)), ref["scores"]
    median = NINE.index("angle_median")
    np.testing.assert_allclose(np.delete(got, median), np.delete(want, median), rtol=2e-5)
    assert abs(got[median] - want[median]) <= D.ANGLE_BIN_DEGREES / 2 + 1e-4


def test_batch_losses_and_batch_metrics_match_libmtl_per_batch():
    ref = load_reference()
    losses = make_task_losses(DENSE)
    starts = np.cumsum([0] + list(ref["batches"]))
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        preds, targets = as_batch(ref, slice(a, b))
        np.testing.assert_allclose(losses(preds, targets), ref["batch_losses"][i], rtol=1e-5)
        got = np.array(flat(jax.device_get(batch_metrics(DENSE, preds, targets))))
        median = NINE.index("angle_median")
        np.testing.assert_allclose(np.delete(got, median), np.delete(ref["batch_scores"][i], median), rtol=2e-5)
        assert abs(got[median] - ref["batch_scores"][i][median]) <= D.ANGLE_BIN_DEGREES / 2 + 1e-4


def test_f1_matches_famos_celeba_metric():
    ref = load_reference()
    logits, labels = ref["attr_logits"], ref["attr_labels"]
    tasks = tuple(T.binary(f"a{k}") for k in range(logits.shape[1]))
    res = evaluate_arrays(tasks, {t.name: logits[:, k:k + 1] for k, t in enumerate(tasks)},
                          {t.name: labels[:, k] for k, t in enumerate(tasks)}, batch_size=3)
    np.testing.assert_allclose([res[t.name]["f1"] for t in tasks], ref["f1"], rtol=1e-6, atol=1e-7)


def test_dense_loss_metric_is_the_split_pixel_mean():
    ref = load_reference()
    preds, targets = as_batch(ref)
    tasks = tuple(T.TaskSpec(t.name, t.kind, t.num_outputs, metrics=("loss",)) for t in DENSE)
    res = evaluate_arrays(tasks, jax.device_get(preds), jax.device_get(targets), batch_size=4)
    whole = make_task_losses(tasks)(preds, targets)  # one batch of all 7: the pixel mean over the split
    np.testing.assert_allclose([res[t.name]["loss"] for t in tasks], whole, rtol=1e-5)


# ---- Delta-m% and the table --------------------------------------------------------------------------

def test_delta_m_averages_all_nine_metrics_with_their_directions():
    base = dict(zip(NINE, [0.40, 0.60, 0.50, 0.20, 20.0, 15.0, 0.30, 0.50, 0.60]))
    new = dict(zip(NINE, [0.44, 0.60, 0.45, 0.22, 20.0, 15.0, 0.30, 0.50, 0.66]))
    split = lambda d: {"segmentation": {m: d[m] for m in NINE[:2]}, "depth": {m: d[m] for m in NINE[2:4]},
                       "normal": {m: d[m] for m in NINE[4:]}}
    # miou +10% (better: -10), abs -10% (better: -10), rel +10% (worse: +10), within_30 +10% (better: -10)
    assert delta_m(split(new), split(base), DENSE) == pytest.approx(100 * (-0.1 - 0.1 + 0.1 - 0.1) / 9)
    assert delta_m(split(new), split(base), DENSE, average="tasks") == pytest.approx(
        100 * ((-0.1 / 2) + (0.0 / 2) + (-0.1 / 5)) / 3)
    assert len(delta_m_terms(split(new), split(base), DENSE)) == 9
    with pytest.raises(ValueError, match="lack \\['depth/rel_err'\\]"):
        delta_m(split(new), {**split(base), "depth": {"abs_err": 0.5}}, DENSE)
    table = results_table(split(new), DENSE, split(base), title="nyu")
    assert "| task | miou | pixel_accuracy | abs_err |" in table and "| depth (single-task) | - | - | 0.5000 |" in table
    assert f"Delta-m% vs single-task: {100 * -0.2 / 9:+.2f}" in table


@pytest.mark.parametrize("bad", [0.0, float("nan"), None])
def test_delta_m_refuses_a_zero_or_non_finite_baseline_in_one_line(bad):
    """A baseline Delta-m% would divide by (e.g. an F1 of 0 for a rare CelebA attribute) is named."""
    tasks = (T.binary("Bald"), T.binary("Smiling"))
    results, baselines = {"Bald": {"f1": 0.1}, "Smiling": {"f1": 0.9}}, {"Bald": {"f1": bad}, "Smiling": {"f1": 0.8}}
    with pytest.raises(ValueError, match=r"baselines \['Bald/f1 = .*'\] are not finite non-zero") as info:
        delta_m(results, baselines, tasks)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"results lack \['Smiling/f1'\]"):
        delta_m({"Bald": {"f1": 0.1}}, {"Bald": {"f1": 0.2}, "Smiling": {"f1": 0.8}}, tasks)


def test_classification_delta_m_and_table_unchanged():
    tasks = (T.classification("a", 10), T.regression("b"))
    results, baselines = {"a": {"accuracy": 0.9, "loss": 0.3}, "b": {"mae": 0.5, "mse": 0.4}}, {
        "a": {"accuracy": 0.8}, "b": {"mae": 0.4}}
    assert delta_m(results, baselines, tasks) == pytest.approx(6.25)
    table = results_table(results, tasks, baselines)
    assert table.splitlines()[0] == "| task | accuracy | loss | mae | mse | single-task (main metric) |"
    assert "| a | 90.00% | 0.3000 | - | - | 80.00% |" in table


# ---- end to end --------------------------------------------------------------------------------------

class _Heads(nn.Module):
    outputs: tuple  # ((task, num_outputs), ...)

    @nn.compact
    def __call__(self, h):
        out = {}
        for name, size in self.outputs:
            y = nn.Conv(size, (1, 1), name=name)(h)
            out[name] = y * jax.lax.rsqrt(jnp.square(y).sum(-1, keepdims=True) + 1e-12) if name == "normal" else y
        return out


class TinyDense(nn.Module):
    """A one-convolution shared encoder and 1x1 convolution heads: predictions [B, H, W, outputs]."""

    outputs: tuple

    def setup(self):
        self.shared = nn.Conv(6, (3, 3))
        self.heads = _Heads(self.outputs)

    def __call__(self, x, train: bool = False):
        return self.heads(nn.relu(self.shared(x)))


def dense_dataset(n_train=8, n_test=12, size=8, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        image = rng.uniform(size=(n, size, size, 3)).astype(np.float32)
        labels = (image[..., 0] * 4).astype(np.int64)
        labels[rng.uniform(size=labels.shape) < 0.2] = -1
        depth = (1.0 + image[..., 1:2]) * (rng.uniform(size=(n, size, size, 1)) > 0.2)
        normal = image - 0.5
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        normal[rng.uniform(size=(n, size, size)) < 0.2] = 0.0
        return {"image": image, "segmentation": labels, "depth": depth.astype(np.float32),
                "normal": normal.astype(np.float32)}

    tasks = (T.segmentation("segmentation", 4), T.depth("depth"), T.normal("normal"))
    return from_arrays("tiny_dense", {"train": split(n_train), "test": split(n_test)}, tasks)


def dense_config(method="ew", steps=3):
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "digits_mlp.py"))
    config.model = ml_collections.ConfigDict({"name": "tiny_dense"})
    config.progress_bar = False
    return apply_overrides(config, [f"method.name={method}", f"num_steps={steps}", "batch_size=8",
                                    "eval_batch_size=8", "log_every=1", "checkpoint.enabled=False", "baselines=''"])


@pytest.fixture
def tiny_dense_model(monkeypatch):
    monkeypatch.setitem(MODELS, "tiny_dense", lambda cfg, tasks: TinyDense(tuple((t.name, t.num_outputs) for t in tasks)))


def test_train_and_evaluate_reports_libmtls_numbers_on_its_predictions(tmp_path, tiny_dense_model):
    """12 test images in batches of 8 (the second padded with 4): the results are LibMTL's scores of
    the trained model's predictions."""
    dataset = dense_dataset()
    out = train_and_evaluate(dense_config(), str(tmp_path), dataset=dataset)
    test = dataset.splits["test"].arrays
    preds = jax.device_get(TinyDense(tuple((t.name, t.num_outputs) for t in dataset.tasks)).apply(
        {"params": out["state"].params}, jnp.asarray(test["image"])))
    want = libmtl_numpy([(preds["segmentation"], test["segmentation"], preds["depth"], test["depth"],
                          preds["normal"], test["normal"])])
    got = [out["results"][t.name][m] for t in dataset.tasks for m in t.metrics]
    median = NINE.index("angle_median")
    np.testing.assert_allclose(np.delete(got, median), np.delete(want, median), rtol=2e-5)
    assert abs(got[median] - want[median]) <= D.ANGLE_BIN_DEGREES / 2 + 1e-4
    assert "| task | miou | pixel_accuracy | abs_err | rel_err | angle_mean |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("method", ["upgrad", "famo", "nash_mtl"])
def test_gradient_methods_step_on_dense_tasks(tiny_dense_model, method):
    """Methods that need each task's gradient (UPGrad, Nash-MTL) or loss (FAMO) take a step."""
    dataset = dense_dataset(n_test=8)
    exp = build_experiment(dense_config(method, steps=1), dataset)
    batch = {k: v for k, v in dataset.splits["train"].arrays.items()}
    state, out = exp.train_step(exp.init(), to_global(batch, exp.data_sharding))
    assert bool(out["applied"]) and np.isfinite(np.asarray(out["losses"])).all() and int(state.step) == 1
