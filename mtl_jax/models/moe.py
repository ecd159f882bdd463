"""Mixture-of-experts MTL architectures: MMoE, CGC, PLE and DSelect-k (LibMTL's semantics).

Every expert is a copy of a trunk encoder (``trunks.TRUNKS``; PLE needs a staged trunk,
``staged.STAGED_TRUNKS``). Gates read the flattened input (uint8 scaled to [0, 1]) as in LibMTL.
Parameter tree::

    shared/...                  experts shared by all tasks (stacked: leaves [E, ...])
    heads/<task>/gate/...       the task's gate
    heads/<task>/experts/...    the task's own experts (CGC; PLE: experts_{level}, gate_{level})
    heads/<task>/head/...       the task's head

Gate weights are recorded as ``intermediates`` (``heads/<task>/gate_weights``, PLE:
``gate_weights_{level}``): ``apply(..., mutable=['intermediates'])`` returns them.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.blocks import PerTask, flat_input, mix, sow_unless_init, stacked


class SoftmaxGate(nn.Module):
    """``softmax(Dense(h))``: h [B, P] -> expert weights [B, num_experts] (MMoE, Ma et al. 2018, Eq. 5)."""

    num_experts: int

    @nn.compact
    def __call__(self, h):
        return jax.nn.softmax(nn.Dense(self.num_experts, name="dense")(h), axis=-1)


def smooth_step(t, gamma: float = 1.0):
    """The smooth-step of DSelect-k (Hazimeh et al. 2021, Eq. 2): 0 for t <= -gamma/2, 1 for
    t >= gamma/2, and the cubic -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 between (C^1, monotone)."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def binary_codes(num_experts: int) -> np.ndarray:
    """bool [E, ceil(log2 E)]: row e is the binary representation of e, most significant bit first."""
    width = max(1, math.ceil(math.log2(num_experts)))
    return np.array([[c == "1" for c in np.binary_repr(e, width=width)] for e in range(num_experts)], bool)


def dselect_k_weights(z_logits, w_logits, num_experts: int, gamma: float = 1.0):
    """DSelect-k expert weights (Hazimeh et al. 2021, Sec. 3, Eqs. 3-5).

    z_logits [B, k, m] (m = ceil(log2 E)): each of the k selectors maps its m binary variables
    through ``smooth_step`` and puts weight prod_i (z_i if code_e[i] else 1 - z_i) on expert e;
    w_logits [B, k]: softmax weights of the k selectors. Returns [B, E], rows summing to 1. When
    the smooth-steps saturate each selector is one-hot, so at most k experts are non-zero.

    When E is not a power of two some codes name no expert; LibMTL then adds a penalty
    ``sum 1 / selector_sum`` to the loss; here every selector is divided by its sum instead (the
    model returns predictions only), which keeps the rows summing to 1.
    """
    codes = jnp.asarray(binary_codes(num_experts))  # [E, m]
    z = smooth_step(z_logits, gamma)[:, :, None, :]  # [B, k, 1, m]
    selectors = jnp.where(codes[None, None], z, 1.0 - z).prod(-1)  # [B, k, E]
    if num_experts != 2 ** codes.shape[1]:
        selectors = selectors / jnp.maximum(selectors.sum(-1, keepdims=True), 1e-6)
    return jnp.einsum("bk,bke->be", jax.nn.softmax(w_logits, axis=-1), selectors)


def _uniform(scale: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -scale, scale)


