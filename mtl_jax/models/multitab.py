"""MultiTab-Net (Sinodinos, Wei & Armanfard 2025, "MultiTab: A Scalable Foundation for Multitask
Learning on Tabular Data", AAAI 2026, Sec. "MultiTab-Net"): a multitask transformer for tabular data.

Every numerical feature j becomes a token ``LayerNorm(x_j w_j + b_j)`` (per-feature linear
embedding + LayerNorm, as the paper embeds numerical features); every task k has a learned task
token. The ``d + t`` tokens go through ``depth`` pre-LN encoder blocks whose inter-feature
attention is the paper's *multitask masked attention*: a task token may not attend to the other
task tokens (``mask_tasks``, the paper's default, against task competition) and, optionally,
feature tokens may not attend to task tokens (``mask_features_to_tasks``, so feature
representations stay task-agnostic). Task k's head reads its own final task token.

Parameter tree (mtl_jax's convention)::

    shared/feature_embed/{kernel, bias} [D, E]   per-feature embedding
    shared/task_tokens/<task> [E]                the task's token (a path naming the task)
    shared/block_{i}/...                         encoder blocks
    heads/<task>/...                             the task's head (HEADS: linear / mlp)

Deviations: numerical features only (the paper also embeds categorical features by lookup);
the optional inter-sample (row) attention of the paper's blocks (SAINT-style attention across
the batch) is left out, so a prediction depends on its own row only (padded evaluation batches
and data-parallel sharding stay exact).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.blocks import PerTask


def multitask_attention_mask(num_features: int, num_tasks: int, mask_tasks: bool = True,
                             mask_features_to_tasks: bool = False) -> np.ndarray:
    """bool [d + t, d + t], ``mask[q, k]`` True where query token q may attend to key token k.

    Tokens are ordered features first (0..d-1), then tasks (d..d+t-1). ``mask_tasks``: task token
    i attends to itself but to no other task token; ``mask_features_to_tasks``: feature tokens do
    not attend to task tokens. Feature-feature and task-to-feature attention are always allowed.
    """
    n = num_features + num_tasks
    mask = np.ones((n, n), bool)
    if mask_tasks:
        mask[num_features:, num_features:] = np.eye(num_tasks, dtype=bool)
    if mask_features_to_tasks:
        mask[:num_features, num_features:] = False
    return mask


class FeatureEmbedding(nn.Module):
    """x [B, D] -> tokens [B, D, E]: ``LayerNorm(x_j * kernel_j + bias_j)`` per feature j."""

    dim: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(1.0), (x.shape[1], self.dim))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[1], self.dim))
        return nn.LayerNorm(name="norm")(x[:, :, None] * kernel + bias)


class MaskedEncoderBlock(nn.Module):
    """Pre-LN block with an attention mask: x + MHA(LN(x), mask); x + MLP(LN(x)). x [B, N, E], mask [N, N]."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, mask, train: bool = False):
        y = nn.LayerNorm(name="ln_0")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(y, y, mask=mask)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.LayerNorm(name="ln_1")(x)
        y = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(y)))
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class MultiTabEncoder(nn.Module):
    """Feature + task tokens through masked encoder blocks: x [B, D] -> final task tokens [B, t, E]."""

    task_names: Sequence[str]
    dim: int = 32
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 64
    dropout: float = 0.0
    mask_tasks: bool = True
    mask_features_to_tasks: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 2:
            raise ValueError(f"MultiTab-Net takes tabular input [batch, num_features]; got shape {tuple(x.shape)} "
                             f"(an image dataset? use an image trunk such as 'hps' with 'lenet' or 'vit')")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"MultiTab-Net embeds numerical features; got dtype {x.dtype} (categorical features "
                             f"are not supported: one-hot or standardise them first)")
        features = FeatureEmbedding(self.dim, name="feature_embed")(x.astype(jnp.float32))
        tokens = TaskTokens(tuple(self.task_names), self.dim, name="task_tokens")()
        h = jnp.concatenate([features, jnp.broadcast_to(tokens, (x.shape[0],) + tokens.shape)], axis=1)
        mask = jnp.asarray(multitask_attention_mask(x.shape[1], len(self.task_names), self.mask_tasks,
                                                    self.mask_features_to_tasks))
        for i in range(self.depth):
            h = MaskedEncoderBlock(self.num_heads, self.mlp_dim, self.dropout, name=f"block_{i}")(h, mask, train)
        return nn.LayerNorm(name="ln_final")(h[:, x.shape[1]:])


class TaskTokens(nn.Module):
    """One learned token per task (parameter ``<task>`` [E]); returns them stacked [t, E] in task order."""

    task_names: Sequence[str]
    dim: int

    @nn.compact
    def __call__(self):
        return jnp.stack([self.param(t, nn.initializers.normal(1.0), (self.dim,)) for t in self.task_names])


class MultiTabNet(nn.Module):
    """``apply(x [B, D]) -> {task: heads[task](final task token [B, E])}``; see the module docstring."""

    encoder: MultiTabEncoder
    heads: Mapping[str, nn.Module]

    @nn.compact
    def __call__(self, x, train: bool = False):
        tokens = self.encoder.clone(parent=self, name="shared")(x, train)
        names = tuple(self.encoder.task_names)
        return PerTask(self.heads, name="heads")({t: (tokens[:, k], train) for k, t in enumerate(names)})


def build_multitab(cfg, tasks: Sequence) -> nn.Module:
    """MODELS['multitab']: ``cfg.arch_kwargs`` are MultiTabEncoder's options (dim, depth, num_heads,
    mlp_dim, dropout, mask_tasks, mask_features_to_tasks); ``cfg.head`` / ``cfg.head_kwargs`` the heads."""
    from mtl_jax.models import _build
    from mtl_jax.models.architectures import _heads, _options

    encoder = _build({"multitab": MultiTabEncoder}, "multitab", _options(cfg, "arch_kwargs"), "model",
                     task_names=tuple(t.name for t in tasks))
    return MultiTabNet(encoder=encoder, heads=_heads(cfg, tasks))
