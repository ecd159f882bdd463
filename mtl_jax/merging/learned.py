"""Learned-coefficient model merging: AdaMerging (++), aTLAS and Self Positioning.

All three learn the coefficients of task arithmetic, ``theta = theta_0 + sum_t lam_t^g tau_t^g``
(one coefficient per task ``t`` and coefficient group ``g``: the whole model, a block, or a leaf),
by gradient descent on a user objective ``objective(merged_params, step_key) -> scalar``. The merge
is the package's :func:`~mtl_jax.merging.arithmetic.task_arithmetic_vector` with a per-(task, leaf)
coefficient tree and :func:`~mtl_jax.merging.task_vectors.apply_task_vector`; ``jax.grad`` goes
through them to the coefficients. The optimisation is one jitted ``lax.scan`` over the steps (one
compile per distinct chunk length; two at most).

Coefficient groups (``granularity``):
  * ``"task"``: one coefficient per task, shape (T,) (task-wise AdaMerging, Eq. 4).
  * ``"layer"``: shape (T, G). With ``layer_index=None`` every selected leaf is its own group, as
    the official AdaMerging and aTLAS code (one coefficient per parameter tensor). With a
    ``layer_index`` function (e.g. :func:`~mtl_jax.merging.tree.default_layer_index`) leaves in the
    same numbered block share a coefficient and leaves outside numbered blocks keep one each.
    Groups are numbered in leaf order of first appearance (see :func:`coefficient_groups`).

Leaf selection: ``select`` / ``exclude`` are '/'-path regexes (``re.fullmatch``, as
:func:`~mtl_jax.merging.tree.merge_subset`); unselected leaves stay at their pretrained value and
get no coefficient. Task vectors are fp32 and computed once, outside the loop.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.merging.arithmetic import task_arithmetic_vector
from mtl_jax.merging.task_vectors import apply_task_vector, stacked_task_vectors
from mtl_jax.merging.threshold import topk_trim
from mtl_jax.merging.ties import elect_sign
from mtl_jax.merging.tree import LayerIndexFn, Models, Params, check_compatible, model_list, replace_flat, select_flat
from mtl_jax.registry import lookup

Objective = Callable[[Params, jax.Array], jax.Array]
Validate = Callable[[Params], float]
GRANULARITIES = ("task", "layer")


class LearnedMerge(NamedTuple):
    """Result of a learned merge.

    params: merged tree (pretrained structure and dtypes).
    coefficients: the learned coefficients as used in the merge (after clamping for AdaMerging),
      (T,) for ``granularity="task"``, (T, G) for ``"layer"``.
    history: objective value at every step, evaluated before that step's update, float32 (steps,).
    """

    params: Params
    coefficients: jax.Array
    history: np.ndarray


def prediction_entropy(logits: jax.Array) -> jax.Array:
    """Shannon entropy of ``softmax(logits)`` per example: [B, C] -> [B] (nats).

    ``H(y) = -sum_c p_c log p_c``: the AdaMerging surrogate objective (Yang et al., ICLR 2024,
    Eq. 7), minimised on unlabelled test batches. Computed from ``log_softmax`` (stable).
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ------------------------------------------------------------------------ coefficient groups


def coefficient_groups(
    paths: Sequence[str], granularity: str = "layer", layer_index: Optional[LayerIndexFn] = None
) -> tuple[dict[str, int], int]:
    """``({path: group id}, G)``: which coefficient column each leaf uses.

    ``"task"``: every leaf in group 0 (G = 1). ``"layer"``: see the module docstring; ids follow
    the first appearance of a group in ``paths`` order.
    """
    lookup(GRANULARITIES, granularity, "granularity")
    if granularity == "task":
        return {p: 0 for p in paths}, 1
    ids: dict[Any, int] = {}
    out = {}
    for p in paths:
        block = None if layer_index is None else layer_index(p)
        group_key = ("leaf", p) if block is None else ("block", block)
        out[p] = ids.setdefault(group_key, len(ids))
    return out, len(ids)


def expand_coefficients(coefficients: jax.Array, groups: dict[str, int]) -> dict[str, jax.Array]:
    """(T, G) coefficient matrix -> ``{path: (T,) column of its group}`` (a per-leaf tree for
    :func:`~mtl_jax.merging.arithmetic.task_arithmetic_vector`)."""
    return {p: coefficients[:, g] for p, g in groups.items()}


def merge_with_coefficients(
    pretrained_flat: dict[str, jax.Array],
    stacked_tau: dict[str, jax.Array],
    coefficients: jax.Array,
    groups: dict[str, int],
) -> dict[str, jax.Array]:
    """``theta_0^l + sum_t c[t, g(l)] tau_t^l`` for every selected leaf ``l`` (flat trees keyed by
    path, as :func:`~mtl_jax.merging.tree.select_flat` returns). coefficients: (T, G)."""
    lam = expand_coefficients(coefficients, groups)
    return apply_task_vector(pretrained_flat, task_arithmetic_vector(stacked_tau, lam))


