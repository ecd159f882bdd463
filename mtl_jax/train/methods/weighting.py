"""Loss-weighting methods: weights from the losses (and their own learned parameters).

All have ``weights_heads=True``: the trainer back-propagates ``sum_k w_k L_k`` through every
parameter, heads included. Methods whose weights are learned by gradient (UW, IMTL-L, GradNorm,
FAMO) take that gradient step inside ``update`` with their own Adam (``lr``), since the weights
are not model parameters here; the step uses the exact gradient of the method's own objective.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.train.methods.base import (Method, MethodInputs, Needs, check_num_tasks, need_num_params, require,
                                        stateless_init)

_EPS = 1e-8


def make_ew(num_tasks: int | None = None) -> Method:
    """Equal weighting / linear scalarisation (LS): ``w_k = 1``, i.e. the gradient of ``sum_k L_k``."""
    del num_tasks

    def update(inputs: MethodInputs, state, key):
        del key
        return jnp.ones_like(inputs.losses), state

    return Method("ew", stateless_init, update, Needs.LOSSES, True)


def _adam_step(params: jax.Array, grad: jax.Array, opt_state, optimizer):
    updates, opt_state = optimizer.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class UWState(NamedTuple):
    """Uncertainty weighting: ``log_var`` [K] ``s_k = log sigma_k^2`` and its Adam state."""

    log_var: jax.Array
    opt: optax.OptState


class IMTLLState(NamedTuple):
    """IMTL-L: ``log_scale`` [K] ``s_k`` (the loss scale is ``exp(s_k)``) and its Adam state."""

    log_scale: jax.Array
    opt: optax.OptState


def _learned_scalars_method(name: str, state_type, lr: float, weights_fn, grad_fn) -> Method:
    """A loss weighting with learned per-task scalars ``s`` [K] (state ``state_type(s, opt)``, init 0):
    returns ``weights_fn(s)``, then takes one Adam step on the exact gradient ``grad_fn(s, L)``."""
    optimizer = optax.adam(lr)

    def init(num_tasks: int):
        scalars = jnp.zeros((num_tasks,), jnp.float32)
        return state_type(scalars, optimizer.init(scalars))

    def update(inputs: MethodInputs, state, key):
        del key
        scalars, opt = state
        scalars_next, opt = _adam_step(scalars, grad_fn(scalars, inputs.losses), opt, optimizer)
        return weights_fn(scalars), state_type(scalars_next, opt)

    return Method(name, init, update, Needs.LOSSES, True)


def make_uw(num_tasks: int | None = None, lr: float = 0.025) -> Method:
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, Eq. 7, LibMTL's form).

    Objective ``sum_k exp(-s_k) L_k / 2 + s_k / 2`` with ``s_k = log sigma_k^2``; the network sees
    ``w_k = exp(-s_k) / 2``. The log variances ``s`` (state, init 0) take one Adam step (``lr``,
    0.025 as the Nash-MTL codebase's ``method-params-lr``) on the exact gradient
    ``(1 - exp(-s_k) L_k) / 2`` each update; the returned weights are those before the step.

    State: ``UWState(log_var [K], opt)``.
    """
    del num_tasks
    return _learned_scalars_method("uw", UWState, lr, lambda s: 0.5 * jnp.exp(-s),
                                   lambda s, losses: 0.5 * (1.0 - jnp.exp(-s) * losses))


def make_imtl_l(num_tasks: int | None = None, lr: float = 0.025) -> Method:
    """IMTL-L, the loss-balance half of IMTL (Liu et al., ICLR 2021, Eq. 4).

    Scaled loss ``exp(s_k) L_k - s_k``; the network sees ``w_k = exp(s_k)``; ``s`` (state, init 0)
    takes one Adam step (``lr``) on the exact gradient ``exp(s_k) L_k - 1`` (stationary when the
    scaled losses are all 1). ``imtl`` = ``chain(imtl_l, imtl_g)`` is the full IMTL (Sec. 3.3).

    State: ``IMTLLState(log_scale [K], opt)``.
    """
    del num_tasks
    return _learned_scalars_method("imtl_l", IMTLLState, lr, jnp.exp, lambda s, losses: jnp.exp(s) * losses - 1.0)


