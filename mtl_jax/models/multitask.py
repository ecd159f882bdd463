"""Hard parameter sharing (Caruana 1993): one shared trunk, one head per task.

Parameter-tree convention every part of mtl_jax relies on (per-task optimisers, gradient methods,
merging)::

    params = {"shared": <trunk params>, "heads": {task_name: <head params>, ...}}

``model.apply({'params': params}, x, train=...)`` returns ``{task_name: prediction}``.

``HardParameterSharing`` also runs its two halves alone, on the same parameter and rng paths as
the whole model (so dropout masks match): ``stage='trunk'`` returns the shared representation
``h``, ``stage='heads'`` takes ``h`` (or ``{task: h_t}``, head t reading its own copy) and returns
the predictions. The train step uses this for per-task gradients at the representation.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn


class TaskHeads(nn.Module):
    """Applies ``heads[t]`` to the shared representation for every task t; params under ``heads/<t>``."""

    heads: Mapping[str, nn.Module]

    @nn.compact
    def __call__(self, h, train: bool = False, per_task: bool = False):
        """``per_task``: ``h`` is ``{task: h_t}`` and head t reads ``h_t``."""
        return {task: head.clone(parent=self, name=task)(h[task] if per_task else h, train)
                for task, head in self.heads.items()}


STAGES = ("all", "trunk", "heads")


class HardParameterSharing(nn.Module):
    trunk: nn.Module
    heads: Mapping[str, nn.Module]

    @nn.compact
    def __call__(self, x, train: bool = False, stage: str = "all", per_task: bool = False):
        """``stage``: 'all' (x -> predictions), 'trunk' (x -> h), 'heads' (x = h, or ``{task: h_t}``
        with ``per_task`` -> predictions)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}'; valid: {list(STAGES)}")
        h = x if stage == "heads" else self.trunk.clone(parent=self, name="shared")(x, train)
        if stage == "trunk":
            return h
        return TaskHeads(self.heads, name="heads")(h, train, per_task=per_task)
