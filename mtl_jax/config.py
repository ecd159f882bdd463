"""Config plumbing: the default config every file starts from, ``:arg`` parsing, command-line
overrides and validation with errors that name the offending key path.

A config file in ``configs/`` defines ``get_config(arg: str | None) -> ConfigDict``. ``arg`` is the
text after ``:`` in ``--config=configs/multimnist.py:smoke,task=left`` (big_vision's convention),
parsed by ``parse_arg`` against the file's own arguments; ``smoke`` shrinks any config to a
seconds-long run. On the command line the file is loaded by ml_collections'
``config_flags.DEFINE_config_file`` (``parse_command_line``); ``--config.<key>=value`` overrides
are typed by the key's default and applied by ``apply_overrides``.

Every value is checked at start (``check_config``: the ``SCHEMA`` table of types and ranges, plus the
rules a dataset module declares for its own ``config.data`` keys) and, once the dataset is loaded,
against its splits (``check_against_dataset``); a bad key or value raises
:class:`~mtl_jax.errors.UsageError` naming the key path, the value and what is valid.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import numbers
import os
import sys
import warnings
from typing import Callable, Mapping, NamedTuple

from absl import flags
from ml_collections import ConfigDict, config_dict, config_flags

from mtl_jax.errors import UsageError

# Sections whose keys depend on a chosen component (model, method, ...): the component's builder
# validates them, listing its valid options.
FREE_FORM = ("model.trunk_kwargs", "model.head_kwargs", "model.arch_kwargs", "method", "head_optim", "sharding.rules")


class UnknownKeyError(UsageError, KeyError):
    """A config key that does not exist: a UsageError (exit 2 at the command line) that is also the
    KeyError it has always been."""


def data_options(config: ConfigDict) -> tuple[dict, dict]:
    """``({key: default}, {key: Rule})``: the keys valid under ``config.data`` for its ``name`` besides
    the common ones of ``default_config().data``, and their rules, as the dataset's module declares them
    (``mtl_jax.data.datasets.DATASETS``); empty for a name that is not registered."""
    from mtl_jax.data.datasets import dataset_options  # imports tfds and jax: asked only for a non-common key

    data = config.get("data")
    return dataset_options(data.get("name", "") if isinstance(data, (ConfigDict, Mapping)) else "")


def _dataset_specific_keys(config: ConfigDict) -> list[str]:
    """The keys of ``config.data`` that are not common to every dataset (``default_config().data``)."""
    data = config.get("data")
    if not isinstance(data, (ConfigDict, Mapping)):
        return []
    common = default_config().data
    return [key for key in data if key not in common]


def default_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.data = ConfigDict(dict(name="multimnist", num_train=60_000, num_test=10_000, seed=0, data_dir="",
                             tasks=(), cache_in_memory=True, max_examples=0,  # > 0: every split cut to its first N
                             frozen_features=""))  # a pretrained trunk run frozen on the inputs (data/frozen_features.py)
    c.model = ConfigDict(dict(name="hps", trunk="lenet", trunk_kwargs=ConfigDict(), head="mlp",
                              head_kwargs=ConfigDict(dict(hidden=(50,))), arch_kwargs=ConfigDict(),
                              pretrained="",  # pretrained trunk weights by name (mtl_jax.models.pretrained.registry)
                              pretrained_file=""))  # or the trunk's weights from a local checkpoint (FILE_LOADERS)
    c.method = ConfigDict(dict(name="ew"))  # + the method's hyperparameters (mtl_jax.train.methods)
    # Sharpness-aware steps (mtl_jax.train.flat_minima): kind '' (off), 'sam', 'fmtl' (F-MTL: A(g) + A(h)),
    # 'fmtl_a' (A(g~)); rho; adaptive = ASAM's T = |w| + eta.
    c.sharpness = ConfigDict(dict(kind="", rho=0.05, adaptive=False, eta=0.01))
    # Per-task gradients for Gramian/Jacobian methods: w.r.t. the shared 'params' or the shared
    # 'representation' (MGDA-UB / LibMTL's rep_grad; GradNorm then reads ||dL_k/dz||); chunk = tasks per
    # vmapped VJP at the parameter level (0 = all at once);
    # gramian_mode, for the methods that need only G: 'layerwise' (G summed per Dense layer from its
    # inputs and per-task output cotangents, <D_k, X X^T D_l>, explicit rows for the other leaves:
    # train/gradients/layerwise.py), 'materialize' (J by a vmapped VJP, then J J^T) or 'vjp_jvp' (G's columns
    # J (J^T e_l) by a VJP + a JVP, chunk columns at a time: J never held); last_shared = regex over 'shared/...'
    # paths of the layer GradNorm reads its gradient norms at ('' = the last layer of the trunk).
    c.jacobian = ConfigDict(dict(level="params", chunk=0, gramian_mode="layerwise", last_shared=""))
    # Rep-MTL saliency regularisers (mtl_jax.train.rep_mtl); off while both weights are 0.
    c.rep_mtl = ConfigDict(dict(tsr_weight=0.0, csa_weight=0.0, temperature=0.5))
    c.optim = ConfigDict(dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, momentum=0.0, nesterov=False,
                              weight_decay=0.0, schedule="constant", warmup_steps=0, grad_clip_norm=0.0,
                              decay_every=0, decay_factor=0.5))
    c.head_optim = ConfigDict()  # {task: {field: value}} overrides of ``optim`` for that head
    c.batch_size = 256
    # Micro-batches per step (gradient accumulation with MTL semantics: per-task gradient rows summed over
    # micro-batches, the method applied once per step; mtl_jax.train.gradients.accumulate).
    c.grad_accum_steps = 1
    # Forward compute dtype ('float32', 'bfloat16'): parameters stay float32 (master copy);
    # per-task losses, gradients and the Gramian are float32 (mtl_jax.train.precision).
    c.precision = "float32"
    c.precision_float32_params = ""  # regex over parameter paths the forward keeps in float32 (e.g. 'norm')
    c.profile_steps = ()  # step numbers (1 = the first) traced with jax.profiler into <workdir>/profile
    c.num_steps = config_dict.placeholder(int)  # total steps; if unset, num_epochs over the train split
    c.num_epochs = 10.0
    c.mesh = ConfigDict(dict(data=-1, model=1, expert=1))  # expert > 1: MoE experts split over an 'expert' axis
    # rules: ((regex, (axis or None, ...)), ...); fsdp: ZeRO-3 style, every parameter no rule matches (and its
    # optimiser moments) split over mesh axis 'data' on its largest divisible dimension (mtl_jax.train.sharding).
    c.sharding = ConfigDict(dict(rules=(), fsdp=False))
    c.remat = False  # rematerialise the trunk's repeated blocks in the backward pass (mtl_jax.models.trunks)
    c.log_every = 50
    c.eval_every = 0  # steps between evaluations during training; 0 = only at the end
    c.eval_batch_size = 1000
    c.eval_split = "test"
    c.baselines = ""  # JSON {task: {metric: value}} of single-task results, for Delta-m%
    c.checkpoint = ConfigDict(dict(every=500, keep=2, enabled=True))
    c.max_nonfinite_steps = 20  # consecutive skipped (NaN/Inf) steps before the run stops
    c.progress_bar = True
    c.distributed = False  # call jax.distributed.initialize() (also done when JAX_COORDINATOR_ADDRESS is set)
    # A workdir keeps the config it was started with (mtl_jax.train.workdir); 'refuse' a later run whose
    # config differs in a key that changes the training, or 'allow' it (the old config is kept beside).
    c.resume_mismatch = "refuse"
    return c


def linspace_grid(lo: float, hi: float, num: int) -> tuple[float, ...]:
    """``num`` evenly spaced values from ``lo`` to ``hi`` (both included) as plain floats rounded to
    4 decimals, e.g. ``linspace_grid(0.1, 1.0, 10) == (0.1, 0.2, ..., 1.0)``: a config's grid."""
    step = (hi - lo) / (num - 1) if num > 1 else 0.0
    return tuple(float(round(lo + i * step, 4)) for i in range(num))


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
    """'smoke,seed=3' -> ConfigDict(smoke=True, seed=3): the keys of ``defaults`` are the only valid ones.

    A bare ``key`` sets a bool default to True; ``key=value`` is typed by its default (a bool takes
    true / false, an int refuses 1.5; a None or tuple default takes a Python literal). An unknown key
    (``:smok``), a bare key whose default is not a bool, or a value of the wrong type raises
    :class:`~mtl_jax.errors.UsageError` naming the key and the valid ones.
    """
    out = ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, text = (part.strip() for part in item.partition("="))
        if key not in defaults:
            raise UsageError(f"unknown config argument '{key}' in ':{arg}'; valid arguments: {sorted(defaults)}")
        default = defaults[key]
        label = f"config argument '{key}'"
        if not sep and not isinstance(default, bool):
            raise UsageError(f"{label} needs a value ('{key}=...'; default {default!r})")
        if not sep:
            value = True
        elif isinstance(default, bool):
            if text.lower() not in ("true", "false"):
                raise UsageError(f"{label} expects true or false, got '{text}'")
            value = text.lower() == "true"
        else:
            value = _coerce(label, None if default is None else type(default),
                            text if isinstance(default, str) else _literal(text))
        out[key] = value
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


