"""A Llama-style decoder-only language model (Touvron et al. 2023, "LLaMA" / "Llama 2"; Grattafiori
et al. 2024, "The Llama 3 Herd of Models") in flax linen, loading Hugging Face
``LlamaForCausalLM`` checkpoints, for merging language models.

The computation follows ``transformers.models.llama.modeling_llama``: token embedding, then per
layer (pre-norm, RMSNorm, Zhang & Sennrich 2019)::

    h = x + o_proj(attention(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),  n = input_layernorm(x)
    x = h + down_proj(silu(gate_proj(m)) * up_proj(m)),                     m = post_attention_layernorm(h)

with causal attention, grouped-query attention (Ainslie et al. 2023: ``num_kv_heads`` key/value
heads, each shared by ``num_heads / num_kv_heads`` consecutive query heads), rotary position
embeddings (Su et al. 2021; the half-split "rotate_half" convention, base ``rope_theta``, optional
"linear" or "llama3" frequency scaling), a final RMSNorm and the LM head (or, with
``tie_word_embeddings``, the transposed token embedding).

Parameters::

    embed_tokens/embedding [V, D]
    layer_{i}/{input_norm/scale, attention/{q_proj,k_proj,v_proj,o_proj}/kernel,
               post_attention_norm/scale, mlp/{gate_proj,up_proj,down_proj}/kernel}
    norm/scale  [lm_head/kernel [D, V]]
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.checkpoints import IDENTITY, Rename, load_into, read_checkpoint
from mtl_jax.models.pretrained.transformer import dense_renames, init_template
from mtl_jax.models.trunks import remat_block

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama architecture (field names as HF's ``LlamaConfig``); the defaults are Llama-2-7B.

    ``head_dim`` 0 becomes ``hidden_size // num_heads``. ``rope_type``: "default", "linear"
    (frequencies / ``rope_factor``) or "llama3" (Llama 3.1's wavelength-dependent scaling with
    ``rope_factor``, ``rope_low_freq_factor``, ``rope_high_freq_factor``,
    ``rope_original_max_position``; 0 becomes ``max_position_embeddings``). ``dtype``: parameter
    and computation dtype (norms and the softmax run in float32)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; valid: {list(ROPE_TYPES)}")
        if not self.head_dim and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; "
                             "set head_dim")
        object.__setattr__(self, "head_dim", self.head_dim or self.hidden_size // self.num_heads)
        object.__setattr__(self, "rope_original_max_position",
                           self.rope_original_max_position or self.max_position_embeddings)

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: str = "float32") -> "LlamaConfig":
        """The config of a Hugging Face ``config.json`` (a dict) of a ``LlamaForCausalLM``. Reads
        ``rope_theta`` / ``rope_scaling`` (transformers 4) and ``rope_parameters`` (transformers 5).
        ValueError naming the key for what this module does not compute (another activation,
        model type or RoPE scaling)."""
        needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        absent = [k for k in needed if k not in hf]
        if absent:
            raise ValueError(f"not a Llama config.json: keys {absent} missing")
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {hf['model_type']!r} is not supported; LlamaConfig reads 'llama'")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; Llama uses 'silu'")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported; valid: {list(ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial_rotary_factor {rope['partial_rotary_factor']} is not supported (1.0 only)")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or 0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 0)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
            dtype=dtype)


def llama_tiny(num_kv_heads: int = 4, tie_word_embeddings: bool = False, **overrides) -> LlamaConfig:
    """A 2-layer, 32-wide Llama with 4 query heads and a 64-token vocabulary (tests)."""
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=num_kv_heads, max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings)
    return LlamaConfig(**{**fields, **overrides})


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """The inverse frequencies [head_dim / 2] (float32): ``theta^(-2j / head_dim)``, then the
    config's scaling ("linear": / factor; "llama3": / factor for wavelengths above
    original_max_position / low_freq_factor, unchanged below original_max_position /
    high_freq_factor, smoothly interpolated between; as transformers' ``modeling_rope_utils``)."""
    dim = config.head_dim
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)))
    inv_freq = inv_freq.astype(np.float32)
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions, inv_freq):
    """positions [B, L] -> (cos, sin) [B, L, head_dim] (the frequencies repeated for both halves)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotary embedding of x [B, L, heads, head_dim]: ``x cos + rotate_half(x) sin`` with
    ``rotate_half([a, b]) = [-b, a]`` (the halves of the head dimension)."""
    a, b = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-b, a], axis=-1)
    return (x * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def dense(config: LlamaConfig, features: int, name: str, bias: bool) -> nn.Dense:
    """A Dense in the config's dtype."""
    return nn.Dense(features, use_bias=bias, dtype=config.dtype, param_dtype=config.dtype, name=name)


def rms_norm(config: LlamaConfig, name: str) -> nn.RMSNorm:
    """HF ``LlamaRMSNorm``: ``scale * x / sqrt(mean(x^2) + eps)``, statistics in float32."""
    return nn.RMSNorm(epsilon=config.rms_norm_eps, dtype=config.dtype, param_dtype=config.dtype, name=name)


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE: x [B, L, D] -> [B, L, D]. ``mask`` [B, L]
    (True: a real token) additionally hides padded keys."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask=None):
        c = self.config
        batch, length, _ = x.shape
        hd = c.head_dim
        q = dense(c, c.num_heads * hd, "q_proj", c.attention_bias)(x).reshape(batch, length, c.num_heads, hd)
        k = dense(c, c.num_kv_heads * hd, "k_proj", c.attention_bias)(x).reshape(batch, length, c.num_kv_heads, hd)
        v = dense(c, c.num_kv_heads * hd, "v_proj", c.attention_bias)(x).reshape(batch, length, c.num_kv_heads, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        key_mask = None if mask is None else mask[:, None, None, :]
        y = jax.nn.dot_product_attention(q, k, v, mask=key_mask, is_causal=True)
        return dense(c, x.shape[-1], "o_proj", c.attention_bias)(y.reshape(batch, length, c.num_heads * hd))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        y = nn.silu(dense(c, c.intermediate_size, "gate_proj", c.mlp_bias)(x))
        y = y * dense(c, c.intermediate_size, "up_proj", c.mlp_bias)(x)
        return dense(c, x.shape[-1], "down_proj", c.mlp_bias)(y)


class LlamaLayer(nn.Module):
    """One decoder layer (module docstring): x [B, L, D] -> [B, L, D]."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, train: bool = False, cos=None, sin=None, mask=None):
        h = x + LlamaAttention(self.config, name="attention")(rms_norm(self.config, "input_norm")(x), cos, sin, mask)
        return h + LlamaMLP(self.config, name="mlp")(rms_norm(self.config, "post_attention_norm")(h))


class Llama(nn.Module):
    """``LlamaForCausalLM``: token ids [B, L] -> next-token logits [B, L, vocab] (float32).

    ``positions`` [B, L] or [L] (default 0 .. L-1, as HF without a cache); ``attention_mask``
    [B, L] (1: token, 0: padding) hides padded keys on top of the causal mask.
    :meth:`hidden_states`: the final normed states [B, L, D]. ``remat``: each layer under
    ``nn.remat``."""

    config: LlamaConfig = LlamaConfig()
    remat: bool = False

    @nn.compact
    def __call__(self, ids, positions=None, attention_mask=None, return_hidden: bool = False):
        c = self.config
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"Llama takes integer token ids [B, L], got {ids.dtype} {tuple(ids.shape)}")
        embed = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.initializers.normal(0.02),
                         dtype=c.dtype, param_dtype=c.dtype, name="embed_tokens")
        x = embed(ids)
        if positions is None:
            positions = jnp.arange(ids.shape[1])
        positions = jnp.broadcast_to(positions, ids.shape)
        cos, sin = rope_cos_sin(positions, rope_frequencies(c))
        mask = None if attention_mask is None else attention_mask.astype(bool)
        layer = remat_block(LlamaLayer, self.remat)
        for i in range(c.num_layers):
            x = layer(c, name=f"layer_{i}")(x, False, cos.astype(x.dtype), sin.astype(x.dtype), mask)
        x = rms_norm(c, "norm")(x)
        if return_hidden:
            return x
        if c.tie_word_embeddings:
            return embed.attend(x).astype(jnp.float32)
        return dense(c, c.vocab_size, "lm_head", False)(x).astype(jnp.float32)

    def hidden_states(self, ids, positions=None, attention_mask=None):
        """The final RMS-normed states [B, L, D]."""
        return self(ids, positions, attention_mask, return_hidden=True)


def llama_template(config: LlamaConfig):
    """:class:`Llama` parameter shapes for ``config`` (nothing allocated)."""
    return init_template(Llama(config), jax.ShapeDtypeStruct((1, 2), jnp.int32))


# HF module -> ours inside ``model.layers.{i}``.
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def llama_renames(config: LlamaConfig, layout: str = "hf") -> list[Rename]:
    """Hugging Face ``LlamaForCausalLM`` names (``model.embed_tokens.weight``,
    ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
    ``model.layers.{i}.input_layernorm.weight``, ``model.layers.{i}.post_attention_layernorm.weight``,
    ``model.norm.weight``, ``lm_head.weight`` unless ``tie_word_embeddings``) -> :class:`Llama`
    parameters. Biases with ``attention_bias`` / ``mlp_bias``."""
    if layout != "hf":
        raise ValueError(f"unknown Llama checkpoint layout {layout!r}; valid: ['hf']")
    renames = [Rename("model.embed_tokens.weight", ("embed_tokens", "embedding"), IDENTITY)]
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}", (f"layer_{i}",)
        renames.append(Rename(f"{src}.input_layernorm.weight", dst + ("input_norm", "scale"), IDENTITY))
        for name in _ATTENTION:
            renames += dense_renames(f"{src}.self_attn.{name}", dst + ("attention", name),
                                     bias="bias" if config.attention_bias else None)
        renames.append(Rename(f"{src}.post_attention_layernorm.weight", dst + ("post_attention_norm", "scale"),
                              IDENTITY))
        for name in _MLP:
            renames += dense_renames(f"{src}.mlp.{name}", dst + ("mlp", name), bias="bias" if config.mlp_bias else None)
    renames.append(Rename("model.norm.weight", ("norm", "scale"), IDENTITY))
    if not config.tie_word_embeddings:
        renames += dense_renames("lm_head", ("lm_head",), bias=None)
    return renames


def read_hf_weights(path: str) -> dict:
    """All tensors of a Hugging Face model folder (``model.safetensors``, sharded
    ``model-*-of-*.safetensors`` listed in ``model.safetensors.index.json``, or
    ``pytorch_model*.bin``)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, name) for name in files]
    else:
        files = (sorted(glob.glob(os.path.join(path, "*.safetensors")))
                 or sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))))
    if not files:
        raise FileNotFoundError(f"{path}: no model.safetensors, sharded safetensors or pytorch_model*.bin")
    state: dict = {}
    for file in files:
        state.update(read_checkpoint(file))
    return state


def load_llama(path: str | os.PathLike, dtype: str = "float32", remat: bool = False):
    """A ``LlamaForCausalLM`` from a Hugging Face model folder (``config.json`` + weights, see
    :func:`read_hf_weights`). With tied embeddings a stored ``lm_head.weight`` (a copy of the
    embedding) is dropped. Returns ``(module, params)`` (parameters in ``dtype``)."""
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        config = LlamaConfig.from_hf_config(json.load(f), dtype=dtype)
    state = read_hf_weights(path)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    params = load_into(llama_template(config), state, llama_renames(config), what=f"Llama ({path})")
    return Llama(config, remat), jax.device_put(params)


__all__ = ["Llama", "LlamaConfig", "ROPE_TYPES", "apply_rope", "llama_renames", "llama_template", "llama_tiny",
           "load_llama", "read_hf_weights", "rope_cos_sin", "rope_frequencies"]
