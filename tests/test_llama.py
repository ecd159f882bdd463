"""The Llama decoder (Hugging Face ``LlamaForCausalLM`` layout): logits parity with transformers
on tiny random models (multi-head, grouped-query with tied embeddings and llama3 RoPE scaling,
multi-query with biases and an explicit head_dim, a left-padded batch), ``config.json`` parsing,
real-size parameter names, shapes and counts, bit-exact round trips, loading a model folder.

Fixtures come from ``tests/fixtures/pretrained/make_llama_reference.py`` (run in the peers venv);
weights are regenerated here with ``deterministic_state_dict`` from our renames' names and our
templates' shapes, which must be the set the reference script recorded.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures.pretrained.deterministic_weights import deterministic_state_dict
from fixtures.pretrained.reference_files import load_fixture
from mtl_jax.checkpoints import CheckpointMismatchError, export, load_into, source_shapes, write_safetensors
from mtl_jax.models.pretrained.llama import Llama, LlamaConfig, llama_renames, llama_template, llama_tiny, load_llama

SCRIPT = "cd tests && ../.peers-venv/bin/python -m fixtures.pretrained.make_llama_reference"
TOLERANCE = 1e-4
CASES = ("mha", "gqa", "mqa_bias")


@pytest.fixture(scope="module")
def reference():
    return load_fixture("llama_reference.npz", SCRIPT), load_fixture("llama_reference.json", SCRIPT)["models"]


def _loaded(config: LlamaConfig):
    renames, template = llama_renames(config), llama_template(config)
    state = deterministic_state_dict(source_shapes(template, renames))
    return renames, state, load_into(template, state, renames, what="tiny Llama")


def test_config_json_is_read(reference):
    _, records = reference
    configs = {name: LlamaConfig.from_hf_config(records[name]["config"]) for name in CASES}
    assert configs["mha"] == llama_tiny(4, rms_norm_eps=1e-6, max_position_embeddings=64)
    assert configs["gqa"] == llama_tiny(2, True, rms_norm_eps=1e-6, rope_theta=1000.0, rope_type="llama3",
                                        rope_factor=4.0, rope_original_max_position=16)
    assert configs["mqa_bias"] == llama_tiny(1, head_dim=16, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6,
                                             rope_type="linear", rope_factor=2.0)
    # transformers 4 config.json keys: rope_theta beside a rope_scaling dict ("type" or "rope_type").
    old = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {"type": "linear", "factor": 2.0}, "tie_word_embeddings": True}
    config = LlamaConfig.from_hf_config(old)
    assert (config.rope_theta, config.rope_type, config.rope_factor) == (500000.0, "linear", 2.0)
    assert (config.num_kv_heads, config.head_dim, config.tie_word_embeddings) == (2, 8, True)
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        LlamaConfig.from_hf_config({**old, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        LlamaConfig.from_hf_config({**old, "model_type": "mistral"})
    with pytest.raises(ValueError, match=r"keys \['vocab_size'\] missing"):
        LlamaConfig.from_hf_config({k: v for k, v in old.items() if k != "vocab_size"})


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(reference, name):
    arrays, records = reference
    config = LlamaConfig.from_hf_config(records[name]["config"])
    renames, template = llama_renames(config), llama_template(config)
    assert source_shapes(template, renames) == records[name]["names"]
    _, _, params = _loaded(config)
    model, ids = Llama(config), jnp.asarray(arrays["ids"])
    diff = float(np.max(np.abs(np.asarray(model.apply({"params": params}, ids)) - arrays[f"{name}/logits"])))
    print(f"{name}: max |ours - transformers| logits {diff:.2e}")
    assert diff <= TOLERANCE
    if name == "mha":  # left padding: compare the real tokens' logits
        mask = arrays["attention_mask"]
        padded = np.asarray(model.apply({"params": params}, ids, attention_mask=jnp.asarray(mask)))
        diff = float(np.max(np.abs(padded - arrays["mha/logits_padded"])[mask.astype(bool)]))
        print(f"mha, left-padded: max |ours - transformers| logits {diff:.2e}")
        assert diff <= TOLERANCE


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trip_is_bit_exact_and_mismatches_raise(tied):
    config = llama_tiny(2, tied)
    renames, state, params = _loaded(config)
    exported = export(params, renames)
    assert list(exported) == list(state)
    for key, value in state.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert ("lm_head.weight" in state) != tied
    template = llama_template(config)
    name = "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(CheckpointMismatchError, match="missing") as info:
        load_into(template, {k: v for k, v in state.items() if k != name}, renames)
    assert name in str(info.value)
    with pytest.raises(CheckpointMismatchError, match="mis-shaped") as info:
        load_into(template, {**state, name: np.zeros((32, 32), np.float32)}, renames)  # MHA-sized k_proj
    assert name in str(info.value)


@pytest.mark.parametrize("name, expected", [("llama_2_7b", 6_738_415_616), ("llama_3_2_1b", 1_235_814_400)])
def test_real_size_names_shapes_and_counts(name, expected):
    manifest = load_fixture("llama_manifests.json", SCRIPT)["models"][name]
    config = LlamaConfig.from_hf_config(manifest["config"])
    template = llama_template(config)  # eval_shape: nothing allocated
    names = dict(manifest["names"])
    if config.tie_word_embeddings:  # state_dict lists the tied head; checkpoints do not store it
        assert names.pop("lm_head.weight") == names["model.embed_tokens.weight"]
    assert source_shapes(template, llama_renames(config)) == names
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(template))
    assert count == manifest["num_parameters"] == expected
    if name == "llama_2_7b":
        assert count == sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(llama_template(LlamaConfig())))


def test_load_llama_reads_a_model_folder(tmp_path):
    """A folder with config.json and a safetensors file holding the (redundant) tied lm_head."""
    config = llama_tiny(2, True)
    renames, state, params = _loaded(config)
    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 64, "tie_word_embeddings": True, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    tied_copy = {"lm_head.weight": state["model.embed_tokens.weight"]}
    write_safetensors(str(tmp_path / "model.safetensors"), {**state, **tied_copy})
    model, loaded = load_llama(tmp_path)
    assert model.config == config
    ids = jnp.asarray([[3, 1, 4, 1, 5, 9]])
    np.testing.assert_array_equal(np.asarray(model.apply({"params": loaded}, ids)),
                                  np.asarray(Llama(config).apply({"params": params}, ids)))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_llama(_empty_folder(tmp_path, hf))


def _empty_folder(tmp_path, hf: dict):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    return folder
