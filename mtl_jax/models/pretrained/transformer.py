"""The pre-LN transformer encoder block shared by the pretrained ViT (``vit.py``) and CLIP
(``clip.py``) towers (Vaswani et al. 2017; pre-LN as in Dosovitskiy et al. 2021 and Radford et
al. 2021), the image preprocessing they share, and the conversion between fused and separate
query / key / value projections.

One block, ``x [B, N, D] -> [B, N, D]``::

    x = x + out(attention(query(y), key(y), value(y))),  y = ln_0(x)
    x = x + mlp_out(act(mlp_in(ln_1(x))))

Parameters of a block::

    ln_0/{scale,bias}  attention/{query,key,value,out}/{kernel,bias}  ln_1/{scale,bias}
    mlp_in/{kernel,bias}  mlp_out/{kernel,bias}

With ``fused_qkv`` the three input projections are one Dense ``attention/qkv`` (kernel [D, 3D],
columns query | key | value), the layout of timm's ``attn.qkv`` and open_clip's
``attn.in_proj_weight``; :func:`split_qkv` / :func:`fuse_qkv` convert a parameter tree between the
two forms bit-exactly (e.g. to merge an open_clip checkpoint with a Hugging Face one).
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.checkpoints import IDENTITY, LINEAR, Rename
from mtl_jax.models.blocks import as_float
from mtl_jax.models.trunks import remat_block
from mtl_jax.registry import lookup


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (Radford et al. 2021)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # exact erf GELU (torch nn.GELU, HF "gelu")
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),  # HF "gelu_pytorch_tanh" / "gelu_new"
    "quick_gelu": quick_gelu,
}


def activation(name: str) -> Callable:
    """The activation called ``name`` (a key of :data:`ACTIVATIONS`)."""
    return lookup(ACTIVATIONS, name, "activation")


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
    """torch ``nn.LayerNorm`` semantics: biased variance from the centred input (two-pass)."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention, x [B, N, D] -> [B, N, D], softmax(q k^T / sqrt(D/heads)) v.
    ``causal``: position i attends to positions <= i (the CLIP text tower)."""

    num_heads: int
    fused_qkv: bool = False
    causal: bool = False

    @nn.compact
    def __call__(self, x):
        batch, length, dim = x.shape
        if dim % self.num_heads:
            raise ValueError(f"width {dim} is not a multiple of num_heads {self.num_heads}")
        if self.fused_qkv:
            q, k, v = jnp.split(nn.Dense(3 * dim, name="qkv")(x), 3, axis=-1)
        else:
            q, k, v = (nn.Dense(dim, name=name)(x) for name in ("query", "key", "value"))
        heads = lambda y: y.reshape(batch, length, self.num_heads, dim // self.num_heads)  # noqa: E731
        y = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=self.causal)
        return nn.Dense(dim, name="out")(y.reshape(batch, length, dim))


class EncoderBlock(nn.Module):
    """One pre-LN transformer block (module docstring), x [B, N, D] -> [B, N, D]. ``activation``:
    a key of :data:`ACTIVATIONS`; ``layer_norm_eps`` of both LayerNorms."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    fused_qkv: bool = False
    causal: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = layer_norm(self.layer_norm_eps, "ln_0")(x)
        x = x + SelfAttention(self.num_heads, self.fused_qkv, self.causal, name="attention")(y)
        y = layer_norm(self.layer_norm_eps, "ln_1")(x)
        y = activation(self.activation)(nn.Dense(self.mlp_dim, name="mlp_in")(y))
        return x + nn.Dense(x.shape[-1], name="mlp_out")(y)


def encoder_blocks(x, depth: int, train: bool = False, remat: bool = False, **block_fields):
    """``depth`` :class:`EncoderBlock` s (``block_fields`` its fields) named ``block_{i}`` applied to
    x [B, N, D]; call inside a compact method (they become children of that module). ``remat``:
    each block under ``nn.remat`` (same parameters and outputs)."""
    block = remat_block(EncoderBlock, remat)
    for i in range(depth):
        x = block(**block_fields, name=f"block_{i}")(x, train)
    return x