class DSelectKGate(nn.Module):
    """Per-example DSelect-k gate (Hazimeh et al. 2021, Sec. 3.2; LibMTL ``DSelect_k``):
    h [B, P] -> expert weights [B, E] with at most ``num_nonzeros`` non-zero at convergence.

    Initialisation as the official code: z-logit layer U(-gamma/100, gamma/100), selector-weight
    layer U(-0.05, 0.05). ``kgamma`` is also the smooth-step's gamma (the official code's
    semantics; LibMTL calls the smooth-step with gamma=1, identical at the default kgamma=1).
    """

    num_experts: int
    num_nonzeros: int = 2
    kgamma: float = 1.0

    @nn.compact
    def __call__(self, h):
        m = binary_codes(self.num_experts).shape[1]
        z_init = _uniform(self.kgamma / 100)
        z = nn.Dense(self.num_nonzeros * m, kernel_init=z_init, bias_init=z_init, name="z_logits")(h)
        w = nn.Dense(self.num_nonzeros, kernel_init=_uniform(0.05), bias_init=_uniform(0.05), name="w_logits")(h)
        return dselect_k_weights(z.reshape(h.shape[0], self.num_nonzeros, m), w, self.num_experts, self.kgamma)


class ExpertTower(nn.Module):
    """A task's part of MMoE / CGC / DSelect-k: its own experts (``num_specific`` copies of
    ``expert``, none for MMoE), its gate over [shared experts; own experts], its head.

    x [B, ...], shared_reps [E_s, B, D] -> prediction [B, num_outputs].
    """

    head: nn.Module
    gate: nn.Module
    expert: nn.Module
    num_specific: int = 0

    @nn.compact
    def __call__(self, x, shared_reps, train: bool = False):
        reps = shared_reps
        if self.num_specific:
            own = stacked(self.expert, self.num_specific, "experts")(x, train)
            reps = jnp.concatenate([shared_reps, own.astype(shared_reps.dtype)], axis=0)
        weights = self.gate(flat_input(x))
        sow_unless_init(self, "gate_weights", weights)
        return self.head(mix(reps, weights), train)


def _per_task_counts(counts, tasks: Sequence[str]) -> dict:
    """An int (the same for every task) or one int per task (task order) -> {task: int}."""
    if isinstance(counts, int):
        return {t: counts for t in tasks}
    if len(counts) != len(tasks):
        raise ValueError(f"num_specific_experts has {len(counts)} entries for {len(tasks)} tasks {list(tasks)}")
    return dict(zip(tasks, (int(c) for c in counts)))


