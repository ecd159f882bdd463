"""``train_and_evaluate(config, workdir)``: the one entry point that trains, evaluates, checkpoints
and writes results. Resumes from the newest checkpoint in ``workdir``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.config import check_against_dataset, check_config
from mtl_jax.data import get_dataset
from mtl_jax.data.pipeline import eval_batches, to_global, train_iterator
from mtl_jax.errors import UsageError
from mtl_jax.models import build_model, check_input, remat_compiler_options
from mtl_jax.models.pretrained.registry import check_trunk_file, file_trunk, load_pretrained, load_trunk_file
from mtl_jax.models.pretrained.weights import fill_trunks
from mtl_jax.train import checkpoint as ckpt
from mtl_jax.train.dense_metrics import finalize_sums
from mtl_jax.train.losses import task_metric_fns
from mtl_jax.train.methods import get_method, with_num_params
from mtl_jax.train.optim import make_optimizers, map_groups
from mtl_jax.train.reporting import MetricWriter, check_baselines, delta_m, flatten_metrics, results_table
from mtl_jax.train.sharding import batch_sharding, make_mesh, replicated, train_state_shardings
from mtl_jax.train.precision import precision_policy
from mtl_jax.train.state import TrainState
from mtl_jax.train import workdir as workdir_lib
from mtl_jax.train.step import guarded_leaves, make_eval_step, make_train_step


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a NaN/Inf loss, gradient or new state."""


def maybe_initialize_distributed(config) -> None:
    """``jax.distributed.initialize()`` when ``config.distributed`` or ``JAX_COORDINATOR_ADDRESS`` is set.

    On TPU pods / SLURM / Kubernetes, jax detects the cluster itself; for a manual launch set
    ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on every process.
    Must run before anything touches a device (``mtl_jax.main`` calls it first).
    """
    if not (config.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS")) or _distributed_initialized():
        return
    env = {"coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
           "num_processes": os.environ.get("JAX_NUM_PROCESSES"), "process_id": os.environ.get("JAX_PROCESS_ID")}
    jax.distributed.initialize(**{k: (v if k == "coordinator_address" else int(v)) for k, v in env.items() if v})


def _distributed_initialized() -> bool:
    from jax._src import distributed

    return distributed.global_state.client is not None


def init_state(model, optimizers, method, tasks, sample_input, seed: int, pretrained=None,
               pretrained_name: str = "") -> TrainState:
    """A fresh TrainState (pure: jit it with out_shardings to create it sharded). ``pretrained``: the
    trunk's pretrained variables (``{'params': ..., 'batch_stats'?: ...}``), put into every copy of the
    trunk under ``'shared'`` (``models/pretrained/weights.fill_trunks``); ``pretrained_name`` names them
    in errors."""
    params_key, dropout_key, step_key = jax.random.split(jax.random.key(seed), 3)
    variables = dict(model.init({"params": params_key, "dropout": dropout_key}, sample_input, train=False))
    if pretrained is not None:
        variables = fill_trunks(variables, pretrained, pretrained_name)
    params = variables.pop("params")
    metric_sums = {t.name: {m: jnp.zeros((), jnp.float32) for m in t.metrics} for t in tasks}
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
        opt_state=map_groups(lambda tx, p: tx.init(p), optimizers, params),
        method_state=method.init(len(tasks)), rng=jax.random.key_data(step_key),
        nonfinite_streak=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32),
        nonfinite_tasks=jnp.zeros((len(tasks),), bool), metric_sums=metric_sums,
        metric_count=jnp.zeros((), jnp.int32))


def total_steps(config, num_train: int) -> int:
    if config.num_steps is not None:
        return int(config.num_steps)
    return max(1, math.ceil(config.num_epochs * num_train / config.batch_size))


