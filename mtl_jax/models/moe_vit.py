"""Task-routed mixture-of-experts ViTs: M3ViT and Mod-Squad.

Both are a ViT (patch embedding, pre-LN blocks ``block_{i}``, final LayerNorm, mean-pooled tokens)
whose MLPs in the MoE blocks are sparse top-k mixtures of experts shared by all tasks, routed by a
**per-task router**: task t's tokens take the pathway its router picks, so each task has its own
features after the first MoE block. Routers and heads are task parts::

    shared/patch_embed, shared/pos_embed, shared/block_{i}/..., shared/ln_final
    shared/block_{i}/moe/experts/{w_in, b_in, w_out, b_out}    stacked experts, leaves [E, ...]
    heads/<task>/router/block_{i}                             task t's router for MoE block i [D, E]
    heads/<task>/head/...                                     task t's head

``model.apply(v, x)`` runs every task's pathway at once (a leading task axis, no loop over tasks)
and returns ``{task: prediction}``; ``model.apply(v, x, tasks=('left',))`` is the single-task
forward: only that task's router and head, one pathway. Blocks before the first MoE block are
computed once for all tasks. ``task_mask`` [B, K] (the step passes which examples are labelled for
which task) restricts each task's auxiliary losses to its own examples.

Auxiliary losses (collection ``aux_loss``, added to the objective by ``step.make_forward``): the
Switch load-balancing loss per task and MoE block (``load_balance_weight``), and for Mod-Squad the
task-expert mutual-information loss per MoE block (``mi_weight``). Intermediates: per MoE block
``heads``-order routing counts ``shared/block_{i}/expert_counts`` [K, E] (how many (token, choice)
pairs of each task went to each expert, before capacity drops); ``expert_usage`` reads them and
``extract_task_model`` builds a sub-model holding one task's experts only.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.blocks import PerTask, sow_unless_init
from mtl_jax.models.moe_layers import SparseMoE, load_balancing_loss, sow_aux_loss, task_expert_entropy
from mtl_jax.models.trunks import EncoderBlock, patch_tokens


class Router(nn.Module):
    """One task's routers: a bias-free linear map [D, E_i] per MoE block, parameters ``block_{i}``
    (normal(0.02) init: small, distinct logits, so the initial top-k choices are spread out).
    ``experts``: ((block index, expert count), ...). ``router() -> {f'block_{i}': kernel}``."""

    dim: int
    experts: tuple[tuple[int, int], ...]

    @nn.compact
    def __call__(self):
        return {f"block_{i}": self.param(f"block_{i}", nn.initializers.normal(0.02), (self.dim, num))
                for i, num in self.experts}


class TaskPart(nn.Module):
    """Task t's parameters: ``tower('router')`` -> its routers; ``tower('head', h [B, D], train)`` -> its prediction."""

    head: nn.Module
    dim: int
    experts: tuple[tuple[int, int], ...]

    @nn.compact
    def __call__(self, part: str, h=None, train: bool = False):
        if part == "router":
            return Router(self.dim, self.experts, name="router")()
        return self.head(h, train)


