"""Two-objective toy problem of CAGrad (Liu et al. 2021) as modified by Nash-MTL (Navon et al. 2022).

Losses of ``x = (x1, x2)`` (Cranial-XIX/CAGrad ``toy.py``; AvivNavon/nash-mtl
``experiments/toy/problem.py`` scales the first loss by 0.1, ``--scale 1e-1``):

  f1 = max(|0.5 (-x1 - 7) - tanh(-x2)|, 5e-6).log() + 6,  f2 = max(|0.5 (-x1 + 3) + tanh(-x2) + 2|, 5e-6).log() + 6
  q1 = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20,         q2 = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
  L1 = scale * (f1 c1 + q1 c2),  L2 = f2 c1 + q2 c2,  c1 = max(tanh(x2 / 2), 0),  c2 = max(tanh(-x2 / 2), 0)

The Pareto set is (close to) the segment x2 = -8.3552, x1 in [-7, 7]. Each method runs from the
five Nash-MTL starts with Adam (lr 1e-3, 35k steps, as ``experiments/toy/trainer.py``); the
update direction is ``J^T w`` with the method's weights. ``lax.scan`` over steps, ``vmap`` over
starts, one jit per method.

  python -m experiments.toy_pareto [--steps 35000] [--out experiments/results/toy_pareto.png]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from mtl_jax.train.methods import MethodInputs, get_method, returns_direction, with_num_params
from mtl_jax.train.methods import solvers

LOWER = 5e-6
SCALE = 0.1
STARTS = np.array([[-8.5, 7.5], [0.0, 0.0], [9.0, 9.0], [-7.5, -0.5], [9.0, -1.0]], np.float32)
PARETO_X2 = -8.3552
# Gradient methods (and LS = 'ew'): weights-returning ones and the direction-returning GradDrop (on
# the 2-parameter Jacobian). Methods that scale by the losses are left out: the toy losses are
# negative in most of the plane, which flips the sign of GLS / DB-MTL / FAMO's log-loss gradients and
# of MoCo's tracked targets L_k g_k / ||g_k|| (MoCo ends on the line x2 = 0 from all five starts).
METHODS = (
    "ew",
    "mgda",
    "pcgrad",
    "gradvac",
    "cagrad",
    "nash_mtl",
    "imtl_g",
    "aligned_mtl",
    "upgrad",
    "dualproj",
    "fairgrad",
    "config",
    "sdmgrad",
    "modo",
    "graddrop",
)
TITLES = {
    "ew": "LS",
    "mgda": "MGDA",
    "pcgrad": "PCGrad",
    "gradvac": "GradVac",
    "cagrad": "CAGrad",
    "nash_mtl": "Nash-MTL",
    "imtl_g": "IMTL-G",
    "aligned_mtl": "Aligned-MTL",
    "upgrad": "UPGrad",
    "dualproj": "DualProj",
    "fairgrad": "FairGrad",
    "config": "ConFIG",
    "sdmgrad": "SDMGrad",
    "modo": "MoDo",
    "graddrop": "GradDrop",
}


def toy_losses(x: jax.Array, scale: float = SCALE) -> jax.Array:
    """[2] losses (L1, L2) at ``x`` [2]."""
    x1, x2 = x[0], x[1]
    f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
    f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
    c1 = jnp.maximum(jnp.tanh(x2 * 0.5), 0)
    q1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    q2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = jnp.maximum(jnp.tanh(-x2 * 0.5), 0)
    return jnp.stack([scale * (f1 * c1 + q1 * c2), f2 * c1 + q2 * c2])


def pareto_stationarity(x: jax.Array) -> jax.Array:
    """``min_{w in simplex} ||J(x)^T w||``: 0 at a Pareto-stationary point."""
    jac = jax.jacrev(toy_losses)(x)
    w = solvers.min_norm_on_simplex(jac @ jac.T + 1e-12 * jnp.eye(2))
    return jnp.linalg.norm(jac.T @ w)


def run_method(
    name: str, num_steps: int = 35000, lr: float = 1e-3, starts: np.ndarray = STARTS, seed: int = 0, **hparams
) -> np.ndarray:
    """Trajectories [S, num_steps + 1, 2] of Adam on ``J^T w`` from every start, w from ``name`` (or on
    the direction that GradDrop / MoCo return)."""
    method = with_num_params(get_method(name, **hparams), 2)  # MoCo's per-parameter rows: a 2-parameter Jacobian
    direct = returns_direction(method)
    optimizer = optax.adam(lr)

    def one_start(x0, key):
        def step(carry, t):
            x, opt_state, method_state = carry
            losses, vjp_fn = jax.vjp(toy_losses, x)
            (jac,) = jax.vmap(vjp_fn)(jnp.eye(2, dtype=x.dtype))
            inputs = MethodInputs(losses=losses, step=t, gramian=jac @ jac.T, jacobian=jac)
            out, method_state = method.update(inputs, method_state, jax.random.fold_in(key, t))
            direction = out if direct else jac.T @ out
            updates, opt_state = optimizer.update(direction, opt_state, x)
            x = optax.apply_updates(x, updates)
            return (x, opt_state, method_state), x

        carry = (x0, optimizer.init(x0), method.init(2))
        _, path = jax.lax.scan(step, carry, jnp.arange(num_steps, dtype=jnp.int32))
        return jnp.concatenate([x0[None], path], axis=0)

    keys = jax.random.split(jax.random.key(seed), len(starts))
    run = jax.jit(jax.vmap(one_start))
    return np.asarray(run(jnp.asarray(starts, jnp.float32), keys))


def summarize(trajectories: np.ndarray, tol: float = 0.05) -> dict:
    """Per start: the final point, its Pareto-stationarity measure, whether it reached the front.

    Reached = Pareto-stationary (measure < ``tol``) *and* in the lower valley (x2 < -5): the flat
    plateau of the log terms (x2 > 0) and the line x2 = 0 (where both losses vanish) also have
    near-zero gradients but are not on the Pareto front.
    """
    finals = trajectories[:, -1]
    stationarity = np.asarray(jax.vmap(pareto_stationarity)(jnp.asarray(finals)))
    reached = (stationarity < tol) & (finals[:, 1] < -5.0)
    return {"final": finals, "stationarity": stationarity, "reached": reached}


def plot(results: dict, path: str, scale: float = SCALE) -> None:
    """One panel per method: trajectories over the contours of L1 + L2, Pareto set in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(-10, 10, 300, dtype=np.float32)
    xx, yy = np.meshgrid(grid, grid)
    points = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], axis=1))
    total = np.asarray(jax.vmap(lambda p: toy_losses(p, scale).sum())(points)).reshape(xx.shape)
    names = list(results)
    cols = 5
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    colors = plt.cm.tab10(np.arange(len(STARTS)))
    for ax, name in zip(axes.ravel(), names):
        ax.contour(xx, yy, total, levels=20, cmap="viridis", linewidths=0.6)
        ax.plot([-7, 7], [PARETO_X2, PARETO_X2], color="grey", linewidth=5, alpha=0.6, zorder=0)
        traj, summary = results[name]["trajectories"], results[name]["summary"]
        for i, path_i in enumerate(traj):
            ax.plot(path_i[:, 0], path_i[:, 1], color=colors[i], linewidth=1.2)
            ax.plot(*path_i[0], "o", color=colors[i], markersize=4)
            ax.plot(*path_i[-1], "*" if summary["reached"][i] else "x", color="k", markersize=7)
        ax.set_title(f"{TITLES.get(name, name)} ({int(summary['reached'].sum())}/{len(traj)})")
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    fig.suptitle("Toy problem (Nash-MTL variant of CAGrad toy.py): Adam lr 1e-3; * = Pareto-stationary end, x = not")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=35000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "toy_pareto.png"))
    args = parser.parse_args(argv)
    results = {}
    for name in args.methods.split(","):
        start = time.time()
        trajectories = run_method(name, args.steps, args.lr)
        summary = summarize(trajectories)
        results[name] = {"trajectories": trajectories[:, ::10], "summary": summary}
        finals = " ".join(f"({x:+.2f},{y:+.2f})" for x, y in summary["final"])
        print(
            f"{name:12s} reached {int(summary['reached'].sum())}/5  "
            f"stationarity {np.array2string(summary['stationarity'], precision=3)}  "
            f"finals {finals}  [{time.time() - start:.0f}s]",
            flush=True,
        )
    plot(results, args.out)
    return results


if __name__ == "__main__":
    common.run_main(main)
