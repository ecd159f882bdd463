"""Dense-prediction models (``mtl_jax/models/segnet.py``, ``mtl_jax/models/dense_resnet.py``): MTAN-SegNet
matches the official torch model (``fixtures/pretrained/make_segnet_reference.py``: outputs in eval and
train mode, BatchNorm running statistics, losses and gradients), parameter counts equal the official
models', shapes and parameter trees, unit normals, per-task attention masks, a jitted train step with
the dense losses, the dilated ResNet + ASPP model, bad input."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from fixtures.pretrained.deterministic_weights import deterministic_state_dict
from fixtures.pretrained.make_segnet_reference import GRADS, OUT, RUNNING_MEANS, SHAPES, WIDTH, reference_batch
from mtl_jax import tasks as T
from mtl_jax.checkpoints import CONV2D, export, load_into
from mtl_jax.models import build_model, check_input
from mtl_jax.models.pretrained.resnet import ResNet, resnet18
from mtl_jax.models.segnet import max_pool_with_positions, max_unpool, mtan_segnet_renames
from mtl_jax.train.losses import depth_l1, normal_cosine, pixel_cross_entropy

TASKS = [T.segmentation("segmentation", 13), T.depth("depth"), T.normal("normal")]
NAMES = [t.name for t in TASKS]


def model(name: str, **arch_kwargs):
    return build_model(ConfigDict({"name": name, "arch_kwargs": arch_kwargs}), TASKS)


def count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def abstract_variables(module, shape=(1, 32, 32, 3)):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape)))


@functools.lru_cache(maxsize=None)
def official():
    with open(SHAPES) as f:
        shapes = {k: v for k, v in json.load(f).items() if not k.endswith("num_batches_tracked")}
    module = model("mtan_segnet", width=WIDTH)
    renames = mtan_segnet_renames(NAMES)
    variables = load_into(abstract_variables(module), deterministic_state_dict(shapes), renames, what="MTAN-SegNet")
    return module, variables, renames, shapes, dict(np.load(OUT))


def test_renames_give_the_official_names_and_shapes():
    _, variables, renames, shapes, _ = official()
    exported = export(variables, renames)
    assert {k: list(v.shape) for k, v in exported.items()} == shapes


def test_mtan_segnet_matches_official_eval_and_train():
    module, variables, _, _, ref = official()
    batch = reference_batch()
    out = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, batch["image"])
    np.testing.assert_allclose(jax.nn.log_softmax(out["segmentation"]), ref["eval_segmentation"], atol=2e-4)
    np.testing.assert_allclose(out["depth"], ref["eval_depth"], atol=2e-4)
    np.testing.assert_allclose(out["normal"], ref["eval_normal"], atol=2e-4)

    def losses_fn(params, state):
        preds, new_state = module.apply({"params": params, **state}, batch["image"], train=True,
                                        mutable=["batch_stats"])
        losses = jnp.stack([pixel_cross_entropy(preds["segmentation"], batch["segmentation"]).mean(),
                            depth_l1(preds["depth"], batch["depth"]).mean(),
                            normal_cosine(preds["normal"], batch["normal"]).mean()])
        return losses.sum(), (losses, preds, new_state)

    state = {"batch_stats": variables["batch_stats"]}
    grads, (losses, preds, new_state) = jax.jit(jax.grad(losses_fn, has_aux=True))(variables["params"], state)
    for name in NAMES:
        ours = preds[name][:, ::4, ::4]
        ours = jax.nn.log_softmax(ours) if name == "segmentation" else ours
        np.testing.assert_allclose(ours, ref[f"train_{name}"], atol=2e-4)
    np.testing.assert_allclose(losses, ref["losses"], rtol=1e-5, atol=1e-5)
    stats = {"batch_stats": new_state["batch_stats"]}
    by_name = {r.source: r for r in mtan_segnet_renames(NAMES)}
    for name in RUNNING_MEANS:
        path = by_name[f"{name}.running_mean"].target
        np.testing.assert_allclose(functools.reduce(lambda t, k: t[k], path, stats), ref[f"running_mean_{name}"],
                                   atol=1e-5)
    for name in GRADS:
        path = by_name[name].target[1:]
        ours = functools.reduce(lambda t, k: t[k], path, grads)
        np.testing.assert_allclose(ours, CONV2D.forward(ref[f"grad_{name}"]), atol=1e-4, rtol=1e-3)


def test_parameter_counts_match_the_official_models():
    _, _, _, _, ref = official()
    mtan = count(abstract_variables(model("mtan_segnet"))["params"])
    assert mtan == int(ref["param_count_width_1"]) == 44_229_073
    # SegNet split: the official single-task SegNet (24,981,069, model_segnet_mtan.py's REL baseline,
    # 13-class head) + the depth and normal heads (conv3x3 64->64 + conv1x1 to 1 / 3).
    split = count(abstract_variables(model("segnet_split"))["params"])
    assert split == 24_981_069 + 2 * (64 * 64 * 9 + 64) + (64 + 1) + (64 * 3 + 3)
    # LibMTL NYUv2: torchvision ResNet-50 without fc (25,557,032 - 2,049,000) + 3 DeepLabHeads: ASPP
    # (1x1, three 3x3 atrous, pooled 1x1 from 2048 to 256; project 1280 -> 256; 6 BN) + conv3x3 256 + BN +
    # conv1x1 to n_t.
    params = abstract_variables(model("resnet_aspp"))["params"]
    assert count(params["shared"]) == 25_557_032 - 2_049_000
    head = 2048 * 256 * (1 + 27 + 1) + 1280 * 256 + 6 * 512 + 256 * 256 * 9 + 512
    assert {t: count(p) for t, p in params["heads"].items()} == {
        "segmentation": head + 256 * 13 + 13, "depth": head + 257, "normal": head + 256 * 3 + 3}


@pytest.mark.parametrize("name,kwargs,shape", [("segnet_split", {"width": 0.0625}, (2, 32, 64, 3)),
                                               ("mtan_segnet", {"width": 0.0625}, (2, 32, 64, 3)),
                                               ("resnet_aspp", {"depth": 18, "aspp_features": 8}, (2, 32, 40, 3))])
def test_shapes_parameter_tree_and_unit_normals(name, kwargs, shape):
    module = model(name, **kwargs)
    x = jax.random.uniform(jax.random.key(1), shape)
    variables = jax.jit(module.init)(jax.random.key(0), x)
    assert set(variables["params"]) == {"shared", "heads"} and set(variables["params"]["heads"]) == set(NAMES)
    assert "batch_stats" in variables
    out, state = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"],
                                                   rngs={"dropout": jax.random.key(2)}))(variables, x)
    assert {k: v.shape for k, v in out.items()} == {"segmentation": shape[:3] + (13,), "depth": shape[:3] + (1,),
                                                    "normal": shape[:3] + (3,)}
    np.testing.assert_allclose(jnp.linalg.norm(out["normal"], axis=-1), 1.0, atol=1e-5)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], state["batch_stats"])
    assert all(jax.tree.leaves(changed))


def test_mtan_attention_masks_per_task():
    module = model("mtan_segnet", width=0.0625)
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    assert set(variables["params"]["heads"]["depth"]) == (
        {f"encoder_att_{i}" for i in range(5)} | {f"decoder_att_{i}" for i in range(5)} | {"pred"})
    _, state = jax.jit(lambda v, x: module.apply(v, x, mutable=["intermediates"]))(variables, x)
    masks = state["intermediates"]["heads"]
    widths = (4, 8, 16, 32, 32)  # filters at width 1/16
    for t in NAMES:
        for i in range(5):
            enc, dec = masks[t][f"encoder_mask_{i}"][0], masks[t][f"decoder_mask_{i}"][0]
            assert enc.shape == (2, 32 >> i, 32 >> i, widths[i])
            assert dec.shape == (2, 32 >> i, 32 >> i, widths[max(i - 1, 0)])
            assert bool(jnp.all((enc > 0) & (enc < 1)))
    assert not np.allclose(masks["depth"]["encoder_mask_0"][0], masks["normal"]["encoder_mask_0"][0])


def test_max_pool_positions_and_unpool():
    x = jnp.array([[1.0, 3.0, 0.0, 0.0], [2.0, 3.0, 0.0, -1.0]]).reshape(1, 2, 4, 1)
    pooled, positions = max_pool_with_positions(x)
    np.testing.assert_array_equal(pooled.ravel(), [3.0, 0.0])
    np.testing.assert_array_equal(positions.ravel(), [1, 0])  # the first maximum, as torch picks
    np.testing.assert_array_equal(max_unpool(pooled, positions).ravel(), [0, 3, 0, 0, 0, 0, 0, 0])
    grad = jax.grad(lambda x: max_pool_with_positions(x)[0].sum())(x)
    np.testing.assert_array_equal(grad.ravel(), [0, 1, 1, 0, 0, 0, 0, 0])


def test_jitted_train_step_with_dense_losses_lowers_the_loss():
    module = model("segnet_split", width=0.0625)
    batch = reference_batch()
    variables = jax.jit(module.init)(jax.random.key(0), batch["image"])
    tx = optax.adam(1e-2)

    def loss_fn(params, stats):
        preds, state = module.apply({"params": params, "batch_stats": stats}, batch["image"], train=True,
                                    mutable=["batch_stats"])
        loss = (pixel_cross_entropy(preds["segmentation"], batch["segmentation"]).mean()
                + depth_l1(preds["depth"], batch["depth"]).mean() + normal_cosine(preds["normal"], batch["normal"]).mean())
        return loss, state["batch_stats"]

    @jax.jit
    def step(params, stats, opt_state):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    losses = []
    for _ in range(8):
        params, stats, opt_state, loss = step(params, stats, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_dilated_resnet_keeps_torchvision_parameters():
    x = jnp.zeros((1, 64, 64, 3))
    plain = jax.eval_shape(lambda: resnet18().init(jax.random.key(0), x))
    dilated_module = ResNet(output_stride=8)
    dilated = jax.eval_shape(lambda: dilated_module.init(jax.random.key(0), x))
    assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, dilated)
    features = jax.eval_shape(lambda: dilated_module.apply(dilated_module.init(jax.random.key(0), x), x,
                                                           method=ResNet.feature_map))
    assert features.shape == (1, 8, 8, 512)


def test_dilated_resnet_matches_libmtl_resnet_dilated():
    """``ResNet(output_stride=8 / 16)`` against LibMTL's ``ResnetDilated(resnet18(), 8 / 16)`` with the same
    weights (``fixtures/pretrained/make_dilated_resnet_reference.py``): stage 3 dilated 2 (its first
    block's strided conv 1), stage 4 dilated 4 (first block 2) at 8; stage 4 dilated 2 (first block 1) at 16."""
    from fixtures.pretrained.make_dilated_resnet_reference import OUT as DILATED, reference_input, resnet18_shapes
    from mtl_jax.models.pretrained.resnet import load_resnet

    ref = np.load(DILATED)
    state = deterministic_state_dict(resnet18_shapes())
    for stride in (8, 16):
        module, variables = load_resnet(state, 18, num_classes=0, output_stride=stride)
        features = jax.jit(lambda v, x: module.apply(v, x, method=ResNet.feature_map))(variables, reference_input())
        np.testing.assert_allclose(features, ref[f"features_os{stride}"], atol=2e-4, rtol=1e-4)


def test_bad_input_and_options():
    with pytest.raises(ValueError, match="multiples of 32"):
        model("mtan_segnet", width=0.0625).init(jax.random.key(0), jnp.zeros((1, 32, 48, 3)))
    with pytest.raises(ValueError, match="unknown option"):
        model("segnet_split", depth=3)
    with pytest.raises(ValueError, match="valid depths"):
        model("resnet_aspp", depth=7)
    with pytest.raises(ValueError, match="output_stride"):
        ResNet(output_stride=4).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="needs images"):
        check_input(ConfigDict({"name": "mtan_segnet"}), (784,))


def test_gpu_script_smoke_runs_on_cpu():
    from benchmarks.device import mtan_segnet_gpu

    result = mtan_segnet_gpu.main(["--smoke", "--methods", "ew"])
    (row,) = result["rows"]
    assert row["applied"] and np.isfinite(row["losses"]).all() and row["steps_per_epoch"] == 398
    assert row["projected_hours"] == pytest.approx(200 * 398 * row["step_ms"] / 3.6e6)