def init_template(module: nn.Module, *inputs: jax.ShapeDtypeStruct):
    """The parameter shapes of ``module`` applied to ``inputs`` (``jax.ShapeDtypeStruct`` leaves;
    nothing allocated or computed)."""
    return jax.eval_shape(lambda *xs: module.init(jax.random.PRNGKey(0), *xs), *inputs)["params"]


def pixel_values(x, mean: Sequence[float], std: Sequence[float]):
    """Images [B, H, W, C] in [0, 1] (floating, e.g. from ``train.precision.cast_input``) or uint8
    (scaled to [0, 1], ``blocks.as_float``) -> ``(x - mean) / std`` per channel, the normalisation
    the checkpoint was trained with (Hugging Face's ``pixel_values``, channels last). Pass mean 0
    and std 1 for images a pipeline has normalised already."""
    x = as_float(x)
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def check_image_shape(x, image_size: int, channels: int = 3) -> None:
    """ValueError unless ``x`` is [B, image_size, image_size, channels] (position embeddings are
    learned for one grid size)."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (image_size, image_size, channels):
        raise ValueError(f"expected images [B, {image_size}, {image_size}, {channels}], got shape {tuple(x.shape)}")


def patch_tokens(x, image_size: int, patch_size: int, width: int, mean: Sequence[float], std: Sequence[float],
                 use_bias: bool = True):
    """Images [B, image_size, image_size, 3] (uint8 or floating in [0, 1]) -> patch embeddings
    [B, (image_size / patch_size)^2, width], row by row: ``check_image_shape``, ``pixel_values``,
    then one ``patch_size`` x ``patch_size`` stride-``patch_size`` convolution named ``patch_embed``
    (ViT, Dosovitskiy et al. 2021). Call it inside a module's ``nn.compact`` method: the
    convolution is that module's submodule."""
    check_image_shape(x, image_size)
    x = pixel_values(x, mean, std)
    p = patch_size
    x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", use_bias=use_bias, name="patch_embed")(x)
    return x.reshape(x.shape[0], -1, width)


