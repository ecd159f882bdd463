"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") image and text towers in flax linen, loading open_clip checkpoints
(``visual.conv1.weight``, ``visual.transformer.resblocks.{i}.attn.in_proj_weight``, ...,
``token_embedding.weight``, ``text_projection``, ``logit_scale``) and Hugging Face ``CLIPModel``
checkpoints (``vision_model.embeddings.patch_embedding.weight``, ``vision_model.pre_layrnorm``,
``text_model.encoder.layers.{i}.self_attn.q_proj.weight``, ``visual_projection.weight``, ...).

Image tower (open_clip ``VisionTransformer``, HF ``CLIPVisionTransformer``): P x P patch
convolution without bias, a learned class token prepended, learned position embeddings, LayerNorm
``ln_pre``, pre-LN blocks (``transformer.EncoderBlock``; QuickGELU for OpenAI's weights),
LayerNorm ``ln_post`` on the class token, linear projection to the joint embedding [B, embed_dim].

Text tower (open_clip ``CLIP.encode_text``, HF ``CLIPTextTransformer``): token + position
embeddings, causal pre-LN blocks, LayerNorm ``ln_final``, the state at the end-of-text token,
linear projection. End-of-text position: the argmax of the token ids (open_clip; HF with the
legacy ``eos_token_id == 2``: the EOT id 49407 is the largest in CLIP's vocabulary) when
``eos_token_id`` is None, else the first position holding ``eos_token_id`` (HF otherwise).

Zero-shot logits: ``exp(logit_scale) * normalise(image) @ normalise(text).T``.

Parameters::

    visual/{patch_embed/kernel, cls_token [D], pos_embed [N + 1, D], ln_pre, block_{i}, ln_post, proj/kernel [D, E]}
    text/{token_embed/embedding [V, W], pos_embed [ctx, W], block_{i}, ln_final, proj/kernel [W, E]}
    logit_scale []

``block_{i}`` holds ``attention/qkv`` for open_clip checkpoints (``fused_qkv``) and
``attention/{query,key,value}`` for HF ones; ``transformer.split_qkv`` / ``fuse_qkv`` convert.
CLIP ViT-B/32 has 151,277,313 parameters (87,849,216 image tower, 63,428,096 text tower, the
logit scale).
"""

from __future__ import annotations

import dataclasses
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.checkpoints import CONV2D, IDENTITY, LINEAR, Rename, load_into, read_checkpoint
from mtl_jax.models.pretrained.transformer import (
    block_renames, encoder_blocks, fused_layout, init_template, layer_norm, norm_renames, patch_tokens)
from mtl_jax.registry import lookup

CLIP_LAYOUTS = ("open_clip", "hf")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The image tower; defaults: ViT-B/32 at 224 x 224 (768 wide, 12 layers, 12 heads, MLP 3072,
    embedding 512), OpenAI's QuickGELU and preprocessing statistics, open_clip's fused QKV."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    embed_dim: int = 512
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    fused_qkv: bool = True
    pixel_mean: tuple = OPENAI_MEAN
    pixel_std: tuple = OPENAI_STD

    @property
    def num_patches(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower; defaults: CLIP's (vocabulary 49408, context 77, 512 wide, 12 layers, 8
    heads, MLP 2048, embedding 512). ``eos_token_id``: None pools at the argmax token id, else
    at the first occurrence of this id (module docstring)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    embed_dim: int = 512
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    fused_qkv: bool = True
    eos_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers (their ``embed_dim`` must agree) and the initial logit scale log(1 / 0.07)."""

    vision: CLIPVisionConfig = CLIPVisionConfig()
    text: CLIPTextConfig = CLIPTextConfig()
    init_logit_scale: float = float(np.log(1 / 0.07))

    def __post_init__(self):
        if self.vision.embed_dim != self.text.embed_dim:
            raise ValueError(f"CLIP towers disagree on embed_dim: vision {self.vision.embed_dim}, "
                             f"text {self.text.embed_dim}")

    @property
    def embed_dim(self) -> int:
        return self.vision.embed_dim


def _check_layout(layout: str) -> None:
    lookup(CLIP_LAYOUTS, layout, "CLIP checkpoint layout")


def for_layout(config: CLIPConfig, layout: str) -> CLIPConfig:
    """``config`` with the attention form ``layout``'s checkpoints hold (fused QKV for open_clip)."""
    _check_layout(layout)
    fused = layout == "open_clip"
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, fused_qkv=fused),
                               text=dataclasses.replace(config.text, fused_qkv=fused))


def clip_vit_b32(layout: str = "open_clip") -> CLIPConfig:
    """OpenAI CLIP ViT-B/32 (open_clip ``ViT-B-32-quickgelu``; HF openai/clip-vit-base-patch32)."""
    return for_layout(CLIPConfig(), layout)


