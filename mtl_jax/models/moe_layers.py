"""A dense-einsum sparse mixture-of-experts MLP layer and its auxiliary losses.

Routing follows GShard (Lepikhin et al. 2021, Sec. 2.2, Alg. 1) and the Switch Transformer
(Fedus et al. 2022, Sec. 2.1-2.2): every token of a group picks its top-k experts from the router
logits; an expert takes at most ``capacity`` tokens of a group (tokens over capacity are dropped for
that expert: the residual connection carries them), assigned first-come-first-served with every
token's first choice before any token's second choice. Dispatch and combine are one-hot
tensors [G, T, (k,) E, C] applied with einsums (no gathers), so the computation is static-shaped and
the stacked expert weights (leaves [E, ...]) shard over a mesh axis ``expert``: GSPMD turns the
dispatch / combine einsums into the all-to-all of expert parallelism.

A group is one example's tokens (per example and per task in the task-routed ViTs), or a run of
``group_size`` consecutive tokens of it: the output for an example never depends on the other
examples of the batch, so padded evaluation batches, single-task forwards and extracted sub-models
give the same per-example predictions. The one-hot dispatch and combine cost O(T * E * C * D) =
O(capacity_factor * k * T^2 * D) per group of T tokens, quadratic in the group: long token
sequences (a 512x512 image in 16x16 patches has 1024) take smaller groups.

Auxiliary losses: ``load_balancing_loss`` (Switch Eq. 4-6) and ``task_expert_entropy`` (Mod-Squad's
mutual-information loss, Chen et al. 2023). ``sow_aux_loss`` records them in the ``aux_loss``
collection, which ``mtl_jax.train.step.make_forward`` adds to the task losses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

AUX_LOSS = "aux_loss"


def sow_aux_loss(module: nn.Module, name: str, value) -> None:
    """Adds ``value`` to the objective: a [K] vector (one entry per task, task order) is added to
    the task losses, a scalar is split equally over them (see ``step.make_forward``). Skipped during
    ``init`` so that ``init`` returns no collection the trainer would take for model state."""
    if not module.is_initializing():
        module.sow(AUX_LOSS, name, value)


def capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert and group: ceil(capacity_factor * top_k * tokens / num_experts), within
    [1, tokens] (GShard's C = 2N/E for top-2 at factor 1; a token visits an expert at most once)."""
    return max(1, min(tokens, math.ceil(capacity_factor * top_k * tokens / num_experts)))


class Routing(NamedTuple):
    """Top-k routing of G groups of T tokens over E experts with C slots each.

    dispatch [G, T, E, C] (1 where the token occupies slot c of expert e), choice_slots
    [G, T, k, E, C] (the slot of the token's j-th choice; all zero where it was dropped), gates
    [G, T, k], probs [G, T, E] (router softmax), choices [G, T, E] (1 where e is among the
    token's top-k, before capacity drops), kept [G, T, k] (the token's j-th choice got a slot).
    """

    dispatch: jax.Array
    choice_slots: jax.Array
    gates: jax.Array
    probs: jax.Array
    choices: jax.Array
    kept: jax.Array


def top_k_routing(logits, top_k: int, slots: int) -> Routing:
    """Routes tokens by their router logits [G, T, E] (float32 math).

    Gates are the softmax of the token's top-k logits (the top-k router probabilities renormalised
    to sum to 1, GShard Alg. 1): experts outside the top-k do not change them, so a sub-model that
    keeps every expert a task picks computes the same gates. Priority within an expert: choice rank
    first, then token order (GShard's position-in-expert by cumulative sum).
    """
    logits = logits.astype(jnp.float32)
    groups, tokens, num_experts = logits.shape
    top_logits, top_index = jax.lax.top_k(logits, top_k)  # [G, T, k]
    choice = jax.nn.one_hot(top_index, num_experts, dtype=jnp.float32)  # [G, T, k, E]
    rank_major = choice.transpose(0, 2, 1, 3).reshape(groups, top_k * tokens, num_experts)
    position = (jnp.cumsum(rank_major, axis=1) - 1.0).reshape(groups, top_k, tokens, num_experts)
    slot_index = jnp.einsum("gktE,gtkE->gtk", position, choice).astype(jnp.int32)  # [G, T, k]
    slot = jax.nn.one_hot(slot_index, slots, dtype=jnp.float32)  # all-zero rows where over capacity
    choice_slots = jnp.einsum("gtke,gtkc->gtkec", choice, slot)
    return Routing(choice_slots.sum(axis=2), choice_slots, jax.nn.softmax(top_logits, axis=-1),
                   jax.nn.softmax(logits, axis=-1), choice.sum(axis=2), slot_index < slots)


def combine(expert_out, routing: Routing):
    """Expert outputs [E, G, C, D] -> token outputs [G, T, D] = sum_j gate_j * (output of the
    token's j-th choice). Each choice's output is read with its one-hot slot (one non-zero term per
    sum, exact whatever the expert count), then the k gated outputs are added in choice order: a
    sub-model with fewer experts combines bit for bit as the full model."""
    picked = jnp.einsum("egcd,gtkec->gtkd", expert_out, routing.choice_slots.astype(expert_out.dtype))
    return jnp.einsum("gtk,gtkd->gtd", routing.gates.astype(picked.dtype), picked)


