"""ScaLearn: two-stage multi-task transfer by learning to scale the outputs of source adapters.

Frohmann, Holtermann, Masoudian, Lauscher, Rekabsaz, "ScaLearn: Simple and Highly
Parameter-Efficient Task Transfer by Learning to Scale", arXiv 2310.01217 (2023).

Stage 1 (task learning): one bottleneck adapter per source task on a frozen pretrained trunk
(``ViT(num_adapters=1)``, ``models/adapters.py``). Stage 2 (transfer to a target task): every
source adapter (the target's own included, as in AdapterFusion) sits in every block, frozen, and
only the scales omega and the target's head are trained. Block l emits (the official code's
``ScaLearn`` module with ``residual=True``)

    y_l + sum_k omega_{l,k} * A_{l,k}(y_l),

y_l being the block's feed-forward output. The variants (``VARIANTS``):

  ======================== ============================== ===================================
  name                     omega shape                    transfer params (K sources)
  ======================== ============================== ===================================
  ``scalearn``             [L, K, D]: per layer, feature  L K D
  ``scalearn_uniform``     [L, K, 1]: per layer           L K
  ``scalearn++``           [1, K, D]: shared by layers    K D
  ``scalearn_uniform++``   [1, K, 1]                      K (8 for 8 sources, the abstract's)
  ======================== ============================== ===================================

Defaults are the official code's (``scalearn_2_avg_d03`` and the GLUE script): omega drawn
N(2 / K, 0.001), dropout 0.3 on omega while training (inverted dropout, as ``torch.nn.Dropout``),
AdamW lr 6e-3 with linear decay to 0, no weight decay, and the checkpoint with the best validation
score kept (the paper: 30 epochs with early stopping; here a step budget, validated every
``eval_every`` steps).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.merging.learned import minimise
from mtl_jax.merging.tree import Params, check_compatible, flatten_with_paths
from mtl_jax.registry import lookup

# name -> (one omega shared by all layers, one scale per feature)
VARIANTS = {
    "scalearn": (False, True),
    "scalearn_uniform": (False, False),
    "scalearn++": (True, True),
    "scalearn_uniform++": (True, False),
}
ADAPTER_KEY = "adapters"


class ScaLearnResult(NamedTuple):
    """omega [L or 1, K, D or 1] and head params as kept (best validation score), the training loss
    at every step (float32 (steps,)), and the number of transfer parameters (omega only)."""

    omega: jax.Array
    head: Params
    history: np.ndarray
    num_transfer_params: int


def variant_flags(variant: str) -> tuple[bool, bool]:
    return lookup(VARIANTS, variant, "ScaLearn variant")


def omega_shape(variant: str, depth: int, num_sources: int, dim: int) -> tuple[int, int, int]:
    """Shape of omega for ``variant`` (module table)."""
    shared, per_feature = variant_flags(variant)
    return (1 if shared else depth, num_sources, dim if per_feature else 1)


def init_omega(key: jax.Array, variant: str, depth: int, num_sources: int, dim: int,
               init_scale: float = 2.0, std: float = 1e-3) -> jax.Array:
    """omega ~ N(init_scale / K, std) (the official ``omega_init_type="avg"``, scale 2)."""
    shape = omega_shape(variant, depth, num_sources, dim)
    return init_scale / num_sources + std * jax.random.normal(key, shape, jnp.float32)


def omega_dropout(omega: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout on the scales: each entry zeroed with probability ``rate``, the rest / (1 - rate)."""
    if rate <= 0.0:
        return omega
    keep = jax.random.bernoulli(key, 1.0 - rate, omega.shape)
    return jnp.where(keep, omega / (1.0 - rate), 0.0)


def _is_adapter(path: str) -> bool:
    return f"/{ADAPTER_KEY}/" in f"/{path}"


def stack_source_adapters(sources: Sequence[Params]) -> Params:
    """One trunk tree holding all K source adapters (stage 2's ``ViT(num_adapters=K)`` params).

    ``sources``: K trees of ``ViT(num_adapters=1)`` params trained on K source tasks from the same
    frozen trunk. Adapter leaves (paths containing ``adapters``) are concatenated on their leading
    (adapter) axis in source order; every other leaf must be identical across sources (the frozen
    trunk), else ``ValueError`` names the first differing path.
    """
    if not sources:
        raise ValueError("ScaLearn needs at least one source adapter")
    check_compatible(sources[0], sources[1:], reference_name="sources[0]", other_name="sources")
    flats = [flatten_with_paths(s) for s in sources]
    if not any(_is_adapter(p) for p, _ in flats[0]):
        raise ValueError(f"no '{ADAPTER_KEY}' leaves in the source trees; train them with ViT(num_adapters=1)")
    leaves = []
    for i, (path, first) in enumerate(flats[0]):
        column = [flat[i][1] for flat in flats]
        if _is_adapter(path):
            leaves.append(jnp.concatenate([jnp.asarray(x) for x in column], axis=0))
            continue
        for k, x in enumerate(column[1:], start=1):
            if not np.array_equal(np.asarray(x), np.asarray(first)):
                raise ValueError(f"sources[{k}] differs from sources[0] at '{path}', outside the adapters: "
                                 "ScaLearn composes adapters trained on one frozen trunk")
        leaves.append(first)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(sources[0]), leaves)


def num_transfer_params(omega: jax.Array) -> int:
    return int(math.prod(omega.shape))


def fit_scalearn(
    loss: Callable[..., jax.Array],
    omega0: jax.Array,
    head0: Params,
    *,
    steps: int,
    lr: float = 6e-3,
    dropout: float = 0.3,
    weight_decay: float = 0.0,
    validate: Optional[Callable[[jax.Array, Params], float]] = None,
    eval_every: Optional[int] = None,
    key: Optional[jax.Array] = None,
    args: tuple = (),
) -> ScaLearnResult:
    """Stage 2: train omega and the target head on ``loss(omega, head, step_key) -> scalar``.

    ``loss(omega, head, step_key, *args)`` reads the frozen trunk + stacked adapters and its data
    from ``args`` (traced, not compiled in as constants) or its closure, and samples its batch from
    ``step_key``; it receives omega after :func:`omega_dropout` (a key split off ``step_key``).
    AdamW (``lr`` decayed linearly to 0 over ``steps``, ``weight_decay`` 0) on (omega, head), one
    jitted ``lax.scan``. With ``validate(omega, head) -> score`` (higher is better), evaluated at the
    start and every ``eval_every`` steps, the best-scoring pair is returned (the paper keeps the
    best epoch).
    """
    optimizer = optax.adamw(optax.linear_schedule(lr, 0.0, max(steps, 1)), weight_decay=weight_decay)

    def objective(params, step_key, *args):
        drop_key, batch_key = jax.random.split(step_key)
        omega, head = params
        value = loss(omega_dropout(omega, dropout, drop_key), head, batch_key, *args)
        return jnp.asarray(value, jnp.float32).reshape(())

    check = None if validate is None else (lambda params: validate(*params))
    (omega, head), history = minimise(objective, (jnp.asarray(omega0, jnp.float32), head0), optimizer, steps,
                                      key, args, check, eval_every)
    return ScaLearnResult(omega, head, history, num_transfer_params(omega))
