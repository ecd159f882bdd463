"""Pretrained ViT (Hugging Face and timm layouts) and CLIP (open_clip and Hugging Face layouts):
parity with the reference implementations on tiny random models, real-size parameter names,
shapes and counts, bit-exact checkpoint round trips, mismatch errors.

Fixtures come from ``tests/fixtures/pretrained/make_vit_clip_reference.py`` (run in the peers
venv); weights are regenerated here with ``deterministic_state_dict`` from our renames' names and
our templates' shapes, which must be the set the reference script recorded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures.pretrained.deterministic_weights import deterministic_state_dict
from fixtures.pretrained.reference_files import load_fixture
from mtl_jax.checkpoints import (
    CheckpointMismatchError, export, flatten, load_into, source_shapes, write_safetensors)
from mtl_jax.models.pretrained.clip import (
    CLIP, CLIPImageEncoder, clip_renames, clip_template, clip_tiny, clip_vit_b32, load_clip, load_clip_image_encoder,
    zero_shot_head)
from mtl_jax.models.pretrained.transformer import fuse_qkv, split_qkv
from mtl_jax.models.pretrained.vit import ViT, load_vit, vit_b16, vit_renames, vit_template, vit_tiny

SCRIPT = "cd tests && ../.peers-venv/bin/python -m fixtures.pretrained.make_vit_clip_reference"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    return load_fixture("vit_clip_reference.npz", SCRIPT), load_fixture("vit_clip_reference.json", SCRIPT)["models"]


# name -> (our config, renames, template) of each tiny reference model.
def _case(name: str):
    if name == "vit_hf":
        config = vit_tiny("hf", pooler=True)
        return config, vit_renames(config, "hf"), vit_template(config)
    if name == "vit_timm":
        config = vit_tiny("timm")
        return config, vit_renames(config, "timm"), vit_template(config)
    layout = name.split("_", 1)[1]
    config = clip_tiny(layout, eos_token_id=62 if layout == "hf" else None)
    return config, clip_renames(config, layout), clip_template(config)


CASES = ("vit_hf", "vit_timm", "clip_open_clip", "clip_hf")


def _loaded(name: str):
    config, renames, template = _case(name)
    state = deterministic_state_dict(source_shapes(template, renames))
    return config, renames, state, load_into(template, state, renames, what=name)


def _max_diff(ours, theirs) -> float:
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours - theirs)))


@pytest.mark.parametrize("name", CASES)
def test_names_and_shapes_match_the_reference(reference, name):
    _, records = reference
    config, renames, template = _case(name)
    assert source_shapes(template, renames) == records[name]["names"]
    sizes = records[name]["config"]
    if name.startswith("vit"):
        assert {k: getattr(config, k) for k in sizes} == sizes
    else:
        assert {k: getattr(config.vision, k) for k in sizes["vision"]} == sizes["vision"]
        assert {k: getattr(config.text, k) for k in sizes["text"]} == sizes["text"]
        assert config.embed_dim == sizes["embed_dim"]
        assert config.text.eos_token_id == sizes.get("eos_token_id")


def test_vit_matches_hf_and_timm(reference):
    arrays, _ = reference
    images = jnp.asarray(arrays["images"])
    for name, tokens_key, pooled_key in (("vit_hf", "last_hidden_state", "pooler_output"),
                                         ("vit_timm", "tokens", "pooled")):
        config, _, _, params = _loaded(name)
        model = ViT(config)
        tokens = model.apply({"params": params}, images, method=ViT.tokens)
        pooled = model.apply({"params": params}, images)
        diffs = (_max_diff(tokens, arrays[f"{name}/{tokens_key}"]), _max_diff(pooled, arrays[f"{name}/{pooled_key}"]))
        print(f"{name}: max |ours - reference| tokens {diffs[0]:.2e}, pooled {diffs[1]:.2e}")
        assert max(diffs) <= TOLERANCE, (name, diffs)


@pytest.mark.parametrize("layout", ["open_clip", "hf"])
def test_clip_matches_reference(reference, layout):
    arrays, _ = reference
    name = f"clip_{layout}"
    config, _, _, params = _loaded(name)
    model = CLIP(config)
    images, ids = jnp.asarray(arrays["images"]), jnp.asarray(arrays[f"ids_{layout}"])
    variables = {"params": params}
    got = {"image_embeds": model.apply(variables, images, method=CLIP.encode_image),
           "text_embeds": model.apply(variables, ids, method=CLIP.encode_text),
           "logits_per_image": model.apply(variables, images, ids)}
    diffs = {k: _max_diff(v, arrays[f"{name}/{k}"]) for k, v in got.items()}
    print(f"{name}: max |ours - reference| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs
    # The image tower alone (the MTL trunk) computes the same embedding from the same parameters.
    trunk = CLIPImageEncoder(config.vision).apply({"params": params["visual"]}, images)
    np.testing.assert_array_equal(np.asarray(trunk), np.asarray(got["image_embeds"]))


@pytest.mark.parametrize("name", CASES)
def test_export_round_trip_is_bit_exact(name):
    _, renames, state, params = _loaded(name)
    exported = export(params, renames)
    assert list(exported) == list(state)
    for key, value in state.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["vit_hf", "clip_open_clip"])
def test_missing_or_misshaped_names_raise(name):
    _, renames, template = _case(name)
    state = deterministic_state_dict(source_shapes(template, renames))
    missing = dict(state)
    dropped = renames[5].source
    del missing[dropped]
    with pytest.raises(CheckpointMismatchError, match="missing") as info:
        load_into(template, missing, renames)
    assert dropped in str(info.value)
    wrong = dict(state)
    wrong[dropped] = np.zeros(tuple(state[dropped].shape) + (2,), np.float32)
    with pytest.raises(CheckpointMismatchError, match="mis-shaped") as info:
        load_into(template, wrong, renames)
    assert dropped in str(info.value)


def test_layout_and_config_must_agree():
    with pytest.raises(ValueError, match="fused_qkv"):
        vit_renames(vit_tiny("hf"), "timm")
    with pytest.raises(ValueError, match="fused_qkv"):
        clip_renames(clip_tiny("open_clip"), "hf")
    with pytest.raises(ValueError, match="unknown CLIP checkpoint layout"):
        clip_renames(clip_tiny(), "openai")


def _count(template) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(template))


# Real-size presets: (config, renames, template, parameters the papers' models have).
def _real_size(name: str):
    if name == "vit_hf":  # google/vit-base-patch16-224 ViTModel with its pooler
        config = vit_b16("hf", pooler=True)
        return vit_renames(config, "hf"), vit_template(config), 86_389_248
    if name == "vit_timm":  # vit_base_patch16_224 without its 1000-class head
        config = vit_b16("timm")
        return vit_renames(config, "timm"), vit_template(config), 85_798_656
    layout = name.split("_", 1)[1]
    config = clip_vit_b32(layout)
    return clip_renames(config, layout), clip_template(config), 151_277_313


@pytest.mark.parametrize("name", CASES)
def test_real_size_names_shapes_and_counts(name):
    manifests = load_fixture("vit_clip_manifests.json", SCRIPT)["models"]
    renames, template, expected = _real_size(name)  # eval_shape: nothing allocated
    assert source_shapes(template, renames) == manifests[name]["names"]
    assert _count(template) == manifests[name]["num_parameters"] == expected


def test_split_and_fuse_qkv_convert_between_layouts(reference):
    """open_clip-layout parameters (fused QKV), split, run in the HF-layout model unchanged."""
    arrays, _ = reference
    config, _, _, fused = _loaded("clip_open_clip")
    split = split_qkv(fused)
    assert "qkv" not in split["visual"]["block_0"]["attention"] and "query" in split["text"]["block_1"]["attention"]
    _assert_same_tree(fuse_qkv(split), fused)
    images, ids = jnp.asarray(arrays["images"]), jnp.asarray(arrays["ids_open_clip"])
    logits = CLIP(clip_tiny("hf")).apply({"params": split}, images, ids)  # argmax pooling, separate q/k/v
    assert _max_diff(logits, arrays["clip_open_clip/logits_per_image"]) <= TOLERANCE


def test_uint8_images_are_normalised_and_trunks_return_b_by_d():
    config, _, _, params = _loaded("vit_timm")
    model = ViT(config)
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
    out = model.apply({"params": params}, images, train=True)
    assert out.shape == (2, config.hidden)
    np.testing.assert_allclose(out, model.apply({"params": params}, images.astype(jnp.float32) / 255.0), atol=1e-6)
    np.testing.assert_allclose(out, ViT(config, remat=True).apply({"params": params}, images), atol=1e-6)
    with pytest.raises(ValueError, match="expected images"):
        model.apply({"params": params}, images[:, :16])
    config, _, _, params = _loaded("clip_open_clip")
    embeddings = CLIPImageEncoder(config.vision).apply({"params": params["visual"]}, images)
    assert embeddings.shape == (2, config.embed_dim)
    assert {f"block_{i}" for i in range(config.vision.layers)} <= set(params["visual"])


def test_load_functions_read_checkpoint_files(tmp_path):
    """load_vit / load_clip / load_clip_image_encoder on safetensors files holding what published
    checkpoints hold beside the backbone (a classifier head and a 'vit.' prefix, position-id
    buffers)."""
    config, renames, state, params = _loaded("vit_hf")
    path = str(tmp_path / "vit.safetensors")
    head = {"classifier.weight": np.zeros((10, config.hidden), np.float32)}
    write_safetensors(path, {**{"vit." + k: v for k, v in state.items()}, **head})
    module, loaded = load_vit(path, "hf", config)
    assert module.config == config
    _assert_same_tree(loaded, params)
    config, renames, state, params = _loaded("clip_hf")
    path = str(tmp_path / "clip.safetensors")
    write_safetensors(path, {**state, "text_model.embeddings.position_ids": np.arange(8)[None]})
    _assert_same_tree(load_clip(path, "hf", config)[1], params)
    module, visual = load_clip_image_encoder(path, "hf", config.vision)
    assert module.config == config.vision
    _assert_same_tree(visual, params["visual"])
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_clip_image_encoder(path, "open_clip", config.vision)


def _assert_same_tree(a, b):
    a, b = flatten(a), flatten(b)
    assert set(a) == set(b)
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg="/".join(path))


def test_zero_shot_head_averages_normalised_prompts():
    embeddings = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4, 8)), jnp.float32)  # [C, T, E]
    head = zero_shot_head(embeddings)
    assert head.shape == (8, 3)
    np.testing.assert_allclose(jnp.linalg.norm(head, axis=0), 1.0, rtol=1e-6)
    unit = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
    mean = unit.mean(axis=1)
    np.testing.assert_allclose(head.T, mean / jnp.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-6)