def ties_selected_entries(stacked_tau: Params, top_k: float = 0.2) -> Params:
    """TIES-trimmed, sign-resolved task vectors, one per task (AdaMerging++, Yang et al. ICLR 2024,
    Sec. 3.2.3; ``ties_merging_split`` in the official code).

    Trim each tau_t to its top ``top_k`` entries by magnitude over all given leaves (TIES step 1),
    elect the sign by mass (step 2), and keep in each task only the entries that agree with the
    elected sign. Their plain sum is TIES' "dis-sum"; their mean over agreeing tasks is
    :func:`~mtl_jax.merging.ties.disjoint_mean`. stacked_tau: leaves (T, ...) -> same shapes.
    """
    trimmed = topk_trim(stacked_tau, top_k, batched=True)
    sign = elect_sign(trimmed)
    return jax.tree_util.tree_map(
        lambda x, s: jnp.where(x * s[None] > 0, x, jnp.zeros_like(x)), trimmed, sign
    )


# --------------------------------------------------------------------------------- the loop


class _Problem(NamedTuple):
    """Static description of one learned merge: selected leaves, task vectors, groups."""

    pretrained: Params
    pretrained_flat: dict[str, jax.Array]
    stacked_tau: dict[str, jax.Array]
    groups: dict[str, int]
    num_tasks: int
    num_groups: int


@functools.partial(jax.jit, static_argnames="top_k")
def _task_vectors(finetuned_flat, pretrained_flat, top_k: Optional[float] = None):
    """Stacked fp32 task vectors, TIES-selected when ``top_k`` is given (one compiled program)."""
    tau = stacked_task_vectors(finetuned_flat, pretrained_flat)
    return tau if top_k is None else ties_selected_entries(tau, top_k)


def _setup(
    pretrained: Params,
    finetuned: Models,
    *,
    granularity: str,
    layer_index: Optional[LayerIndexFn],
    select: Optional[str | Iterable[str]],
    exclude: Optional[str | Iterable[str]],
    top_k: Optional[float] = None,
) -> _Problem:
    finetuned = model_list(pretrained, finetuned)
    if len(finetuned) == 0:
        raise ValueError("learned merging needs at least one fine-tuned model")
    check_compatible(pretrained, finetuned)
    flat0 = select_flat(pretrained, select, exclude)
    if not flat0:
        raise ValueError(f"no leaf selected by select={select!r}, exclude={exclude!r}")
    tau = _task_vectors([select_flat(f, select, exclude) for f in finetuned], flat0, top_k)
    groups, num_groups = coefficient_groups(list(flat0), granularity, layer_index)
    return _Problem(pretrained, flat0, tau, groups, len(finetuned), num_groups)


def _merged(groups: dict[str, int], pretrained, pretrained_flat, stacked_tau, coefficients) -> Params:
    merged = merge_with_coefficients(pretrained_flat, stacked_tau, coefficients, groups)
    return replace_flat(pretrained, merged)