def load_balancing_loss(probs, choices, weights, top_k: int):
    """Switch Transformer auxiliary loss (Fedus et al. 2022, Eq. 4-6), per task.

    probs, choices [K, B, T, E]; weights [K, B] (which examples count for task k, e.g. the task's
    labelled examples). f_e = weighted share of the (token, choice) assignments that go to e
    (choices / top_k), P_e = weighted mean router probability; loss_k = E * sum_e f_e P_e, which is
    1 for uniform routing. Returns [K].
    """
    num_experts = probs.shape[-1]
    norm = jnp.maximum(weights.sum(axis=1) * probs.shape[2], 1e-9)[:, None]  # [K, 1] weighted token count
    share = jnp.einsum("kb,kbte->ke", weights, choices) / (top_k * norm)
    mean_prob = jnp.einsum("kb,kbte->ke", weights, probs) / norm
    return num_experts * (share * mean_prob).sum(axis=-1)


def task_expert_entropy(probs, weights):
    """Mod-Squad's mutual-information loss between tasks T and experts E (Chen et al. 2023, Sec. 3,
    "mutual information loss"), written as H(T | E) = H(T) - MI(T; E).

    probs [K, B, T, E] (task k's router probabilities on example b); weights [K, B] (example b
    counts for task k). The joint P(t, e) is the weighted sum of task t's routing probabilities
    over its tokens, normalised over all tasks' tokens (as the official code accumulates it);
    MI = sum_{t,e} P(t,e) log(P(t,e) / (P(t) P(e))). H(T) depends on the task weights only, so the
    gradient is the paper's -MI; the constant keeps the loss >= 0 (0 when every expert serves one
    task), which loss-based MTL methods that take logs of losses need. Returns a scalar.
    """
    joint = jnp.einsum("kb,kbte->ke", weights, probs)
    joint = joint / jnp.maximum(joint.sum(), 1e-9)
    p_task = joint.sum(axis=1, keepdims=True)
    p_expert = joint.sum(axis=0, keepdims=True)
    positive = joint > 0
    ratio = jnp.where(positive, joint, 1.0) / jnp.where(positive, p_task * p_expert, 1.0)
    mutual_information = jnp.sum(jnp.where(positive, joint * jnp.log(ratio), 0.0))
    p_t = p_task[:, 0]
    task_entropy = -jnp.sum(jnp.where(p_t > 0, p_t * jnp.log(jnp.where(p_t > 0, p_t, 1.0)), 0.0))
    return task_entropy - mutual_information


class StackedExperts(nn.Module):
    """E two-layer GELU MLPs D -> hidden -> D, weights stacked on a leading expert axis
    (``w_in`` [E, D, H], ``b_in`` [E, H], ``w_out`` [E, H, D], ``b_out`` [E, D]).
    x [E, G, C, D] (each expert's slots) -> [E, G, C, D]."""

    num_experts: int
    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        w_in = self.param("w_in", init, (self.num_experts, dim, self.hidden_dim))
        b_in = self.param("b_in", nn.initializers.zeros, (self.num_experts, self.hidden_dim))
        w_out = self.param("w_out", init, (self.num_experts, self.hidden_dim, dim))
        b_out = self.param("b_out", nn.initializers.zeros, (self.num_experts, dim))
        h = nn.gelu(jnp.einsum("egcd,edh->egch", x, w_in) + b_in[:, None, None])
        return jnp.einsum("egch,ehd->egcd", h, w_out) + b_out[:, None, None]


class SparseMoE(nn.Module):
    """Top-k sparse mixture-of-experts MLP (dense einsum dispatch, GShard / Switch).

    ``moe(x [..., T, D], logits [..., T, E]) -> (y [..., T, D], Routing)``: the leading dims are the
    groups (flattened); the caller computes the router logits (a task's router in the task-routed
    ViTs). ``capacity_experts`` is the expert count the capacity is computed for (0: this layer's
    ``num_experts``); a sub-model holding some of a model's experts keeps the model's count, so that
    tokens are dropped exactly as in the full model. Experts live under ``experts`` (the path the
    ``expert`` mesh axis shards, ``mtl_jax.train.sharding.EXPERT_PATTERN``). ``group_size`` > 0
    splits the T tokens into groups of that many consecutive tokens (it must divide T), each routed
    with its own capacity (GShard's groups); 0 routes all T tokens as one group.
    """

    num_experts: int
    hidden_dim: int
    top_k: int = 2
    capacity_factor: float = 1.25
    capacity_experts: int = 0
    group_size: int = 0

    @nn.compact
    def __call__(self, x, logits):
        lead, (tokens, dim) = x.shape[:-2], x.shape[-2:]
        if logits.shape[-1] != self.num_experts:
            raise ValueError(f"router logits have {logits.shape[-1]} experts; the layer has {self.num_experts}")
        group = self.group_size or tokens
        if group < 1 or tokens % group:
            raise ValueError(f"group_size={self.group_size} must divide the {tokens} tokens of a group (or be 0)")
        slots = capacity(group, self.capacity_experts or self.num_experts, self.top_k, self.capacity_factor)
        routing = top_k_routing(logits.reshape(-1, group, self.num_experts), self.top_k, slots)
        xg = x.reshape(-1, group, dim)
        expert_in = jnp.einsum("gtd,gtec->egcd", xg, routing.dispatch.astype(x.dtype))
        expert_out = StackedExperts(self.num_experts, self.hidden_dim, name="experts")(expert_in)
        y = combine(expert_out, routing)
        ungroup = lambda a: a.reshape(*lead, tokens, *a.shape[2:])
        return y.reshape(*lead, tokens, dim), jax.tree.map(ungroup, routing)