class MoEEncoderBlock(nn.Module):
    """Pre-LN block whose MLP is a task-routed sparse MoE: x + MHSA(LN(x)); x + MoE_t(LN(x)).

    x [K, B, N, D] (task k's stream), routers [K, D, E], task_weights [K, B]. Sows the per-task
    load-balancing loss [K] and (``mi_weight > 0``) the task-expert entropy over the K tasks.
    """

    num_heads: int
    mlp_dim: int
    num_experts: int
    top_k: int
    capacity_factor: float
    capacity_experts: int
    load_balance_weight: float
    mi_weight: float
    dropout: float = 0.0
    expert_mlp_dim: int = 0  # every expert's hidden width; 0 = mlp_dim
    group_size: int = 0  # tokens per routing group; 0 = an example's tokens

    @nn.compact
    def __call__(self, x, routers, task_weights, train: bool = False):
        y = nn.LayerNorm(name="ln_0")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(y, y)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.LayerNorm(name="ln_1")(x)
        logits = jnp.einsum("kbnd,kde->kbne", y, routers.astype(y.dtype))
        moe = SparseMoE(self.num_experts, self.expert_mlp_dim or self.mlp_dim, self.top_k, self.capacity_factor,
                        self.capacity_experts, self.group_size, name="moe")
        y, routing = moe(y, logits)
        sow_unless_init(self, "expert_counts", routing.choices.sum(axis=(1, 2)))
        if self.load_balance_weight:
            sow_aux_loss(self, "load_balance", self.load_balance_weight * load_balancing_loss(
                routing.probs, routing.choices, task_weights, self.top_k))
        if self.mi_weight:
            sow_aux_loss(self, "task_expert_entropy", self.mi_weight * task_expert_entropy(routing.probs, task_weights))
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class TaskRoutedViTTrunk(nn.Module):
    """The shared part: x [B, H, W, C], routers {f'block_{i}': [K, D, E_i]}, task_weights [K, B]
    -> per-task representations [K, B, D]. Fields: those of ``TaskMoEViT``; ``experts``:
    ((MoE block index, expert count), ...)."""

    patch_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    experts: tuple[tuple[int, int], ...]
    top_k: int
    capacity_factor: float
    capacity_experts: int
    load_balance_weight: float
    mi_weight: float
    dropout: float
    expert_mlp_dim: int = 0
    group_size: int = 0

    @nn.compact
    def __call__(self, x, routers, task_weights, train: bool = False):
        c = self
        x = patch_tokens(self, x, c.patch_size, c.dim)
        num_tasks = task_weights.shape[0]
        experts = dict(c.experts)
        for i in range(c.depth):
            if i not in experts:
                x = EncoderBlock(c.num_heads, c.mlp_dim, c.dropout, name=f"block_{i}")(x, train)
                continue
            if x.ndim == 3:  # the first MoE block: from here on every task has its own stream
                x = jnp.broadcast_to(x[None], (num_tasks,) + x.shape)
            block = MoEEncoderBlock(c.num_heads, c.mlp_dim, experts[i], c.top_k, c.capacity_factor,
                                    c.capacity_experts, c.load_balance_weight, c.mi_weight, c.dropout,
                                    c.expert_mlp_dim, c.group_size, name=f"block_{i}")
            x = block(x, routers[f"block_{i}"], task_weights, train)
        if x.ndim == 3:
            x = jnp.broadcast_to(x[None], (num_tasks,) + x.shape)
        return nn.LayerNorm(name="ln_final")(x).mean(axis=2)