def clip_tiny(layout: str = "open_clip", eos_token_id: int | None = None) -> CLIPConfig:
    """A 2-layer CLIP on 32 x 32 images (16 x 16 patches, 32 wide) with a 64-token vocabulary and
    context 8 (tests)."""
    vision = CLIPVisionConfig(image_size=32, patch_size=16, width=32, layers=2, heads=4, mlp_dim=64, embed_dim=16)
    text = CLIPTextConfig(vocab_size=64, context_length=8, width=24, layers=2, heads=4, mlp_dim=48, embed_dim=16,
                          eos_token_id=eos_token_id)
    return for_layout(CLIPConfig(vision, text), layout)


class CLIPImageEncoder(nn.Module):
    """CLIP's image tower as an MTL trunk: images [B, H, W, 3] -> image embedding [B, embed_dim]
    (not normalised); ``return_tokens=True`` or :meth:`tokens`: the last block's states after
    ``ln_post`` [B, 1 + N, width]. Images are uint8 or floating in [0, 1], normalised with
    ``config.pixel_mean`` / ``pixel_std`` (OpenAI's statistics; ``transformer.pixel_values``).
    ``remat``: blocks under ``nn.remat``."""

    config: CLIPVisionConfig = CLIPVisionConfig()
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, return_tokens: bool = False):
        c = self.config
        x = patch_tokens(x, c.image_size, c.patch_size, c.width, c.pixel_mean, c.pixel_std, use_bias=False)
        cls = self.param("cls_token", nn.initializers.normal(c.width ** -0.5), (c.width,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, c.width)), x], axis=1)
        x = x + self.param("pos_embed", nn.initializers.normal(c.width ** -0.5), (c.num_patches + 1, c.width))
        x = layer_norm(c.layer_norm_eps, "ln_pre")(x)
        x = encoder_blocks(x, c.layers, train, self.remat, num_heads=c.heads, mlp_dim=c.mlp_dim,
                           activation=c.activation, layer_norm_eps=c.layer_norm_eps, fused_qkv=c.fused_qkv)
        x = layer_norm(c.layer_norm_eps, "ln_post")(x)
        if return_tokens:
            return x
        return nn.Dense(c.embed_dim, use_bias=False, name="proj")(x[:, 0])

    def tokens(self, x, train: bool = False):
        """The final states [B, 1 + N, width] after ``ln_post`` (class token first)."""
        return self(x, train, return_tokens=True)


def eot_positions(ids, eos_token_id: int | None = None):
    """The end-of-text position of each sequence in ``ids`` [B, L] -> [B]: the argmax id (first
    of ties) when ``eos_token_id`` is None, else the first position holding ``eos_token_id``."""
    if eos_token_id is None:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == eos_token_id, axis=-1)


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower: token ids [B, L] (L <= context_length) -> text embedding [B, embed_dim]
    (not normalised), the causal transformer's state at the end-of-text token (:func:`eot_positions`);
    ``return_tokens=True``: all states after ``ln_final`` [B, L, width]."""

    config: CLIPTextConfig = CLIPTextConfig()
    remat: bool = False

    @nn.compact
    def __call__(self, ids, train: bool = False, return_tokens: bool = False):
        c = self.config
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"CLIP text tower takes integer token ids [B, L], got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > c.context_length:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds context_length {c.context_length}")
        x = nn.Embed(c.vocab_size, c.width, embedding_init=nn.initializers.normal(0.02), name="token_embed")(ids)
        pos = self.param("pos_embed", nn.initializers.normal(0.01), (c.context_length, c.width))
        x = x + pos[: ids.shape[1]].astype(x.dtype)
        x = encoder_blocks(x, c.layers, train, self.remat, num_heads=c.heads, mlp_dim=c.mlp_dim,
                           activation=c.activation, layer_norm_eps=c.layer_norm_eps, fused_qkv=c.fused_qkv,
                           causal=True)
        x = layer_norm(c.layer_norm_eps, "ln_final")(x)
        if return_tokens:
            return x
        pooled = jnp.take_along_axis(x, eot_positions(ids, c.eos_token_id)[:, None, None], axis=1)[:, 0]
        return nn.Dense(c.embed_dim, use_bias=False, name="proj")(pooled)


def l2_normalize(x, eps: float = 1e-12):
    """``x / max(||x||, eps)`` along the last axis (torch ``F.normalize``)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def zero_shot_logits(image_embeddings, text_embeddings, logit_scale):
    """CLIP's logits [B_image, B_text]: ``exp(logit_scale) * normalise(image) @ normalise(text).T``
    (Radford et al. 2021, Fig. 3)."""
    return jnp.exp(logit_scale) * l2_normalize(image_embeddings) @ l2_normalize(text_embeddings).T


