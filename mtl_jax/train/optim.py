"""Optimisers from config: one for the shared parameters, one per task head.

``config.optim`` sets the shared optimiser; ``config.head_optim.<task>`` overrides any of its fields
for that task's head (unset fields inherit ``config.optim``), so each task's optimiser and learning
rate are settable, e.g. ``--config.head_optim.left.lr=0``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import ml_collections
import optax

from mtl_jax.registry import lookup


def _schedule(cfg, total_steps: int):
    warmup = int(cfg.get("warmup_steps", 0))
    name = cfg.get("schedule", "constant")
    decay_steps = max(total_steps - warmup, 1)
    schedules = {
        "constant": lambda: optax.constant_schedule(cfg.lr),
        "cosine": lambda: optax.cosine_decay_schedule(cfg.lr, decay_steps),
        "linear": lambda: optax.linear_schedule(cfg.lr, 0.0, decay_steps),
        # torch's StepLR: lr * decay_factor ** floor(step / decay_every) (MTAN / Nash-MTL / LibMTL: x0.5 after
        # 100 of 200 epochs); decay_every = 0: half of the decay steps.
        "step": lambda: optax.exponential_decay(cfg.lr, int(cfg.get("decay_every", 0)) or max(decay_steps // 2, 1),
                                                float(cfg.get("decay_factor", 0.5)), staircase=True),
    }
    main = lookup(schedules, name, "schedule")()
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])
    return main


OPTIMIZERS = {
    "adam": lambda cfg, lr: optax.adam(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8)),
    "adamw": lambda cfg, lr: optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                                         weight_decay=cfg.get("weight_decay", 0.0)),
    "sgd": lambda cfg, lr: optax.sgd(lr, momentum=cfg.get("momentum", 0.0) or None,
                                     nesterov=bool(cfg.get("nesterov", False))),
}


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """``cfg``: name, lr, schedule, warmup_steps, grad_clip_norm (0 = off), weight_decay (adamw),
    decay_every / decay_factor ('step' schedule), ..."""
    tx = lookup(OPTIMIZERS, cfg.name, "optimiser")(cfg, _schedule(cfg, total_steps))
    clip = float(cfg.get("grad_clip_norm", 0.0) or 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def head_optim_config(optim_cfg, overrides) -> ml_collections.ConfigDict:
    """``optim_cfg`` with every non-None field of ``overrides`` replaced."""
    merged = ml_collections.ConfigDict(optim_cfg.to_dict())
    for key, value in (overrides.items() if overrides else ()):
        if value is None:
            continue
        if key not in merged:
            raise ValueError(f"head_optim: unknown optimiser field '{key}'; valid fields: {sorted(merged)}")
        merged[key] = value
    return merged


def make_optimizers(config, task_names: Sequence[str], total_steps: int) -> dict:
    """``{'shared': tx, 'heads': {task: tx}}``, the same structure as the top of ``params``."""
    head_cfgs: Mapping = config.get("head_optim") or {}
    unknown = [t for t in head_cfgs if t not in task_names]
    if unknown:
        raise ValueError(f"head_optim names unknown task(s) {unknown}; tasks: {list(task_names)}")
    return {
        "shared": make_optimizer(config.optim, total_steps),
        "heads": {t: make_optimizer(head_optim_config(config.optim, head_cfgs.get(t)), total_steps)
                  for t in task_names},
    }


def map_groups(fn, optimizers: Mapping, *trees: Mapping) -> dict:
    """Applies ``fn(tx, *subtrees)`` to every group ('shared' and each head); returns the same structure.

    One optimiser state per group, each over its own subtree, rather than ``optax.partition``, whose
    state holds every group's moments over the whole parameter tree with ``MaskedNode`` placeholders:
    (K + 1) times the pytree nodes, which every jitted step's dispatch flattens and every checkpoint's
    metadata records (measured in docs/development/layout.md)."""
    out = {"shared": fn(optimizers["shared"], *(t["shared"] for t in trees)), "heads": {}}
    for task, tx in optimizers["heads"].items():
        out["heads"][task] = fn(tx, *(t["heads"][task] for t in trees))
    return out
