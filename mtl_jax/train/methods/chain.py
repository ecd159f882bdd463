"""``chain(weighting, aggregator)``: a loss weighting composed with a gradient method, in the spirit
of ``optax.chain``.

Contract (K tasks, per-task losses ``L_k`` and shared-parameter gradients ``g_k``):

1. the weighting (``needs=Needs.LOSSES``, ``weights_heads=True``) sees the step's inputs and returns
   ``w1 [K]``, the scales of the task losses;
2. the aggregator is applied to the *scaled* losses ``w1_k L_k``, whose gradients are ``w1_k g_k``:
   it sees the losses ``w1 * L``, the Gramian ``diag(w1) G diag(w1)``, the Jacobian rows
   ``w1_k g_k`` (and ``last_shared_gramian`` / ``cross_gramian`` / ``updated_losses`` scaled the
   same way) and returns ``w2 [K]`` or a direction ``d [P]``;
3. the shared update is ``sum_k w2_k (w1_k g_k)``, returned as weights ``w = w1 * w2`` on the raw
   gradients (or ``d`` itself);
4. heads follow the aggregator's rule on the scaled losses: head k gets the gradient of
   ``w1_k L_k`` for a gradient method (``Method.head_weights`` = ``w1``, read through
   ``base.head_scales``), of ``w2_k w1_k L_k`` for a loss weighting (``weights_heads=True``).

State: ``ChainState(weighting, aggregator, scales)``, the two methods' states and the ``w1`` of the
last update (the heads' scales, and the scale of ``after_update``'s losses). ``needs`` is the
aggregator's, ``wants`` the union, ``after_update`` runs whichever of the two has one.

IMTL (Liu et al., ICLR 2021, "Towards Impartial Multi-task Learning", Sec. 3.3 / Alg. 1) is
``chain(imtl_l, imtl_g)``: IMTL-L's scaled losses ``e^{s_k} L_k - s_k`` (network gradient
``e^{s_k} g_k``), IMTL-G's closed-form weights ``alpha`` (Eq. 9) from the gradients of the scaled
losses, the shared update ``sum_k alpha_k e^{s_k} g_k``, the heads trained on the scaled losses.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.train.methods import aggregation, weighting as weighting_lib
from mtl_jax.train.methods.base import Method, MethodInputs, Needs, PyTree, returns_direction


class ChainState(NamedTuple):
    """``chain``'s state: the weighting's and the aggregator's states and ``scales`` [K], the ``w1``
    of the last update."""

    weighting: PyTree
    aggregator: PyTree
    scales: jax.Array


def scale_inputs(inputs: MethodInputs, scales: jax.Array) -> MethodInputs:
    """The ``MethodInputs`` of the scaled losses ``scales_k L_k``: losses (and ``updated_losses``)
    times ``scales``, Jacobian rows ``scales_k g_k``, every Gramian ``diag(scales) G diag(scales)``."""
    rows = lambda x: None if x is None else x * scales.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    both = lambda g: None if g is None else g * (scales[:, None] * scales[None, :]).astype(g.dtype)
    return inputs.replace(losses=rows(inputs.losses), updated_losses=rows(inputs.updated_losses),
                          jacobian=rows(inputs.jacobian), gramian=both(inputs.gramian),
                          last_shared_gramian=both(inputs.last_shared_gramian),
                          cross_gramian=both(inputs.cross_gramian))


def _init(method: Method, num_tasks: int, num_params: int | None):
    if method.per_parameter_state and num_params is not None:
        return method.init(num_tasks, num_params=num_params)
    return method.init(num_tasks)


def chain(weighting: Method, aggregator: Method, name: str | None = None) -> Method:
    """The aggregator applied to the losses scaled by the weighting (module docstring).

    Args:
      weighting: a loss-weighting method (``needs=Needs.LOSSES``, ``weights_heads=True``: EW, UW,
        DWA, RLW, GLS, IMTL-L, FAMO, STCH, GradNorm).
      aggregator: any method; typically a gradient method (MGDA, PCGrad, IMTL-G, ..., MoCo).
      name: the chained method's name (default ``'chain(<weighting>,<aggregator>)'``).

    Raises:
      ValueError: when ``weighting`` is not a loss weighting.
    """
    if weighting.needs != Needs.LOSSES or not weighting.weights_heads:
        raise ValueError(f"chain's weighting must be a loss-weighting method (needs='losses', weights_heads=True) that "
                         f"returns loss scales; '{weighting.name}' has needs='{weighting.needs}', "
                         f"weights_heads={weighting.weights_heads}")
    direction = returns_direction(aggregator)
    gradient_method = not aggregator.weights_heads

    def init(num_tasks: int, num_params: int | None = None) -> ChainState:
        return ChainState(_init(weighting, num_tasks, num_params), _init(aggregator, num_tasks, num_params),
                          jnp.ones((num_tasks,), jnp.float32))

    def update(inputs: MethodInputs, state: ChainState, key):
        weighting_key = None if key is None else jax.random.fold_in(key, 1)  # the aggregator keeps ``key``
        scales, weighting_state = weighting.update(inputs, state.weighting, weighting_key)
        scales = jax.lax.stop_gradient(scales).astype(jnp.float32)
        out, aggregator_state = aggregator.update(scale_inputs(inputs, scales), state.aggregator, key)
        shared = out if direction else scales.astype(out.dtype) * out
        return shared, ChainState(weighting_state, aggregator_state, scales)

    def after_update(inputs: MethodInputs, state: ChainState) -> ChainState:
        if weighting.after_update is not None:
            state = state._replace(weighting=weighting.after_update(inputs, state.weighting))
        if aggregator.after_update is not None:
            state = state._replace(aggregator=aggregator.after_update(scale_inputs(inputs, state.scales),
                                                                      state.aggregator))
        return state

    has_after_update = weighting.after_update is not None or aggregator.after_update is not None

    return Method(
        name or f"chain({weighting.name},{aggregator.name})", init, update, aggregator.needs,
        weights_heads=not gradient_method,
        wants=tuple(dict.fromkeys(weighting.wants + aggregator.wants)),
        after_update=after_update if has_after_update else None,
        per_parameter_state=weighting.per_parameter_state or aggregator.per_parameter_state,
        head_weights=(lambda state: state.scales) if gradient_method else None,
    )


def make_imtl(num_tasks: int | None = None, lr: float = 0.025) -> Method:
    """IMTL (Liu et al., ICLR 2021, Sec. 3.3 / Alg. 1): ``chain(imtl_l, imtl_g)``.

    IMTL-L (Eq. 4) learns ``s`` (Adam, ``lr``) so that the scaled losses ``e^{s_k} L_k`` balance;
    IMTL-G (Eq. 9) computes ``alpha`` (sum 1) with equal projections of ``sum_k alpha_k e^{s_k} g_k``
    on every unit scaled gradient; the shared update is ``sum_k alpha_k e^{s_k} g_k``, head k is
    trained on ``e^{s_k} L_k``. State: ``ChainState(IMTLLState, EmptyState, scales)``.
    """
    return chain(weighting_lib.make_imtl_l(num_tasks, lr=lr), aggregation.make_imtl_g(num_tasks), name="imtl")