def evaluate(eval_step, state, dataset, split: str, batch_size: int, sharding) -> dict:
    """``{task: {metric: value over the split's examples labelled for the task}}``: ``eval_step``
    returns per-task sums and counts (:func:`mtl_jax.train.forward.metric_sums`), summed over the
    batches; a per-example metric is the sum over the count, an accumulated one (mIoU, F1, ...) its
    ``finalize`` of the summed statistics (``dense_metrics.finalize_sums``)."""
    keys = [dataset.input_key] + [t.label_key for t in dataset.tasks]
    totals = None
    for batch in eval_batches(dataset.splits[split], keys=keys, global_batch_size=batch_size):
        out = eval_step(state.params, state.model_state, to_global(batch, sharding))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    sums, counts = jax.device_get(totals)
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"split '{split}' has no example labelled for task(s) {empty}")
    fns = {t.name: task_metric_fns(t) for t in dataset.tasks}
    return {name: {m: finalize_sums(fns[name][m], v, counts[name]) for m, v in metrics.items()}
            for name, metrics in sums.items()}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a config builds: data, model, optimisers, method, mesh, and the jitted, sharded steps.

    ``train_step(state, batch) -> (state, metrics)`` donates the state; ``init()`` creates the
    state directly with its shardings.
    """

    dataset: Any
    model: Any
    optimizers: dict
    method: Any
    mesh: Any
    steps: int
    abstract_state: TrainState
    state_shardings: TrainState
    data_sharding: Any
    init: Callable[[], TrainState]
    train_step: Callable
    eval_step: Callable


def build_method(method_cfg, model, sample_input, num_tasks: int):
    """``get_method(name, **hparams)`` for ``config.method``; a method that keeps per-parameter state
    (``Method.per_parameter_state``) gets the shared parameter count bound to its ``init``
    (``with_num_params``). Its ``init`` is traced for ``num_tasks`` here, so that its errors (e.g. a
    gradient method given one task) come before the model's."""
    hparams = dict(method_cfg)
    method = get_method(hparams.pop("name"), **hparams)
    if method.per_parameter_state:
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample_input, train=False))
        method = with_num_params(method, sum(x.size for x in jax.tree.leaves(shapes["params"]["shared"])))
    jax.eval_shape(lambda: method.init(num_tasks))
    return method


def abstract_init(init_fn: Callable, model_name: str, dataset, sample) -> Any:
    """``jax.eval_shape(init_fn)``; a shape or type error while tracing the model's init is re-raised
    naming the model, the dataset, its input and its tasks (the trace's own message is kept)."""
    try:
        return jax.eval_shape(init_fn)
    except (TypeError, ValueError) as err:
        tasks = [f"{t.name} ({t.kind}, {t.num_outputs} outputs)" for t in dataset.tasks]
        raise ValueError(f"model '{model_name}' cannot be initialised on dataset '{dataset.name}' (input "
                         f"'{dataset.input_key}' {tuple(sample.shape[1:])} {sample.dtype} per example; tasks {tasks}): "
                         f"{err}") from err


def build_experiment(config, dataset=None) -> Experiment:
    dataset = get_dataset(config.data) if dataset is None else dataset
    tasks = dataset.tasks
    mesh = make_mesh(config.mesh.data, config.mesh.model, expert=config.mesh.get("expert", 1))
    model = build_model(config.model, tasks, remat=config.get("remat", False))
    steps = total_steps(config, len(dataset.splits["train"]))
    optimizers = make_optimizers(config, dataset.task_names, steps)
    sample = jnp.asarray(dataset.splits["train"][0][dataset.input_key])[None]
    check_input(config.model, sample.shape[1:], dataset.input_key)
    method = build_method(config.method, model, sample, len(tasks))

    name, pretrained_file = config.model.get("pretrained", ""), config.model.get("pretrained_file", "")
    if pretrained_file and name:
        raise UsageError(f"model.pretrained '{name}' and model.pretrained_file '{pretrained_file}' both set: give one")
    if pretrained_file:
        check_trunk_file(file_trunk(config.model), pretrained_file)
    pretrained_name = (f"model.pretrained_file '{pretrained_file}'" if pretrained_file
                       else f"model.pretrained '{name}'")
    init_fn = lambda pretrained=None: init_state(model, optimizers, method, tasks, sample, config.seed, pretrained,
                                                 pretrained_name)
    abstract = abstract_init(init_fn, config.model.name, dataset, sample)
    state_shardings = train_state_shardings(abstract, optimizers, mesh, config.sharding.rules,
                                            fsdp=config.sharding.get("fsdp", False))
    data_sharding = batch_sharding(mesh)
    precision = precision_policy(config.get("precision", "float32"), config.get("precision_float32_params", ""))
    train_step = jax.jit(make_train_step(model, tasks, optimizers, method, dataset.input_key, config.sharpness,
                                         config.jacobian, config.rep_mtl, sample_input=sample, precision=precision,
                                         micro_batches=config.get("grad_accum_steps", 1)),
                         in_shardings=(state_shardings, data_sharding),
                         out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0,
                         compiler_options=remat_compiler_options(config.get("remat", False)))
    eval_step = jax.jit(make_eval_step(model, tasks, dataset.input_key, precision),
                        in_shardings=(state_shardings.params, state_shardings.model_state, data_sharding),
                        out_shardings=replicated(mesh))
    return Experiment(dataset=dataset, model=model, optimizers=optimizers, method=method, mesh=mesh, steps=steps,
                      abstract_state=abstract, state_shardings=state_shardings, data_sharding=data_sharding,
                      init=with_pretrained(jax.jit(init_fn, out_shardings=state_shardings),
                                           load_pretrained_weights(config.model)),
                      train_step=train_step,
                      eval_step=eval_step)


