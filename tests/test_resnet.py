"""ResNet-18 / ResNet-50 in torchvision's layout: our renames give torchvision's names and shapes
exactly, outputs with deterministic random weights match torchvision's
(``fixtures/pretrained/make_resnet_reference.py``), export round trips bit for bit, a mis-shaped
checkpoint is refused, the trunk contract, training forwards update BatchNorm statistics."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures.pretrained.deterministic_weights import deterministic_state_dict
from fixtures.pretrained.make_resnet_reference import OUT, SHAPES, reference_input
from mtl_jax.checkpoints import CheckpointMismatchError, read_checkpoint, write_safetensors
from mtl_jax.models.pretrained.resnet import ResNet, export_resnet, load_resnet, resnet18, resnet50, variables_template


def torchvision_shapes(depth: int) -> dict:
    with open(SHAPES) as f:
        return json.load(f)[f"resnet{depth}"]


@functools.lru_cache(maxsize=None)
def loaded(depth: int):
    return load_resnet(deterministic_state_dict(torchvision_shapes(depth)), depth)


@pytest.mark.parametrize("depth", [18, 50])
def test_renames_give_torchvision_names_and_shapes(depth):
    module = resnet18(num_classes=1000) if depth == 18 else resnet50(num_classes=1000)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables_template(module, 64))
    exported = export_resnet(zeros, depth)
    assert [(k, list(v.shape)) for k, v in exported.items()] == list(torchvision_shapes(depth).items())


@pytest.mark.parametrize("depth", [18, 50])
def test_outputs_match_torchvision(depth):
    module, variables = loaded(depth)
    ref = np.load(OUT)
    features, logits = jax.jit(lambda v, x: (module.apply(v, x), module.apply(v, x, method="logits")))(
        variables, reference_input())
    for name, ours in (("features", features), ("logits", logits)):
        expected = ref[f"resnet{depth}_{name}"]
        diff = float(np.abs(np.asarray(ours) - expected).max())
        scale = float(np.abs(expected).max())
        print(f"ResNet-{depth} {name} vs torchvision: max abs diff {diff:.3g} (max |value| {scale:.3g})")
        assert ours.shape == expected.shape and diff <= 1e-4 * max(1.0, scale)


def test_export_round_trip_and_mis_shaped_checkpoint(tmp_path):
    state = deterministic_state_dict(torchvision_shapes(18))
    _, variables = loaded(18)
    exported = export_resnet(variables, 18)
    assert list(exported) == list(state)
    for name, value in state.items():
        assert exported[name].dtype == value.dtype and exported[name].tobytes() == value.tobytes(), name
    path = str(tmp_path / "resnet18.safetensors")
    write_safetensors(path, exported)
    _, again = load_resnet(path, 18)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, variables)
    assert read_checkpoint(path).keys() == state.keys()
    trunk, trunk_vars = load_resnet(path, 18, num_classes=0)
    assert "fc" not in trunk_vars["params"] and trunk.num_classes == 0

    bad = dict(exported)
    bad["layer2.0.downsample.0.weight"] = bad["layer2.0.downsample.0.weight"][:, :3]
    bad["layer9.0.conv1.weight"] = bad["layer1.0.conv1.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"layer2\.0\.downsample\.0\.weight") as err:
        load_resnet(bad, 18)
    assert "layer9.0.conv1.weight" in str(err.value)
    with pytest.raises(ValueError, match="valid depths"):
        load_resnet(bad, 19)


def test_trunk_contract_train_mode_and_remat():
    x = jnp.asarray(reference_input()[:, :32, :32])
    module = ResNet(stage_sizes=(1, 1), block="bottleneck")
    variables = jax.jit(module.init)(jax.random.key(0), x)
    features = jax.jit(module.apply)(variables, x)
    assert features.shape == (2, 128 * 4)

    @functools.partial(jax.jit, static_argnums=1)
    def train_forward(variables, remat):
        return ResNet(stage_sizes=(1, 1), block="bottleneck", remat=remat).apply(
            variables, x, train=True, mutable=["batch_stats"])

    out, updates = train_forward(variables, False)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    np.testing.assert_allclose(train_forward(variables, True)[0], out, atol=1e-5)
    # uint8 images are scaled and normalised inside the model.
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    normalised = (images / np.float32(255.0) - np.array([0.485, 0.456, 0.406], np.float32)) / np.array(
        [0.229, 0.224, 0.225], np.float32)
    np.testing.assert_allclose(jax.jit(module.apply)(variables, images),
                               jax.jit(module.apply)(variables, normalised.astype(np.float32)), atol=1e-5)


def test_input_channels_and_classes_come_from_the_checkpoint():
    state = deterministic_state_dict(torchvision_shapes(18))
    gray = {**state, "conv1.weight": state["conv1.weight"][:, :1], "fc.weight": state["fc.weight"][:10],
            "fc.bias": state["fc.bias"][:10]}
    module, variables = load_resnet(gray, 18)
    assert module.num_classes == 10 and variables["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    logits = jax.jit(lambda v, x: module.apply(v, x, method="logits"))(variables, images)
    assert logits.shape == (2, 10)
    # One channel is not ImageNet RGB: uint8 is only scaled to [0, 1].
    np.testing.assert_allclose(logits, jax.jit(lambda v, x: module.apply(v, x, method="logits"))(
        variables, images.astype(np.float32) / 255), rtol=1e-5, atol=1e-5)
