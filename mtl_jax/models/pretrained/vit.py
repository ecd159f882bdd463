"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") in flax linen,
loading Hugging Face ``ViTModel`` / ``ViTForImageClassification`` checkpoints
(google/vit-base-patch16-224 names) and timm ``vit_base_patch16_224`` checkpoints.

The computation follows ``transformers.models.vit.modeling_vit`` (and timm's
``VisionTransformer`` with ``global_pool='token'``): a P x P patch convolution, a learned [CLS]
token prepended, learned position embeddings added, ``layers`` pre-LN blocks
(``transformer.EncoderBlock``, exact erf GELU), a final LayerNorm. The trunk output is the final
[CLS] state [B, hidden] (what both libraries' classifiers read), or with ``pooler`` HF's
``pooler_output`` ``tanh(W h_cls + b)``.

Parameters::

    patch_embed/{kernel,bias}  cls_token [1, 1, D]  pos_embed [1, N + 1, D]
    block_{i}/...  (transformer.py; attention/qkv when ``fused_qkv``, timm's layout)
    ln_final/{scale,bias}  [pooler/{kernel,bias}]

Parameter count of ViT-B/16 (224 x 224, 768 wide, 12 layers): 85,798,656 without the pooler,
86,389,248 with it (HF ``ViTModel``'s default); classifier heads are not part of the backbone.
"""

from __future__ import annotations

import dataclasses
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.checkpoints import CONV2D, IDENTITY, Rename, load_into, read_checkpoint
from mtl_jax.models.pretrained.transformer import (
    block_renames, dense_renames, encoder_blocks, init_template, layer_norm, norm_renames, patch_tokens)
from mtl_jax.registry import lookup

VIT_LAYOUTS = ("hf", "timm")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT architecture; the defaults are ViT-B/16 at 224 x 224 in the Hugging Face layout.

    ``layer_norm_eps``: 1e-12 in HF ViT, 1e-6 in timm. ``fused_qkv``: one query/key/value Dense
    (timm's ``attn.qkv``). ``pooler``: HF's tanh pooler on the [CLS] state (its output is then the
    trunk output). ``pixel_mean`` / ``pixel_std``: the normalisation of the [0, 1] images (0.5 /
    0.5 for google/vit-base-patch16-224 and timm's augreg weights)."""

    image_size: int = 224
    patch_size: int = 16
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    fused_qkv: bool = False
    pooler: bool = False
    pixel_mean: tuple = (0.5, 0.5, 0.5)
    pixel_std: tuple = (0.5, 0.5, 0.5)

    @property
    def num_patches(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        return (self.image_size // self.patch_size) ** 2


def _check_layout(layout: str) -> None:
    lookup(VIT_LAYOUTS, layout, "ViT checkpoint layout")


def _layout_fields(layout: str, pooler: bool) -> dict:
    """The config fields a checkpoint layout fixes."""
    _check_layout(layout)
    if layout == "timm":
        if pooler:
            raise ValueError("timm ViTs have no pooler; use pooler=False with layout='timm'")
        return dict(layer_norm_eps=1e-6, fused_qkv=True, pooler=False)
    return dict(layer_norm_eps=1e-12, fused_qkv=False, pooler=pooler)


def vit_b16(layout: str = "hf", pooler: bool = False) -> ViTConfig:
    """ViT-B/16, 224 x 224 (768 wide, 12 layers, 12 heads, MLP 3072) for checkpoints in ``layout``."""
    return ViTConfig(**_layout_fields(layout, pooler))


def vit_tiny(layout: str = "hf", pooler: bool = False) -> ViTConfig:
    """A 2-layer, 32-wide ViT on 32 x 32 images with 8 x 8 patches (tests)."""
    return ViTConfig(image_size=32, patch_size=8, hidden=32, layers=2, heads=4, mlp_dim=64,
                     **_layout_fields(layout, pooler))


class ViT(nn.Module):
    """ViT as an MTL trunk: images [B, H, W, 3] -> the [CLS] representation [B, hidden] (the
    pooler output with ``config.pooler``); ``return_tokens=True`` or :meth:`tokens`: all final
    states [B, 1 + N, hidden] after the last LayerNorm (HF's ``last_hidden_state``).

    Images are uint8 or floating in [0, 1], normalised with ``config.pixel_mean`` / ``pixel_std``
    (``transformer.pixel_values``). ``remat``: each block under ``nn.remat`` (as the other
    trunks). ``train`` is accepted for the trunk contract (the published models use no dropout)."""

    config: ViTConfig = ViTConfig()
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, return_tokens: bool = False):
        c = self.config
        x = patch_tokens(x, c.image_size, c.patch_size, c.hidden, c.pixel_mean, c.pixel_std)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c.hidden))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.hidden)).astype(x.dtype), x], axis=1)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, c.num_patches + 1, c.hidden))
        x = encoder_blocks(x, c.layers, train, self.remat, num_heads=c.heads, mlp_dim=c.mlp_dim,
                           activation=c.activation, layer_norm_eps=c.layer_norm_eps, fused_qkv=c.fused_qkv)
        x = layer_norm(c.layer_norm_eps, "ln_final")(x)
        if return_tokens:
            return x
        if c.pooler:
            return jnp.tanh(nn.Dense(c.hidden, name="pooler")(x[:, 0]))
        return x[:, 0]

    def tokens(self, x, train: bool = False):
        """The final states [B, 1 + N, hidden] ([CLS] first, then the patches row by row)."""
        return self(x, train, return_tokens=True)


