"""Hard parameter sharing (Caruana 1993): one shared trunk, one head per task.

Parameter-tree convention every part of mtl_jax relies on (per-task optimisers, gradient methods,
merging)::

    params = {"shared": <trunk params>, "heads": {task_name: <head params>, ...}}

``model.apply({'params': params}, x, train=...)`` returns ``{task_name: prediction}``.

``HardParameterSharing`` also runs its two halves alone, on the same parameter and rng paths as
the whole model (so dropout masks match): ``stage='trunk'`` returns the shared representation
``h``, ``stage='heads'`` takes ``h`` (or ``{task: h_t}``, head t reading its own copy) and returns
the predictions. The train step uses this for per-task gradients at the representation.

``targets`` ({task: label batch}, given by the training forward only) go to the heads whose
``__call__`` takes ``depth_target`` (AiT's soft-token depth head, ``models/ait.py``: its token loss).
"""

from __future__ import annotations

import inspect
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.heads import LinearHead, MLPHead


STACKABLE_HEADS = (LinearHead, MLPHead)  # stateless, no rng: one vmapped apply computes them all
# Two heads run unstacked: stacking two is no faster at benchmarks/method_step_time.py's sizes, and
# unstacked two-task runs keep the summation order of the per-head matmuls.
MIN_STACKED_HEADS = 3


def stackable(heads: Mapping[str, nn.Module]) -> bool:
    """Whether ``heads`` are ``MIN_STACKED_HEADS`` or more copies of one ``STACKABLE_HEADS`` configuration."""
    configs = [head.clone(parent=None, name=None) for head in heads.values()]  # fields without the path
    return (len(configs) >= MIN_STACKED_HEADS and type(configs[0]) in STACKABLE_HEADS
            and all(c == configs[0] for c in configs))


def takes_depth_target(head: nn.Module) -> bool:
    """Whether ``head``'s ``__call__`` takes the task's label as ``depth_target`` (AiT's token loss)."""
    return "depth_target" in inspect.signature(type(head).__call__).parameters


class TaskHeads(nn.Module):
    """Applies ``heads[t]`` to the shared representation for every task t; params under ``heads/<t>``.

    When the heads are copies of one stateless head (``stackable``), apply (not init) stacks their
    params on a leading task axis and runs one ``jax.vmap`` of that head: per head layer one
    matmul for all K tasks ([B, D] x [D, K C] on the shared input, batched over tasks after it)
    instead of K small ones, and the same in the backward pass, on the same per-task parameter tree.
    Init creates each head on its own path, so parameters are those of the unstacked heads.
    """

    heads: Mapping[str, nn.Module]

    @nn.compact
    def __call__(self, h, train: bool = False, per_task: bool = False, targets: Mapping | None = None):
        """``per_task``: ``h`` is ``{task: h_t}`` and head t reads ``h_t``. ``targets``: {task: label};
        a head that takes ``depth_target`` (``takes_depth_target``) gets its task's label (stacked heads
        take none)."""
        names = list(self.heads)
        params = {} if self.is_initializing() else self.variables.get("params", {})
        if stackable(self.heads) and all(t in params for t in names):
            head = self.heads[names[0]].clone(parent=None, name=None)
            stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[t] for t in names])
            inputs = jax.tree.map(lambda *xs: jnp.stack(xs), *[h[t] for t in names]) if per_task else h
            apply = lambda p, x: head.apply({"params": p}, x, train)
            out = jax.vmap(apply, in_axes=(0, 0 if per_task else None))(stacked, inputs)
            return {t: out[k] for k, t in enumerate(names)}
        targets = targets or {}

        def labels(task, head):
            return {"depth_target": targets[task]} if task in targets and takes_depth_target(head) else {}

        return {task: head.clone(parent=self, name=task)(h[task] if per_task else h, train, **labels(task, head))
                for task, head in self.heads.items()}


STAGES = ("all", "trunk", "heads")


class HardParameterSharing(nn.Module):
    trunk: nn.Module
    heads: Mapping[str, nn.Module]

    @nn.compact
    def __call__(self, x, train: bool = False, stage: str = "all", per_task: bool = False,
                 targets: Mapping | None = None):
        """``stage``: 'all' (x -> predictions), 'trunk' (x -> h), 'heads' (x = h, or ``{task: h_t}``
        with ``per_task`` -> predictions). ``targets``: {task: label batch}, handed to the heads
        (``TaskHeads``)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}'; valid: {list(STAGES)}")
        h = x if stage == "heads" else self.trunk.clone(parent=self, name="shared")(x, train)
        if stage == "trunk":
            return h
        return TaskHeads(self.heads, name="heads")(h, train, per_task=per_task, targets=targets)