def _experts_towers(module, gates: Mapping[str, nn.Module], specific: Mapping[str, int], x, train):
    """Shared experts under ``shared``, one ExpertTower per task under ``heads/<task>``."""
    shared_reps = stacked(module.expert, module.num_shared, "shared")(x, train)
    towers = {t: ExpertTower(head=h, gate=gates[t], expert=module.expert, num_specific=specific[t], parent=None)
              for t, h in module.heads.items()}
    return PerTask(towers, name="heads")({t: (x, shared_reps, train) for t in towers})


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts (Ma et al. 2018, KDD, Sec. 4.2, Eqs. 4-5).

    ``num_experts`` shared copies of the trunk ``expert``; task t's prediction is
    head_t(sum_e g_t(x)_e f_e(x)) with g_t = softmax(W_t flatten(x)). x [B, ...] -> {task: [B, n_t]}.
    """

    expert: nn.Module
    heads: Mapping[str, nn.Module]
    num_experts: int = 4

    @property
    def num_shared(self) -> int:
        return self.num_experts

    @nn.compact
    def __call__(self, x, train: bool = False):
        gates = {t: SoftmaxGate(self.num_experts, parent=None) for t in self.heads}
        return _experts_towers(self, gates, {t: 0 for t in self.heads}, x, train)


class CGC(nn.Module):
    """Customized Gate Control (Tang et al. 2020, RecSys, Sec. 4.1, Eqs. 1-3): ``num_shared_experts``
    shared experts plus ``num_specific_experts`` (an int, or one per task) experts of each task;
    task t's gate mixes the shared and its own experts. x [B, ...] -> {task: [B, n_t]}.
    """

    expert: nn.Module
    heads: Mapping[str, nn.Module]
    num_shared_experts: int = 1
    num_specific_experts: int | Sequence[int] = 1

    @property
    def num_shared(self) -> int:
        return self.num_shared_experts

    @nn.compact
    def __call__(self, x, train: bool = False):
        specific = _per_task_counts(self.num_specific_experts, list(self.heads))
        gates = {t: SoftmaxGate(self.num_shared_experts + specific[t], parent=None) for t in self.heads}
        return _experts_towers(self, gates, specific, x, train)


class DSelectK(nn.Module):
    """MMoE with DSelect-k gates (Hazimeh et al. 2021, NeurIPS, Sec. 3-4; LibMTL ``DSelect_k``):
    each task selects at most ``num_nonzeros`` of the ``num_experts`` shared experts through
    differentiable binary encodings; ``kgamma`` scales the smooth-step. x [B, ...] -> {task: [B, n_t]}.

    LibMTL's entropy regulariser on the selectors (weight 1e-6) is not included: the model returns
    predictions only.
    """

    expert: nn.Module
    heads: Mapping[str, nn.Module]
    num_experts: int = 4
    num_nonzeros: int = 2
    kgamma: float = 1.0

    @property
    def num_shared(self) -> int:
        return self.num_experts

    @nn.compact
    def __call__(self, x, train: bool = False):
        gates = {t: DSelectKGate(self.num_experts, self.num_nonzeros, self.kgamma, parent=None) for t in self.heads}
        return _experts_towers(self, gates, {t: 0 for t in self.heads}, x, train)


class PLETower(nn.Module):
    """Task t's part of PLE at one level: its own experts at that stage (``experts_{level}``), its
    gate (``gate_{level}``) over [shared experts; own experts] reading the task's stream, and at
    the last level its head. x [B, ...] (the task's stream), shared_reps [E_s, B, ...]."""

    head: nn.Module
    expert: nn.Module  # a staged trunk
    num_shared: int
    num_specific: int

    @nn.compact
    def __call__(self, level: int, x, shared_reps, train: bool = False):
        stages = self.expert.stages()
        reps = shared_reps
        if self.num_specific:
            own = stacked(stages[level], self.num_specific, f"experts_{level}")(x, train)
            reps = jnp.concatenate([shared_reps, own.astype(shared_reps.dtype)], axis=0)
        weights = SoftmaxGate(self.num_shared + self.num_specific, name=f"gate_{level}")(flat_input(x))
        sow_unless_init(self, f"gate_weights_{level}", weights)
        out = mix(reps, weights)
        return self.head(out, train) if level == len(stages) - 1 else out


class PLEShared(nn.Module):
    """The shared experts of PLE, stage by stage: ``level_{i}`` holds stage i of every shared expert."""

    expert: nn.Module  # a staged trunk
    num_shared: int

    @nn.compact
    def __call__(self, level: int, x, train: bool = False):
        return stacked(self.expert.stages()[level], self.num_shared, f"level_{level}")(x, train)


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al. 2020, RecSys, Sec. 4.2), as LibMTL implements it.

    The experts are staged trunks; at every stage (extraction level) and for every task t, stage i
    of the shared experts and of task t's experts reads task t's stream, and task t's gate (on the
    flattened stream) mixes them into the stream of the next level; the last level feeds the head.
    As in LibMTL there is no shared-expert gate: shared experts read each task's stream (the
    paper's variant feeds them a separately gated shared stream). x [B, ...] -> {task: [B, n_t]}.
    """

    expert: nn.Module  # a staged trunk
    heads: Mapping[str, nn.Module]
    num_shared_experts: int = 1
    num_specific_experts: int | Sequence[int] = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        specific = _per_task_counts(self.num_specific_experts, list(self.heads))
        shared = PLEShared(self.expert, self.num_shared_experts, name="shared")
        towers = PerTask({t: PLETower(h, self.expert, self.num_shared_experts, specific[t], parent=None)
                          for t, h in self.heads.items()}, name="heads")
        streams = {t: x for t in self.heads}
        for level in range(len(self.expert.stages())):
            streams = towers({t: (level, s, shared(level, s, train), train) for t, s in streams.items()})
        return streams
