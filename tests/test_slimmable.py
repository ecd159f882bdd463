"""Controllable slimmable MTL (Aich et al. 2023): channel slicing, width errors, XLA FLOPs, CIKD,
one compilation per width configuration, the budget search, smoke training on real digits."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mtl_jax import tasks as T
from mtl_jax.data import get_dataset
from mtl_jax.data.pipeline import train_iterator
from mtl_jax.models import build_model
from mtl_jax.models.slimmable import SlimmableMTL, WidthConfig, all_width_configs, slim_channels, width_config
from mtl_jax.train.slimmable import (CIKDTrainer, cikd_loss, make_config_evaluator, respects_preferences,
                                     sample_width_configs, search_widths, width_config_flops)

TASKS = (T.classification("a", 10), T.classification("b", 3))
NAMES = ("a", "b")
# Tiny model on 8x8 inputs: conv 3x3 SAME (4, 8 channels) -> [B, 2, 2, 8]; decoders 8 -> outputs.
SMALL = dict(encoder_features=(4, 8), decoder_hidden=(8,), kernel_size=3, padding="SAME", widths=(0.5, 1.0))
X = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))


def small_model(**overrides):
    return build_model(ml_collections.ConfigDict(dict(name="slimmable", arch_kwargs={**SMALL, **overrides})), TASKS)


def reference_forward(params, x, enc_width, dec_widths):
    """The sub-network written out by hand: every layer keeps its first round(w * C) channels;
    dec_widths ((task, width), ...)."""
    h = x
    for i in range(2):
        p = params["shared"][f"conv_{i}"]
        out = slim_channels(p["kernel"].shape[-1], enc_width)
        k = p["kernel"][:, :, : h.shape[-1], :out]
        h = jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(jax.lax.reduce_window(h + p["bias"][:out], -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                              (1, 2, 2, 1), "VALID"))
    preds = {}
    for task, w in dec_widths:
        d = params["heads"][task]
        hidden = slim_channels(d["dense_0"]["kernel"].shape[-1], w)
        flat = h.reshape(h.shape[0], -1, h.shape[-1])
        z = jax.nn.relu(jnp.einsum("bpc,pch->bh", flat, d["dense_0"]["kernel"][:, : h.shape[-1], :hidden])
                        + d["dense_0"]["bias"][:hidden])
        preds[task] = z @ d["out"]["kernel"][:hidden] + d["out"]["bias"]
    return h, preds


def test_sub_widths_slice_the_same_parameters():
    model = small_model()
    params = jax.jit(model.init)(jax.random.key(1), X)["params"]
    assert params["shared"]["conv_1"]["kernel"].shape == (3, 3, 4, 8)
    assert params["heads"]["a"]["dense_0"]["kernel"].shape == (4, 8, 8)  # [positions, channels, hidden]
    forward = jax.jit(lambda p, x, widths: model.apply({"params": p}, x, widths=widths, method=SlimmableMTL.forward),
                      static_argnums=2)
    reference = jax.jit(reference_forward, static_argnums=(2, 3))
    for enc, dec in [(1.0, (("a", 1.0), ("b", 1.0))), (0.5, (("a", 1.0), ("b", 0.5)))]:
        features, preds = forward(params, X, width_config(enc, dict(dec), NAMES))
        ref_features, ref_preds = reference(params, X, enc, dec)
        assert features.shape == (4, 2, 2, slim_channels(8, enc))
        np.testing.assert_allclose(features, ref_features, rtol=1e-5, atol=1e-6)
        for t in NAMES:
            np.testing.assert_allclose(preds[t], ref_preds[t], rtol=1e-5, atol=1e-6)
    # No widths = the full width (what the standard trainer runs).
    default = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, X)
    assert all(jnp.array_equal(v, forward(params, X, model.full_width())[1][k]) for k, v in default.items())


def test_bad_widths_fail_clearly():
    model = small_model()
    params = jax.eval_shape(model.init, jax.random.key(1), X)["params"]  # the check runs before any computation
    with pytest.raises(ValueError, match=r"width 0\.75 for the decoder 'b' is not an allowed width; "
                                         r"allowed widths: \[0\.5, 1\.0\]"):
        model.apply({"params": params}, X, widths=width_config(1.0, {"a": 1.0, "b": 0.75}, NAMES))
    with pytest.raises(ValueError, match=r"width 0\.3 for the encoder is not an allowed width"):
        model.apply({"params": params}, X, widths=width_config(0.3, 1.0, NAMES))
    with pytest.raises(ValueError, match=r"decoder widths name tasks \['a'\]; the model's tasks are \['a', 'b'\]"):
        width_config(1.0, {"a": 1.0}, NAMES)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['width'\] for model 'slimmable'; valid options: "
                                         r"\['encoder_features'"):
        small_model(width=0.5)


def test_xla_flops_grow_with_width_and_match_the_layer_count():
    model = small_model(padding="VALID")  # 12x12 -> conv 10x10 -> pool 5x5 -> conv 3x3 -> pool 1x1
    example = jax.ShapeDtypeStruct((12, 12, 1), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(1), jnp.zeros((1, 12, 12, 1))))["params"]
    costs = {c: width_config_flops(model, params, example, c) for c in model.configurations()}
    assert len(costs) == 2 ** 3
    full, small = costs[model.full_width()], costs[model.smallest()]
    # Multiply-adds of the full network (2 FLOPs each): two convolutions and each decoder's two dense layers.
    macs = 10 * 10 * 9 * 1 * 4 + 3 * 3 * 9 * 4 * 8 + (1 * 8 * 8 + 8 * 10) + (1 * 8 * 8 + 8 * 3)
    assert 2 * macs <= full <= 1.3 * 2 * macs, (full, 2 * macs)
    assert small < 0.45 * full
    # Widening any part never costs less.
    for c, cost in costs.items():
        wider = WidthConfig(1.0, c.decoders)
        assert costs[wider] >= cost


def test_cikd_loss_closed_form_and_no_teacher_gradient():
    student = jax.random.normal(jax.random.key(0), (2, 3, 3, 2))
    teacher = jax.random.normal(jax.random.key(1), (2, 3, 3, 5))
    expected = np.mean((np.asarray(student) - np.asarray(teacher)[..., :2]) ** 2)
    assert float(cikd_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)
    g_student, g_teacher = jax.jit(jax.grad(cikd_loss, argnums=(0, 1)))(student, teacher)
    np.testing.assert_allclose(g_student, 2 * (student - teacher[..., :2]) / student.size, rtol=1e-5)
    assert not jnp.any(g_teacher)


def test_search_follows_budget_and_preferences():
    widths, tasks = (0.25, 0.5, 0.75, 1.0), ("seg", "depth")
    # Encoder cost 8 w, each decoder 1 w (arbitrary units).
    costs = {c: 8 * c.encoder + sum(w for _, w in c.decoders) for c in all_width_configs(widths, tasks)}
    with pytest.raises(ValueError, match=r"budget 2 is below the smallest configuration's cost 2\.5 "
                                         r"\(enc 0\.25; seg 0\.25, depth 0\.25\)"):
        search_widths(2.0, {"seg": 1, "depth": 1}, costs)
    with pytest.raises(ValueError, match="preferences name tasks"):
        search_widths(10.0, {"seg": 1}, costs)
    picked, weak = {}, {}
    for budget in (2.5, 4.0, 6.0, 9.0, 10.0):
        for prefs in ({"seg": 0.8, "depth": 0.2}, {"seg": 0.2, "depth": 0.8}):
            c = search_widths(budget, prefs, costs)
            assert costs[c] <= budget and respects_preferences(c, prefs)
            assert respects_preferences(c, prefs, strict=True) or budget == 2.5  # 2.5: no strict order fits
            picked[budget, prefs["seg"]] = c
            weak[budget, prefs["seg"]] = search_widths(budget, prefs, costs, strict=False)
    # Without scores: the widest encoder that fits, then the budget left goes to the decoders,
    # the more preferred one strictly wider (9 = 8 + 0.75 + 0.25; 10 = 8 + 1 + 0.75 leaves 0.25 unused).
    assert picked[9.0, 0.8] == width_config(1.0, {"seg": 0.75, "depth": 0.25}, tasks)
    assert picked[9.0, 0.2] == width_config(1.0, {"seg": 0.25, "depth": 0.75}, tasks)
    assert picked[6.0, 0.8] == width_config(0.5, {"seg": 1.0, "depth": 0.75}, tasks)
    assert picked[10.0, 0.8] == width_config(1.0, {"seg": 1.0, "depth": 0.75}, tasks)
    assert picked[2.5, 0.8] == width_config(0.25, 0.25, tasks)  # the cheapest; equal widths as the fallback
    # strict=False allows equal widths: the whole budget then goes to both decoders.
    assert weak[6.0, 0.8] == width_config(0.5, {"seg": 1.0, "depth": 1.0}, tasks)
    assert weak[10.0, 0.8] == width_config(1.0, 1.0, tasks)
    # With validation scores the search maximises the preference-weighted score within the budget.
    scores = {c: {"seg": c.decoder("seg"), "depth": c.encoder} for c in costs}
    best = search_widths(6.0, {"seg": 0.9, "depth": 0.1}, costs, scores)
    feasible = [c for c in costs
                if costs[c] <= 6.0 and respects_preferences(c, {"seg": 0.9, "depth": 0.1}, strict=True)]
    assert 0.9 * best.decoder("seg") + 0.1 * best.encoder == max(
        0.9 * c.decoder("seg") + 0.1 * c.encoder for c in feasible)


def test_cikd_compiles_once_per_configuration_and_learns_digits(data_dir):
    dataset = get_dataset(ml_collections.ConfigDict(dict(name="digits", seed=0, tasks=("digit", "parity"),
                                                         cache_in_memory=True)))
    model = build_model(ml_collections.ConfigDict(dict(name="slimmable", arch_kwargs={
        **SMALL, "encoder_features": (16, 32), "decoder_hidden": (32,)})), dataset.tasks)
    trainer = CIKDTrainer(model, dataset.tasks, optax.adam(1e-2), kd_weight=1.0, num_random=0, seed=0)
    keys = ["image", "digit", "parity"]
    batches = train_iterator(dataset.splits["train"], keys=keys, global_batch_size=64, seed=0)
    state = trainer.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    first = None
    for i in range(100):
        state, metrics = trainer.step(state, next(batches))
        first = metrics if first is None else first
    # The sandwich without random students: the full width (teacher) and the smallest, each traced once.
    assert dict(trainer.trace_counts) == {model.full_width(): 1, model.smallest(): 1}
    seen = dict(trainer.trace_counts)
    for _ in range(3):
        state, metrics = trainer.step(state, next(batches))
    assert {c: n for c, n in trainer.trace_counts.items() if c in seen} == seen
    assert all(n == 1 for n in trainer.trace_counts.values())
    small = model.smallest()
    assert float(metrics["losses"][small].sum()) < 0.5 * float(first["losses"][small].sum())
    assert np.isfinite(float(metrics["cikd"][small]))
    evaluate = make_config_evaluator(model, dataset.tasks)
    for widths in (model.full_width(), small):
        res = evaluate(state.params, dataset, "test", widths, batch_size=512)
        assert res["digit"]["accuracy"] > 0.4 and res["parity"]["accuracy"] > 0.7, (widths, res)  # chance 0.1 / 0.5


def test_sandwich_students():
    model = small_model()
    configs = sample_width_configs(np.random.default_rng(0), model, 200)
    assert configs[0] == model.smallest() and model.full_width() not in configs
    assert set(configs[1:]) == set(model.configurations()) - {model.full_width()}  # every other one is drawn


def test_random_students_trace_once_per_configuration():
    """With random sandwich students, every width configuration that is drawn compiles once, however
    often it is drawn again (8 configurations of the small model, 2 random students per step)."""
    model = small_model()
    trainer = CIKDTrainer(model, TASKS, optax.sgd(1e-2), kd_weight=1.0, num_random=2, seed=0)
    state = trainer.init(jax.random.key(0), X)
    batch = {"image": X, **{t.name: jnp.zeros((4,), jnp.int32) for t in TASKS}}
    for _ in range(12):
        state, _ = trainer.step(state, batch)
    assert len(trainer.trace_counts) > 4  # several random configurations were drawn, most more than once
    assert all(n == 1 for n in trainer.trace_counts.values()), dict(trainer.trace_counts)
