"""Hard parameter sharing (Caruana 1993): one shared trunk, one head per task.

Parameter-tree convention every part of mtl_jax relies on (per-task optimisers, gradient methods,
merging)::

    params = {"shared": <trunk params>, "heads": {task_name: <head params>, ...}}

``model.apply({'params': params}, x, train=...)`` returns ``{task_name: prediction}``.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn


class TaskHeads(nn.Module):
    """Applies ``heads[t]`` to the shared representation for every task t; params under ``heads/<t>``."""

    heads: Mapping[str, nn.Module]

    @nn.compact
    def __call__(self, h, train: bool = False):
        return {task: head.clone(parent=self, name=task)(h, train) for task, head in self.heads.items()}


class HardParameterSharing(nn.Module):
    trunk: nn.Module
    heads: Mapping[str, nn.Module]

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = self.trunk.clone(parent=self, name="shared")(x, train)
        return TaskHeads(self.heads, name="heads")(h, train)