# Valid values of the known keys, checked by ``check_config`` after overrides (``load_config``) and
# by the trainer for configs built in Python; a dataset's own ``config.data`` keys have their rules in
# its module (``mtl_jax.data.datasets.DATASETS``). The choice lists mirror the registries of
# mtl_jax.train.optim / step / flat_minima (which import jax; tests/test_config_cli.py checks they agree).
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "step")
SHARPNESS_KINDS = ("", "sam", "fmtl", "fmtl_a")
JACOBIAN_LEVELS = ("params", "representation")
GRAMIAN_MODES = ("materialize", "vjp_jvp", "layerwise")
PRETRAINED_TRUNKS = ("", "minilm_l6", "efficientnet_lite0")


class Rule(NamedTuple):
    """What a key accepts. ``kind``: 'int', 'float' (finite; an int is accepted), 'bool' or 'choice'
    (one of ``choices``, a ``what`` by name). Numbers lie in [lo, hi], a bound named in ``open``
    ('lo', 'hi') excluded; ``also``: values accepted besides (None = unset, -1 = all devices)."""

    kind: str
    lo: float = -math.inf
    hi: float = math.inf
    open: tuple = ()
    also: tuple = ()
    choices: tuple = ()
    what: str = ""


SEED = Rule("int", 0, 2**63 - 1)
COUNT, NONNEG_INT = Rule("int", 1), Rule("int", 0)
NONNEG, POSITIVE, FRACTION = Rule("float", 0), Rule("float", 0, open=("lo",)), Rule("float", 0, 1, open=("hi",))
BOOL = Rule("bool")

