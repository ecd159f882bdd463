"""Task heads: ``head(representation [B, D], train) -> prediction [B, num_outputs]``."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn


class LinearHead(nn.Module):
    num_outputs: int

    @nn.compact
    def __call__(self, h, train: bool = False):
        return nn.Dense(self.num_outputs, name="out")(h)


class MLPHead(nn.Module):
    """``Dense -> relu`` per entry of ``hidden``, then a linear output (MultiMNIST's 50-50-10 head)."""

    num_outputs: int
    hidden: Sequence[int] = (50,)

    @nn.compact
    def __call__(self, h, train: bool = False):
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, name=f"dense_{i}")(h))
        return nn.Dense(self.num_outputs, name="out")(h)


HEADS = {"linear": LinearHead, "mlp": MLPHead}