class DWAState(NamedTuple):
    """DWA: the running loss sum / update count of the current epoch, the last two epoch means, and
    the number of completed epochs."""

    loss_sum: jax.Array
    count: jax.Array
    last: jax.Array
    before_last: jax.Array
    epochs: jax.Array


def make_dwa(num_tasks: int | None = None, temperature: float = 2.0, steps_per_epoch: int = 1) -> Method:
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, Eq. 1).

    ``w_k = K softmax_k(r / T)`` with ``r_k = Lbar_k(e-1) / Lbar_k(e-2)``, the ratio of the mean
    losses of the last two completed epochs of ``steps_per_epoch`` updates (1: per step);
    ``w = 1`` until two epochs are complete. T = 2 as in the paper.

    State: ``DWAState`` (running sum / count of the current epoch, the two last epoch means).
    """
    del num_tasks

    def init(num_tasks: int):
        zeros = jnp.zeros((num_tasks,), jnp.float32)
        return DWAState(loss_sum=zeros, count=jnp.zeros((), jnp.int32), last=zeros, before_last=zeros,
                        epochs=jnp.zeros((), jnp.int32))

    def update(inputs: MethodInputs, state, key):
        del key
        num = inputs.losses.shape[0]
        ratio = state.last / jnp.maximum(state.before_last, _EPS)
        weights = jnp.where(
            state.epochs >= 2, num * jax.nn.softmax(ratio / temperature), jnp.ones((num,), jnp.float32)
        )
        loss_sum = state.loss_sum + inputs.losses
        count = state.count + 1
        epoch_done = count >= steps_per_epoch
        mean = loss_sum / count
        new_state = DWAState(
            loss_sum=jnp.where(epoch_done, 0.0, loss_sum),
            count=jnp.where(epoch_done, 0, count),
            last=jnp.where(epoch_done, mean, state.last),
            before_last=jnp.where(epoch_done, state.last, state.before_last),
            epochs=state.epochs + epoch_done.astype(jnp.int32),
        )
        return weights, new_state

    return Method("dwa", init, update, Needs.LOSSES, True)


def make_rlw(num_tasks: int | None = None, distribution: str = "normal") -> Method:
    """Random loss weighting (Lin et al., TMLR 2022, Eq. 3): ``w = softmax(z)``, fresh ``z`` each step.

    ``distribution``: ``'normal'`` (z ~ N(0, I), the paper's and LibMTL's default) or
    ``'dirichlet'`` (w ~ Dir(1), uniform on the simplex). Weights sum to 1.
    """
    del num_tasks
    if distribution not in ("normal", "dirichlet"):
        raise ValueError(f"rlw distribution must be 'normal' or 'dirichlet', got {distribution!r}")

    def update(inputs: MethodInputs, state, key):
        num = inputs.losses.shape[0]
        if distribution == "normal":
            weights = jax.nn.softmax(jax.random.normal(key, (num,), jnp.float32))
        else:
            weights = jax.random.dirichlet(key, jnp.ones((num,), jnp.float32))
        return weights, state

    return Method("rlw", stateless_init, update, Needs.LOSSES, True)


def make_gls(num_tasks: int | None = None) -> Method:
    """Geometric loss strategy (Chennupati et al., CVPRW 2019, Eq. 2): minimise ``(prod_k L_k)^(1/K)``.

    Its gradient is ``sum_k GM / (K L_k) g_k`` with ``GM`` the geometric mean, so
    ``w_k = GM / (K L_k)`` (losses must be positive).
    """
    del num_tasks

    def update(inputs: MethodInputs, state, key):
        del key
        losses = jnp.maximum(inputs.losses, _EPS)
        num = losses.shape[0]
        geometric_mean = jnp.exp(jnp.mean(jnp.log(losses)))
        return geometric_mean / (num * losses), state

    return Method("gls", stateless_init, update, Needs.LOSSES, True)


class GradNormState(NamedTuple):
    """GradNorm: ``logits`` [K] (``w = K softmax(logits)``), their Adam state, and the first
    update's losses ``initial_losses`` [K] (``L(0)``)."""

    logits: jax.Array
    opt: optax.OptState
    initial_losses: jax.Array


