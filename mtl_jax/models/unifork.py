"""UniFork: a Y-shaped Vision Transformer with shared shallow blocks and task-specific deep branches.

Li et al. (2025), "UniFork: Exploring Modality Alignment for Unified Multimodal Understanding and
Generation", method (the Y-shaped architecture; only the abstract was available here, so no
section numbers are given): the shallow layers are shared by every task, where
the tasks' representations agree, and the deeper layers fork into one branch per task, where they
diverge. Here the trunk is ``trunks.ViT`` cut after ``shared_depth`` of its ``depth`` blocks::

    x [B, H, W, C] -> patch + position embedding -> block_0 .. block_{s-1}   (shared)
                   -> task t: block_s .. block_{depth-1} -> LayerNorm -> mean over tokens -> head_t

Parameters (block indices are global, so layer-wise merging rules read the right depth)::

    shared/{patch_embed, pos_embed, block_0 .. block_{s-1}}
    heads/<task>/{block_s .. block_{depth-1}, ln_final, head}

Limits: ``shared_depth = depth`` is hard parameter sharing on the ViT (``shared`` is exactly the
``trunks.ViT`` tree, ``ln_final`` included, and the model computes ``HardParameterSharing(ViT,
heads)``); ``shared_depth = 0`` gives every task its own transformer. Deviation: at
``shared_depth = 0`` the tasks still share the patch and position embedding (the tokenizer, which
UniFork shares too), because the parameter tree needs a non-empty ``shared`` part. UniFork forks a
multimodal language model between understanding and generation; here the same Y shape serves any
set of tasks on an image ViT.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn

from mtl_jax.models.blocks import PerTask
from mtl_jax.models.trunks import EncoderBlock, ViT, patch_tokens


def vit_blocks(vit: ViT, start: int, stop: int, x, train: bool):
    """Blocks ``block_{start} .. block_{stop-1}`` of ``vit`` (children of the calling compact module):
    [B, N, dim] -> [B, N, dim]."""
    for i in range(start, stop):
        x = EncoderBlock(vit.num_heads, vit.mlp_dim, vit.dropout, name=f"block_{i}")(x, train)
    return x


def vit_pool(x):
    """``trunks.ViT``'s output: final LayerNorm (child ``ln_final``) and mean over tokens, [B, N, D] -> [B, D]."""
    return nn.LayerNorm(name="ln_final")(x).mean(axis=1)


class UniForkStem(nn.Module):
    """The shared part: embeddings and the first ``shared_depth`` blocks; when every block is shared
    it also pools (it is then ``trunks.ViT``). x -> [B, N, dim] tokens, or [B, dim]."""

    vit: ViT
    shared_depth: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = vit_blocks(self.vit, 0, self.shared_depth, patch_tokens(self, x, self.vit.patch_size, self.vit.dim), train)
        return vit_pool(x) if self.shared_depth == self.vit.depth else x


class UniForkBranch(nn.Module):
    """Task t's branch: blocks ``shared_depth .. depth-1``, final LayerNorm, mean pool, head.
    h [B, N, dim] tokens (or [B, dim] when nothing is left to fork) -> prediction [B, n_t]."""

    vit: ViT
    shared_depth: int
    head: nn.Module

    @nn.compact
    def __call__(self, h, train: bool = False):
        if self.shared_depth < self.vit.depth:
            h = vit_pool(vit_blocks(self.vit, self.shared_depth, self.vit.depth, h, train))
        return self.head(h, train)


class UniFork(nn.Module):
    """Y-shaped ViT (UniFork, Li et al. 2025). ``encoder``: a ``trunks.ViT`` (its fields set
    the patch size, width, depth, heads, MLP width, dropout); ``shared_depth`` in [0, depth]: how
    many blocks all tasks share. x [B, H, W, C] -> {task: [B, n_t]}."""

    encoder: nn.Module
    heads: Mapping[str, nn.Module]
    shared_depth: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        vit = self.encoder
        if not isinstance(vit, ViT):
            raise ValueError(f"UniFork forks a ViT; got trunk {type(vit).__name__} (set model.trunk='vit')")
        if not 0 <= self.shared_depth <= vit.depth:
            raise ValueError(f"UniFork: shared_depth={self.shared_depth} must lie in [0, depth={vit.depth}]")
        h = UniForkStem(vit, self.shared_depth, name="shared")(x, train)
        branches = {t: UniForkBranch(vit, self.shared_depth, head, parent=None) for t, head in self.heads.items()}
        return PerTask(branches, name="heads")({t: (h, train) for t in branches})