def load_pretrained_weights(model_cfg) -> Callable | None:
    """``() -> trunk variables`` for ``model.pretrained`` (a name) or ``model.pretrained_file`` (a local
    checkpoint of ``model.trunk``), or None when neither is set."""
    if model_cfg.get("pretrained_file", ""):
        return lambda: load_trunk_file(file_trunk(model_cfg), model_cfg.pretrained_file)
    if model_cfg.get("pretrained", ""):
        return lambda: load_pretrained(model_cfg.pretrained)
    return None


def with_pretrained(init: Callable, load: Callable | None) -> Callable:
    """``init()`` (the jitted ``init_state``) given the trunk weights ``load()`` returns
    (``models/pretrained``), read when the state is first created (not on resume); ``init`` as is when
    ``load`` is None."""
    if load is None:
        return init
    return lambda: init(load())


def load_baselines(config, tasks) -> dict | None:
    """The single-task results ``config.baselines`` points at, checked (``reporting.check_baselines``)
    to hold every metric Delta-m% averages (``TaskSpec.delta_m_metrics``: the main metric, every metric
    of a dense task) as a finite non-zero number, so a bad file fails when the run starts."""
    if not config.baselines:
        return None
    if not os.path.exists(config.baselines):
        raise FileNotFoundError(f"config.baselines: '{config.baselines}' does not exist (make it with "
                                f"python -m experiments.single_task_baselines, or set --config.baselines='')")
    with open(config.baselines) as f:
        baselines = json.load(f)
    if not isinstance(baselines, dict) or not all(isinstance(v, dict) for v in baselines.values()):
        raise ValueError(f"config.baselines '{config.baselines}' must be a JSON object {{task: {{metric: value}}}}")
    check_baselines(baselines, tasks, what=f"config.baselines '{config.baselines}'")
    return baselines


def train_and_evaluate(config, workdir: str, *, dataset=None,
                       on_step: Optional[Callable[[int, TrainState], None]] = None) -> dict:
    """Trains ``config`` in ``workdir``; returns ``{'results': {task: {metric}}, 'delta_m': ..., 'state',
    'warnings': [...], 'train_step_traces': how many times the train step was traced (1 unless shapes or
    options changed)}``.

    ``dataset``: a ``Dataset`` to use instead of ``config.data`` (bring your own data, e.g.
    ``mtl_jax.data.from_arrays``). ``on_step(step, state)`` is called after every step.

    The workdir is locked for the run (:mod:`mtl_jax.train.workdir`) and remembers its config; the run
    resumes from the newest checkpoint that verifies and restores (:func:`checkpoint.restore_latest`).
    """
    check_config(config)
    maybe_initialize_distributed(config)
    os.makedirs(workdir, exist_ok=True)
    claim = workdir_lib.lock(workdir) if jax.process_index() == 0 else None
    try:
        if claim is not None:
            workdir_lib.check_config(workdir, config)
        return _train_and_evaluate(config, workdir, dataset, on_step)
    finally:
        if claim is not None:
            claim.release()