def make_gradnorm(num_tasks: int | None = None, alpha: float = 1.5, lr: float = 0.025) -> Method:
    """GradNorm (Chen et al., ICML 2018, Eqs. 1-2), LibMTL's softmax parameterisation.

    ``w = K softmax(s)``; ``G_k = w_k ||grad_W L_k||`` at the last shared layer W, ``r_k`` the
    inverse training rate ``(L_k / L_k(0)) / mean_j (L_j / L_j(0))``; ``s`` takes one Adam step
    (``lr``) on ``sum_k |G_k - mean(G) r_k^alpha|`` with the target held constant. The returned
    weights are those before the step; ``L(0)`` are the losses of the first update. alpha = 1.5.

    Wants ``MethodInputs.last_shared_gramian`` (norms at the last shared layer, the paper's choice;
    the train step computes it from per-task VJPs restricted to that layer, see
    ``config.jacobian.last_shared``) and falls back to ``gramian`` (all shared parameters) when it
    is None. The shared update is one VJP with ``w`` as cotangent (``needs=Needs.LOSSES``).

    State: ``GradNormState(logits, opt, initial_losses)``.
    """
    check_num_tasks("gradnorm", num_tasks)
    optimizer = optax.adam(lr)

    def init(num_tasks: int):
        check_num_tasks("gradnorm", num_tasks)
        logits = jnp.zeros((num_tasks,), jnp.float32)
        return GradNormState(logits, optimizer.init(logits), jnp.ones((num_tasks,), jnp.float32))

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = inputs.gramian if inputs.last_shared_gramian is None else inputs.last_shared_gramian
        if gramian is None:
            raise ValueError("gradnorm needs MethodInputs.last_shared_gramian (or gramian); the train step did not "
                             "provide either.")
        num = inputs.losses.shape[0]
        grad_norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0))
        initial = jnp.where(inputs.step == 0, inputs.losses, state.initial_losses)
        loss_ratio = inputs.losses / jnp.maximum(initial, _EPS)
        inverse_rate = loss_ratio / jnp.maximum(jnp.mean(loss_ratio), _EPS)

        def gradnorm_loss(logits):
            weighted_norms = num * jax.nn.softmax(logits) * grad_norms
            target = jax.lax.stop_gradient(jnp.mean(weighted_norms) * inverse_rate**alpha)
            return jnp.sum(jnp.abs(weighted_norms - target))

        logits = state.logits
        weights = num * jax.nn.softmax(logits)
        logits, opt = _adam_step(logits, jax.grad(gradnorm_loss)(logits), state.opt, optimizer)
        return weights, GradNormState(logits, opt, initial)

    return Method("gradnorm", init, update, Needs.LOSSES, True, wants=("last_shared_gramian",))


def _famo_logit_step(logits, opt_state, optimizer, before, after, min_loss: float):
    """FAMO's logit update (Liu et al. 2023, Eq. 9): one step of ``optimizer`` on
    ``J_softmax(xi)^T delta`` with ``delta_k = log(before_k - L*_k) - log(after_k - L*_k)``."""
    delta = jnp.log(jnp.maximum(before - min_loss, 0.0) + _EPS) - jnp.log(jnp.maximum(after - min_loss, 0.0) + _EPS)
    _, softmax_vjp = jax.vjp(jax.nn.softmax, logits)
    (logit_grad,) = softmax_vjp(delta)
    return _adam_step(logits, logit_grad, opt_state, optimizer)


