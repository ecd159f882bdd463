"""Config plumbing: the default config every file starts from, ``:arg`` parsing, command-line
overrides and validation with errors that name the offending key path.

A config file in ``configs/`` defines ``get_config(arg: str | None) -> ConfigDict``. ``arg`` is the
text after ``:`` in ``--config=configs/x.py:smoke,seed=3`` (big_vision's convention); ``smoke``
shrinks any config to a seconds-long run.
"""

from __future__ import annotations

import ast
import importlib.util
import os

from ml_collections import ConfigDict, config_dict

# Sections whose keys depend on a chosen component (model, method, ...): the component's builder
# validates them, listing its valid options.
FREE_FORM = ("model.trunk_kwargs", "model.head_kwargs", "model.arch_kwargs", "method", "head_optim", "sharding.rules")

# Keys of ``config.data`` that only one dataset reads, with their defaults (the loaders read them from
# here): valid in the config, and as ``--config.data.<key>=...`` overrides, when ``data.name`` is that dataset.
DATA_OPTIONS = {
    # MultiTab-Bench generator (mtl_jax.data.multitab_bench.make_multitab_bench): feature count, task
    # count, pairwise task correlation rho, polynomial degree per task (None: 1, 2, 3, ...), noise sigma,
    # 'regression' / 'classification' per task (None: every second task classification), classes.
    "multitab_bench": dict(num_features=16, num_tasks=3, correlation=0.5, degrees=None, noise=0.01, kinds=None,
                           num_classes=2),
    # Mod-Squad-style heterogeneous data: the probability of each task's label per training pair
    # (() = equal).
    "multimnist_one_task": dict(task_ratios=()),
    # MultiMNIST with labels derived from the two digits (mtl_jax.data.datasets.MULTIMNIST_DERIVED_LABELS).
    "multimnist_derived": dict(derived_tasks=("left", "right", "sum", "difference", "max")),
}


def data_options(config: ConfigDict) -> dict:
    """The dataset-specific keys (and defaults) valid under ``config.data`` for its ``name``."""
    return DATA_OPTIONS.get(config.get("data", {}).get("name", ""), {})


def default_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.data = ConfigDict(dict(name="multimnist", num_train=60_000, num_test=10_000, seed=0, data_dir="",
                             tasks=(), cache_in_memory=True))
    c.model = ConfigDict(dict(name="hps", trunk="lenet", trunk_kwargs=ConfigDict(), head="mlp",
                              head_kwargs=ConfigDict(dict(hidden=(50,))), arch_kwargs=ConfigDict()))
    c.method = ConfigDict(dict(name="ew"))  # + the method's hyperparameters (mtl_jax.train.methods)
    # Sharpness-aware steps (mtl_jax.train.flat_minima): kind '' (off), 'sam', 'fmtl' (F-MTL: A(g) + A(h)),
    # 'fmtl_a' (A(g~)); rho; adaptive = ASAM's T = |w| + eta.
    c.sharpness = ConfigDict(dict(kind="", rho=0.05, adaptive=False, eta=0.01))
    # Per-task gradients for Gramian/Jacobian methods: w.r.t. the shared 'params' or the shared
    # 'representation' (MGDA-UB / LibMTL's rep_grad; GradNorm then reads ||dL_k/dz||); chunk = tasks per
    # vmapped VJP at the parameter level (0 = all at once);
    # gramian_mode, for the methods that need only G: 'layerwise' (G summed per Dense layer from its
    # inputs and per-task output cotangents, <D_k, X X^T D_l>, explicit rows for the other leaves:
    # train/layerwise.py), 'materialize' (J by a vmapped VJP, then J J^T) or 'vjp_jvp' (G's columns
    # J (J^T e_l) by a VJP + a JVP, chunk columns at a time: J never held); last_shared = regex over 'shared/...'
    # paths of the layer GradNorm reads its gradient norms at ('' = the last layer of the trunk).
    c.jacobian = ConfigDict(dict(level="params", chunk=0, gramian_mode="layerwise", last_shared=""))
    # Rep-MTL saliency regularisers (mtl_jax.train.rep_mtl); off while both weights are 0.
    c.rep_mtl = ConfigDict(dict(tsr_weight=0.0, csa_weight=0.0, temperature=0.5))
    c.optim = ConfigDict(dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, momentum=0.0, nesterov=False,
                              weight_decay=0.0, schedule="constant", warmup_steps=0, grad_clip_norm=0.0))
    c.head_optim = ConfigDict()  # {task: {field: value}} overrides of ``optim`` for that head
    c.batch_size = 256
    c.num_steps = config_dict.placeholder(int)  # total steps; if unset, num_epochs over the train split
    c.num_epochs = 10.0
    c.mesh = ConfigDict(dict(data=-1, model=1, expert=1))  # expert > 1: MoE experts split over an 'expert' axis
    c.sharding = ConfigDict(dict(rules=()))  # ((regex, (axis or None, ...)), ...)
    c.log_every = 50
    c.eval_every = 0  # steps between evaluations during training; 0 = only at the end
    c.eval_batch_size = 1000
    c.eval_split = "test"
    c.baselines = ""  # JSON {task: {metric: value}} of single-task results, for Delta-m%
    c.checkpoint = ConfigDict(dict(every=500, keep=2, enabled=True))
    c.max_nonfinite_steps = 20  # consecutive skipped (NaN/Inf) steps before the run stops
    c.progress_bar = True
    c.distributed = False  # call jax.distributed.initialize() (also done when JAX_COORDINATOR_ADDRESS is set)
    return c


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
    """'smoke,seed=3' -> ConfigDict(smoke=True, seed=3); keys must be among ``defaults`` or flags."""
    out = ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if not value:
            out[key] = True
            continue
        default = defaults.get(key)
        out[key] = type(default)(value) if default is not None and not isinstance(default, bool) else _literal(value)
    return out