# Checkpoint module names of one block per layout: our module -> the layout's module, or
# (module, weight name, bias name) where those are not 'weight' / 'bias'.
BLOCK_LAYOUTS: dict[str, dict[str, str | tuple[str, str, str]]] = {
    "hf_vit": {  # transformers ViTLayer
        "ln_0": "layernorm_before", "attention/query": "attention.attention.query",
        "attention/key": "attention.attention.key", "attention/value": "attention.attention.value",
        "attention/out": "attention.output.dense", "ln_1": "layernorm_after",
        "mlp_in": "intermediate.dense", "mlp_out": "output.dense"},
    "timm": {  # timm vision_transformer.Block
        "ln_0": "norm1", "attention/qkv": "attn.qkv", "attention/out": "attn.proj", "ln_1": "norm2",
        "mlp_in": "mlp.fc1", "mlp_out": "mlp.fc2"},
    "open_clip": {  # open_clip ResidualAttentionBlock (torch nn.MultiheadAttention)
        "ln_0": "ln_1", "attention/qkv": ("attn", "in_proj_weight", "in_proj_bias"),
        "attention/out": "attn.out_proj", "ln_1": "ln_2", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"},
    "hf_clip": {  # transformers CLIPEncoderLayer
        "ln_0": "layer_norm1", "attention/query": "self_attn.q_proj", "attention/key": "self_attn.k_proj",
        "attention/value": "self_attn.v_proj", "attention/out": "self_attn.out_proj", "ln_1": "layer_norm2",
        "mlp_in": "mlp.fc1", "mlp_out": "mlp.fc2"},
}


def dense_renames(source: str, target: tuple, weight: str = "weight", bias: str | None = "bias") -> list[Rename]:
    """torch ``nn.Linear`` ``{source}.{weight}`` [out, in] / ``{source}.{bias}`` -> Dense
    ``target/kernel`` [in, out] / ``target/bias`` (no bias when ``bias`` is None)."""
    renames = [Rename(f"{source}.{weight}", target + ("kernel",), LINEAR)]
    return renames + ([Rename(f"{source}.{bias}", target + ("bias",), IDENTITY)] if bias else [])


def norm_renames(source: str, target: tuple) -> list[Rename]:
    """torch LayerNorm / RMSNorm ``{source}.weight`` / ``.bias`` -> ``target/scale`` / ``target/bias``."""
    return [Rename(f"{source}.weight", target + ("scale",), IDENTITY),
            Rename(f"{source}.bias", target + ("bias",), IDENTITY)]


def block_renames(layout: str, source: str, target: tuple) -> list[Rename]:
    """One :class:`EncoderBlock`'s renames: checkpoint module ``source`` (e.g.
    ``"encoder.layer.3"``) in ``layout`` (a key of :data:`BLOCK_LAYOUTS`) -> our block at ``target``
    (e.g. ``("block_3",)``). Fused layouts (timm, open_clip) need ``fused_qkv`` blocks."""
    lookup(BLOCK_LAYOUTS, layout, "block layout")
    renames = []
    for ours, theirs in BLOCK_LAYOUTS[layout].items():
        module, weight, bias = (theirs, "weight", "bias") if isinstance(theirs, str) else theirs
        path = target + tuple(ours.split("/"))
        if ours.startswith("ln_"):
            renames += norm_renames(f"{source}.{module}", path)
        else:
            renames += dense_renames(f"{source}.{module}", path, weight, bias)
    return renames


def fused_layout(layout: str) -> bool:
    """Whether blocks of ``layout`` hold one fused query/key/value projection."""
    return "attention/qkv" in BLOCK_LAYOUTS[layout]


def _map_attention(tree, fn: Callable[[Mapping], Mapping]):
    """``tree`` with every ``attention`` subtree replaced by ``fn(subtree)`` (plain dicts)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = fn(value) if key == "attention" else _map_attention(value, fn)
        else:
            out[key] = value
    return out


def _split_attention(attention: Mapping) -> dict:
    if "qkv" not in attention:
        return dict(attention)
    out = {k: v for k, v in attention.items() if k != "qkv"}
    for name, i in (("query", 0), ("key", 1), ("value", 2)):
        out[name] = {leaf: np.split(np.asarray(value), 3, axis=-1)[i] for leaf, value in attention["qkv"].items()}
    return out


def _fuse_attention(attention: Mapping) -> dict:
    if "query" not in attention:
        return dict(attention)
    out = {k: v for k, v in attention.items() if k not in ("query", "key", "value")}
    out["qkv"] = {leaf: np.concatenate([np.asarray(attention[n][leaf]) for n in ("query", "key", "value")], axis=-1)
                  for leaf in attention["query"]}
    return out


def split_qkv(params: Mapping) -> dict:
    """``params`` of a ``fused_qkv`` model as the parameters of the same model without it
    (``attention/qkv`` -> ``attention/{query,key,value}``; numpy leaves, bit-exact)."""
    return _map_attention(params, _split_attention)


def fuse_qkv(params: Mapping) -> dict:
    """Inverse of :func:`split_qkv`: ``attention/{query,key,value}`` -> ``attention/qkv``."""
    return _map_attention(params, _fuse_attention)


__all__ = ["ACTIVATIONS", "BLOCK_LAYOUTS", "EncoderBlock", "SelfAttention", "activation", "block_renames",
           "check_image_shape", "dense_renames", "encoder_blocks", "fuse_qkv", "fused_layout", "init_template",
           "layer_norm", "norm_renames", "patch_tokens", "pixel_values", "quick_gelu", "split_qkv"]