def _train_and_evaluate(config, workdir: str, dataset, on_step) -> dict:
    exp = build_experiment(config, dataset)
    check_against_dataset(config, {split: len(source) for split, source in exp.dataset.splits.items()},
                          batch_shards=exp.mesh.shape["data"] * exp.mesh.shape.get("expert", 1))
    dataset, names, steps, data_sharding = exp.dataset, exp.dataset.task_names, exp.steps, exp.data_sharding
    train_step, eval_step, state_shardings = exp.train_step, exp.eval_step, exp.state_shardings
    keys = [dataset.input_key] + [t.label_key for t in dataset.tasks]
    baselines = load_baselines(config, dataset.tasks)
    warnings = nonfinite_label_warnings(dataset)
    for text in warnings:
        _warn(text)
    data_iter = train_iterator(dataset.splits["train"], keys=keys, global_batch_size=config.batch_size,
                               seed=config.seed, augment=dataset.augment)
    leaf_paths = [path for path, _ in guarded_leaves(exp.abstract_state)]
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    writer = MetricWriter(workdir)
    progress = None
    try:
        abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        exp.abstract_state, state_shardings)
        restored = ckpt.restore_latest(manager, abstract_sharded) if config.checkpoint.enabled else None
        if restored is not None:
            state = restored.state
            data_iter.set_state(restored.data)
            for bad_step, reason in restored.skipped:
                _warn(f"checkpoint step {bad_step} in {workdir} skipped ({reason}); moved to "
                      f"{os.path.join(workdir, ckpt.DAMAGED)}")
            if jax.process_index() == 0:
                print(f"resumed from the step-{restored.step} checkpoint in {workdir}", flush=True)
        else:
            state = exp.init()

        start = int(state.step)
        guard = FiniteGuard(config.max_nonfinite_steps, names, leaf_paths, int(state.nonfinite_streak))
        last_sums, last_count = jax.device_get((state.metric_sums, state.metric_count))
        last_skipped = int(state.nonfinite_total)
        progress = _progress_bar(config, start, steps)
        tick, tick_step = time.perf_counter(), start
        pending = None  # the previous step's outputs, checked after the next step is dispatched
        profiled = {int(s) for s in config.get("profile_steps", ())}
        for step in range(start, steps):
            batch = to_global(next(data_iter), data_sharding)
            done = step + 1
            if done in profiled:
                jax.block_until_ready(state)
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            state, out = train_step(state, batch)
            if done in profiled:
                jax.block_until_ready(out)
                jax.profiler.stop_trace()
            if on_step is not None:
                on_step(done, state)
            guard.check(pending)
            pending = (done, out)
            if done % config.log_every == 0 or done == steps:
                sums, count = jax.device_get((state.metric_sums, state.metric_count))
                window = max(int(count - last_count), 1)
                train_metrics = flatten_metrics(jax.tree.map(lambda a, b: (a - b) / window, sums, last_sums))
                now = time.perf_counter()
                train_metrics["steps_per_sec"] = (done - tick_step) / (now - tick)
                train_metrics["nonfinite_total"] = skipped = int(state.nonfinite_total)
                writer.write(done, "train", train_metrics)
                if skipped > last_skipped:
                    _warn(f"step {done}: {skipped - last_skipped} step(s) skipped since step {tick_step} "
                          f"(non-finite loss, gradient or update; {skipped} in all)")
                losses = {k.replace("/loss", " loss"): f"{v:.3f}" for k, v in train_metrics.items()
                          if k.endswith("/loss")}
                progress.set_postfix(losses | {"skipped": skipped}, refresh=False)
                progress.update(done - progress.n)
                last_sums, last_count, last_skipped, tick, tick_step = sums, count, skipped, now, done
            if config.eval_every and done % config.eval_every == 0 and done != steps:
                writer.write(done, config.eval_split, flatten_metrics(
                    evaluate(eval_step, state, dataset, config.eval_split, config.eval_batch_size, data_sharding)))
            if config.checkpoint.enabled and (done == steps or done % config.checkpoint.every == 0):
                guard.check(pending)  # the step being saved: no checkpoint while steps are being skipped
                pending = None
                if guard.streak == 0:
                    ckpt.save(manager, done, state, data_iter.get_state())
        guard.check(pending)
    finally:
        if progress is not None:
            progress.close()
        ckpt.finish(manager)

    results = evaluate(eval_step, state, dataset, config.eval_split, config.eval_batch_size, data_sharding)
    tasks = dataset.tasks
    skipped, printed = int(state.nonfinite_total), len(warnings)
    if skipped:
        warnings.append(f"{skipped} of {steps} steps skipped (non-finite loss, gradient or update); they were "
                        f"not applied")
    warnings += [f"{config.eval_split} {name} is {value} (a non-finite prediction or label)"
                 for name, value in flatten_metrics(results).items() if not math.isfinite(value)]
    summary = {"results": results, "steps": steps, "tasks": list(names), "nonfinite_total": skipped,
               "warnings": warnings}
    if baselines:
        summary["baselines"] = baselines
        summary["delta_m"] = delta_m(results, baselines, tasks)
    writer.write(steps, config.eval_split, flatten_metrics(results) | (
        {"delta_m": summary["delta_m"]} if baselines else {}))
    writer.close()
    table = results_table(results, tasks, baselines, title=f"{dataset.name}: {config.eval_split} after {steps} steps")
    if jax.process_index() == 0:
        workdir_lib.write_text_atomic(os.path.join(workdir, "results.md"), table + "\n")
        workdir_lib.write_json_atomic(os.path.join(workdir, "results.json"), json_safe(summary))
        print(table, flush=True)
        for text in warnings[printed:]:
            _warn(text)
    summary["state"] = state
    summary["train_step_traces"] = train_step._cache_size()  # 1: every step ran the same executable
    return summary