OPTIM_SCHEMA = {
    "name": Rule("choice", choices=OPTIMIZERS, what="optimiser"),
    "lr": NONNEG, "b1": FRACTION, "b2": FRACTION, "eps": POSITIVE, "momentum": FRACTION, "nesterov": BOOL,
    "weight_decay": NONNEG, "schedule": Rule("choice", choices=SCHEDULES, what="schedule"),
    "warmup_steps": NONNEG_INT, "grad_clip_norm": NONNEG, "decay_every": NONNEG_INT, "decay_factor": POSITIVE,
}

SCHEMA = {
    "seed": SEED,
    "data.num_train": COUNT, "data.num_test": COUNT, "data.seed": SEED, "data.cache_in_memory": BOOL,
    "model.pretrained": Rule("choice", choices=PRETRAINED_TRUNKS, what="pretrained trunk"),
    "data.max_examples": NONNEG_INT,
    "data.frozen_features": Rule("choice", choices=PRETRAINED_TRUNKS, what="pretrained trunk"),
    "sharpness.kind": Rule("choice", choices=SHARPNESS_KINDS, what="sharpness kind"), "sharpness.rho": NONNEG,
    "sharpness.adaptive": BOOL, "sharpness.eta": NONNEG,
    "jacobian.level": Rule("choice", choices=JACOBIAN_LEVELS, what="jacobian level"), "jacobian.chunk": NONNEG_INT,
    "jacobian.gramian_mode": Rule("choice", choices=GRAMIAN_MODES, what="jacobian.gramian_mode"),
    "rep_mtl.tsr_weight": NONNEG, "rep_mtl.csa_weight": NONNEG, "rep_mtl.temperature": POSITIVE,
    **{f"optim.{key}": rule for key, rule in OPTIM_SCHEMA.items()},
    "batch_size": COUNT, "num_steps": Rule("int", 1, also=(None,)), "num_epochs": POSITIVE,
    "grad_accum_steps": COUNT, "precision": Rule("choice", choices=("float32", "bfloat16"), what="precision"),
    "mesh.data": Rule("int", 1, also=(-1,)), "mesh.model": COUNT, "mesh.expert": COUNT,
    "sharding.fsdp": BOOL, "remat": BOOL,
    "log_every": COUNT, "eval_every": NONNEG_INT, "eval_batch_size": COUNT,
    "checkpoint.every": COUNT, "checkpoint.keep": COUNT, "checkpoint.enabled": BOOL,
    "max_nonfinite_steps": COUNT, "progress_bar": BOOL, "distributed": BOOL,
    "resume_mismatch": Rule("choice", choices=("refuse", "allow"), what="resume_mismatch"),
}


