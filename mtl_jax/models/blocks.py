"""Building blocks shared by the MTL architectures (moe.py, mtan.py, cross_stitch.py, ltb.py)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp


def as_float(x):
    """Input [B, ...] -> floating: uint8 images as float32 scaled to [0, 1] (as trunks.LeNet does), other
    integers as float32, floating inputs in their own dtype (a mixed-precision forward's compute dtype)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return x.astype(jnp.float32) / (255.0 if x.dtype == jnp.uint8 else 1.0)


def flat_input(x):
    """[B, ...] -> [B, prod(...)] float32, uint8 scaled to [0, 1]: the input LibMTL's gates read."""
    return as_float(x).reshape(x.shape[0], -1)


@functools.lru_cache(maxsize=None)
def _scan_copy(base: type) -> type:
    """``base`` with the call ``(carry, _) -> (carry, base(carry, train))`` that ``nn.scan`` wants
    (``train`` a field); submodules stay where ``base`` puts them, so parameter paths are unchanged."""

    class ScanCopy(base):
        scan_train: bool = False

        def __call__(self, carry, _):
            return carry, base.__call__(self, carry, self.scan_train)

    ScanCopy.__name__ = ScanCopy.__qualname__ = base.__name__
    return ScanCopy


def stacked(module: nn.Module, num: int, name: str):
    """``num`` independently initialised copies of ``module`` (call it inside a compact method):
    ``copies(x [B, ...], train) -> [num, B, ...]``, every parameter leaf gets a leading axis of
    size ``num``; dropout masks differ per copy.

    The copies run as an unrolled ``nn.scan`` over the stacked parameters, i.e. ``num`` ordinary
    layers: vmapping them over the weights instead turns conv experts into one grouped
    convolution, 4.4x slower forward + backward on XLA:CPU (4 LeNet experts, batch 256).
    """
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}
    if num == 1:  # a vmap of size 1 is the module itself; a length-1 scan ran 3.6x slower (LeNet, XLA:CPU)
        return nn.vmap(type(module), in_axes=None, out_axes=0, axis_size=1, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True})(**fields, name=name)
    cls = nn.scan(_scan_copy(type(module)), variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                  length=num, unroll=True)

    def copies(x, train: bool = False):
        return cls(**fields, scan_train=train, name=name)(x, None)[1]

    return copies


def mix(reps, weights):
    """Gated mixture: reps [E, B, ...], weights [B, E] -> sum_e weights[:, e] * reps[e]  [B, ...]."""
    return jnp.einsum("eb...,be->b...", reps, weights.astype(reps.dtype))


def stitch(mixing, reps):
    """Linear combination of task streams: mixing [K, K], reps [K, B, ...] -> [K, B, ...] with
    out[k] = sum_j mixing[k, j] * reps[j] (a cross-stitch unit; an LTB branch choice)."""
    return jnp.einsum("kj,jb...->kb...", mixing.astype(reps.dtype), reps)


class PerTask(nn.Module):
    """One module per task, parameters under ``<this module>/<task>``.

    ``per_task(args {task: tuple}) -> {task: towers[task](*args[task])}``; call it several times
    (e.g. once per stage) to reuse the same parameters. Towers are deep-cloned, so module fields
    they hold (a head already bound to the caller, a gate) get their parameters under
    ``<task>/<field>`` rather than where they were first adopted.
    """

    towers: Mapping[str, nn.Module]

    @nn.compact
    def __call__(self, args: Mapping[str, tuple]):
        return {task: tower.clone(parent=self, name=task, _deep_clone=True, _reset_names=True)(*args[task])
                for task, tower in self.towers.items()}


def sow_unless_init(module: nn.Module, name: str, value) -> None:
    """Records ``value`` in the 'intermediates' collection (read it with
    ``apply(..., mutable=['intermediates'])``); skipped during ``init`` so that ``init`` returns no
    'intermediates' the trainer would mistake for model state."""
    if not module.is_initializing():
        module.sow("intermediates", name, value)


class Column(nn.Module):
    """One task's copy of a staged trunk, run stage by stage: ``column(level, x, train)`` applies
    stage ``level`` (parameters ``stage_{level}``). Cross-stitch and LTB keep one column per task."""

    encoder: nn.Module  # a staged trunk (staged.STAGED_TRUNKS)

    @nn.compact
    def __call__(self, level: int, x, train: bool = False):
        return self.encoder.stages()[level].clone(parent=self, name=f"stage_{level}")(x, train)


def mixed_columns(encoder: nn.Module, tasks: tuple, x, train: bool, mixing):
    """One staged-encoder column per task, the task streams mixed between stages (Cross-stitch
    units, LTB branch choices): mixing [S - 1, K, K] -> {task: [B, D]}. Column parameters go under
    ``columns/<task>`` of the calling module; call it from a compact method."""
    columns = PerTask({t: Column(encoder, parent=None) for t in tasks}, name="columns")
    reps = columns({t: (0, x, train) for t in tasks})
    for level in range(1, len(encoder.stages())):
        mixed = stitch(mixing[level - 1], jnp.stack([reps[t] for t in tasks]))
        reps = columns({t: (level, mixed[k], train) for k, t in enumerate(tasks)})
    return reps