def zero_shot_head(class_text_embeddings):
    """Zero-shot classifier weights [E, C] from text embeddings [C, T, E] of C classes under T
    prompt templates: the mean of the normalised embeddings per class, normalised again (Radford
    et al. 2021, Sec. 3.1.4; the heads of the task-arithmetic / AdaMerging ViT-B/32 benchmarks).
    Logits are ``exp(logit_scale) * normalise(image) @ weights``."""
    return l2_normalize(l2_normalize(class_text_embeddings).mean(axis=1)).T


class CLIP(nn.Module):
    """Both towers (``visual``, ``text``) and ``logit_scale``. ``model(images, ids)`` -> zero-shot
    logits [B_image, B_text] (:func:`zero_shot_logits`); :meth:`encode_image` / :meth:`encode_text`
    the (optionally normalised) embeddings. ``visual``'s parameters are those of a standalone
    :class:`CLIPImageEncoder` (the trunk merged in the ViT-B/32 8-task benchmarks)."""

    config: CLIPConfig = CLIPConfig()
    remat: bool = False

    def setup(self):
        self.visual = CLIPImageEncoder(self.config.vision, self.remat)
        self.text = CLIPTextEncoder(self.config.text, self.remat)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.config.init_logit_scale), ())

    def encode_image(self, images, normalize: bool = False):
        """Images [B, H, W, 3] -> [B, embed_dim] (unit norm with ``normalize``, as open_clip)."""
        x = self.visual(images)
        return l2_normalize(x) if normalize else x

    def encode_text(self, ids, normalize: bool = False):
        """Token ids [B, L] -> [B, embed_dim] (unit norm with ``normalize``, as open_clip)."""
        x = self.text(ids)
        return l2_normalize(x) if normalize else x

    def __call__(self, images, ids):
        return zero_shot_logits(self.visual(images), self.text(ids), self.logit_scale)


def clip_template(config: CLIPConfig):
    """:class:`CLIP` parameter shapes for ``config`` (nothing allocated)."""
    v, t = config.vision, config.text
    return init_template(CLIP(config), jax.ShapeDtypeStruct((1, v.image_size, v.image_size, 3), jnp.float32),
                         jax.ShapeDtypeStruct((1, t.context_length), jnp.int32))