class TaskMoEViT(nn.Module):
    """ViT with task-routed sparse MoE MLPs (the common part of M3ViT and Mod-Squad).

    Options: ViT ``patch_size``, ``dim``, ``depth``, ``num_heads``, ``mlp_dim`` (the dense MLPs'
    hidden width, and every expert's unless ``expert_mlp_dim`` > 0: M3ViT's ``moe_mlp_ratio``);
    ``group_size``: tokens per routing group (0: each example's tokens; see ``moe_layers``);
    ``num_experts`` per MoE block, ``top_k`` experts per
    token, ``capacity_factor``; ``moe_every``: blocks i with i % moe_every == moe_every - 1 are MoE
    blocks (2: every other block, starting at block 1; 1: every block); ``load_balance_weight``,
    ``mi_weight``: weights of the auxiliary losses. ``experts_kept`` and ``capacity_experts`` describe
    extracted sub-models (``extract_task_model``): the expert count of each MoE block (in block
    order; empty = ``num_experts`` everywhere) and the full model's count, for the capacity.

    ``__call__(x [B, ...], train, tasks=None, task_mask=None) -> {task: [B, n_t]}``: ``tasks`` runs a
    subset (a single-task forward), ``task_mask`` [B, K] (all tasks, model order; 1 where the example
    is labelled for the task) weighs each task's auxiliary losses (default: every example counts).
    """

    heads: Mapping[str, nn.Module]
    patch_size: int = 4
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    moe_every: int = 2
    load_balance_weight: float = 0.01
    mi_weight: float = 0.0
    dropout: float = 0.0
    experts_kept: Sequence[int] = ()
    capacity_experts: int = 0
    expert_mlp_dim: int = 0
    group_size: int = 0

    def __post_init__(self):
        if self.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1; got {self.moe_every}")
        moe_blocks = self.moe_block_indices()
        if self.experts_kept and len(self.experts_kept) != len(moe_blocks):
            raise ValueError(f"experts_kept has {len(self.experts_kept)} entries for {len(moe_blocks)} MoE blocks "
                             f"{moe_blocks}")
        smallest = min(self.experts_kept or (self.num_experts,))
        if not 1 <= self.top_k <= smallest:
            raise ValueError(f"top_k={self.top_k} must be between 1 and the number of experts per MoE block "
                             f"({smallest})")
        super().__post_init__()

    def moe_block_indices(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.depth) if i % self.moe_every == self.moe_every - 1)

    def experts_per_block(self) -> tuple[tuple[int, int], ...]:
        """((MoE block index, its expert count), ...)."""
        blocks = self.moe_block_indices()
        return tuple(zip(blocks, self.experts_kept or (self.num_experts,) * len(blocks)))

    @nn.compact
    def __call__(self, x, train: bool = False, tasks: Sequence[str] | None = None, task_mask=None):
        names = list(self.heads)
        tasks = tuple(names if tasks is None else tasks)
        unknown = [t for t in tasks if t not in self.heads]
        if unknown or not tasks:
            raise ValueError(f"unknown task(s) {unknown or list(tasks)}; the model's tasks: {names}")
        experts = self.experts_per_block()
        parts = PerTask({t: TaskPart(self.heads[t], self.dim, experts, parent=None) for t in tasks}, name="heads")
        routers = parts({t: ("router",) for t in tasks})
        stacked = {key: jnp.stack([routers[t][key] for t in tasks]) for key in routers[tasks[0]]}
        if task_mask is None:
            weights = jnp.ones((len(tasks), x.shape[0]), jnp.float32)
        else:
            weights = jnp.asarray(task_mask, jnp.float32).T[jnp.array([names.index(t) for t in tasks])]
        trunk = TaskRoutedViTTrunk(self.patch_size, self.dim, self.depth, self.num_heads, self.mlp_dim, experts,
                                   self.top_k, self.capacity_factor, self.capacity_experts or self.num_experts,
                                   self.load_balance_weight, self.mi_weight, self.dropout, self.expert_mlp_dim,
                                   self.group_size, name="shared")
        reps = trunk(x, stacked, weights, train)
        return parts({t: ("head", reps[k], train) for k, t in enumerate(tasks)})


class M3ViT(TaskMoEViT):
    """M3ViT (Liang et al., NeurIPS 2022, "M3ViT: Mixture-of-Experts Vision Transformer for Efficient
    Multi-task Learning with Model-Accelerator Co-design", Sec. 3.1-3.2): MoE MLPs in every other
    block, task-conditioned routing (one router per task: the paper's task-dependent gating), top-k
    experts per token; single-task inference activates that task's pathway only.

    Deviations: no noisy gating; gates are the softmax over the top-k logits; a group (capacity) is
    one example's tokens by default (``group_size`` splits it); no per-layer expert-count search or
    hardware co-design.
    """


