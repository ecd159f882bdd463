"""Bottleneck adapters, stacked so that K of them run as one einsum, and their scaled composition.

An adapter (Houlsby et al. 2019; Pfeiffer et al. 2021, the placement ScaLearn uses) is a small
residual MLP on a block's feed-forward output y [..., D]:

    A(y) = W_up relu(W_down y + b_down) + b_up,    W_down [D, m], W_up [m, D],  m = D / reduction,

and the block emits y + A(y). With K adapters (one per source task) in the same block, ScaLearn
(Frohmann et al. 2024; its official ``ScaLearn`` module) emits

    y + sum_k omega_k * A_k(y),   omega [K, D] (ScaLearn) or [K, 1] (ScaLearnUniform),

so omega = e_k (one-hot) is source model k and omega = 0 is the frozen model without adapters.
Weights are drawn N(0, 0.02) and biases zero (adapter-transformers' "bert" init).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

ADAPTER_INIT = nn.initializers.normal(0.02)


class StackedAdapters(nn.Module):
    """K bottleneck adapters with stacked parameters: ``down_kernel`` [K, D, m], ``down_bias`` [K, m],
    ``up_kernel`` [K, m, D], ``up_bias`` [K, D]. y [..., D] -> A_k(y) [..., K, D]."""

    num: int
    hidden: int

    @nn.compact
    def __call__(self, y):
        dim = y.shape[-1]
        down_kernel = self.param("down_kernel", ADAPTER_INIT, (self.num, dim, self.hidden))
        down_bias = self.param("down_bias", nn.initializers.zeros, (self.num, self.hidden))
        up_kernel = self.param("up_kernel", ADAPTER_INIT, (self.num, self.hidden, dim))
        up_bias = self.param("up_bias", nn.initializers.zeros, (self.num, dim))
        hidden = nn.relu(jnp.einsum("...d,kdm->...km", y, down_kernel) + down_bias)
        return jnp.einsum("...km,kmd->...kd", hidden, up_kernel) + up_bias


def scaled_sum(outputs, omega):
    """ScaLearn's composition sum_k omega_k * A_k: outputs [..., K, D], omega [K, D] or [K, 1] -> [..., D]."""
    return (outputs * omega).sum(axis=-2)


def adapter_hidden(dim: int, reduction: int) -> int:
    """Bottleneck width m = D / reduction (at least 1), adapter-transformers' ``reduction_factor``."""
    return max(1, dim // reduction)
