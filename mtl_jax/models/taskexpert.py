"""TaskExpert: task-generic experts, per-task dynamic gating, and a multi-task feature memory.

Ye & Xu (ICCV 2023), "TaskExpert: Dynamically Assembling Multi-Task Representations with Memorial
Mixture-of-Experts", method section (Fig. 2: memorial MoE modules at backbone layers reading and
writing a multi-task feature memory; only the abstract and that figure's caption were available
here). After every block l of a ViT backbone (``trunks.ViT``),
a memorial mixture-of-experts module

1. decomposes the backbone tokens X_l [B, N, D] with E expert networks into task-generic features
   F_{l,e} = expert_{l,e}(X_l) (shared by the tasks),
2. reads task t's memory M_{t,l-1} as an extra expert and assembles the task-specific feature
   with task t's gate, computed per token (``gating='token'``) or per sample (``'sample'``, from
   the mean token)::

       g_{t,l} = softmax(W_{t,l} X_l) in R^{E+1}
       T_{t,l} = sum_e g_{t,l,e} F_{l,e} + g_{t,l,E} M_{t,l-1}

3. writes the memory: M_{t,l} = M_{t,l-1} + T_{t,l}, with M_{t,0} = 0.

Task t predicts from its memory after the last block: head_t(mean_tokens(LayerNorm_t(M_{t,L}))).

Parameters::

    shared/{patch_embed, pos_embed, block_{l}, experts_{l}}     backbone and experts (leaves [E, ...])
    heads/<task>/{gate_{l}, ln_final, head}

Intermediates (``apply(..., mutable=['intermediates'])``): ``heads/<task>/gate_weights_{l}``
([B, N, E+1] or [B, E+1]), ``task_feature_{l}`` and ``memory_{l}`` ([B, N, D]).

Deviations, the paper's equations not being available here: the memory write is the residual
accumulation above and the memory starts at zero (so it contributes nothing at the first
layer); the paper inserts its modules after a few chosen layers of a large ViT and decodes dense
predictions, here one module follows every block and the heads classify pooled tokens; experts
are two-layer MLPs (``expert_dim`` hidden units, GELU).
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.blocks import PerTask, sow_unless_init, stacked
from mtl_jax.models.trunks import ViT, patch_tokens
from mtl_jax.models.unifork import vit_blocks
from mtl_jax.registry import lookup


class ExpertMLP(nn.Module):
    """One expert network: Dense(hidden) -> GELU -> Dense(out). [..., D] -> [..., out]."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.out, name="out")(nn.gelu(nn.Dense(self.hidden, name="hidden")(x)))


# How a gate reads the backbone tokens X [B, N, D]: per token, or once per sample (mean token).
GATE_INPUTS = {"token": lambda x: x, "sample": lambda x: x.mean(axis=1)}


def assemble(gates, experts, memory):
    """T = sum_e g_e F_e + g_E M (step 2 above).

    gates [B, N, E+1] (per token) or [B, E+1] (per sample); experts [E, B, N, D]; memory [B, N, D].
    Returns [B, N, D].
    """
    candidates = jnp.concatenate([experts, memory[None].astype(experts.dtype)], axis=0)  # [E+1, B, N, D]
    gates = gates if gates.ndim == 3 else gates[:, None, :]
    return jnp.einsum("bne,ebnd->bnd", gates.astype(candidates.dtype), candidates)


class TaskExpertTower(nn.Module):
    """Task t at layer ``level``: gate over [experts; memory], assembled feature, memory write; at
    ``level = None`` the prediction from the memory. Returns (task feature, new memory) or [B, n_t]."""

    head: nn.Module
    gating: str = "token"

    @nn.compact
    def __call__(self, level, tokens, experts, memory, train: bool = False):
        if level is None:
            return self.head(nn.LayerNorm(name="ln_final")(memory).mean(axis=1), train)
        gate_input = lookup(GATE_INPUTS, self.gating, "TaskExpert gating")(tokens)
        gates = jax.nn.softmax(nn.Dense(experts.shape[0] + 1, name=f"gate_{level}")(gate_input), axis=-1)
        feature = assemble(gates, experts, memory)
        memory = memory + feature
        sow_unless_init(self, f"gate_weights_{level}", gates)
        sow_unless_init(self, f"task_feature_{level}", feature)
        sow_unless_init(self, f"memory_{level}", memory)
        return feature, memory


class TaskExpertBackbone(nn.Module):
    """The shared part, layer by layer: ``level = -1`` embeds the input; ``level = l`` runs block l and
    its experts: tokens [B, N, D] -> (tokens, expert features [E, B, N, D])."""

    vit: ViT
    num_experts: int
    expert_dim: int

    @nn.compact
    def __call__(self, level: int, x, train: bool = False):
        if level < 0:
            return patch_tokens(self, x, self.vit.patch_size, self.vit.dim)
        tokens = vit_blocks(self.vit, level, level + 1, x, train)
        experts = stacked(ExpertMLP(self.expert_dim, self.vit.dim, parent=None), self.num_experts, f"experts_{level}")
        return tokens, experts(tokens, train)


class TaskExpert(nn.Module):
    """TaskExpert (Ye & Xu, ICCV 2023) on a ``trunks.ViT`` backbone (``encoder``).
    x [B, H, W, C] -> {task: [B, n_t]}. ``gating``: 'token' (per-token gates, the paper's dense
    case) or 'sample'."""

    encoder: nn.Module
    heads: Mapping[str, nn.Module]
    num_experts: int = 4
    expert_dim: int = 64
    gating: str = "token"

    @nn.compact
    def __call__(self, x, train: bool = False):
        vit = self.encoder
        if not isinstance(vit, ViT):
            raise ValueError(f"TaskExpert needs a ViT backbone; got trunk {type(vit).__name__} (set model.trunk='vit')")
        lookup(GATE_INPUTS, self.gating, "TaskExpert gating")
        backbone = TaskExpertBackbone(vit, self.num_experts, self.expert_dim, name="shared")
        towers = PerTask({t: TaskExpertTower(h, self.gating, parent=None) for t, h in self.heads.items()},
                         name="heads")
        tokens = backbone(-1, x, train)
        memory = {t: jnp.zeros_like(tokens) for t in self.heads}
        for level in range(vit.depth):
            tokens, experts = backbone(level, tokens, train)
            out = towers({t: (level, tokens, experts, memory[t], train) for t in memory})
            memory = {t: new for t, (_, new) in out.items()}
        return towers({t: (None, tokens, None, memory[t], train) for t in memory})
