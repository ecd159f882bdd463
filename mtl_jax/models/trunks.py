"""Shared trunks: ``trunk(x [B, ...], train) -> representation [B, D]``.

Every trunk has ``remat`` (``config.remat``, set by ``mtl_jax.models.build_model``): its repeated
blocks (ViT encoder blocks, MLP layers, LeNet conv stages) run under ``flax.linen.remat``, so their
inner activations are recomputed in the backward pass instead of kept from the forward (only block
inputs are stored). Parameter paths, outputs and gradients are unchanged (to float rounding). Dense
layers inside a remat block are not intercepted by the layer-wise Gramian
(``train/gradients/layerwise.py``): their parameters get explicit gradient rows, still exact.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.adapters import StackedAdapters, scaled_sum
from mtl_jax.models.blocks import as_float


def remat_compiler_options(remat: bool, platform: str | None = None) -> dict:
    """XLA compile options (``jax.jit(..., compiler_options=...)``) under which ``remat`` saves memory
    on ``platform`` (default: the default backend). ``nn.remat`` (``jax.checkpoint``) keeps the
    recomputation apart from the forward with optimisation barriers; XLA:GPU removes them only after
    scheduling, but XLA:CPU removes them (pass 'cse_barrier_expander') before its last CSE passes,
    which merge the recomputation back into the forward: the same memory as without remat (measured,
    value_and_grad of a 4-block ViT, dim 128, 64 tokens, batch 8: 29.4 MB of temporaries with and
    without remat, 9.5 MB with remat and these options). On CPU with ``remat`` this keeps the
    barriers; else ``{}``."""
    platform = jax.default_backend() if platform is None else platform
    return {"xla_disable_hlo_passes": "cse_barrier_expander"} if remat and platform == "cpu" else {}


def maybe_remat(fn: Callable, remat: bool, static_argnums: tuple = ()) -> Callable:
    """``fn(module, x, *static)`` (a function building layers as children of ``module``, called from
    its compact method) under ``nn.remat`` when ``remat``: the children keep their names and paths
    (a lifted function adds no scope). ``static_argnums`` count ``module`` as 0 (Python values: the
    layer index, ``train``)."""
    return nn.remat(fn, static_argnums=static_argnums) if remat else fn


def _mlp_layer(module, x, i: int, train: bool):
    """Layer ``i`` of ``MLP``: ``Dense -> [BatchNorm] -> relu -> [Dropout]``."""
    x = nn.Dense(module.features[i], name=f"dense_{i}")(x)
    if module.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"batch_norm_{i}")(x)
    x = nn.relu(x)
    if module.dropout:
        x = nn.Dropout(module.dropout, deterministic=not train)(x)
    return x


def _lenet_conv(module, x, i: int, features: int):
    """Conv stage ``i`` of ``LeNet``: conv 5x5 VALID -> maxpool 2 -> relu."""
    x = nn.Conv(features, (5, 5), padding="VALID", name=f"conv_{i}")(x)
    return nn.relu(nn.max_pool(x, (2, 2), (2, 2)))


class MLP(nn.Module):
    """Flattens the input (uint8 scaled to [0, 1]), then ``Dense -> relu`` per entry of ``features``
    (``Dense -> BatchNorm -> relu`` with ``batch_norm``: running statistics in the ``batch_stats``
    collection, updated by training forwards, read in evaluation). ``remat``: each layer rematerialised."""

    features: Sequence[int] = (512, 512)
    dropout: float = 0.0
    batch_norm: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = as_float(x.reshape(x.shape[0], -1))
        layer = maybe_remat(_mlp_layer, self.remat, static_argnums=(2, 3))
        for i in range(len(self.features)):
            x = layer(self, x, i, train)
        return x


class LeNet(nn.Module):
    """The MultiMNIST LeNet trunk of Sener & Koltun (2018, MGDA; their ``MultiLeNetR``).

    conv 5x5 (10 ch) -> maxpool 2 -> relu -> conv 5x5 (20 ch) -> maxpool 2 -> relu -> flatten
    (4*4*20 = 320 on 28x28 inputs) -> dense 50 -> relu. ``width`` multiplies every channel / feature count (1 = the papers' model).
    ``channels`` = (conv_0, conv_1, dense_0) sizes overrides them (a channel-pruned LeNet, ``models/pruning.py``).
    Input [B, 28, 28, C] uint8 or float; uint8 is scaled to [0, 1]. ``remat``: each conv stage
    (conv -> pool -> relu) rematerialised (its conv output is recomputed in the backward pass).
    """

    width: int = 1
    dropout: float = 0.0
    channels: Sequence[int] = ()
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        sizes = tuple(self.channels) or (10 * self.width, 20 * self.width, 50 * self.width)
        if len(sizes) != 3:
            raise ValueError(f"LeNet channels must be (conv_0, conv_1, dense_0) sizes, got {self.channels}")
        x = as_float(x)
        conv = maybe_remat(_lenet_conv, self.remat, static_argnums=(2, 3))
        for i in range(2):
            x = conv(self, x, i, sizes[i])
        x = x.reshape(x.shape[0], -1)
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.relu(nn.Dense(sizes[2], name="dense_0")(x))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)); x + MLP(LN(x)). x [B, N, D].

    With ``num_adapters`` = K > 0 the MLP output y gets K bottleneck adapters (``adapters``,
    ``models/adapters.py``) after it, Pfeiffer-style: y + sum_k omega_k * A_k(y), omega [K, D] or
    [K, 1] (ones when not given: one adapter, plain adapter tuning)."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    num_adapters: int = 0
    adapter_hidden: int = 0

    @nn.compact
    def __call__(self, x, train: bool = False, omega=None):
        y = nn.LayerNorm(name="ln_0")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(y, y)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.LayerNorm(name="ln_1")(x)
        y = nn.Dense(self.mlp_dim, name="mlp_in")(y)
        y = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(y))
        if self.num_adapters:
            outputs = StackedAdapters(self.num_adapters, self.adapter_hidden, name="adapters")(y)
            y = y + scaled_sum(outputs, jnp.ones((self.num_adapters, 1)) if omega is None else omega)
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


@functools.lru_cache(maxsize=None)
def remat_block(cls: type, remat: bool) -> type:
    """``cls`` (a block called as ``block(x, train, ...)``) or, with ``remat``, its ``nn.remat``
    version (``train`` static); same fields, names and parameter paths."""
    return nn.remat(cls, static_argnums=(2,)) if remat else cls


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
    methods read), final LayerNorm, mean-pooled tokens -> [B, dim].

    ``num_adapters`` = K > 0 adds K bottleneck adapters of width ``adapter_hidden`` to every block
    (``block_{i}/adapters``; the other parameters keep their paths, so a plain ViT's params fill them);
    ``omega`` [depth or 1, K, dim or 1] scales them (ScaLearn, ``merging/scalearn.py``).

    ``remat``: every block runs under ``nn.remat`` (attention maps and the MLP hidden layer are
    recomputed in the backward pass; a block keeps only its input)."""

    patch_size: int = 4
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    num_adapters: int = 0
    adapter_hidden: int = 4
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, omega=None):
        if omega is not None and (omega.ndim != 3 or omega.shape[0] not in (1, self.depth)
                                  or omega.shape[1] != self.num_adapters or omega.shape[2] not in (1, self.dim)):
            raise ValueError(f"omega has shape {omega.shape}; expected [1 or depth={self.depth}, "
                             f"num_adapters={self.num_adapters}, 1 or dim={self.dim}]")
        x = patch_tokens(self, x, self.patch_size, self.dim)
        block = remat_block(EncoderBlock, self.remat)
        for i in range(self.depth):
            block_omega = None if omega is None else omega[min(i, omega.shape[0] - 1)]
            x = block(self.num_heads, self.mlp_dim, self.dropout, self.num_adapters, self.adapter_hidden,
                      name=f"block_{i}")(x, train, block_omega)
        return nn.LayerNorm(name="ln_final")(x).mean(axis=1)


TRUNKS = {"mlp": MLP, "lenet": LeNet, "vit": ViT}
