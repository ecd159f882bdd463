"""Staged trunks: a trunk cut into stages, for architectures that act between a trunk's layers.

Cross-stitch, MTAN, LTB and PLE exchange information between tasks after every stage of the
encoder (LibMTL does this with the four ``layer{i}`` blocks of a ResNet). A staged trunk is a
linen module whose ``stages()`` returns its stages as unbound modules, each
``stage(x, train) -> y``; running them in order (``run_stages``) is the trunk::

    stage_0(x [B, ...]) -> ... -> stage_{S-1} -> representation [B, D]

``StagedLeNet`` and ``StagedMLP`` compute the same functions as ``trunks.LeNet`` and
``trunks.MLP`` (their parameters are named per stage instead).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from mtl_jax.models.blocks import as_float


class ConvStage(nn.Module):
    """conv 5x5 VALID -> maxpool 2 -> relu. [B, H, W, C] -> [B, (H-4)/2, (W-4)/2, features]."""

    features: int
    scale_input: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = as_float(x) if self.scale_input else x
        x = nn.Conv(self.features, (5, 5), padding="VALID", name="conv")(x)
        return nn.relu(nn.max_pool(x, (2, 2), (2, 2)))


class DenseStage(nn.Module):
    """flatten -> [dropout] -> dense -> relu. [B, ...] -> [B, features].

    ``dropout_before`` reproduces LeNet (dropout on the flattened convolution output), otherwise
    dropout follows the activation as in ``trunks.MLP``.
    """

    features: int
    dropout: float = 0.0
    dropout_before: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = as_float(x).reshape(x.shape[0], -1)  # as trunks.MLP: uint8 scaled to [0, 1]
        drop = nn.Dropout(self.dropout, deterministic=not train) if self.dropout else (lambda h: h)
        if self.dropout_before:
            x = drop(x)
        x = nn.relu(nn.Dense(self.features, name="dense")(x))
        return x if self.dropout_before else drop(x)


def run_stages(parent: nn.Module, stages: Sequence[nn.Module], x, train: bool, prefix: str = "stage"):
    """Applies ``stages`` in order as children of ``parent`` named ``{prefix}_{i}`` (call inside
    ``parent``'s compact method). Returns the last output."""
    for i, stage in enumerate(stages):
        x = stage.clone(parent=parent, name=f"{prefix}_{i}")(x, train)
    return x


class StagedLeNet(nn.Module):
    """``trunks.LeNet`` (Sener & Koltun 2018) in three stages:
    [B, 28, 28, C] -> [B, 12, 12, 10w] -> [B, 4, 4, 20w] -> [B, 50w]."""

    width: int = 1
    dropout: float = 0.0

    def stages(self) -> tuple:
        return (ConvStage(10 * self.width, scale_input=True, parent=None),
                ConvStage(20 * self.width, parent=None),
                DenseStage(50 * self.width, dropout=self.dropout, dropout_before=True, parent=None))

    @nn.compact
    def __call__(self, x, train: bool = False):
        return run_stages(self, self.stages(), x, train)


class StagedMLP(nn.Module):
    """``trunks.MLP`` with one stage per entry of ``features``: [B, ...] -> [B, features[i]]."""

    features: Sequence[int] = (512, 512)
    dropout: float = 0.0

    def stages(self) -> tuple:
        return tuple(DenseStage(width, dropout=self.dropout, parent=None) for width in self.features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        return run_stages(self, self.stages(), x, train)


STAGED_TRUNKS = {"lenet": StagedLeNet, "mlp": StagedMLP}