def minimise(
    loss: Callable[..., jax.Array],
    params0: Any,
    optimizer: optax.GradientTransformation,
    steps: int,
    key: Optional[jax.Array],
    args: tuple = (),
    validate: Optional[Callable[[Any], float]] = None,
    eval_every: Optional[int] = None,
) -> tuple[Any, np.ndarray]:
    """Minimise ``loss(params, step_key, *args)`` from ``params0`` (any pytree) for ``steps`` steps.

    Steps run as a jitted ``lax.scan`` (``args`` are traced arguments, not baked-in constants) in
    chunks of ``eval_every`` (all steps in one chunk without ``validate``). With ``validate``
    (``params -> score``, higher is better) the params are scored at the start and after every chunk
    and the best-scoring ones are returned (the first on ties). ``key`` (default
    ``jax.random.key(0)``) is split into one ``step_key`` per step. Returns (params, the loss at every
    step before its update, float32 (steps,)).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eval_every is not None and eval_every <= 0:
        raise ValueError(f"eval_every must be a positive number of steps, got {eval_every}")
    key = jax.random.key(0) if key is None else key
    step_keys = jax.random.split(key, steps) if steps else None

    @jax.jit
    def run_chunk(params, opt_state, keys, *args):
        def body(carry, step_key):
            params, opt_state = carry
            value, grad = jax.value_and_grad(loss)(params, step_key, *args)
            updates, opt_state = optimizer.update(grad, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, opt_state), values = jax.lax.scan(body, (params, opt_state), keys)
        return params, opt_state, values

    chunk = steps if (validate is None or eval_every is None) else int(eval_every)
    params, opt_state = params0, optimizer.init(params0)
    best = (params0, float(validate(params0)) if validate is not None else None)
    history = []
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        params, opt_state, values = run_chunk(params, opt_state, step_keys[done : done + n], *args)
        history.append(np.asarray(values))
        done += n
        if validate is None:
            best = (params, None)
        else:
            score = float(validate(params))
            if score > best[1]:
                best = (params, score)
    hist = np.concatenate(history).astype(np.float32) if history else np.zeros((0,), np.float32)
    return best[0], hist


def optimise_coefficients(
    problem: _Problem,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    init: float | jax.Array,
    steps: int,
    key: Optional[jax.Array],
    transform: Callable[[jax.Array], jax.Array] = lambda c: c,
    validate: Optional[Validate] = None,
    eval_every: Optional[int] = None,
    granularity: str = "layer",
) -> LearnedMerge:
    """Minimise ``objective(merge(transform(c)), key_s)`` over raw coefficients ``c`` (T, G).

    ``transform`` maps raw to used coefficients (AdaMerging: clamp to [0, 1], whose gradient is 0
    outside the box, as ``torch.clamp`` in the official code). The loop is :func:`minimise`: with
    ``validate`` (``params -> score``, higher is better) the merged model is scored at the start and
    every ``eval_every`` steps and the best-scoring coefficients are returned (first one on ties).
    """
    shape = (problem.num_tasks, problem.num_groups)
    init = jnp.asarray(init, jnp.float32)
    accepted = ((), (problem.num_tasks,)) if granularity == "task" else ((), shape)
    if init.shape not in accepted:
        raise ValueError(f"coefficient init has shape {init.shape}; expected one of {list(accepted)}")
    raw0 = jnp.broadcast_to(init.reshape(init.shape + (1,) * (init.ndim == 1)), shape).astype(jnp.float32)

    @jax.jit
    def merged_params(raw, pretrained, pretrained_flat, stacked_tau):
        return _merged(problem.groups, pretrained, pretrained_flat, stacked_tau, transform(raw))

    def loss(raw, step_key, *args):
        return jnp.asarray(objective(merged_params(raw, *args), step_key), jnp.float32).reshape(())

    args = (problem.pretrained, problem.pretrained_flat, problem.stacked_tau)
    validate_raw = None if validate is None else (lambda raw: validate(merged_params(raw, *args)))
    raw, hist = minimise(loss, raw0, optimizer, steps, key, args, validate_raw, eval_every)
    coefficients = transform(raw)
    if granularity == "task":
        coefficients = coefficients[:, 0]
    return LearnedMerge(merged_params(raw, *args), coefficients, hist)


# ------------------------------------------------------------------------------------ methods


def adamerging(
    pretrained: Params,
    finetuned: Models,
    objective: Objective,
    *,
    granularity: str = "layer",
    plus_plus: bool = False,
    init: float = 0.3,
    lr: float = 1e-3,
    steps: int = 500,
    top_k: float = 0.2,
    layer_index: Optional[LayerIndexFn] = None,
    select: Optional[str | Iterable[str]] = None,
    exclude: Optional[str | Iterable[str]] = None,
    key: Optional[jax.Array] = None,
) -> LearnedMerge:
    """AdaMerging: task-wise or layer-wise coefficients learned by entropy minimisation.

    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.
    Task-wise (Eq. 4): ``theta = theta_0 + sum_t lam_t tau_t``; layer-wise (Eq. 6):
    ``theta^l = theta_0^l + sum_t lam_t^l tau_t^l``; the pretrained weight is fixed at 1.
    Coefficients start at ``init=0.3``, are clamped to [0, 1] in the merge, and are optimised with
    Adam (lr 1e-3, betas (0.9, 0.999), 500 steps) on ``objective``, which for the paper is the
    mean Shannon entropy (:func:`prediction_entropy`, Eq. 7) of the merged model's predictions on
    unlabelled test batches (the official code sums the per-task means over tasks; a mean only
    rescales the gradient, and Adam is invariant to that scale).

    AdaMerging++ (``plus_plus=True``, Sec. 3.2.3): the same over TIES-trimmed, sign-resolved task
    vectors (:func:`ties_selected_entries`, ``top_k=0.2``, the paper's k = 20%).

    Args:
      pretrained: the pretrained tree.
      finetuned: a list of T trees with the structure of ``pretrained``.
      objective: ``(merged_params, step_key) -> scalar`` (jittable; closes over heads and data).
      granularity: ``"layer"`` or ``"task"``.
      layer_index: groups for ``"layer"`` (module doc).
      select: leaf regexes of the leaves merged; unselected leaves stay pretrained.
      exclude: leaf regexes of leaves kept pretrained.
      key: PRNG key split into one ``step_key`` per step (default ``jax.random.key(0)``).
    Returns :class:`LearnedMerge` with clamped coefficients (T,) or (T, G).
    """
    problem = _setup(
        pretrained, finetuned, granularity=granularity, layer_index=layer_index,
        select=select, exclude=exclude, top_k=top_k if plus_plus else None,
    )
    return optimise_coefficients(
        problem, objective, optax.adam(lr, b1=0.9, b2=0.999), init, steps, key,
        transform=lambda c: jnp.clip(c, 0.0, 1.0), granularity=granularity,
    )


def atlas(
    pretrained: Params,
    finetuned: Models,
    objective: Objective,
    *,
    init: float = 0.0,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    steps: int = 500,
    validate: Optional[Validate] = None,
    eval_every: int = 50,
    clip_norm: Optional[float] = 1.0,
    granularity: str = "layer",
    layer_index: Optional[LayerIndexFn] = None,
    select: Optional[str | Iterable[str]] = None,
    exclude: Optional[str | Iterable[str]] = None,
    key: Optional[jax.Array] = None,
) -> LearnedMerge:
    """aTLAS: anisotropic scaling, one learned coefficient per task per parameter block.

    Zhang, Zhang, Yang, Tang, Gould, Ajanthan, "Knowledge Composition using Task Vectors with
    Learned Anisotropic Scaling", NeurIPS 2024, Sec. 3: ``theta = theta_0 + sum_t Lambda_t tau_t``
    with ``Lambda_t`` block-diagonal, one scalar per parameter block (here: per leaf, as
    ``blockwise=True`` in the official code). Coefficients start at 0 (the pretrained model), are
    unconstrained, and are learned with AdamW (lr 1e-3, weight decay 0.1) on a supervised
    ``objective`` (the paper: cross-entropy on a few labelled validation examples per task). The
    official code clips the gradient norm to 1 (``clip_norm``; None disables it) and keeps the
    coefficients with the best validation accuracy: pass ``validate(params) -> score`` (higher is
    better), evaluated at the start and every ``eval_every`` steps. If no later score beats the
    initial one, the initial coefficients are returned.

    Deviation: the paper trains for a number of epochs and validates once per epoch; here the
    budget is ``steps`` (default 500, our choice) and validation every ``eval_every`` steps.
    ``granularity="task"`` gives the isotropic (one scalar per task) variant.
    """
    problem = _setup(
        pretrained, finetuned, granularity=granularity, layer_index=layer_index,
        select=select, exclude=exclude,
    )
    adamw = optax.adamw(lr, weight_decay=weight_decay)
    optimizer = adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    return optimise_coefficients(
        problem, objective, optimizer, init, steps, key,
        validate=validate, eval_every=eval_every, granularity=granularity,
    )


def self_positioning(
    pretrained: Params,
    finetuned: Models,
    objective: Objective,
    *,
    init: Optional[float] = None,
    lr: float = 1e-2,
    momentum: Optional[float] = None,
    steps: int = 500,
    granularity: str = "task",
    layer_index: Optional[LayerIndexFn] = None,
    select: Optional[str | Iterable[str]] = None,
    exclude: Optional[str | Iterable[str]] = None,
    key: Optional[jax.Array] = None,
) -> LearnedMerge:
    """Self Positioning: SGD over the interpolation coefficients of the task vectors.

    Li, Nie, Zhang, Long, Zhang, Xie, "Improving General Text Embedding Model: Tackling Task
    Conflict and Data Imbalance through Model Merging", arXiv 2410.15035 (2024). Taken from the
    paper (abstract and method summary): the merged model lies in the interpolation space of the
    task vectors, ``theta = theta_0 + sum_t alpha_t tau_t``, and the coefficients are found by
    stochastic gradient descent on the task loss over a small probe set balanced across tasks
    (the caller's ``objective``; it samples the probe batch with ``step_key``).

    Not taken from the paper (we could not read its method section's hyperparameters; these are
    our choices, stated here): init ``1/T`` per task (the plain average of the fine-tuned models,
    when ``init`` is None), plain SGD with ``lr=1e-2`` and no momentum, 500 steps, no constraint
    or regulariser on alpha, task-wise coefficients (``granularity="layer"`` is available).
    """
    problem = _setup(
        pretrained, finetuned, granularity=granularity, layer_index=layer_index,
        select=select, exclude=exclude,
    )
    init = 1.0 / problem.num_tasks if init is None else init
    return optimise_coefficients(
        problem, objective, optax.sgd(lr, momentum=momentum), init, steps, key,
        granularity=granularity,
    )