def describe(rule: Rule) -> str:
    """'an int >= 1 or None', 'a float in [0, 1)', "one of ['adam', 'sgd']", ..."""
    if rule.kind == "choice":
        return f"one of {list(rule.choices)}"
    if rule.kind == "bool":
        return "true or false"
    text = {"int": "an int", "float": "a finite float"}[rule.kind]
    lo, hi = (f"{b:g}" if isinstance(b, float) else str(b) for b in (rule.lo, rule.hi))
    if rule.lo > -math.inf and rule.hi < math.inf:
        text += f" in {'(' if 'lo' in rule.open else '['}{lo}, {hi}{')' if 'hi' in rule.open else ']'}"
    elif rule.lo > -math.inf:
        text += f" {'>' if 'lo' in rule.open else '>='} {lo}"
    elif rule.hi < math.inf:
        text += f" {'<' if 'hi' in rule.open else '<='} {hi}"
    return text + "".join(f" or {v!r}" for v in rule.also)


def obeys(value, rule: Rule) -> bool:
    """Whether ``value`` is one that ``rule`` accepts."""
    if any(value is v or (type(value) is type(v) and value == v) for v in rule.also):
        return True
    if rule.kind == "choice":
        return value in rule.choices
    if rule.kind == "bool":
        return isinstance(value, bool)
    kind = numbers.Integral if rule.kind == "int" else numbers.Real
    return (isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
            and (rule.lo < value if "lo" in rule.open else rule.lo <= value)
            and (value < rule.hi if "hi" in rule.open else value <= rule.hi))


def check_value(path: str, value, rule: Rule) -> None:
    """Raises UsageError (naming ``path``, ``value`` and what is valid) unless ``value`` obeys ``rule``."""
    if obeys(value, rule):
        return
    if rule.kind == "choice":
        raise UsageError(f"config key '{path}': unknown {rule.what} {value!r}; valid names: {list(rule.choices)}")
    raise UsageError(f"config key '{path}' = {value!r} is invalid: expected {describe(rule)}")