def json_safe(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN / Inf)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def nonfinite_label_warnings(dataset) -> list[str]:
    """One line per split and float label with NaN / Inf values, for splits held as arrays (steps
    whose batch holds one are skipped; evaluation metrics over them are NaN)."""
    out = []
    for split, source in dataset.splits.items():
        arrays = getattr(source, "arrays", None)
        if arrays is None:
            continue
        for t in dataset.tasks:
            labels = np.asarray(arrays[t.label_key])
            if np.issubdtype(labels.dtype, np.floating):
                bad = int((~np.isfinite(labels)).reshape(len(labels), -1).any(axis=1).sum())
                if bad:
                    out.append(f"split '{split}': {bad} of {len(labels)} examples have a non-finite "
                               f"'{t.label_key}' label (training steps whose batch holds one are skipped)")
    return out


def _warn(text: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)


class FiniteGuard:
    """The host's view of skipped steps: counts the consecutive ones from each step's outputs
    (``applied``, ``nonfinite_tasks``, ``nonfinite_state``) and raises :class:`NonFiniteError` at
    ``limit``, naming the tasks and the state leaf paths that went non-finite."""

    def __init__(self, limit: int, names, leaf_paths, streak: int = 0):
        self.limit, self.names, self.leaf_paths, self.streak = limit, list(names), leaf_paths, streak

    def check(self, pending) -> None:
        if pending is None:
            return
        done, out = pending
        applied, tasks = jax.device_get((out["applied"], out["nonfinite_tasks"]))
        self.streak = 0 if applied else self.streak + 1
        if self.streak >= self.limit:
            leaves = jax.device_get(out["nonfinite_state"])
            culprits = [n for n, b in zip(self.names, tasks) if b]
            paths = [p for p, b in zip(self.leaf_paths, leaves) if b]
            where = []
            if culprits:
                where.append(f"loss or gradient of task(s) {culprits}")
            if paths:
                where.append(f"new state at {paths[:4]}{f' and {len(paths) - 4} more' if len(paths) > 4 else ''}")
            raise NonFiniteError(f"{self.streak} consecutive steps skipped (up to step {done}): non-finite "
                                 f"{'; '.join(where) or 'shared-parameter gradient'}. These steps were not applied; "
                                 f"the checkpoints hold the last good state.")


def _progress_bar(config, start: int, steps: int):
    from tqdm.auto import tqdm

    disable = not config.progress_bar or jax.process_index() != 0
    return tqdm(total=steps, initial=start, disable=disable, unit="step", dynamic_ncols=True)
