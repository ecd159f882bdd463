"""The interface every MTL loss-weighting / gradient-aggregation method implements.

A method is a pair of pure functions, in the spirit of an optax ``GradientTransformation``:

* ``init(num_tasks) -> state``: a typed ``NamedTuple`` of arrays (``EmptyState()`` when stateless).
  Methods with ``per_parameter_state`` (MoCo, ExcessMTL: state rows [K, P]) take
  ``init(num_tasks, num_params=P)``, P the flattened shared-parameter count; the trainer binds it
  (``with_num_params``), so nothing reads factory signatures.
* ``update(inputs, state, key) -> (out, new_state)``: ``out`` is

  - ``weights[K]`` for every method except the direction-returning ones. The trainer applies the
    shared-parameter gradient ``sum_k weights[k] * g_k`` (one weighted VJP). Head k receives the
    gradient of ``h_k L_k`` with ``h = head_scales(method, weights, new_state)``: ``weights`` when
    ``weights_heads`` is True (loss weighting), ones when it is False (gradient aggregation), or
    the method's own ``head_weights(new_state)`` (``chain``: the weighting's ``w1``).
  - ``direction[P]`` (the flattened shared-parameter update direction, to be unflattened like
    ``MethodInputs.jacobian`` rows) when ``returns_direction(method)`` is True, i.e. for the
    methods with ``needs=Needs.JACOBIAN`` and ``weights_heads=False`` (GradDrop, MoCo), whose
    result is not a linear combination of the current task gradients.

``update`` is jittable, contains no Python loop over tasks, and never leaves the device.
"""

from __future__ import annotations

import enum
import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp

PyTree = Any


class Needs(str, enum.Enum):
    """What the train step must compute for ``Method.update`` besides the losses (a ``str`` enum:
    ``Needs.GRAMIAN == "gramian"``)."""

    LOSSES = "losses"  # nothing: one weighted VJP
    GRAMIAN = "gramian"  # MethodInputs.gramian, G = J J^T [K, K]
    JACOBIAN = "jacobian"  # MethodInputs.jacobian, J [K, P] (and the Gramian)

    def __str__(self) -> str:
        return self.value


NEEDS = tuple(n.value for n in Needs)
OPTIONAL_INPUTS = ("last_shared_gramian", "cross_gramian")


class EmptyState(NamedTuple):
    """The state of a stateless method (no leaves)."""


class _MethodFields(NamedTuple):
    name: str
    init: Callable[..., PyTree]
    update: Callable[["MethodInputs", PyTree, jax.Array], tuple[jax.Array, PyTree]]
    needs: Needs
    weights_heads: bool
    wants: tuple[str, ...] = ()
    after_update: Callable[["MethodInputs", PyTree], PyTree] | None = None
    per_parameter_state: bool = False
    head_weights: Callable[[PyTree], jax.Array] | None = None


class Method(_MethodFields):
    """An MTL method: ``init(num_tasks) -> state`` and ``update(inputs, state, key) -> (out, state)``.

    Attributes:
      name: registry name of the method.
      init: ``init(num_tasks) -> state`` (a NamedTuple pytree of arrays, ``EmptyState()`` if
        stateless); ``init(num_tasks, num_params=P)`` when ``per_parameter_state``.
      update: ``update(inputs: MethodInputs, state, key) -> (weights [K] | direction [P], state)``.
      needs: a ``Needs`` (strings are converted): what the trainer must fill in ``MethodInputs``
        besides the losses: ``LOSSES`` (nothing), ``GRAMIAN`` (``gramian``), ``JACOBIAN``
        (``jacobian``).
      weights_heads: True for loss-weighting methods (head k gets the gradient of ``w_k L_k``),
        False for gradient methods (head k gets the gradient of ``L_k``).
      wants: optional ``MethodInputs`` fields (``OPTIONAL_INPUTS``) the train step computes for
        this method on top of ``needs``: ``'last_shared_gramian'`` (GradNorm), ``'cross_gramian'``
        (SDMGrad / MoDo double sampling). Paths of the step that cannot provide one leave it None.
      after_update: optional ``after_update(inputs, state) -> state``, called by the train step
        after the optimiser update with ``inputs.losses = L_t(theta_t)`` and
        ``inputs.updated_losses = L_t(theta_{t+1})`` (one extra forward on the same batch, no
        gradient; FAMO, Liu et al. 2023, Alg. 1). Its state is kept only when the step was applied
        and the updated losses are finite.
      per_parameter_state: True when the state has rows over the P flattened shared parameters
        (MoCo, ExcessMTL): ``init`` then needs ``num_params`` (``with_num_params`` binds it), and
        the rows must be parameter gradients (not representation gradients).
      head_weights: optional ``head_weights(new_state) -> [K]``, the scales of the heads' own
        gradients for the update that returned ``new_state``, overriding the ``weights_heads``
        rule (``chain``). Read it through ``head_scales``.
    """

    __slots__ = ()

    def __new__(cls, name, init, update, needs, weights_heads, wants=(), after_update=None,
                per_parameter_state=False, head_weights=None):
        if needs not in NEEDS:
            raise ValueError(f"method {name!r}: needs must be one of {list(NEEDS)}, got {needs!r}")
        wants = tuple(wants)
        unknown = [w for w in wants if w not in OPTIONAL_INPUTS]
        if unknown:
            raise ValueError(f"method {name!r} wants unknown input(s) {unknown}; valid: {list(OPTIONAL_INPUTS)}")
        return super().__new__(cls, name, init, update, Needs(needs), bool(weights_heads), wants, after_update,
                               bool(per_parameter_state), head_weights)