def check_config(config: ConfigDict) -> None:
    """Checks every key of ``SCHEMA`` that ``config`` has, the dataset-specific ``config.data`` keys
    against the rules their dataset declares, and each ``head_optim.<task>`` field against ``optim``'s
    rules; the first violation raises UsageError naming the key path, the value and the valid range.
    ``load_config`` calls it after the overrides; call it on configs built in Python
    (``train_and_evaluate`` does)."""
    for path, rule in SCHEMA.items():
        node, keys = config, path.split(".")
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, (ConfigDict, Mapping)) else None
        if isinstance(node, (ConfigDict, Mapping)) and keys[-1] in node:
            check_value(path, node[keys[-1]], rule)
    specific = _dataset_specific_keys(config)
    rules = data_options(config)[1] if specific else {}
    for key in specific:
        if key in rules:
            check_value(f"data.{key}", config["data"][key], rules[key])
    for task, fields in (config.get("head_optim") or {}).items():
        if not isinstance(fields, (ConfigDict, Mapping)):
            raise UsageError(f"config key 'head_optim.{task}' = {fields!r} is invalid: expected "
                             f"{{optim field: value}} overrides, e.g. --config.head_optim.{task}.lr=0")
        for key, value in fields.items():
            if key not in OPTIM_SCHEMA:
                raise UnknownKeyError(f"unknown config key 'head_optim.{task}.{key}'; valid optim fields: "
                                      f"{sorted(OPTIM_SCHEMA)}")
            if value is not None:  # None: inherit optim.<key>
                check_value(f"head_optim.{task}.{key}", value, OPTIM_SCHEMA[key])


def check_against_dataset(config: ConfigDict, split_sizes: Mapping[str, int], *, batch_shards: int = 1) -> None:
    """The checks that need the loaded dataset, once it is (``split_sizes``: ``{split: number of
    examples}``, e.g. ``{s: len(src) for s, src in dataset.splits.items()}``; ``batch_shards``: the
    devices a batch is split over, mesh 'data' x 'expert'). UsageError when there is no 'train'
    split, ``batch_size`` exceeds it, ``eval_split`` is not a split or is empty, or a batch size is
    not a multiple of ``batch_shards``. An eval split smaller than ``eval_batch_size`` is fine:
    evaluation pads its last batch."""
    sizes = dict(split_sizes)
    if "train" not in sizes:
        raise UsageError(f"the dataset has no 'train' split; splits: {sorted(sizes)}")
    if config.batch_size > sizes["train"]:
        raise UsageError(f"config key 'batch_size' = {config.batch_size} is invalid: larger than the "
                         f"{sizes['train']} examples of the 'train' split")
    if config.eval_split not in sizes:
        raise UsageError(f"config key 'eval_split' = {config.eval_split!r} is invalid: expected one of "
                         f"{sorted(sizes)}")
    if sizes[config.eval_split] < 1:
        raise UsageError(f"config key 'eval_split' = {config.eval_split!r} is invalid: the split is empty")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % batch_shards:
            raise UsageError(f"config key '{key}' = {config[key]} is invalid: expected a multiple of the "
                             f"{batch_shards} devices a batch is split over (mesh 'data' x 'expert')")
    micro = config.get("grad_accum_steps", 1)
    if config.batch_size % (micro * batch_shards):
        raise UsageError(f"config key 'batch_size' = {config.batch_size} is invalid: expected a multiple of "
                         f"grad_accum_steps x devices = {micro} x {batch_shards} (each micro-batch is split over "
                         f"the devices)")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(label: str, kind: type | None, value):
    """``value`` as a ``kind`` (None: any value): int <-> float only when no digit is lost (an int key
    refuses 1.5 rather than truncating it), a list as a tuple, 'true' / 'false' as a bool; else
    UsageError naming ``label`` ("config key 'a.b'")."""
    if kind is None or (isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)):
        return value
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UsageError(f"{label} expects a bool (true or false), got {value!r}")
    if kind is int:
        if number and (isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer())):
            return int(value)
        raise UsageError(f"{label} expects an int, got {value!r}" + (" (not truncated)" if number else ""))
    if kind is float and number:
        return float(value)
    if issubclass(kind, tuple) and isinstance(value, list):
        return tuple(value)
    if kind is str:
        return str(value)
    if issubclass(kind, ConfigDict) and isinstance(value, dict):
        return ConfigDict(value)
    raise UsageError(f"{label} expects {kind.__name__}, got {value!r}")


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
            options = data_options(config)[0] if here == f"data.{key}" else {}
            if key in options:
                with node.unlocked():
                    node[key] = options[key]
            elif not free:
                parent = ".".join(keys[:i]) or "config"
                raise UnknownKeyError(f"unknown config key '{here}'; valid keys under '{parent}': "
                                      f"{sorted(set(node) | set(options))}")
            if not last:
                with node.unlocked():
                    node[key] = ConfigDict()
        if last:
            current = node.get(key)
            field = node._fields.get(key)
            label = f"config key '{path}'"
            if isinstance(field, config_dict.FieldReference):  # a placeholder: None or its type
                value = None if value is None else _coerce(label, field.get_type(), value)
            else:
                value = _coerce(label, None if current is None else type(current), value)
            with node.unlocked():
                node[key] = value
        else:
            node = node[key]


