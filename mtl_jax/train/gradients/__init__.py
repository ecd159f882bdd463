"""Gradient strategies: how a step turns a batch into per-task losses and the gradients of every
parameter group under the MTL method.

``make_gradients`` picks one strategy from the config and checks the combination against
``INVALID`` (one table, checked at start):

==========================  =========================================  ================================
strategy                    when                                       file
==========================  =========================================  ================================
parameter level             default (``jacobian.level='params'``)      ``params.py`` (+ ``layerwise.py``)
representation level        ``jacobian.level='representation'``        ``representation.py``
F-MTL                       ``sharpness.kind`` 'fmtl' / 'fmtl_a'       ``sharpness.py``
SAM / ASAM (wrapper)        ``sharpness.kind='sam'``                   ``sharpness.py``
Rep-MTL                     ``rep_mtl`` weights > 0                    ``rep_mtl.py``
accumulated micro-batches   ``grad_accum_steps`` > 1                   ``accumulate.py``
==========================  =========================================  ================================
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from mtl_jax.errors import UsageError
from mtl_jax.train import flat_minima
from mtl_jax.train.forward import has_representation, make_forward, make_representation_forward, sows_aux_loss
from mtl_jax.train.gradients.accumulate import accumulate
from mtl_jax.train.gradients.base import Linearization, StepContext, Strategy, TaskGradients
from mtl_jax.train.gradients.options import GRAMIAN_MODES, GradientOptions, gradient_options
from mtl_jax.train.gradients.params import make_linearize, make_split_of, params_level
from mtl_jax.train.gradients.rep_mtl import rep_mtl_model_gradients
from mtl_jax.train.gradients.representation import representation_level
from mtl_jax.train.gradients.sharpness import fmtl, sam
from mtl_jax.train.precision import FLOAT32, Precision

LEVELS = ("params", "representation")
FLAT_MINIMA = ("fmtl", "fmtl_a")


class Choice(NamedTuple):
    """What the config asks of the step (``make_gradients`` reads it from the config sections)."""

    method: object
    level: str
    kind: str  # sharpness kind ('' = none)
    rep_mtl: bool  # Rep-MTL regularisers on
    rep_level: bool  # representation-level gradients in effect (the method reads gradients)
    gramian_mode: str
    micro_batches: int = 1


def keeps_parameter_state(method) -> bool:
    """Whether the method keeps per-parameter state across steps (``Method.per_parameter_state``:
    MoCo, ExcessMTL, a chain with one of them)."""
    return method.per_parameter_state


# (is the choice invalid?, the one-line error) -- every combination the step refuses.
INVALID = (
    (lambda c: c.level not in LEVELS, lambda c: f"unknown jacobian level '{c.level}'; valid: {list(LEVELS)}"),
    (lambda c: c.kind not in flat_minima.KINDS,
     lambda c: f"unknown sharpness kind '{c.kind}'; valid: {list(flat_minima.KINDS)}"),
    (lambda c: c.rep_mtl and (c.method.needs != "losses" or bool(c.kind)),
     lambda c: "Rep-MTL regularisers combine with loss-weighting methods (e.g. 'ew') only, without sharpness "
               f"steps; got method '{c.method.name}'"),
    (lambda c: c.rep_level and bool(c.kind),
     lambda c: "jacobian.level='representation' cannot be combined with sharpness steps"),
    (lambda c: c.rep_level and keeps_parameter_state(c.method),
     lambda c: f"method '{c.method.name}' keeps per-parameter state across steps (rows of the shared parameters' "
               "gradients); at jacobian.level='representation' its rows would be dL_k/dz of each batch's own "
               "samples: use jacobian.level='params'"),
    (lambda c: c.micro_batches > 1 and (c.rep_mtl or c.rep_level or bool(c.kind)),
     lambda c: "grad_accum_steps > 1 applies to the parameter-level plain step (no sharpness steps, Rep-MTL or "
               "jacobian.level='representation')"),
    (lambda c: c.gramian_mode == "vjp_jvp" and (c.rep_level or c.kind in FLAT_MINIMA),
     lambda c: "jacobian.gramian_mode='vjp_jvp' applies to the parameter-level plain and SAM steps; F-MTL and "
               "jacobian.level='representation' hold the per-task gradients by construction"),
)


def check_choice(choice: Choice) -> None:
    """Raises UsageError with the first row of ``INVALID`` the choice matches."""
    for invalid, message in INVALID:
        if invalid(choice):
            raise UsageError(message(choice))


def make_gradients(model, tasks: Sequence, method, input_key: str, sharpness=None, jacobian=None, rep_mtl_cfg=None,
                   sample_input=None, precision: Precision = FLOAT32, micro_batches: int = 1) -> Strategy:
    """The strategy ``gradients(ctx: StepContext) -> TaskGradients`` the config sections ask for.

    ``sharpness``: None or ``config.sharpness`` (kind, rho, adaptive, eta); ``jacobian``: None or
    ``config.jacobian`` (level, chunk, gramian_mode, last_shared: ``options.gradient_options``);
    ``rep_mtl_cfg``: None or ``config.rep_mtl``; ``sample_input``: one input batch (shape only), to find
    the last shared layer GradNorm reads; ``precision``: the forward's mixed-precision policy;
    ``micro_batches``: gradient accumulation (``accumulate.py``) over that many micro-batches.

    What the method asks for beyond ``needs``: ``wants=('cross_gramian',)`` (SDMGrad, MoDo) gets
    ``J_a J_b^T`` of the batch's two halves on the plain parameter-level step (sharpness steps' methods
    see the single-batch Gramian); ``wants=('last_shared_gramian',)`` (GradNorm) gets it on every
    parameter-level path. The heads-once VJP (``representation_losses_and_vjp``) is used when per-task
    rows are formed (gradient methods, GradNorm, F-MTL) on a trunk + heads model; a loss-weighting step
    needs one weighted VJP, which the whole forward's VJP gives.
    """
    options = gradient_options(jacobian, method, model, sample_input)
    level = jacobian.level if jacobian is not None else "params"
    kind = sharpness.kind if sharpness is not None else ""
    use_rep_mtl = rep_mtl_cfg is not None and (rep_mtl_cfg.tsr_weight > 0 or rep_mtl_cfg.csa_weight > 0)
    # Loss weights that read no gradient are the same at either level; GradNorm reads norms.
    rep_level = level == "representation" and (method.needs != "losses" or "last_shared_gramian" in method.wants)
    check_choice(Choice(method, level, kind, use_rep_mtl, rep_level, options.gramian_mode, micro_batches))
    names = [t.name for t in tasks]
    if micro_batches > 1:
        return accumulate(method, make_forward(model, tasks, input_key, precision), micro_batches, names,
                          options.last_shared)
    if use_rep_mtl:
        return rep_mtl_model_gradients(method, rep_mtl_cfg, model, tasks, input_key, precision)
    if rep_level:
        return representation_level(method, *make_representation_forward(model, tasks, input_key, precision), names,
                                    lambda params, batch: sows_aux_loss(model, params, batch, input_key, tasks))

    forward = make_forward(model, tasks, input_key, precision)
    flat = kind in FLAT_MINIMA  # F-MTL holds the per-task gradients by construction
    by_jvp = options.gramian_mode == "vjp_jvp" and method.needs == "gramian"
    by_layer = (options.gramian_mode == "layerwise" and not flat
                and (method.needs == "gramian" or "last_shared_gramian" in method.wants))
    wants_rows = method.needs != "losses" or "last_shared_gramian" in method.wants or flat
    split_forward = (make_representation_forward(model, tasks, input_key, precision)
                     if has_representation(model) and wants_rows else None)
    split_of = make_split_of(model, tasks, input_key, split_forward)
    linearization = make_linearize(forward, names, by_jvp, by_layer, options.chunk, precision)
    if flat:
        return fmtl(method, sharpness, forward, linearization, split_of, options.last_shared)
    double_sampling = "cross_gramian" in method.wants and kind == ""
    strategy = params_level(method, options, forward, linearization, split_of, names, double_sampling, precision)
    return sam(strategy, sharpness) if kind == "sam" else strategy


__all__ = ["make_gradients", "check_choice", "INVALID", "Choice", "StepContext", "TaskGradients", "Linearization",
           "Strategy", "GradientOptions", "GRAMIAN_MODES", "gradient_options"]