def smoke(config: ConfigDict) -> ConfigDict:
    """Shrinks a config to a seconds-long end-to-end run (tiny data, few steps, frequent checkpoints)."""
    config.num_steps = 20
    config.batch_size = 64
    config.eval_batch_size = 256
    config.log_every = 5
    config.checkpoint.every = 10
    if "num_train" in config.data:
        config.data.num_train, config.data.num_test = 1024, 256
    return config


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(path: str, current, value):
    if current is None or isinstance(value, type(current)):
        return value
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"config key '{path}' expects a bool, got {value!r}")
    if isinstance(current, (int, float)) and isinstance(value, (int, float)):
        return type(current)(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, str):
        return str(value)
    if isinstance(current, ConfigDict) and isinstance(value, dict):
        return ConfigDict(value)
    raise ValueError(f"config key '{path}' expects {type(current).__name__}, got {value!r}")


def set_by_path(config: ConfigDict, path: str, value, free_form=FREE_FORM) -> None:
    """``config.a.b.c = value`` for path 'a.b.c'; an unknown key fails with its path and the valid keys.

    Inside ``free_form`` sections new keys may be added (their owner validates them).
    """
    node, keys = config, path.split(".")
    for i, key in enumerate(keys):
        here = ".".join(keys[: i + 1])
        free = any(here == f or here.startswith(f + ".") for f in free_form) and here not in free_form
        last = i == len(keys) - 1
        if key not in node:
            options = data_options(config) if here == f"data.{key}" else {}
            if key in options:
                with node.unlocked():
                    node[key] = options[key]
            elif not free:
                parent = ".".join(keys[:i]) or "config"
                raise KeyError(f"unknown config key '{here}'; valid keys under '{parent}': {sorted(set(node) | set(options))}")
            if not last:
                with node.unlocked():
                    node[key] = ConfigDict()
        if last:
            current = node.get(key)
            field = node._fields.get(key)
            if isinstance(field, config_dict.FieldReference):
                current = field.get()
                value = value if current is None else _coerce(path, current, value)
            else:
                value = _coerce(path, current, value)
            with node.unlocked():
                node[key] = value
        else:
            node = node[key]


def apply_overrides(config: ConfigDict, overrides: list[str], free_form=FREE_FORM) -> ConfigDict:
    """Applies ['optim.lr=3e-4', 'data.name=digits', ...] (values parsed as Python literals)."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"config override '{item}' must look like key.path=value")
        set_by_path(config, path, _literal(text), free_form)
    return config


def validate(config: ConfigDict, reference: ConfigDict | None = None, prefix: str = "") -> None:
    """Fails on any key of ``config`` that ``default_config()`` (plus the dataset's DATA_OPTIONS) lacks,
    naming its path."""
    if reference is None:
        reference = default_config()
        reference.data.update(data_options(config))
    for key in config.keys():
        path = f"{prefix}{key}"
        if path in FREE_FORM:
            continue
        if key not in reference:
            raise KeyError(f"unknown config key '{path}'; valid keys under '{prefix[:-1] or 'config'}': "
                           f"{sorted(reference)}")
        if isinstance(config[key], ConfigDict) and isinstance(reference[key], ConfigDict):
            validate(config[key], reference[key], path + ".")


def config_from_file(spec: str) -> ConfigDict:
    """'path/x.py[:arg]' -> that file's ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file '{path}' not found")
    module_spec = importlib.util.spec_from_file_location("mtl_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def load_config(spec: str, overrides: list[str] = ()) -> ConfigDict:
    """A training config: 'configs/x.py[:arg]' -> ConfigDict validated against ``default_config()``,
    with overrides applied."""
    config = config_from_file(spec)
    validate(config)
    apply_overrides(config, list(overrides))
    return config


__all__ = ["default_config", "parse_arg", "smoke", "apply_overrides", "validate", "load_config"]