@flax.struct.dataclass
class MethodInputs:
    """What the train step hands to ``Method.update``; K tasks, P flattened shared parameters.

    Attributes:
      losses: [K] float32 current per-task losses.
      step: scalar int32 optimisation step (0 at the first update).
      gramian: [K, K] ``G = J J^T`` of the per-task gradients of the shared parameters
        (``needs='gramian'``).
      jacobian: [K, P] flattened per-task shared-parameter gradients (``needs='jacobian'``).
      last_shared_gramian: optional [K, K] Gramian of the per-task gradients w.r.t. the *last
        shared layer* only (GradNorm, Chen et al. 2018, Sec. 3.2). GradNorm falls back to
        ``gramian`` when it is None.
      updated_losses: optional [K] ``L_t(theta_{t+1})``: this step's batch re-evaluated with the
        parameters after this step's update (FAMO, Liu et al. 2023, Eq. 9: the logit update uses
        ``log L_t(theta_t) - log L_t(theta_{t+1})``). Given to ``Method.after_update`` only.
      cross_gramian: optional [K, K] ``J_a J_b^T`` of per-task shared gradients on two disjoint
        halves a, b of the batch (the double sampling of SDMGrad, Xiao et al. 2023, Alg. 1, and
        MoDo, Chen et al. 2023, Eq. 9), when the method ``wants`` it. When None, both methods use
        ``gramian`` (single-sample variant).
    """

    losses: jax.Array
    step: jax.Array
    gramian: jax.Array | None = None
    jacobian: jax.Array | None = None
    last_shared_gramian: jax.Array | None = None
    updated_losses: jax.Array | None = None
    cross_gramian: jax.Array | None = None


def returns_direction(method: Method) -> bool:
    """True when ``method.update`` returns a flattened direction [P] instead of weights [K]."""
    return method.needs == Needs.JACOBIAN and not method.weights_heads


def head_scales(method: Method, weights: jax.Array, state: PyTree) -> jax.Array:
    """[K] scales of the heads' own gradients after ``weights, state = method.update(...)``:
    ``method.head_weights(state)`` when the method defines it, else ``weights`` for loss-weighting
    methods and ones for gradient methods (whose direction or NaN weights touch only the shared part)."""
    if method.head_weights is not None:
        return method.head_weights(state).astype(weights.dtype)
    return weights if method.weights_heads else jnp.ones_like(weights)


def with_num_params(method: Method, num_params: int) -> Method:
    """``method`` whose ``init(num_tasks)`` sizes per-parameter state for P = ``num_params`` shared
    parameters (unchanged when it has no ``per_parameter_state``)."""
    if not method.per_parameter_state:
        return method
    return method._replace(init=functools.partial(method.init, num_params=int(num_params)))


def check_num_tasks(name: str, num_tasks: int | None, minimum: int = 2) -> None:
    """Raises ValueError when a method that compares task gradients is given fewer than 2 tasks."""
    if num_tasks is not None and num_tasks < minimum:
        raise ValueError(
            f"{name} aggregates per-task gradients and needs at least {minimum} tasks; got "
            f'num_tasks={num_tasks}. Use "ew" for a single task.'
        )


def require(inputs: MethodInputs, field: str, name: str) -> jax.Array:
    """Returns ``inputs.<field>``, raising a clear error at trace time when it is missing."""
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"{name} needs MethodInputs.{field}; the train step did not provide it.")
    return value


def normalized_gramian(gramian: jax.Array, reg: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Scales a PSD Gramian to unit mean diagonal and adds ``reg * I``.

    Args:
      gramian: [K, K] ``J J^T``.
      reg: ridge added after scaling; keeps sub-problems strictly convex when gradients are
        identical or one task's gradient is zero.

    Returns:
      ``(gramian_n [K, K], scale [])`` with ``gramian ~= scale * (gramian_n - reg I)``. An all-zero
      Gramian gives ``gramian_n = (1 + reg) I`` and ``scale = 0`` (any weights give a zero update).
    """
    num_tasks = gramian.shape[0]
    gramian = 0.5 * (gramian + gramian.T)
    scale = jnp.trace(gramian) / num_tasks
    tiny = jnp.finfo(gramian.dtype).tiny * 1e6
    safe_scale = jnp.where(scale > tiny, scale, 1.0)
    eye = jnp.eye(num_tasks, dtype=gramian.dtype)
    gramian_n = jnp.where(scale > tiny, gramian / safe_scale, eye) + reg * eye
    return gramian_n, jnp.where(scale > tiny, scale, 0.0)


def stateless_init(num_tasks: int, num_params: int | None = None) -> EmptyState:
    """``init`` of a method without state."""
    del num_tasks, num_params
    return EmptyState()


def need_num_params(name: str, num_params: int | None) -> int:
    """``num_params``, or a clear ValueError when a per-parameter-state method was not given it."""
    if num_params is None:
        raise ValueError(f"{name} keeps per-parameter state [K, P]: give num_params (P, the flattened shared-parameter "
                         f"count) to init(num_tasks, num_params=P) or to get_method('{name}', num_params=P); the "
                         "trainer does so (with_num_params).")
    return int(num_params)
