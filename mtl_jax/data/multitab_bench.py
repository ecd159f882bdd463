"""MultiTab-Bench: synthetic multitask tabular data with tunable task count, task correlation and
relative task complexity (Sinodinos, Wei & Armanfard 2025, "MultiTab: A Scalable Foundation for
Multitask Learning on Tabular Data", AAAI 2026, the MultiTab-Bench section; the authors'
``data/synthetic.py``).

The recipe, for ``T`` tasks over ``D`` standard-normal features ``x ~ N(0, I_D)``:

1. ``U`` [T, D]: orthonormal random directions (QR of a Gaussian matrix).
2. ``P = (1 - rho) I + rho 11^T``: the wanted pairwise cosine similarity ``rho`` between task weights.
3. ``W = V sqrt(Lambda) U`` with ``P = V Lambda V^T``, so that ``W W^T = P``: unit task weight
   vectors with pairwise cosine ``rho``. ``z_t = x . w_t`` is then N(0, 1) and ``corr(z_s, z_t) = rho``.
4. Task t's target: ``y_t = z_t + sum_{k=2}^{degree_t} z_t^k + sigma_t * eps`` (the polynomial degree
   is the task's complexity: degree 1 is linear in x; higher degrees add terms no linear model fits).

Additions to the paper's recipe (it only has regression tasks): a task of kind 'classification'
with C classes labels ``y_t`` by its train-split quantiles (C equal-frequency bins); regression
targets are standardised with the train split's mean and std (heavy-tailed high-degree
polynomials otherwise dominate any sum of losses). Everything is deterministic per seed: the task
weights from ``seed``, each split's features and noise from its own child seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mtl_jax import tasks as T
from mtl_jax.config import COUNT, NONNEG, Rule
from mtl_jax.data.sources import Dataset, from_arrays

# The ``config.data`` keys of this dataset (``--config.data.<key>=...`` when ``data.name`` is
# 'multitab_bench'), with their defaults: ``make_multitab_bench``'s knobs (``kinds`` None: every second
# task classification), and the rules ``mtl_jax.config.check_config`` checks them by.
OPTIONS = dict(num_features=16, num_tasks=3, correlation=0.5, degrees=None, noise=0.01, kinds=None, num_classes=2)
RULES = {"num_features": COUNT, "num_tasks": COUNT, "noise": NONNEG, "num_classes": Rule("int", 2)}


def task_weights(num_tasks: int, num_features: int, correlation: float, rng: np.random.Generator) -> np.ndarray:
    """[T, D] unit vectors with pairwise cosine similarity ``correlation`` (MultiTab-Bench steps 1-3).

    Needs ``num_tasks <= num_features`` and ``-1/(T-1) <= correlation <= 1`` (``P`` positive semidefinite).
    """
    if num_tasks > num_features:
        raise ValueError(f"MultiTab-Bench needs num_tasks <= num_features (orthonormal task directions); "
                         f"got {num_tasks} tasks, {num_features} features")
    lower = -1.0 / (num_tasks - 1) if num_tasks > 1 else -1.0
    if not lower <= correlation <= 1.0:
        raise ValueError(f"task correlation {correlation} makes the task Gram matrix indefinite; "
                         f"valid range for {num_tasks} tasks: [{lower:.3f}, 1]")
    q, _ = np.linalg.qr(rng.standard_normal((num_features, num_tasks)))
    directions = q.T  # [T, D], orthonormal rows
    gram = np.full((num_tasks, num_tasks), correlation) + (1.0 - correlation) * np.eye(num_tasks)
    eigvals, eigvecs = np.linalg.eigh(gram)
    return eigvecs @ np.diag(np.sqrt(np.clip(eigvals, 0.0, None))) @ directions


def polynomial_targets(z: np.ndarray, degrees: Sequence[int]) -> np.ndarray:
    """z [N, T] -> y [N, T] with ``y_t = z_t + sum_{k=2}^{degree_t} z_t^k`` (MultiTab-Bench step 4, no noise)."""
    return np.stack([sum(z[:, t] ** k for k in range(1, int(d) + 1)) for t, d in enumerate(degrees)], axis=1)


def make_multitab_bench(num_train: int = 8000, num_test: int = 2000, num_features: int = 16, num_tasks: int = 3,
                        correlation: float = 0.5, degrees: Sequence[int] | None = None,
                        noise: Sequence[float] | float = 0.01, kinds: Sequence[str] | None = None,
                        num_classes: int = 2, seed: int = 0) -> tuple[dict, tuple[T.TaskSpec, ...]]:
    """MultiTab-Bench splits and task specs.

    Args:
      num_features: D; num_tasks: T; correlation: pairwise cosine ``rho`` of the task weights (= the
        Pearson correlation of the tasks' linear parts z_t).
      degrees: polynomial degree per task (complexity; default 1, 2, 3, ... cycling to 4).
      noise: sigma per task (or one for all).
      kinds: 'regression' or 'classification' per task (default all regression, as the paper).
      num_classes: classes of every classification task (train-split quantile bins).
    Returns:
      ({'train': {'features': float32 [N, D], 'task_<t>': ...}, 'test': {...}}, task specs); a
      regression target is float32 [N, 1], a classification label int32 [N].
    """
    degrees = tuple(degrees) if degrees is not None else tuple(1 + t % 4 for t in range(num_tasks))
    kinds = tuple(kinds) if kinds is not None else ("regression",) * num_tasks
    noise = (float(noise),) * num_tasks if np.isscalar(noise) else tuple(float(s) for s in noise)
    for what, values in (("degrees", degrees), ("kinds", kinds), ("noise", noise)):
        if len(values) != num_tasks:
            raise ValueError(f"MultiTab-Bench: {len(values)} {what} for {num_tasks} tasks")
    unknown = [k for k in kinds if k not in T.TASK_KINDS]
    if unknown:
        raise ValueError(f"MultiTab-Bench: unknown task kind(s) {unknown}; valid kinds: {T.TASK_KINDS}")
    weight_seed, *split_seeds = np.random.SeedSequence(seed).spawn(3)
    weights = task_weights(num_tasks, num_features, correlation, np.random.default_rng(weight_seed))

    def split(n, split_seed):
        rng = np.random.default_rng(split_seed)
        x = rng.standard_normal((n, num_features))
        y = polynomial_targets(x @ weights.T, degrees) + rng.standard_normal((n, num_tasks)) * np.array(noise)
        return x.astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = split(num_train, split_seeds[0]), split(num_test, split_seeds[1])
    names = [f"task_{t}" for t in range(num_tasks)]
    splits = {"train": {"features": x_train}, "test": {"features": x_test}}
    specs = []
    for t, (name, kind) in enumerate(zip(names, kinds)):
        if kind == "classification":
            edges = np.quantile(y_train[:, t], np.linspace(0, 1, num_classes + 1)[1:-1])
            encode = lambda y: np.searchsorted(edges, y).astype(np.int32)
            specs.append(T.classification(name, num_classes))
        else:
            mean, std = y_train[:, t].mean(), y_train[:, t].std()
            encode = lambda y: ((y - mean) / std).astype(np.float32)[:, None]
            specs.append(T.regression(name, 1))
        splits["train"][name], splits["test"][name] = encode(y_train[:, t]), encode(y_test[:, t])
    return splits, tuple(specs)


def load_multitab_bench(cfg) -> Dataset:
    """DATASETS['multitab_bench']: ``cfg.num_train`` / ``cfg.num_test`` / ``cfg.seed``, and the generator's
    knobs (``OPTIONS``: ``num_features``, ``num_tasks``, ``correlation``, ``degrees``, ``noise``, ``kinds``,
    ``num_classes``); the defaults are 16 features and three tasks of degrees 1, 2, 3 with correlation
    0.5, task_0 and task_2 regression, task_1 binary classification."""
    knobs = {key: cfg.get(key, default) for key, default in OPTIONS.items()}
    num_tasks = int(knobs["num_tasks"])
    options = dict(num_features=int(knobs["num_features"]), num_tasks=num_tasks, correlation=float(knobs["correlation"]),
                   degrees=knobs["degrees"], noise=knobs["noise"], num_classes=int(knobs["num_classes"]),
                   kinds=knobs["kinds"] or tuple("classification" if t % 2 else "regression" for t in range(num_tasks)))
    splits, specs = make_multitab_bench(int(cfg.num_train), int(cfg.num_test), seed=int(cfg.seed), **options)
    return from_arrays("multitab_bench", splits, specs, input_key="features")