def vit_renames(config: ViTConfig, layout: str = "hf", prefix: str = "") -> list[Rename]:
    """Checkpoint names in ``layout`` -> :class:`ViT` parameters.

    ``"hf"``: ``ViTModel`` names (``embeddings.cls_token``, ``embeddings.position_embeddings``,
    ``embeddings.patch_embeddings.projection.weight``, ``encoder.layer.{i}.attention.attention.query.weight``,
    ..., ``layernorm.weight``, ``pooler.dense.weight`` with ``config.pooler``); ``prefix`` ``"vit."``
    for ``ViTForImageClassification`` checkpoints. ``"timm"``: ``cls_token``, ``pos_embed``,
    ``patch_embed.proj.weight``, ``blocks.{i}.attn.qkv.weight``, ..., ``norm.weight``."""
    _check_layout(layout)
    if config.fused_qkv != (layout == "timm"):
        raise ValueError(f"layout {layout!r} needs fused_qkv={layout == 'timm'}, the config has "
                         f"fused_qkv={config.fused_qkv} (build it with vit_b16(layout={layout!r}))")
    if layout == "timm":
        if config.pooler:
            raise ValueError("timm ViTs have no pooler; the config has pooler=True")
        names = dict(cls="cls_token", pos="pos_embed", patch="patch_embed.proj", blocks="blocks", norm="norm")
        block_layout = "timm"
    else:
        names = dict(cls="embeddings.cls_token", pos="embeddings.position_embeddings",
                     patch="embeddings.patch_embeddings.projection", blocks="encoder.layer", norm="layernorm")
        block_layout = "hf_vit"
    names = {k: prefix + v for k, v in names.items()}
    renames = [Rename(names["cls"], ("cls_token",), IDENTITY), Rename(names["pos"], ("pos_embed",), IDENTITY),
               Rename(f"{names['patch']}.weight", ("patch_embed", "kernel"), CONV2D),
               Rename(f"{names['patch']}.bias", ("patch_embed", "bias"), IDENTITY)]
    for i in range(config.layers):
        renames += block_renames(block_layout, f"{names['blocks']}.{i}", (f"block_{i}",))
    renames += norm_renames(names["norm"], ("ln_final",))
    if config.pooler:
        renames += dense_renames(f"{prefix}pooler.dense", ("pooler",))
    return renames


# Checkpoint entries beside the backbone: classifier heads and the masked-image-modelling token.
_NOT_BACKBONE = {"hf": r"classifier\..*|(vit\.)?embeddings\.mask_token", "timm": r"head\..*"}


def backbone_state(state: dict, layout: str = "hf") -> tuple[dict, str]:
    """``(state without classifier-head entries, prefix)`` of a ViT checkpoint in ``layout``;
    ``prefix`` is ``"vit."`` when the HF names carry it (``ViTForImageClassification``)."""
    _check_layout(layout)
    drop = re.compile(_NOT_BACKBONE[layout])
    state = {k: v for k, v in state.items() if not drop.fullmatch(k)}
    prefix = "vit." if layout == "hf" and any(k.startswith("vit.") for k in state) else ""
    return state, prefix


def vit_template(config: ViTConfig):
    """:class:`ViT` parameter shapes for ``config`` (nothing allocated)."""
    return init_template(ViT(config), jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32))


def load_vit(path: str | os.PathLike, layout: str = "hf", config: ViTConfig | None = None, remat: bool = False):
    """A ViT-B/16 (or ``config``) from a checkpoint file in ``layout`` (safetensors or torch
    ``.bin`` / ``.pth``; ``read_checkpoint``). Classifier heads are dropped; with no ``config`` the
    pooler is kept when the checkpoint has one. Returns ``(module, params)``;
    CheckpointMismatchError listing missing / unexpected / mis-shaped names when it does not fit."""
    state, prefix = backbone_state(read_checkpoint(os.fspath(path)), layout)
    if config is None:
        config = vit_b16(layout, pooler=any(k.startswith(f"{prefix}pooler.") for k in state))
    module = ViT(config, remat=remat)
    params = load_into(vit_template(config), state, vit_renames(config, layout, prefix), what=f"ViT ({path})")
    return module, jax.device_put(params)


__all__ = ["VIT_LAYOUTS", "ViT", "ViTConfig", "backbone_state", "load_vit", "vit_b16", "vit_renames", "vit_template",
           "vit_tiny"]
