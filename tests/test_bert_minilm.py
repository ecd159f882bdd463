"""BERT encoder (models/pretrained/bert.py) and text tokenization (data/text.py): parity with
sentence-transformers' all-MiniLM-L6-v2 and Hugging Face's BertModel, checkpoint round trip and
refusals. References: ``tests/fixtures/pretrained/make_minilm_reference.py``."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures.pretrained.deterministic_weights import deterministic_state_dict
from mtl_jax.checkpoints import CheckpointMismatchError, export, read_checkpoint
from mtl_jax.data.text import encode_batch, load_tokenizer
from mtl_jax.models.pretrained import bert

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained")
MAX_LEN = 256


def _reference():
    with open(os.path.join(FIXTURES, "minilm_reference.json")) as f:
        meta = json.load(f)
    return meta, np.load(os.path.join(FIXTURES, "minilm_reference.npz"))


def _minilm_folder():
    try:
        return bert.minilm_path()
    except FileNotFoundError as e:
        pytest.skip(f"{e}")


@pytest.fixture(scope="module")
def minilm():
    _minilm_folder()
    return bert.load_minilm()


def _linked_folder(tmp_path, replace: dict):
    """A copy of the MiniLM folder (symlinks) with the files in ``replace`` ({relative path: dict}) rewritten."""
    source = _minilm_folder()
    for root, _, files in os.walk(source):
        rel = os.path.relpath(root, source)
        os.makedirs(tmp_path / rel, exist_ok=True)
        for name in files:
            key = os.path.normpath(os.path.join(rel, name))
            if key in replace:
                (tmp_path / key).write_text(json.dumps(replace[key]))
            else:
                os.symlink(os.path.join(root, name), tmp_path / key)
    return str(tmp_path)


def test_tokenization_matches_sentence_transformers(minilm):
    meta, _ = _reference()
    _, _, tokenizer = minilm
    ids = encode_batch(tokenizer, meta["sentences"], MAX_LEN)
    assert ids.dtype == np.int32 and ids.shape == (len(meta["sentences"]), MAX_LEN)
    for row, expected in zip(ids, meta["token_ids"]):
        assert row[:len(expected)].tolist() == expected
        assert (row[len(expected):] == 0).all()
    assert max(len(t) for t in meta["token_ids"]) == MAX_LEN  # the long sentence is truncated, [SEP] kept
    short = encode_batch(tokenizer, ["The quick brown fox jumps over the lazy dog."], 6)
    assert short[0, 0] == 101 and short[0, -1] == 102


def test_minilm_embeddings_match_sentence_transformers(minilm):
    meta, ref = _reference()
    module, params, tokenizer = minilm
    ids = encode_batch(tokenizer, meta["sentences"], MAX_LEN)
    ours = np.asarray(jax.jit(lambda p, i: module.apply({"params": p}, i))(params, ids))
    expected = ref["embeddings"]
    cosine = (ours * expected).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(expected, axis=-1))
    print(f"MiniLM vs sentence-transformers: min cosine {cosine.min():.8f} over {len(cosine)} sentences")
    assert cosine.min() >= 0.9999


def test_minilm_export_round_trip_bit_exact(minilm):
    module, params, _ = minilm
    folder = _minilm_folder()
    state = bert.encoder_state(read_checkpoint(os.path.join(folder, "model.safetensors")))
    config = bert.BertConfig.from_json(os.path.join(folder, "config.json"))
    exported = export(params, bert.bert_renames(config))
    assert sorted(exported) == sorted(state)
    for name, value in state.items():
        assert exported[name].dtype == value.dtype and exported[name].shape == value.shape, name
        assert np.array_equal(exported[name].view(np.uint32), value.view(np.uint32)), name


def test_checkpoint_mismatch_is_refused(minilm):
    module, params, _ = minilm
    config = bert.BertConfig(**{f.name: getattr(module, f.name) for f in dataclasses.fields(bert.BertConfig)})
    state = export(params, bert.bert_renames(config))
    missing = dict(state)
    del missing["encoder.layer.3.attention.self.key.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.layer\.3\.attention\.self\.key\.weight"):
        bert.load_bert_params(module, missing)
    mis_shaped = dict(state)
    mis_shaped["encoder.layer.1.intermediate.dense.weight"] = np.zeros((1536, 383), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.layer\.1\.intermediate\.dense\.weight"):
        bert.load_bert_params(module, mis_shaped)
    prefixed = {"bert." + k: v for k, v in state.items()}
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        bert.load_bert_params(module, prefixed)
    loaded = bert.load_bert_params(module, prefixed, prefix="bert.")
    assert np.array_equal(loaded["layer_5"]["output"]["kernel"], params["layer_5"]["output"]["kernel"])


def test_wrong_tokenizer_vocabulary_is_refused(tmp_path):
    folder = _minilm_folder()
    with pytest.raises(ValueError, match=r"tokenizer\.json has 30522 tokens but .*config\.json has vocab_size 30000"):
        load_tokenizer(os.path.join(folder, "tokenizer.json"), 30000, os.path.join(folder, "config.json"))
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    linked = _linked_folder(tmp_path, {"config.json": {**config, "vocab_size": 30000}})
    with pytest.raises(ValueError, match="30522 tokens .* vocab_size 30000"):
        bert.load_minilm(linked)


def test_pooling_other_than_mean_is_refused(tmp_path):
    folder = _minilm_folder()
    with open(os.path.join(folder, "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    linked = _linked_folder(tmp_path, {os.path.join("1_Pooling", "config.json"): pooling})
    with pytest.raises(ValueError, match=r"pooling modes \['pooling_mode_cls_token'\] are not supported"):
        bert.load_minilm(linked)


def _tiny(tmp_path, **kwargs):
    meta, ref = _reference()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(meta["tiny_config"]))
    config = bert.BertConfig.from_json(path)
    module = bert.BertEncoder(**dataclasses.asdict(config), **kwargs)
    params = bert.load_bert_params(module, deterministic_state_dict(meta["tiny_shapes"]), what="tiny BERT")
    return module, params, ref


def test_tiny_bert_matches_hf_token_states(tmp_path):
    module, params, ref = _tiny(tmp_path)
    ids = ref["tiny_ids"]
    states = np.asarray(module.apply({"params": params}, ids, method=module.token_states))
    diff = np.abs(states - ref["tiny_token_states"]).max()
    print(f"tiny BERT vs transformers.BertModel: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    pooled = np.asarray(module.apply({"params": params}, ids))
    mask = (ids != 0)[..., None]
    np.testing.assert_allclose(pooled, (states * mask).sum(1) / mask.sum(1), rtol=1e-6, atol=1e-6)


def test_tiny_bert_remat_dropout_and_trunk_gradients(tmp_path):
    module, params, ref = _tiny(tmp_path)
    remat_module, _, _ = _tiny(tmp_path, remat=True)
    ids = jnp.asarray(ref["tiny_ids"])

    def loss(m):
        return lambda p: (m.apply({"params": p}, ids, train=True) ** 2).sum()

    grads = jax.grad(loss(module))(params)
    remat_grads = jax.grad(loss(remat_module))(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))

    dropped, _, _ = _tiny(tmp_path, dropout=0.1, attention_dropout=0.1)
    rngs = {"dropout": jax.random.PRNGKey(1)}
    train_out = dropped.apply({"params": params}, ids, train=True, rngs=rngs)
    eval_out = dropped.apply({"params": params}, ids)
    assert train_out.shape == eval_out.shape == (3, 32)
    assert not np.allclose(train_out, eval_out)
    np.testing.assert_allclose(eval_out, module.apply({"params": params}, ids), rtol=1e-6, atol=1e-6)


def test_bert_config_refuses_other_architectures(tmp_path):
    meta, _ = _reference()
    for key, value in (("hidden_act", "relu"), ("position_embedding_type", "relative_key")):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**meta["tiny_config"], key: value}))
        with pytest.raises(ValueError, match=f"{key} '{value}' is not supported"):
            bert.BertConfig.from_json(path)
