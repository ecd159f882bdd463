"""Step time of mtl_jax's train_step vs a hand-written single-loss optax step, side by side.

    python -m benchmarks.step_time [--steps 50] [--rounds 7]

Both steps train the same model on the same batch on one device: ours is the full MTL step
(equal weighting, one optimiser state per task head, NaN/Inf guard, running metrics); the
reference is ``value_and_grad(sum of task losses)`` + one ``optax.adam`` update, jitted with
donation. Rounds alternate between the two so machine noise hits both; the reported figure is the
median over rounds of the per-step time. Prints JSON, then a table with the ratio (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import CONFIGS
from mtl_jax.config import apply_overrides, load_config
from mtl_jax.data.pipeline import to_global
from mtl_jax.train.forward import make_task_losses
from mtl_jax.train.trainer import build_experiment

CASES = {
    "multimnist_lenet_b256": ("multimnist.py", ["batch_size=256", "data.num_train=2048", "data.num_test=256"]),
    "digits_mlp_b256": ("digits_mlp.py", ["batch_size=256"]),
    "multimnist_vit_b128": ("multimnist_vit.py", ["batch_size=128", "data.num_train=2048", "data.num_test=256"]),
}


def reference_step(model, tasks, input_key, lr):
    """The hand-written baseline: summed loss, one optax.adam over all parameters."""
    tx = optax.adam(lr)
    task_losses = make_task_losses(tasks)

    def loss(params, batch):
        return task_losses(model.apply({"params": params}, batch[input_key], train=True), batch).sum()

    @jax.jit
    def init(params):
        return params, tx.init(params)

    def step(carry, batch):
        params, opt_state = carry
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return init, jax.jit(step, donate_argnums=0)


def time_steps(step, carry, batch, n):
    carry, out = step(carry, batch)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(n):
        carry, out = step(carry, batch)
    jax.block_until_ready((carry, out))
    return carry, (time.perf_counter() - start) / n


def first_batch(exp, batch_size: int) -> dict:
    """The first ``batch_size`` training examples of ``exp``'s dataset (input + every label key),
    placed on its data sharding."""
    ds = exp.dataset
    keys = list(dict.fromkeys([ds.input_key] + [t.label_key for t in ds.tasks]))
    batch = {k: np.stack([ds.splits["train"][i][k] for i in range(batch_size)]) for k in keys}
    return to_global(batch, exp.data_sharding)


def bench_case(name, config_file, overrides, steps, rounds):
    config = load_config(os.path.join(CONFIGS, config_file))
    apply_overrides(config, overrides + ["mesh.data=1", "mesh.model=1", "progress_bar=False"])
    exp = build_experiment(config)
    ds = exp.dataset
    batch = first_batch(exp, config.batch_size)
    state = exp.init()
    ref_init, ref_step = reference_step(exp.model, ds.tasks, ds.input_key, config.optim.lr)
    ref_carry = ref_init(jax.tree.map(jnp.copy, state.params))
    ours, ref = [], []
    for _ in range(rounds):
        state, t_ours = time_steps(exp.train_step, state, batch, steps)
        ref_carry, t_ref = time_steps(ref_step, ref_carry, batch, steps)
        ours.append(t_ours)
        ref.append(t_ref)
    ours_ms, ref_ms = 1e3 * float(np.median(ours)), 1e3 * float(np.median(ref))
    return {"case": name, "batch_size": config.batch_size, "tasks": list(ds.task_names),
            "mtl_jax_step_ms": ours_ms, "optax_single_loss_step_ms": ref_ms, "ratio": ours_ms / ref_ms,
            "rounds": rounds, "steps_per_round": steps, "device": str(jax.devices()[0].platform)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    rows = [bench_case(c, *CASES[c], args.steps, args.rounds) for c in args.cases.split(",")]
    print(json.dumps(rows, indent=2))
    print("\n| case | mtl_jax step (ms) | optax single-loss step (ms) | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['mtl_jax_step_ms']:.2f} | {r['optax_single_loss_step_ms']:.2f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
