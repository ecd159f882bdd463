"""Model size and cost: parameter count and inference FLOPs per example from XLA's cost analysis.

Both work on shapes only (``jax.eval_shape`` + ``jit(...).lower(...)``): nothing is initialised or
run. FLOPs are XLA's count for the compiled inference forward (``train=False``, every task's output)
of ``batch_size`` examples, divided by ``batch_size``; XLA counts a multiply-add as 2 FLOPs.
"""

from __future__ import annotations

import jax
import numpy as np


def abstract_variables(model, sample_input):
    """The shapes of ``model.init(key, sample_input, train=False)`` (no computation)."""
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                               x, train=False), sample_input)


def param_count(variables) -> int:
    """Number of scalars in ``variables['params']`` (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(variables["params"])))


def cost_flops(cost) -> float:
    """The ``'flops'`` of ``Compiled.cost_analysis()``, which is a dict or (older jax) a list of
    dicts, one per computation; None or no 'flops' entry -> ValueError."""
    entries = [cost] if isinstance(cost, dict) else list(cost or [])
    flops = [float(e["flops"]) for e in entries if e and "flops" in e]
    if not flops:
        raise ValueError(f"XLA cost analysis reported no 'flops': {cost!r}")
    return float(sum(flops))


def inference_flops(model, variables, example, batch_size: int = 8, **apply_kwargs) -> float:
    """XLA FLOPs of ``model.apply(variables, x, train=False, **apply_kwargs)`` per example, x =
    ``batch_size`` copies of ``example``'s shape and dtype (one example, no batch axis);
    ``apply_kwargs`` e.g. ``tasks=('left',)`` for a task-routed model's single-task forward."""
    x = jax.ShapeDtypeStruct((batch_size,) + tuple(example.shape), example.dtype)
    forward = jax.jit(lambda v, inputs: model.apply(v, inputs, train=False, rngs={"dropout": jax.random.key(0)},
                                                    **apply_kwargs))
    return cost_flops(forward.lower(variables, x).compile().cost_analysis()) / batch_size


def model_cost(model, example, batch_size: int = 8) -> dict:
    """``{'params': parameter count, 'flops_per_example': inference FLOPs}`` for one unbatched example."""
    x = jax.ShapeDtypeStruct((1,) + tuple(example.shape), example.dtype)
    variables = abstract_variables(model, x)
    return {"params": param_count(variables),
            "flops_per_example": inference_flops(model, variables, example, batch_size)}


__all__ = ["abstract_variables", "param_count", "cost_flops", "inference_flops", "model_cost"]
