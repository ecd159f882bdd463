"""Shared trunks: ``trunk(x [B, ...], train) -> representation [B, D]``."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from mtl_jax.models.blocks import as_float


class MLP(nn.Module):
    """Flattens the input (uint8 scaled to [0, 1]), then ``Dense -> relu`` per entry of ``features``."""

    features: Sequence[int] = (512, 512)
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = as_float(x.reshape(x.shape[0], -1))
        for i, width in enumerate(self.features):
            x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return x


class LeNet(nn.Module):
    """The MultiMNIST LeNet trunk of Sener & Koltun (2018, MGDA; their ``MultiLeNetR``).

    conv 5x5 (10 ch) -> maxpool 2 -> relu -> conv 5x5 (20 ch) -> maxpool 2 -> relu -> flatten
    (4*4*20 = 320 on 28x28 inputs) -> dense 50 -> relu. ``width`` multiplies every channel / feature count (1 = the papers' model).
    Input [B, 28, 28, C] uint8 or float; uint8 is scaled to [0, 1].
    """

    width: int = 1
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = as_float(x)
        x = nn.Conv(10 * self.width, (5, 5), padding="VALID", name="conv_0")(x)
        x = nn.relu(nn.max_pool(x, (2, 2), (2, 2)))
        x = nn.Conv(20 * self.width, (5, 5), padding="VALID", name="conv_1")(x)
        x = nn.relu(nn.max_pool(x, (2, 2), (2, 2)))
        x = x.reshape(x.shape[0], -1)
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.relu(nn.Dense(50 * self.width, name="dense_0")(x))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)); x + MLP(LN(x)). x [B, N, D]."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.LayerNorm(name="ln_0")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(y, y)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.LayerNorm(name="ln_1")(x)
        y = nn.Dense(self.mlp_dim, name="mlp_in")(y)
        y = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(y))
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


def patch_tokens(module: nn.Module, x, patch_size: int, dim: int):
    """ViT patch embedding + learned position embedding, created as children ``patch_embed`` /
    ``pos_embed`` of ``module`` (call inside its compact method): x [B, H, W, C] (uint8 scaled to
    [0, 1]) -> tokens [B, N, dim] (Dosovitskiy et al. 2021, Eq. 1)."""
    x = as_float(x)
    x = nn.Conv(dim, (patch_size, patch_size), strides=(patch_size, patch_size), padding="VALID",
                name="patch_embed")(x)
    x = x.reshape(x.shape[0], -1, dim)
    return x + module.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], dim))


class ViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al. 2021): patch embedding, learned position
    embedding, ``depth`` pre-LN blocks named ``block_{i}`` (the layer index merging and layer-wise
    methods read), final LayerNorm, mean-pooled tokens -> [B, dim]."""

    patch_size: int = 4
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = patch_tokens(self, x, self.patch_size, self.dim)
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, name=f"block_{i}")(x, train)
        return nn.LayerNorm(name="ln_final")(x).mean(axis=1)


TRUNKS = {"mlp": MLP, "lenet": LeNet, "vit": ViT}