class ModSquad(TaskMoEViT):
    """Mod-Squad (Chen et al., CVPR 2023, "Mod-Squad: Designing Mixtures of Experts As Modular
    Multi-Task Learners", Sec. 3): a task-routed MoE ViT trained with the mutual-information loss
    between tasks and experts (``task_expert_entropy``, weight ``mi_weight``) besides load balancing,
    so that each task uses a small set of experts; ``extract_task_model`` then keeps a task's
    experts only. Its follow-up, Chen et al. 2023, "An Efficient General-Purpose Modular Vision Model
    via Multi-Task Heterogeneous Training" (arXiv 2306.17165, a seed paper), trains the same model on
    heterogeneous data, each example labelled for one task: ``datasets.one_task_per_example`` (task
    sampling ratios ``data.task_ratios``), with losses masked by label < 0.

    Deviations: MoE in the MLPs only (the paper also makes attention a mixture of attention
    heads); every block is an MoE block by default; no noisy gating. ``mi_weight`` 1.0 is ours: on
    two-task MultiMNIST (1000 steps) 0.01 and 0.1 left every task on (nearly) every expert, 1.0 split
    the experts between the tasks (experiments/results/moe_inference_flops_mod_squad_mi*.md).
    """

    moe_every: int = 1
    mi_weight: float = 1.0


def expert_usage(model: TaskMoEViT, variables, x, task: str) -> dict[str, np.ndarray]:
    """{f'block_{i}': [E_i] int}: how often ``task``'s router picks each expert (top-k, before
    capacity drops) on the examples ``x`` (a single-task forward)."""
    run = jax.jit(lambda v, inputs: model.apply(v, inputs, tasks=(task,), mutable=["intermediates"])[1])
    shared = run(variables, x)["intermediates"]["shared"]
    return {block: np.asarray(shared[block]["expert_counts"][0][0]).astype(np.int64)
            for block in sorted(shared, key=lambda b: int(b.split("_")[1])) if "expert_counts" in shared[block]}


def kept_experts(usage: Mapping[str, np.ndarray], threshold: float, top_k: int) -> dict[str, np.ndarray]:
    """{block: sorted expert indices}: experts whose share of the task's routing exceeds
    ``threshold`` (0: every expert the task picked at least once), never fewer than ``top_k`` (the
    most used ones)."""
    out = {}
    for block, counts in usage.items():
        share = counts / max(counts.sum(), 1)
        most_used = np.argsort(-counts, kind="stable")[:top_k]
        keep = set(np.flatnonzero(share > threshold).tolist()) | set(most_used.tolist())
        out[block] = np.array(sorted(keep), dtype=np.int64)
    return out


def extract_task_model(model: TaskMoEViT, params, task: str, kept: Mapping[str, np.ndarray]):
    """A standalone single-task model holding only ``kept[block]`` experts of every MoE block
    (Mod-Squad Sec. 3, "extracting a sub-model"; M3ViT's single-task pathway).

    Returns (sub_model, sub_params): the same architecture with ``heads={task: ...}``, fewer
    experts per block and the full model's capacity; task t's router keeps the matching columns.
    Where every token's top-k experts are kept (e.g. ``kept`` from ``expert_usage`` on the same
    inputs with threshold 0) the sub-model routes, drops and combines exactly as the full model.
    """
    blocks = [f"block_{i}" for i in model.moe_block_indices()]
    missing = [b for b in blocks if b not in kept]
    if missing:
        raise ValueError(f"kept experts missing for MoE block(s) {missing}")
    index = {b: jnp.asarray(kept[b]) for b in blocks}
    shared = dict(params["shared"])
    for b in blocks:
        block = dict(shared[b])
        moe = dict(block["moe"])
        moe["experts"] = jax.tree.map(lambda leaf: leaf[index[b]], moe["experts"])
        block["moe"] = moe
        shared[b] = block
    head = dict(params["heads"][task])
    head["router"] = {b: head["router"][b][:, index[b]] for b in blocks}
    sub_model = model.clone(heads={task: model.heads[task]}, experts_kept=tuple(len(kept[b]) for b in blocks),
                            capacity_experts=model.capacity_experts or model.num_experts)
    return sub_model, {"shared": shared, "heads": {task: head}}
