"""PDE data for MT-DeepONet (Kumar, Goswami, Kontolati, Shields & Karniadakis 2024, "Synergistic
Learning with Multi-Task DeepONet for Efficient PDE Problem Solving", arXiv 2408.02198, the
Fisher and Darcy examples): small JAX finite-difference solvers and the multi-task datasets built from them.

* 1D Fisher(-KPP) equation ``u_t = D u_xx + r u (1 - u) + f(x)`` on x in [0, 1], ``u = 0`` at both
  ends, ``u(x, 0) = u0(x)``: central differences in space, explicit Euler in time with
  ``dt <= 0.4 dx^2 / D`` (stable; error O(dx^2 + dt) = O(dx^2)). Each *family* of source terms
  (``FISHER_FAMILIES``: sines, Gaussian bumps, cubic polynomials) is one task.
* 2D Darcy flow ``-div(k grad u) = f`` on a geometry Omega inside the unit square, ``u = 0`` on and
  outside the boundary of Omega: five-point finite-volume stencil on the nodes of an n x n grid
  (face permeabilities = arithmetic means of the node values, second order), the geometry a binary
  mask on the interior nodes; the masked system ``M A M u + (I - M) u = M f`` is symmetric positive
  definite and solved matrix-free by conjugate gradients. Each geometry (``DARCY_GEOMETRIES``:
  square, L-shape, square with a square hole) is one task; the input function is a random
  log-normal permeability, ``f = 10``.

A record holds ``branch`` float32 [K, n_in] (one row per task: the input function sampled on the
grid, then the geometry mask) and, per task, float32 [P, 2] (solution on the grid flattened in C
order, then the mask that the loss ``masked_mse`` and the metric ``relative_l2`` read). Row k of
every record is an independent instance of task k, so each task has a target in every record.
Instances depend only on (seed, task, split): a single-task dataset holds the same instances as
the multi-task one.

Deviations from the paper: the paper encodes each source-term family by its coefficients in a
common functional expansion; here the branch reads the source sampled at the grid points (a
form-agnostic encoding of the same information). Grids are small (CPU-sized).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import tasks as T
from mtl_jax.data.sources import Dataset, from_arrays
from mtl_jax.registry import lookup

# ----------------------------------------------------------------------------------------------
# 1D Fisher-KPP


def laplacian_1d(u, dx: float):
    """Second difference of u [..., nx] with u = 0 beyond both ends: [..., nx] (the end values are
    kept at 0 by the caller)."""
    padded = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(1, 1)])
    return (padded[..., 2:] - 2.0 * u + padded[..., :-2]) / dx**2


def solve_fisher(u0, source: Callable, diffusion: float, reaction: float, t_final: float, num_saves: int,
                 dx: float, max_dt: float | None = None):
    """Explicit finite differences for ``u_t = D u_xx + r u (1 - u) + source(x, t)``, u = 0 at both ends.

    Args:
      u0: [nx] initial values on x_i = i dx, i = 0..nx-1 (the end values are overwritten by 0).
      source: ``source(t) -> [nx]`` at time t (a closure over x).
      t_final: last saved time; ``num_saves`` >= 2 snapshots at t = j t_final / (num_saves - 1).
      max_dt: time-step bound (default 0.4 dx^2 / D, inside explicit Euler's stability limit 0.5).
    Returns:
      u [num_saves, nx], the solution at the saved times (row 0 = the initial condition).
    """
    max_dt = 0.4 * dx**2 / diffusion if max_dt is None else max_dt
    save_dt = t_final / (num_saves - 1)
    steps = max(1, math.ceil(save_dt / max_dt - 1e-9))
    dt = save_dt / steps
    interior = jnp.ones_like(u0).at[0].set(0.0).at[-1].set(0.0)

    def euler(i, carry):
        u, t = carry
        du = diffusion * laplacian_1d(u, dx) + reaction * u * (1.0 - u) + source(t)
        return (u + dt * du) * interior, t + dt

    def save(carry, _):
        carry = jax.lax.fori_loop(0, steps, euler, carry)
        return carry, carry[0]

    u0 = u0 * interior
    _, snapshots = jax.lax.scan(save, (u0, jnp.zeros((), u0.dtype)), None, length=num_saves - 1)
    return jnp.concatenate([u0[None], snapshots])


def _sines(rng, x, n):
    amplitude, k = rng.uniform(0.2, 1.0, (n, 1)), rng.integers(1, 4, (n, 1))
    return amplitude * np.sin(k * np.pi * x)


def _gaussians(rng, x, n):
    amplitude, centre, width = rng.uniform(0.2, 1.0, (n, 1)), rng.uniform(0.2, 0.8, (n, 1)), rng.uniform(0.05, 0.2, (n, 1))
    return amplitude * np.exp(-((x - centre) ** 2) / (2 * width**2))


def _cubics(rng, x, n):
    amplitude, slope = rng.uniform(0.5, 3.0, (n, 1)), rng.uniform(-1.0, 1.0, (n, 1))
    return amplitude * x * (1 - x) * (1 + slope * x)


# Source-term families f(rng, x [nx], n) -> [n, nx]: each is one Fisher task.
FISHER_FAMILIES = {"sine": _sines, "gaussian": _gaussians, "cubic": _cubics}
FISHER_GRID = dict(nx=33, num_saves=11, t_final=1.0, diffusion=0.05, reaction=1.0)


def fisher_grid_shape(nx: int = FISHER_GRID["nx"], num_saves: int = FISHER_GRID["num_saves"]) -> tuple[int, int]:
    """(time, space): the C-order layout of a flattened Fisher solution."""
    return (num_saves, nx)


def fisher_instances(family: str, n: int, rng: np.random.Generator, nx: int, num_saves: int, t_final: float,
                     diffusion: float, reaction: float):
    """(branch [n, 2 nx] = (f on the grid, mask = 1), target [n, num_saves * nx, 2]) for one family;
    u0(x) = sin(pi x) / 2 for every instance."""
    x = np.linspace(0.0, 1.0, nx)
    sources = lookup(FISHER_FAMILIES, family, "Fisher source family")(rng, x, n).astype(np.float32)
    u0 = jnp.asarray(0.5 * np.sin(np.pi * x), jnp.float32)
    solve = jax.jit(jax.vmap(lambda f: solve_fisher(u0, lambda t: f, diffusion, reaction, t_final, num_saves,
                                                    1.0 / (nx - 1))))
    u = np.asarray(solve(jnp.asarray(sources))).reshape(n, -1)
    mask = np.ones_like(sources)
    return np.concatenate([sources, mask], axis=1), np.stack([u, np.ones_like(u)], axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# 2D Darcy


def darcy_operator(u, k_nodes, h: float):
    """``-div(k grad u)`` by the five-point finite-volume stencil.

    u [n-1, n-1] on the interior nodes of an n x n cell grid (u = 0 on the boundary nodes);
    k_nodes [n+1, n+1] on all nodes; face values are arithmetic means of the two node values.
    Returns [n-1, n-1].
    """
    up = jnp.pad(u, 1)
    kx = 0.5 * (k_nodes[1:, :] + k_nodes[:-1, :])  # faces (i+1/2, j): [n, n+1]
    ky = 0.5 * (k_nodes[:, 1:] + k_nodes[:, :-1])  # faces (i, j+1/2): [n+1, n]
    flux_x = kx[:, 1:-1] * (up[1:, 1:-1] - up[:-1, 1:-1])  # [n, n-1]
    flux_y = ky[1:-1, :] * (up[1:-1, 1:] - up[1:-1, :-1])  # [n-1, n]
    return -((flux_x[1:] - flux_x[:-1]) + (flux_y[:, 1:] - flux_y[:, :-1])) / h**2


def solve_darcy(k_nodes, f, mask, tol: float = 1e-6, maxiter: int = 2000):
    """u [n-1, n-1] with ``-div(k grad u) = f`` where ``mask`` is 1 and ``u = 0`` where it is 0.

    k_nodes [n+1, n+1] (all nodes of the unit square), f and mask [n-1, n-1] (interior nodes).
    Solves ``M A M u + (I - M) u = M f`` (symmetric positive definite) by conjugate gradients.
    """
    n = k_nodes.shape[0] - 1
    mask = mask.astype(f.dtype)
    matvec = lambda u: mask * darcy_operator(mask * u, k_nodes, 1.0 / n) + (1.0 - mask) * u
    u, _ = jax.scipy.sparse.linalg.cg(matvec, mask * f, tol=tol, maxiter=maxiter)
    return mask * u


def _square(x, y):
    return np.ones_like(x, bool)


def _lshape(x, y):
    return ~((x > 0.5) & (y > 0.5))


def _hole(x, y):
    return ~((np.abs(x - 0.5) < 0.2) & (np.abs(y - 0.5) < 0.2))


# Geometries (x, y) -> bool inside Omega: each is one Darcy task.
DARCY_GEOMETRIES = {"square": _square, "lshape": _lshape, "hole": _hole}
DARCY_GRID = dict(n=21, source=10.0)


def darcy_grid_shape(n: int = DARCY_GRID["n"]) -> tuple[int, int]:
    """The interior nodes (x, y) of an n x n cell grid: the layout of a flattened Darcy solution."""
    return (n - 1, n - 1)


def random_permeability(rng: np.random.Generator, num: int, n: int, modes: int = 3, scale: float = 1.0) -> np.ndarray:
    """[num, n+1, n+1] log-normal fields ``exp(scale * sum_{p,q<=modes} xi_pq cos(p pi x) cos(q pi y) / (p^2+q^2))``
    with xi ~ N(0, 1), on the nodes of the unit square."""
    t = np.linspace(0.0, 1.0, n + 1)
    freq = np.arange(1, modes + 1)
    basis = np.cos(np.pi * freq[:, None] * t[None])  # [modes, n+1]
    decay = 1.0 / (freq[:, None] ** 2 + freq[None] ** 2)
    xi = rng.standard_normal((num, modes, modes)) * decay
    return np.exp(scale * np.einsum("bpq,px,qy->bxy", xi, basis, basis)).astype(np.float32)


def darcy_instances(geometry: str, num: int, rng: np.random.Generator, n: int, source: float):
    """(branch [num, 2 (n-1)^2] = (k on the interior nodes, mask), target [num, (n-1)^2, 2]) for one geometry."""
    inner = np.linspace(0.0, 1.0, n + 1)[1:-1]
    x, y = np.meshgrid(inner, inner, indexing="ij")
    mask = lookup(DARCY_GEOMETRIES, geometry, "Darcy geometry")(x, y).astype(np.float32)
    k = random_permeability(rng, num, n)
    f = jnp.full(mask.shape, source, jnp.float32)
    u = np.asarray(jax.jit(jax.vmap(lambda kk: solve_darcy(kk, f, jnp.asarray(mask))))(jnp.asarray(k)))
    flat_mask = np.broadcast_to(mask.reshape(1, -1), (num, mask.size))
    branch = np.concatenate([k[:, 1:-1, 1:-1].reshape(num, -1), flat_mask], axis=1)
    return branch.astype(np.float32), np.stack([u.reshape(num, -1), flat_mask], axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Datasets


def field_task(name: str, num_points: int) -> T.TaskSpec:
    """A field-regression task: target [P, 2] (value, mask), loss 'masked_mse', main metric 'relative_l2'."""
    return T.regression(name, num_points, loss="masked_mse", metrics=("relative_l2", "masked_mse"))


def multitask_pde(name: str, instances: Callable, families: Sequence[str], all_families: Sequence[str],
                  num_train: int, num_test: int, seed: int) -> Dataset:
    """Stacks ``instances(family, n, rng) -> (branch [n, n_in], target [n, P, 2])`` of every family into
    records ``{'branch': [K, n_in], family: [P, 2]}``. The rng of (family, split) is seeded by
    ``(seed, index of the family in all_families, split)``."""
    unknown = [f for f in families if f not in all_families]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} for dataset '{name}'; valid: {list(all_families)}")
    splits = {}
    for split_id, (split, n) in enumerate((("train", num_train), ("test", num_test))):
        made = {f: instances(f, n, np.random.default_rng([seed, list(all_families).index(f), split_id]))
                for f in families}
        splits[split] = {"branch": np.stack([made[f][0] for f in families], axis=1),
                         **{f: made[f][1] for f in families}}
    num_points = splits["train"][families[0]].shape[1]
    return from_arrays(name, splits, [field_task(f, num_points) for f in families], input_key="branch")


def load_fisher(cfg) -> Dataset:
    """DATASETS['pde_fisher']: Fisher-KPP with one task per source family (``cfg.tasks``: a subset,
    default all of FISHER_FAMILIES); ``cfg.num_train`` / ``num_test`` instances per family."""
    families = tuple(cfg.get("tasks") or FISHER_FAMILIES)
    instances = lambda f, n, rng: fisher_instances(f, n, rng, **FISHER_GRID)
    return multitask_pde("pde_fisher", instances, families, tuple(FISHER_FAMILIES), int(cfg.num_train),
                         int(cfg.num_test), int(cfg.seed))


def load_darcy(cfg) -> Dataset:
    """DATASETS['pde_darcy']: Darcy flow with one task per geometry (``cfg.tasks``: a subset, default
    all of DARCY_GEOMETRIES); ``cfg.num_train`` / ``num_test`` instances per geometry."""
    geometries = tuple(cfg.get("tasks") or DARCY_GEOMETRIES)
    instances = lambda g, n, rng: darcy_instances(g, n, rng, **DARCY_GRID)
    return multitask_pde("pde_darcy", instances, geometries, tuple(DARCY_GEOMETRIES), int(cfg.num_train),
                         int(cfg.num_test), int(cfg.seed))
