"""Multi-Task Attention Network (Liu, Johns & Davison 2019, CVPR, Sec. 3; LibMTL ``MTAN``).

A shared staged trunk computes features h_0 .. h_{S-1}; every task owns one soft attention module
per stage. At stage i task t computes the mask

    m_{t,i} = sigmoid(W2 relu(W1 [h_i ; b_{i-1}(a_{t,i-1})]))   (just h_0 at stage 0)

(1x1 convolutions: dense layers over the channel axis) and its attended features
a_{t,i} = m_{t,i} * h_i; b_{i-1}, shared by the tasks, maps a_{t,i-1} to the shape of h_i and is
a fresh copy of trunk stage i (LibMTL: a ResNet block plus down-sampling; the paper: a 3x3
convolution plus pooling). a_{t,S-1} [B, D] feeds head t. The paper computes the mask from the
first layer of a block and applies it to the block's output; our stages are single layers, so the
mask reads and multiplies the stage output. LibMTL's attention modules end in BatchNorm; these
have none.

Parameters::

    shared/stage_{i}/...            the trunk
    shared/block_att_{i}/...        b_i, shared by the tasks
    heads/<task>/attention_{i}/...  task t's attention module at stage i
    heads/<task>/head/...

Masks are recorded as ``intermediates`` ``heads/<task>/mask_{i}`` (same shape as h_i).
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp

from mtl_jax.models.blocks import PerTask, sow_unless_init


class AttentionMask(nn.Module):
    """[..., C_in] -> mask [..., features] in (0, 1): Dense(features) -> relu -> Dense(features) ->
    sigmoid (LibMTL ``_att_layer`` with intermediate width = output width, without BatchNorm)."""

    features: int

    @nn.compact
    def __call__(self, h):
        h = nn.relu(nn.Dense(self.features, name="hidden")(h))
        return nn.sigmoid(nn.Dense(self.features, name="out")(h))


class MTANTower(nn.Module):
    """Task t at stage ``level``: mask from [h ; previous attended features] -> m * h; at the last
    stage the head's prediction instead. h [B, ..., C], prev [B, ..., C'] or None."""

    head: nn.Module
    num_stages: int

    @nn.compact
    def __call__(self, level: int, h, prev, train: bool = False):
        inputs = h if prev is None else jnp.concatenate([h, prev.astype(h.dtype)], axis=-1)
        mask = AttentionMask(h.shape[-1], name=f"attention_{level}")(inputs)
        sow_unless_init(self, f"mask_{level}", mask)
        attended = mask * h
        return self.head(attended, train) if level == self.num_stages - 1 else attended


class MTANShared(nn.Module):
    """The shared trunk stage ``level`` (``stage_{level}``) or, with ``block=True``, the shared
    block b_{level-1} (``block_att_{level-1}``: a fresh copy of stage ``level``)."""

    encoder: nn.Module  # a staged trunk (staged.STAGED_TRUNKS)

    @nn.compact
    def __call__(self, level: int, x, train: bool = False, block: bool = False):
        name = f"block_att_{level - 1}" if block else f"stage_{level}"
        return self.encoder.stages()[level].clone(parent=self, name=name)(x, train)


class MTAN(nn.Module):
    """MTAN over a staged trunk (see the module docstring). x [B, ...] -> {task: [B, n_t]}."""

    encoder: nn.Module  # a staged trunk (staged.STAGED_TRUNKS)
    heads: Mapping[str, nn.Module]

    @nn.compact
    def __call__(self, x, train: bool = False):
        num_stages = len(self.encoder.stages())
        shared = MTANShared(self.encoder, name="shared")
        towers = PerTask({t: MTANTower(h, num_stages, parent=None) for t, h in self.heads.items()}, name="heads")
        prev = {t: None for t in self.heads}
        for level in range(num_stages):
            x = shared(level, x, train)
            out = towers({t: (level, x, prev[t], train) for t in self.heads})
            if level < num_stages - 1:
                prev = {t: shared(level + 1, a, train, block=True) for t, a in out.items()}
        return out