def image_encoder_template(config: CLIPVisionConfig):
    """:class:`CLIPImageEncoder` parameter shapes for ``config`` (nothing allocated)."""
    size = config.image_size
    return init_template(CLIPImageEncoder(config), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def _check_fused(layout: str, fused_qkv: bool, what: str) -> None:
    if fused_qkv != fused_layout("open_clip" if layout == "open_clip" else "hf_clip"):
        raise ValueError(f"layout {layout!r} needs {what} fused_qkv={layout == 'open_clip'}, the config has "
                         f"fused_qkv={fused_qkv} (build it with clip_vit_b32({layout!r}) or "
                         f"for_layout(config, {layout!r}))")


def clip_vision_renames(config: CLIPVisionConfig, layout: str = "open_clip", target: tuple = ()) -> list[Rename]:
    """Image-tower names of a full CLIP checkpoint in ``layout`` (``visual.*``; HF
    ``vision_model.*`` and ``visual_projection.weight``) -> :class:`CLIPImageEncoder` parameters
    under ``target`` (``()``: a standalone image encoder, ``("visual",)`` in :class:`CLIP`)."""
    _check_layout(layout)
    _check_fused(layout, config.fused_qkv, "the image tower")
    if layout == "open_clip":
        renames = [Rename("visual.conv1.weight", target + ("patch_embed", "kernel"), CONV2D),
                   Rename("visual.class_embedding", target + ("cls_token",), IDENTITY),
                   Rename("visual.positional_embedding", target + ("pos_embed",), IDENTITY)]
        renames += norm_renames("visual.ln_pre", target + ("ln_pre",))
        for i in range(config.layers):
            renames += block_renames("open_clip", f"visual.transformer.resblocks.{i}", target + (f"block_{i}",))
        renames += norm_renames("visual.ln_post", target + ("ln_post",))
        return renames + [Rename("visual.proj", target + ("proj", "kernel"), IDENTITY)]
    emb = "vision_model.embeddings"
    renames = [Rename(f"{emb}.patch_embedding.weight", target + ("patch_embed", "kernel"), CONV2D),
               Rename(f"{emb}.class_embedding", target + ("cls_token",), IDENTITY),
               Rename(f"{emb}.position_embedding.weight", target + ("pos_embed",), IDENTITY)]
    renames += norm_renames("vision_model.pre_layrnorm", target + ("ln_pre",))
    for i in range(config.layers):
        renames += block_renames("hf_clip", f"vision_model.encoder.layers.{i}", target + (f"block_{i}",))
    renames += norm_renames("vision_model.post_layernorm", target + ("ln_post",))
    return renames + [Rename("visual_projection.weight", target + ("proj", "kernel"), LINEAR)]


def clip_text_renames(config: CLIPTextConfig, layout: str = "open_clip", target: tuple = ()) -> list[Rename]:
    """Text-tower names of a full CLIP checkpoint in ``layout`` (open_clip: ``token_embedding``,
    ``positional_embedding``, ``transformer.resblocks.{i}``, ``ln_final``, ``text_projection``; HF:
    ``text_model.*``, ``text_projection.weight``) -> :class:`CLIPTextEncoder` parameters under ``target``."""
    _check_layout(layout)
    _check_fused(layout, config.fused_qkv, "the text tower")
    if layout == "open_clip":
        renames = [Rename("token_embedding.weight", target + ("token_embed", "embedding"), IDENTITY),
                   Rename("positional_embedding", target + ("pos_embed",), IDENTITY)]
        for i in range(config.layers):
            renames += block_renames("open_clip", f"transformer.resblocks.{i}", target + (f"block_{i}",))
        renames += norm_renames("ln_final", target + ("ln_final",))
        return renames + [Rename("text_projection", target + ("proj", "kernel"), IDENTITY)]
    emb = "text_model.embeddings"
    renames = [Rename(f"{emb}.token_embedding.weight", target + ("token_embed", "embedding"), IDENTITY),
               Rename(f"{emb}.position_embedding.weight", target + ("pos_embed",), IDENTITY)]
    for i in range(config.layers):
        renames += block_renames("hf_clip", f"text_model.encoder.layers.{i}", target + (f"block_{i}",))
    renames += norm_renames("text_model.final_layer_norm", target + ("ln_final",))
    return renames + [Rename("text_projection.weight", target + ("proj", "kernel"), LINEAR)]


def clip_renames(config: CLIPConfig, layout: str = "open_clip") -> list[Rename]:
    """A full CLIP checkpoint in ``layout`` (``"open_clip"`` or ``"hf"``) -> :class:`CLIP`
    parameters (``visual/...``, ``text/...``, ``logit_scale``)."""
    return (clip_vision_renames(config.vision, layout, ("visual",)) + clip_text_renames(config.text, layout, ("text",))
            + [Rename("logit_scale", ("logit_scale",), IDENTITY)])


# Non-parameter entries older checkpoints carry (HF position-id buffers, open_clip's attn_mask).
_BUFFERS = re.compile(r"(text_model|vision_model)\.embeddings\.position_ids|attn_mask")


def _read_clip_state(path: str) -> dict:
    return {k: v for k, v in read_checkpoint(path).items() if not _BUFFERS.fullmatch(k)}


def load_clip(path: str | os.PathLike, layout: str = "open_clip", config: CLIPConfig | None = None,
              remat: bool = False):
    """CLIP (default ViT-B/32) from a checkpoint file in ``layout`` (safetensors or torch ``.bin``
    / ``.pth`` state dict; OpenAI's TorchScript archives are not state dicts). Returns
    ``(module, params)``; CheckpointMismatchError naming missing / unexpected / mis-shaped names."""
    config = for_layout(CLIPConfig() if config is None else config, layout)
    params = load_into(clip_template(config), _read_clip_state(os.fspath(path)), clip_renames(config, layout),
                       what=f"CLIP ({path})")
    return CLIP(config, remat), jax.device_put(params)


def load_clip_image_encoder(path: str | os.PathLike, layout: str = "open_clip",
                            config: CLIPVisionConfig | None = None, remat: bool = False):
    """The image tower alone (an MTL trunk) from a full CLIP checkpoint file; the text tower's
    entries are ignored. Returns ``(module, params)``."""
    _check_layout(layout)
    config = dataclasses.replace(config or CLIPVisionConfig(), fused_qkv=layout == "open_clip")
    renames = clip_vision_renames(config, layout)
    sources = {r.source for r in renames}
    state = {k: v for k, v in _read_clip_state(os.fspath(path)).items() if k in sources}
    params = load_into(image_encoder_template(config), state, renames, what=f"CLIP image tower ({path})")
    return CLIPImageEncoder(config, remat), jax.device_put(params)


__all__ = ["CLIP", "CLIPConfig", "CLIPImageEncoder", "CLIPTextConfig", "CLIPTextEncoder", "CLIPVisionConfig",
           "CLIP_LAYOUTS", "OPENAI_MEAN", "OPENAI_STD", "clip_renames", "clip_template", "clip_text_renames",
           "clip_tiny", "clip_vision_renames", "clip_vit_b32", "eot_positions", "for_layout", "image_encoder_template",
           "l2_normalize", "load_clip", "load_clip_image_encoder", "zero_shot_head", "zero_shot_logits"]
