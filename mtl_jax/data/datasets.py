"""Dataset loaders shipped with mtl_jax (real data from installed packages; no network).

A loader is ``fn(data_config) -> Dataset``. ``DATASETS`` is the registry the config's ``data.name``
picks from: each name maps to ``{"load": loader, "options": {key: default}, "rules": {key: Rule}}``,
the last two declared by the dataset's module beside its loader (absent: none): the keys of
``config.data`` only that dataset reads (valid in a config, and as ``--config.data.<key>=...``
overrides, when ``data.name`` is that dataset; the loader takes the default of a key the config
lacks) and the ``mtl_jax.config.Rule`` each is checked by (``mtl_jax.config.check_config``).
"""

from __future__ import annotations

import numpy as np

from mtl_jax import tasks as T
from mtl_jax.data import celeba, mtan_npy, multimnist, multitab_bench, office, qm9, rendered_scenes, wiki
from mtl_jax.data.pde import load_darcy, load_fisher
from mtl_jax.data.frozen_features import with_frozen_features
from mtl_jax.data.sources import Dataset, from_arrays, read_all
from mtl_jax.data.tfds_builders import ArrayDictBuilder, data_sources, default_data_dir, prepare
from mtl_jax.registry import lookup


def load_multimnist(cfg) -> Dataset:
    """MultiMNIST (see ``mtl_jax.data.multimnist``), prepared once as a tfds array_record dataset.

    Config: ``num_train`` / ``num_test`` pairs (default 60,000 / 10,000, from 4,000 / 1,000 disjoint
    source digits), ``seed``, ``data_dir``.
    """
    num_train, num_test, seed = int(cfg.num_train), int(cfg.num_test), int(cfg.seed)
    builder = ArrayDictBuilder(
        dataset_name="multi_mnist",
        config_name=f"train{num_train}_test{num_test}_seed{seed}",
        generate=lambda: multimnist.make_multimnist(num_train, num_test, seed),
        description=multimnist.__doc__,
        data_dir=cfg.data_dir or default_data_dir(),
    )
    tasks = (T.classification("left", 10), T.classification("right", 10))
    return Dataset(name="multimnist", tasks=tasks, splits=data_sources(prepare(builder)), input_key="image")