class FAMOState(NamedTuple):
    """FAMO: ``logits`` [K] ``xi`` (``z = softmax(xi)``), their Adam state, and the last update's
    losses ``prev_losses`` [K] with ``has_prev`` (the lagged variant's ``L_{t-1}``)."""

    logits: jax.Array
    opt: optax.OptState
    prev_losses: jax.Array
    has_prev: jax.Array


def make_famo(num_tasks: int | None = None, gamma: float = 0.01, lr: float = 0.025, min_loss: float = 0.0,
              extra_forward: bool = True) -> Method:
    """FAMO (Liu et al., NeurIPS 2023, Alg. 1; official defaults gamma=0.01, w_lr=0.025).

    Network objective ``sum_k z_k log(L_k - L*_k) / c`` with ``z = softmax(xi)``,
    ``c = sum_k z_k / (L_k - L*_k)`` held constant, i.e. ``w_k = z_k / (c (L_k - L*_k))``
    (``L* = min_loss``). Logit update (Eq. 9): ``xi`` takes an Adam step (``lr``, L2 weight decay
    ``gamma``) on ``J_softmax(xi)^T delta`` with ``delta_k = log(L_k(theta_t) - L*) -
    log(L_k(theta_{t+1}) - L*)``, the change of each log loss over the update.

    ``extra_forward=True`` (the paper and the official code): ``after_update`` takes that step
    with ``L_t(theta_{t+1})`` from the train step's extra no-grad forward on the same batch.
    ``extra_forward=False`` (cheaper; TorchJD's usage): the step is taken at the next ``update``
    with the *next* batch's losses ``L_{t+1}(theta_{t+1})`` in place of ``L_t(theta_{t+1})``.

    State: ``FAMOState(logits, opt, prev_losses, has_prev)``.
    """
    del num_tasks
    optimizer = optax.chain(optax.add_decayed_weights(gamma), optax.adam(lr))

    def init(num_tasks: int):
        logits = jnp.zeros((num_tasks,), jnp.float32)
        return FAMOState(logits, optimizer.init(logits), jnp.ones((num_tasks,), jnp.float32), jnp.zeros((), jnp.bool_))

    def update(inputs: MethodInputs, state, key):
        del key
        logits, opt = state.logits, state.opt
        if not extra_forward:  # the lagged step: the current batch's losses stand in for L_{t-1}(theta_t)
            stepped = _famo_logit_step(logits, opt, optimizer, state.prev_losses, inputs.losses, min_loss)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(state.has_prev, a, b), new, old)
            logits, opt = keep(stepped, (logits, opt))
        z = jax.nn.softmax(logits)
        gaps = jnp.maximum(inputs.losses - min_loss, 0.0) + _EPS
        normaliser = jnp.sum(z / gaps)
        weights = z / (normaliser * gaps)
        return weights, FAMOState(logits, opt, inputs.losses, jnp.ones((), jnp.bool_))

    def after_update(inputs: MethodInputs, state):
        after = require(inputs, "updated_losses", "famo")
        logits, opt = _famo_logit_step(state.logits, state.opt, optimizer, inputs.losses, after, min_loss)
        return state._replace(logits=logits, opt=opt)

    return Method("famo", init, update, Needs.LOSSES, True, after_update=after_update if extra_forward else None)


class STCHState(NamedTuple):
    """STCH: the loss sum [K] and update count of the warm-up (the nadir is their ratio)."""

    loss_sum: jax.Array
    count: jax.Array