def apply_overrides(config: ConfigDict, overrides: list[str], free_form=FREE_FORM) -> ConfigDict:
    """Applies ['optim.lr=3e-4', 'data.name=digits', ...] (values parsed as Python literals)."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"config override '{item}' must look like --config.key.path=value")
        set_by_path(config, path, _literal(text), free_form)
    return config


def validate(config: ConfigDict, reference: ConfigDict | None = None, prefix: str = "") -> None:
    """Fails on any key of ``config`` that ``default_config()`` (plus the keys its dataset declares,
    ``data_options``) lacks, naming its path."""
    if reference is None:
        reference = default_config()
        if _dataset_specific_keys(config):
            reference.data.update(data_options(config)[0])
    for key in config.keys():
        path = f"{prefix}{key}"
        if path in FREE_FORM:
            continue
        if key not in reference:
            raise UnknownKeyError(f"unknown config key '{path}'; valid keys under '{prefix[:-1] or 'config'}': "
                           f"{sorted(reference)}")
        if isinstance(config[key], ConfigDict) and isinstance(reference[key], ConfigDict):
            validate(config[key], reference[key], path + ".")


def config_from_file(spec: str) -> ConfigDict:
    """'path/x.py[:arg]' -> that file's ``get_config(arg)`` (a fresh module per call, so a config file
    may load another one)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file '{path}' not found")
    module_spec = importlib.util.spec_from_file_location("mtl_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def prepare_config(config: ConfigDict, overrides: list[str] = ()) -> ConfigDict:
    """A training config as a run uses it: ``config`` validated against ``default_config()``, the
    ``overrides`` applied, its values checked (``check_config``)."""
    validate(config)
    apply_overrides(config, list(overrides))
    check_config(config)
    return config


def load_config(spec: str, overrides: list[str] = ()) -> ConfigDict:
    """A training config: 'configs/x.py[:arg]' -> ConfigDict validated against ``default_config()``,
    with overrides applied, its values checked (``check_config``)."""
    return prepare_config(config_from_file(spec), overrides)


CONFIG_FLAG = "config"
OVERRIDE_PREFIX = f"--{CONFIG_FLAG}."


def parse_command_line(argv: list[str], define_flags: Callable[[flags.FlagValues], None] | None = None,
                       ) -> tuple[flags.FlagValues, list[str], list[str]]:
    """Parses a command line (``argv`` without the program name) with absl flags, into a fresh
    ``flags.FlagValues`` each call (so it runs any number of times in one process).

    ``--config=FILE[:arg]`` (required) is ml_collections' ``config_flags.DEFINE_config_file``: it loads
    FILE and calls its ``get_config(arg)``, as big_vision and flax's examples do;
    ``define_flags(flag_values)`` adds the command's own flags. The ``--config.<key>=value`` overrides are split off and
    returned, not applied: ``apply_overrides`` types each by the key's default (an int key takes 1e3 or
    None where it is a placeholder, a str key takes 'quoted' text, a None default any literal), adds the
    keys a free-form section or the chosen dataset allows, and names an unknown key with the valid ones,
    none of which config_flags' typed field parsers do.

    Returns ``(flag values, positional arguments, overrides)``; the loaded config is
    ``flag_values.config`` (not yet validated: ``prepare_config``). An unknown or missing flag, a config
    file that does not exist and an error of ``get_config`` (e.g. an unknown ``:arg``) raise
    :class:`~mtl_jax.errors.UsageError` / the error itself, one line.
    """
    overrides = [arg[len(OVERRIDE_PREFIX):] for arg in argv if arg.startswith(OVERRIDE_PREFIX)]
    args = ["mtl-jax"] + [arg for arg in argv if not arg.startswith(OVERRIDE_PREFIX)]
    flag_values = command_line_flags(args, define_flags)
    module = f"{CONFIG_FLAG}_config"  # the name config_flags loads the file under, dropped after: no stale module
    try:
        with warnings.catch_warnings():  # config_flags loads the file with importlib's deprecated load_module()
            warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
            positional = flag_values(args)[1:]
    except flags.IllegalFlagValueError as e:
        raise _error_of_get_config(e) from None
    except flags.Error as e:
        raise UsageError(str(e).splitlines()[0]) from e
    finally:
        sys.modules.pop(module, None)
    _raise_deferred_load_error(flag_values[CONFIG_FLAG])
    return flag_values, positional, overrides


def command_line_flags(args: list[str], define_flags: Callable[[flags.FlagValues], None] | None = None,
                       ) -> flags.FlagValues:
    """A fresh ``flags.FlagValues`` holding ``--config`` (``config_flags.DEFINE_config_file``, the config
    not locked) and the flags ``define_flags`` adds; ``args`` (program name first) is the
    command line config_flags reads. ``.get_help()`` is the flags' help text."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(CONFIG_FLAG, None, "configs/<file>.py[:arg], e.g. configs/multimnist.py:smoke; "
                                    "--config.<key>=value overrides a key", flag_values=flag_values,
                                    lock_config=False, sys_argv=args)
    if define_flags is not None:
        define_flags(flag_values)
    return flag_values


def _error_of_get_config(error: flags.IllegalFlagValueError) -> Exception:
    """The error a config file's ``get_config`` raised: config_flags re-raises a TypeError / ValueError
    as one of the same type whose message is the traceback, which absl wraps in IllegalFlagValueError;
    any other IllegalFlagValueError (e.g. a required flag missing) as a one-line UsageError."""
    e = error.__context__
    while e is not None:
        if e.args and isinstance(e.args[0], str) and e.args[0].startswith("Error whilst parsing config file"):
            return e.__context__ or e
        e = e.__context__
    return UsageError(str(error).splitlines()[0])


def _raise_deferred_load_error(flag: flags.Flag) -> None:
    """UsageError unless ``--config`` was given and its file's ``get_config`` returned a ConfigDict.
    config_flags defers an OSError raised while loading the config file (a file that does not exist,
    or an OSError of ``get_config``) to the config's first use: raised here, as raised (a missing file as
    FileNotFoundError naming it)."""
    config = flag.value
    if isinstance(config, ConfigDict):
        return
    if not flag.present:
        raise UsageError(f"flag --{flag.name} is required: {flag.help}")
    path = config_flags.get_config_filename(flag).partition(":")[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file '{path}' not found")
    try:
        config.keys()  # config_flags' stand-in for a config that failed to load raises that error
    except OSError as e:
        raise (e.__cause__ or e) from None
    except AttributeError:
        pass
    raise UsageError(f"config file '{path}': get_config() returned {type(config).__name__}, expected a ConfigDict")


__all__ = ["default_config", "parse_arg", "smoke", "apply_overrides", "validate", "load_config", "prepare_config",
           "check_config", "check_against_dataset", "parse_command_line", "SCHEMA", "UnknownKeyError"]