def load_digits(cfg) -> Dataset:
    """scikit-learn's 1,797 real 8x8 digits with three tasks on the same image.

    Tasks: ``digit`` (10-way), ``parity`` (odd/even, 2-way), ``ink`` (regression: fraction of pixels
    above half intensity, standardised). Split: a fixed permutation (``seed``), last 20% test.
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = (d.images[..., None] / 16.0).astype(np.float32)  # [N, 8, 8, 1] in [0, 1]
    ink = (images > 0.5).mean(axis=(1, 2, 3))
    ink = ((ink - ink.mean()) / ink.std()).astype(np.float32)[:, None]
    arrays = {"image": images, "digit": d.target.astype(np.int64), "parity": (d.target % 2).astype(np.int64),
              "ink": ink}
    order = np.random.default_rng(int(cfg.seed)).permutation(len(images))
    cut = int(0.8 * len(images))
    splits = {"train": {k: v[order[:cut]] for k, v in arrays.items()},
              "test": {k: v[order[cut:]] for k, v in arrays.items()}}
    tasks = (T.classification("digit", 10), T.classification("parity", 2), T.regression("ink", 1))
    return from_arrays("digits", splits, tasks, input_key="image")


def one_task_per_example(dataset: Dataset, ratios=(), seed: int = 0, split: str = "train") -> Dataset:
    """Heterogeneous multi-task data (Mod-Squad's setting: each task its own examples): every
    example of ``split`` keeps the label of one task, drawn with probabilities ``ratios`` (task
    order; default equal), the other tasks' labels become -1 ("not labelled",
    ``mtl_jax.train.step.labelled``). Other splits stay fully labelled. Classification tasks only."""
    names = [t.name for t in dataset.tasks]
    other = [t.name for t in dataset.tasks if t.kind != "classification"]
    if other:
        raise ValueError(f"one_task_per_example: tasks {other} are not classification tasks (no 'not labelled' label)")
    ratios = np.full(len(names), 1.0 / len(names)) if not len(ratios) else np.asarray(ratios, np.float64)
    if ratios.shape != (len(names),) or np.any(ratios < 0) or ratios.sum() <= 0:
        raise ValueError(f"one_task_per_example: ratios {ratios.tolist()} must be {len(names)} non-negative "
                         f"numbers (tasks {names})")
    arrays = {s: dict(read_all(src)) for s, src in dataset.splits.items()}
    size = len(next(iter(arrays[split].values())))
    drawn = np.random.default_rng(seed).choice(len(names), size=size, p=ratios / ratios.sum())
    for k, task in enumerate(dataset.tasks):
        labels = arrays[split][task.label_key].astype(np.int64)
        arrays[split][task.label_key] = np.where(drawn == k, labels, -1)
    return from_arrays(dataset.name + "_one_task", arrays, dataset.tasks, dataset.input_key)


def mixture_of_task_datasets(name: str, datasets: dict, ratios=(), size: int = 0, seed: int = 0,
                             split: str = "train") -> Dataset:
    """Heterogeneous multi-task data from separate datasets (Mod-Squad / Chen et al. 2023's setting:
    each task its own dataset and sampling ratio). ``datasets`` maps a task name to a ``Dataset`` that
    has a classification task of that name; every example keeps that one label, the other tasks' labels
    are -1 ("not labelled").

    ``split`` (training) holds ``size`` examples (default: all of them, summed over the datasets), the
    task of each drawn with probabilities ``ratios`` (task order of ``datasets``; default proportional to
    the datasets' ``split`` sizes), each task's examples taken in a shuffled order, cycled when a task
    is drawn more often than it has examples. Every other split (e.g. 'test') is the concatenation of
    the datasets' splits, each example labelled for its own task. Inputs must agree in shape and dtype.
    """
    names = list(datasets)
    tasks = []
    for task, dataset in datasets.items():
        spec = {t.name: t for t in dataset.tasks}.get(task)
        if spec is None or spec.kind != "classification":
            raise ValueError(f"mixture_of_task_datasets: dataset '{dataset.name}' has no classification task '{task}'; "
                             f"its tasks: {[(t.name, t.kind) for t in dataset.tasks]}")
        tasks.append(spec)
    reads = {task: {s: read_all(src) for s, src in d.splits.items()} for task, d in datasets.items()}
    shapes = {task: (reads[task][split][d.input_key].shape[1:], reads[task][split][d.input_key].dtype)
              for task, d in datasets.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"mixture_of_task_datasets: inputs differ in shape / dtype per example: "
                         f"{ {t: (tuple(sh), str(dt)) for t, (sh, dt) in shapes.items()} }")
    counts = np.array([len(reads[t][split][datasets[t].input_key]) for t in names])
    ratios = counts / counts.sum() if not len(ratios) else np.asarray(ratios, np.float64)
    if ratios.shape != (len(names),) or np.any(ratios < 0) or ratios.sum() <= 0:
        raise ValueError(f"mixture_of_task_datasets: ratios {np.asarray(ratios).tolist()} must be {len(names)} "
                         f"non-negative numbers (tasks {names})")
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(names), size=int(size) or int(counts.sum()), p=ratios / ratios.sum())

    def records(split_name: str, rows_of) -> dict:
        """Every task's ``rows_of(k)`` rows of ``split_name``, concatenated in task order: its input, its
        label, -1 for the other tasks."""
        parts = []
        for k, task in enumerate(names):
            arrays, rows = reads[task][split_name], rows_of(k)
            part = {"input": arrays[datasets[task].input_key][rows]}
            for j, spec in enumerate(tasks):
                part[spec.label_key] = (arrays[spec.label_key][rows].astype(np.int64) if j == k
                                        else np.full(len(rows), -1, np.int64))
            parts.append(part)
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    # training: task k fills the slots drawn for it with its examples in a shuffled, cycled order
    slots = [np.flatnonzero(drawn == k) for k in range(len(names))]
    train = records(split, lambda k: rng.permutation(counts[k])[np.arange(len(slots[k])) % counts[k]])
    order = np.argsort(np.concatenate(slots))
    splits = {split: {key: value[order] for key, value in train.items()}}
    for other in sorted(set.intersection(*(set(r) for r in reads.values())) - {split}):
        splits[other] = records(other, lambda k: np.arange(len(reads[names[k]][other][datasets[names[k]].input_key])))
    return from_arrays(name, splits, tasks, input_key="input")


# Mod-Squad-style heterogeneous data: the probability of each task's label per training pair (() = equal).
ONE_TASK_OPTIONS = dict(task_ratios=())


def load_multimnist_one_task(cfg) -> Dataset:
    """MultiMNIST with each training pair labelled for one digit (``one_task_per_example``, ratios
    ``cfg.task_ratios``, a ``ONE_TASK_OPTIONS`` key; () = equal); the test split keeps both labels."""
    ratios = tuple(cfg.get("task_ratios", ONE_TASK_OPTIONS["task_ratios"]) or ())
    return one_task_per_example(load_multimnist(cfg), ratios, int(cfg.seed))


# Labels computed from a MultiMNIST pair's two digits (l, r): {name: (number of classes, fn(l, r))}.
MULTIMNIST_DERIVED_LABELS = {
    "left": (10, lambda l, r: l),
    "right": (10, lambda l, r: r),
    "sum": (19, lambda l, r: l + r),
    "difference": (10, lambda l, r: np.abs(l - r)),
    "max": (10, np.maximum),
    "min": (10, np.minimum),
    "product_last_digit": (10, lambda l, r: (l * r) % 10),
}
# The tasks of ``multimnist_derived``: names of ``MULTIMNIST_DERIVED_LABELS``.
DERIVED_OPTIONS = dict(derived_tasks=("left", "right", "sum", "difference", "max"))


def load_multimnist_derived(cfg) -> Dataset:
    """MultiMNIST with more tasks on the same image pair: classification labels computed from its two
    digits (l, r), ``cfg.derived_tasks`` from ``MULTIMNIST_DERIVED_LABELS`` (left, right, sum 0-18,
    |l - r|, max, min, l * r mod 10); default the five left / right / sum / difference / max. Every
    pair is labelled for every task (the task count of M3ViT's 5-task PASCAL-Context setting)."""
    names = tuple(cfg.get("derived_tasks", DERIVED_OPTIONS["derived_tasks"]))
    unknown = [n for n in names if n not in MULTIMNIST_DERIVED_LABELS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"data.derived_tasks {list(names)} (unknown: {unknown}): give distinct names from "
                         f"{sorted(MULTIMNIST_DERIVED_LABELS)}")
    base = load_multimnist(cfg)
    splits = {}
    for split, source in base.splits.items():
        arrays = read_all(source)
        left, right = (np.asarray(arrays[k]).astype(np.int64) for k in ("left", "right"))
        splits[split] = {"image": arrays["image"],
                         **{n: MULTIMNIST_DERIVED_LABELS[n][1](left, right).astype(np.int64) for n in names}}
    tasks = tuple(T.classification(n, MULTIMNIST_DERIVED_LABELS[n][0]) for n in names)
    return from_arrays("multimnist_derived", splits, tasks, input_key="image")


DATASETS = {
    "multimnist": dict(load=load_multimnist),
    "multimnist_derived": dict(load=load_multimnist_derived, options=DERIVED_OPTIONS),
    "multimnist_one_task": dict(load=load_multimnist_one_task, options=ONE_TASK_OPTIONS),
    "digits": dict(load=load_digits),
    "multitab_bench": dict(load=multitab_bench.load_multitab_bench, options=multitab_bench.OPTIONS,
                           rules=multitab_bench.RULES),
    "pde_fisher": dict(load=load_fisher),
    "pde_darcy": dict(load=load_darcy),
    "wiki": dict(load=wiki.load_wiki, options=wiki.OPTIONS, rules=wiki.RULES),
    # the standard MTL benchmarks, read from the user's copy in data.manual_dir
    "nyuv2": dict(load=mtan_npy.load_nyuv2, options=mtan_npy.NYUV2_OPTIONS, rules=mtan_npy.NYUV2_RULES),
    "cityscapes": dict(load=mtan_npy.load_cityscapes, options=mtan_npy.CITYSCAPES_OPTIONS,
                       rules=mtan_npy.CITYSCAPES_RULES),
    "celeba": dict(load=celeba.load_celeba, options=celeba.OPTIONS, rules=celeba.RULES),
    "qm9": dict(load=qm9.load_qm9, options=qm9.OPTIONS, rules=qm9.RULES),
    "office31": dict(load=office.load_office31, options=office.OPTIONS, rules=office.RULES),
    "office_home": dict(load=office.load_office_home, options=office.OPTIONS, rules=office.RULES),
    "rendered_scenes": dict(load=rendered_scenes.load_rendered_scenes, options=rendered_scenes.OPTIONS,
                            rules=rendered_scenes.RULES),
}


def dataset_options(name: str) -> tuple[dict, dict]:
    """``({key: default}, {key: Rule})`` that dataset ``name`` declares for ``config.data`` (empty for a
    name not in ``DATASETS``)."""
    entry = DATASETS.get(name, {})
    return dict(entry.get("options", {})), dict(entry.get("rules", {}))


def get_dataset(cfg) -> Dataset:
    """Loads ``cfg.name`` from DATASETS, keeps only ``cfg.tasks`` if given and the first
    ``cfg.max_examples`` of every split if > 0, replaces the inputs by a
    frozen pretrained trunk's features if ``cfg.frozen_features`` names one (``frozen_features.py``),
    caches in memory if asked."""
    dataset = lookup(DATASETS, cfg.name, "dataset")["load"](cfg)
    if cfg.get("tasks"):
        dataset = dataset.select_tasks(list(cfg.tasks))
    if cfg.get("max_examples"):
        dataset = dataset.first(int(cfg.max_examples))
    if cfg.get("frozen_features"):
        dataset = with_frozen_features(dataset, cfg.frozen_features, cfg.get("data_dir") or default_data_dir())
    if cfg.get("cache_in_memory", False):
        dataset = dataset.cached()
    return dataset