def make_stch(num_tasks: int | None = None, mu: float = 1.0, warmup_steps: int = 1) -> Method:
    """Smooth Tchebycheff scalarisation (Lin et al., ICML 2024, Eq. 9; LibMTL's MTL form).

    Objective ``mu K log sum_k exp(log(L_k / n_k) / mu)`` with nadir ``n`` = the mean losses over the
    first ``warmup_steps`` updates (LibMTL: 4 epochs), during which the objective is ``sum_k log L_k``.
    Gradient weights: ``w_k = 1 / L_k`` in warm-up, then ``w_k = K softmax_k(log(L / n) / mu) / L_k``.
    mu = 1 (LibMTL default). State: ``STCHState(loss_sum, count)``.
    """
    del num_tasks
    if warmup_steps < 1:
        raise ValueError(f"stch needs warmup_steps >= 1 to estimate the nadir point, got {warmup_steps}")

    def init(num_tasks: int):
        return STCHState(jnp.zeros((num_tasks,), jnp.float32), jnp.zeros((), jnp.int32))

    def update(inputs: MethodInputs, state, key):
        del key
        num = inputs.losses.shape[0]
        losses = jnp.maximum(inputs.losses, 1e-20)
        warming = state.count < warmup_steps
        nadir = state.loss_sum / jnp.maximum(state.count, 1)
        log_ratio = jnp.log(losses / jnp.maximum(nadir, 1e-20) + 1e-20)
        stch_weights = num * jax.nn.softmax(log_ratio / mu) / losses
        weights = jnp.where(warming, 1.0 / losses, stch_weights)
        new_state = STCHState(
            loss_sum=jnp.where(warming, state.loss_sum + inputs.losses, state.loss_sum),
            count=jnp.where(warming, state.count + 1, state.count),
        )
        return weights, new_state

    return Method("stch", init, update, Needs.LOSSES, True)


class ExcessMTLState(NamedTuple):
    """ExcessMTL: the AdaGrad accumulator ``grad_sq_sum`` [K, P], the current ``weights`` [K] and the
    first update's excess risks ``initial_excess`` [K]."""

    grad_sq_sum: jax.Array
    weights: jax.Array
    initial_excess: jax.Array


def make_excess_mtl(num_params: int | None = None, num_tasks: int | None = None,
                    robust_step_size: float = 1e-2) -> Method:
    """ExcessMTL (He et al., ICML 2024, Alg. 1; LibMTL's implementation and default step size).

    Excess risk estimate per task ``e_k = g_k^T diag(1 / h_k) g_k`` with ``h_k`` the AdaGrad
    accumulator ``sqrt(sum_t g_k(t)^2 + 1e-7)`` (per coordinate, so it needs the Jacobian);
    ``e / e(0)`` is then fed to exponentiated-gradient weights
    ``w <- K normalise(w * exp(robust_step_size * e / e(0)))`` (weights stay 1 at the first step).

    Needs ``MethodInputs.jacobian`` and returns *weights* [K] (``weights_heads=True``): the train
    step must weight the heads with them (see ``base.returns_direction``). Per-parameter state:
    ``init(num_tasks, num_params=P)`` sizes the accumulator [K, P] (``num_params`` given here is
    the default; the trainer binds the model's P).

    State: ``ExcessMTLState(grad_sq_sum [K, P], weights [K], initial_excess [K])``.
    """
    del num_tasks
    default_num_params = num_params

    def init(num_tasks: int, num_params: int | None = None):
        num_params = need_num_params("excess_mtl", default_num_params if num_params is None else num_params)
        return ExcessMTLState(jnp.zeros((num_tasks, num_params), jnp.float32), jnp.ones((num_tasks,), jnp.float32),
                              jnp.ones((num_tasks,), jnp.float32))

    def update(inputs: MethodInputs, state, key):
        del key
        jacobian = require(inputs, "jacobian", "excess_mtl").astype(jnp.float32)
        num = jacobian.shape[0]
        grad_sq_sum = state.grad_sq_sum + jacobian**2
        excess = jnp.sum(jacobian**2 / jnp.sqrt(grad_sq_sum + 1e-7), axis=1)
        first = inputs.step == 0
        initial = jnp.where(first, excess, state.initial_excess)
        stepped = state.weights * jnp.exp(robust_step_size * excess / jnp.maximum(initial, 1e-12))
        stepped = num * stepped / jnp.sum(stepped)
        weights = jnp.where(first, state.weights, stepped)
        return weights, ExcessMTLState(grad_sq_sum, weights, initial)

    return Method("excess_mtl", init, update, Needs.JACOBIAN, True, per_parameter_state=True)
