"""Step time of every MTL method's full jitted train step vs our EW step, the VJP floor and TorchJD.

    python -m benchmarks.method_step_time [--methods all] [--tasks 2,10,40] [--rounds 5,5,3]

Measures, on CPU, for K tasks on one model (mtl_jax's ``hps``: trunk 'mlp' 784-512-512 ReLU,
one 'linear' 10-class head per task; one fixed batch of 256 random inputs and labels):

* ours: ``build_experiment(config, dataset).train_step`` per method (mesh 1x1, Adam, one optimiser
  per head, NaN guard, running metrics; the whole step, optimiser update included);
* ``ew``: the same step with equal weighting (the baseline of the loss-weighting methods); FAMO
  includes its extra no-grad forward at the updated parameters, GradNorm its last shared layer's
  Gramian from the layer-wise rows, SDMGrad / MoDo the cross Gramian of two half-batches (their defaults);
* Gramian methods run the default ``config.jacobian.gramian_mode='layerwise'`` (G summed per Dense
  layer from its inputs and per-task output cotangents, ``train/gradients/layerwise.py``);
  ``<method>@materialize`` (``--materialize``, default upgrad and mgda): J by one vmapped VJP, then
  ``J J^T``; ``<method>@vjp_jvp`` (``--vjp-jvp``, default upgrad and mgda): the Gramian built column
  by column as ``J (J^T e_l)``, then one weighted VJP; ``<method>@<key>=<value>`` (``--variants``,
  e.g. ``famo@extra_forward=False``): the method with ``config.method.<key>=<value>``, or with
  ``config.<key>=<value>`` when the key is dotted (``gradnorm@jacobian.level=representation``:
  GradNorm's norms of ``dL_k/dz``, LibMTL's ``rep_grad``);
* ``floor``: one forward + K vmapped VJPs, ``jax.vmap(vjp_fn)(eye(K))`` over the same model, jitted
  (the issue's floor for per-task-gradient methods; no Gramian, no optimiser); each cotangent e_k
  goes back through all K heads, K^2 head backward passes;
* ``floor_heads_once``: the same Jacobian the way our step gets it for trunk + heads models
  (``gradients.representation.representation_losses_and_vjp``: one backward through the heads, then K trunk VJPs);
* TorchJD (``benchmarks/peers/torchjd_step.py``, run in ``.peers-venv`` with as many torch threads
  as JAX has CPU devices' cores here, 2): its aggregator or scalarizer for the method, the same
  model, ``torch.optim.Adam``; plus the plain summed-loss torch step, TorchJD's ``Mean`` through
  ``mtl_backward``, and Nash-MTL as its authors wrote it (cvxpy/ECOS solves every step).

The torch side is a long-lived subprocess driven one command per line, so every round visits every
implementation (JAX and torch alike) in turn; odd rounds run the list backwards, ``ew`` and
``floor`` run at both ends of every round. Each implementation runs enough steps per round to
take about ``--target-ms`` (at least ``--min-steps``, so one step per round at K=40); the figure
reported is the median over rounds of the per-step time. The load average is recorded: other work
on the machine inflates torch's 2-thread OpenMP steps far more than XLA's. ``--pieces`` also times each Gramian method's ``update`` alone and the
Gramian + weighted combination, to tell solver cost from gradient cost.

Targets checked: loss-weighting methods <= 1.10x our EW step; Gramian/Jacobian methods <= 1.3x the
floor; every method no slower than its TorchJD counterpart; Nash-MTL >= 3x faster than the
cvxpy-per-step version. Prints JSON, then markdown tables. LibMTL is not timed: its only PyPI
release (1.1.5, 2021) installs but fails at import on torch 2.13 (torchvision ops mismatch).

Setup of the peers venv (once)::

    python3 -m venv .peers-venv
    .peers-venv/bin/pip install torch==2.13.0
    .peers-venv/bin/pip install "torchjd[full]" torch==2.13.0 cvxpy
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import op_profile
from benchmarks.torch_peer import ROOT, print_json, start_peer
from mtl_jax.config import load_config
from mtl_jax.data import from_arrays
from mtl_jax.data.pipeline import to_global
from mtl_jax.host_memory import ENV_VAR, glibc_tunables, reuse_freed_memory
from mtl_jax.tasks import classification
from mtl_jax.train.forward import make_representation_forward
from mtl_jax.train.gradients import layerwise
from mtl_jax.train.gradients.layerwise import gramian
from mtl_jax.train.gradients.representation import representation_losses_and_vjp
from mtl_jax.train.losses import task_loss_fn
from mtl_jax.train.methods import METHODS, Method, MethodInputs
from mtl_jax.train.sharding import replicated
from mtl_jax.train.step import make_train_step
from mtl_jax.train.trainer import build_experiment

BATCH_SIZE = 256
IN_FEATURES = 784
TRUNK = (512, 512)
NUM_CLASSES = 10
# Our method -> the TorchJD implementation timed against it (benchmarks/peers/torchjd_step.py keys).
TORCHJD = {m: m for m in ("ew", "uw", "dwa", "rlw", "gls", "imtl_l", "famo", "stch", "excess_mtl", "mgda",
                          "pcgrad", "gradvac", "cagrad", "nash_mtl", "imtl_g", "aligned_mtl", "upgrad",
                          "dualproj", "fairgrad", "config", "sdmgrad", "modo", "graddrop")}
TORCH_EXTRAS = ("torch_sum", "jd_mean")  # references without an mtl_jax method of their own
LOSS_TARGET, FLOOR_TARGET, NASH_TARGET = 1.10, 1.3, 3.0
FLOP_FLOOR_TARGET, TORCHJD_TARGETS = 1.5, {10: 1.6, 40: 2.0}  # exact Gramian methods
EXACT_GRAMIAN = ("upgrad", "mgda", "dualproj", "nash_mtl", "cagrad", "imtl_g", "aligned_mtl")


def gramian_step_flops(num_tasks: int, batch: int = BATCH_SIZE, dims=(IN_FEATURES,) + TRUNK,
                       classes: int = NUM_CLASSES) -> dict:
    """FLOPs of the layer-wise Gramian step on the benchmark's model (MLP ``dims`` + K linear heads),
    each piece at its least: the forward; the heads' backward once (the per-task representation
    gradients ``Z_k`` and the head kernels); the per-task cotangents sent back through the trunk (one
    [K*B, o] x [o, i] GEMM per layer but the first); per layer the Gramian by the cheaper route of
    ``layerwise.contraction_flops`` (kernel and bias: input width + 1); ``J^T w`` from the same
    cotangents (``sum_k w_k D_k`` and ``X^T`` of it). Optimiser updates and losses are elementwise:
    not counted."""
    layers = list(zip(dims[:-1], dims[1:]))
    rep, heads = dims[-1], num_tasks * classes
    gram = sum(min(layerwise.contraction_flops(batch, batch, i + 1, num_tasks, num_tasks, o).values())
               for i, o in layers)
    out = {"forward": 2 * batch * (sum(i * o for i, o in layers) + rep * heads),
           "heads_backward": 2 * 2 * batch * rep * heads,
           "cotangent_gemms": 2 * num_tasks * batch * sum(i * o for i, o in layers[1:]),
           "gramian": 2 * gram,
           "combine": 2 * sum(num_tasks * batch * o + batch * i * o for i, o in layers)}
    out["total"] = sum(out.values())
    return out


def make_dataset(num_tasks: int, seed: int):
    """One batch of random 784-d inputs and K 10-class random labels, as an mtl_jax Dataset."""
    rng = np.random.default_rng(seed)
    x = rng.random((BATCH_SIZE, IN_FEATURES), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, (BATCH_SIZE, num_tasks))
    arrays = {"image": x, **{f"t{k}": y[:, k] for k in range(num_tasks)}}
    tasks = [classification(f"t{k}", NUM_CLASSES) for k in range(num_tasks)]
    return from_arrays("random_mlp", {"train": arrays}, tasks, input_key="image"), x, y


VARIANT = "@vjp_jvp"  # '<method>@vjp_jvp': the method with config.jacobian.gramian_mode='vjp_jvp'


def make_config(method: str):
    """'<name>', '<name>@<gramian_mode>', '<name>@<method key>=<value>' or '<name>@<config.key>=<value>'
    -> the benchmark's config."""
    name, _, variant = method.partition("@")
    if not variant:
        extra = []
    elif "=" not in variant:
        extra = [f"jacobian.gramian_mode={variant}"]
    else:
        extra = [variant if "." in variant.partition("=")[0] else f"method.{variant}"]
    return load_config(os.path.join(ROOT, "configs", "digits_mlp.py"), [
        "model.trunk_kwargs.features=(512, 512)", "model.head=linear", f"batch_size={BATCH_SIZE}",
        "mesh.data=1", "mesh.model=1", "optim.name=adam", "progress_bar=False", "num_steps=1000000",
        f"method.name={name}"] + extra)


def peer_of(method: str):
    """The TorchJD implementation timed against ``method`` (a variant shares its base method's)."""
    return TORCHJD.get(method.partition("@")[0])


def make_floor(model, tasks, input_key: str):
    """``params, batch -> (losses, J)``: one forward, then ``jax.vmap(vjp_fn)(eye(K))``."""
    loss_fns = [(t.name, t.label_key, task_loss_fn(t)) for t in tasks]
    num_tasks = len(tasks)

    def losses_fn(params, batch):
        preds = model.apply({"params": params}, batch[input_key], train=True)
        return jnp.stack([fn(preds[name], batch[label]).mean() for name, label, fn in loss_fns])

    def floor(params, batch):
        losses, vjp_fn = jax.vjp(lambda p: losses_fn(p, batch), params)
        (jac,) = jax.vmap(vjp_fn)(jnp.eye(num_tasks, dtype=losses.dtype))
        return losses, jac

    return jax.jit(floor), losses_fn


def make_floor_heads_once(model, tasks, input_key: str):
    """``params, batch -> (losses, J)`` as :func:`make_floor`, with the VJP the train step uses for
    trunk + heads models (``gradients.representation.representation_losses_and_vjp``: each head differentiated once,
    then K trunk VJPs)."""
    encode, decode = make_representation_forward(model, tasks, input_key)
    names = [t.name for t in tasks]

    def floor(params, batch):
        lin = representation_losses_and_vjp(encode, decode, params, batch, jax.random.key(0), names)
        losses, vjp_fn = lin.losses, lin.vjp_fn
        (jac,) = jax.vmap(vjp_fn)(jnp.eye(len(names), dtype=losses.dtype))
        return losses, jac

    return jax.jit(floor)


def trivial_method(needs: str) -> Method:
    """A method whose solver costs nothing: weights 1 from the Gramian ('gramian'), or the row sum of
    the flattened Jacobian as the direction ('jacobian'). Timing the train step with it isolates the
    step's own cost of that path (vmapped VJP, Gramian / flattening, combination, optimisers); the
    weights read G, else XLA would drop its computation."""

    def update(inputs, state, key):
        del key
        if needs == "jacobian":
            # a matvec, not ``sum(axis=0)``: XLA:CPU reduces [K, P] over K ~70x slower than ``ones @ J``
            return jnp.ones((inputs.jacobian.shape[0],), inputs.jacobian.dtype) @ inputs.jacobian, state
        # weights that read G (0 * trace: XLA keeps it, float x * 0 is not folded), so its computation stays
        return jnp.ones_like(inputs.losses) + 0 * jnp.trace(inputs.gramian).astype(inputs.losses.dtype), state

    return Method(f"trivial_{needs}", lambda num_tasks: {}, update, needs, False)


def trivial_step(exp, dataset, config, needs: str):
    """``exp``'s train step (same model, optimisers, shardings) with ``trivial_method(needs)``."""
    step = make_train_step(exp.model, dataset.tasks, exp.optimizers, trivial_method(needs), dataset.input_key,
                           config.sharpness)
    return jax.jit(step, in_shardings=(exp.state_shardings, exp.data_sharding),
                   out_shardings=(exp.state_shardings, replicated(exp.mesh)), donate_argnums=0)


class JaxImpl:
    """A jitted step with its carry: ``run(n)`` returns seconds per step over n steps."""

    def __init__(self, step, carry, batch, donates: bool):
        self.step, self.carry, self.batch, self.donates = step, carry, batch, donates

    def run(self, n: int) -> float:
        start = time.perf_counter()
        out = None
        for _ in range(n):
            if self.donates:
                self.carry, out = self.step(self.carry, self.batch)
            else:
                out = self.step(self.carry, self.batch)
        jax.block_until_ready(out)
        if self.donates:
            jax.block_until_ready(self.carry)
        return (time.perf_counter() - start) / n


def steps_for(seconds_per_step: float, target_ms: float, min_steps: int) -> int:
    return max(min_steps, min(100, int(round(target_ms / 1e3 / max(seconds_per_step, 1e-6)))))


def best_ms(fn, *args, reps: int = 5) -> float:
    """Best of ``reps`` timed calls of ``fn(*args)`` (after one warm-up call), in ms."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def time_contractions(num_tasks: int, seed: int = 0) -> list:
    """Both routes of ``layerwise.rows_gramian`` (kernel + bias) on each trunk layer of the benchmark
    at K tasks: FLOPs (``contraction_flops``), best time, and the route the FLOP rule picks."""
    rng = np.random.default_rng(seed)
    out = []
    for i, o in zip((IN_FEATURES,) + TRUNK[:-1], TRUNK):
        x = jnp.asarray(rng.random((BATCH_SIZE, i), dtype=np.float32))
        d = jnp.asarray(rng.standard_normal((BATCH_SIZE, num_tasks, o), dtype=np.float32))
        flops = layerwise.contraction_flops(BATCH_SIZE, BATCH_SIZE, i + 1, num_tasks, num_tasks, o)
        row = {"layer": f"{i}x{o}", "chosen": layerwise.choose_contraction(BATCH_SIZE, BATCH_SIZE, i + 1, num_tasks,
                                                                           num_tasks, o)}
        for route in layerwise.CONTRACTIONS:
            fn = jax.jit(lambda a, b, r=route: layerwise.rows_gramian(a, b, route=r, bias=True))
            row[route] = {"gflop": 2 * flops[route] / 1e9, "ms": best_ms(fn, x, d)}
        row["fastest"] = min(layerwise.CONTRACTIONS, key=lambda r: row[r]["ms"])
        out.append(row)
    return out


def profile_steps(experiments, jax_impls, args, num_tasks: int, gemm_rate: float) -> dict:
    """``op_profile`` of the train step of each ``--profile-methods`` entry timed here (a fresh carry,
    3 traced steps), with XLA's copy rate as the byte peak and ``gemm_rate`` as the FLOP peak; plus
    the contraction routes (``time_contractions``)."""
    copy_rate = op_profile.copy_rate()
    out = {"peak_gflops": gemm_rate / 1e9, "peak_gbytes": copy_rate / 1e9, "steps": {},
           "contractions": time_contractions(num_tasks, args.seed)}
    for name in args.profile_methods.split(","):
        if name not in experiments:
            continue
        exp = experiments[name]
        rows, summary = op_profile.profile_ops(exp.train_step, (exp.init(), jax_impls[name].batch), steps=3,
                                               carries=True)
        out["steps"][name] = {"summary": summary,
                              "table": op_profile.format_table(rows, summary, gemm_rate, copy_rate, args.profile_top),
                              "by_kind": op_profile.time_by_kind(rows)}
    return out


def time_pieces(methods, experiments, floor, params, batch, num_tasks: int, reps: int) -> dict:
    """Per Gramian method: ``update`` alone on this batch's Gramian; plus Gramian + combination."""
    losses, jac = floor(params, batch)
    shared = jac["shared"]
    gram = jax.jit(gramian)(shared)
    flat = jnp.concatenate([j.reshape(num_tasks, -1) for j in jax.tree.leaves(shared)], axis=1)

    def median_ms(fn, *args):
        """Median over ``reps`` rounds of the mean time of back-to-back calls (~20 ms a round: a
        sub-millisecond update timed one call at a time is mostly timer and dispatch noise)."""
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        calls = max(1, min(500, int(0.02 / max(time.perf_counter() - start, 1e-6))))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - start) / calls)
        return 1e3 * statistics.median(times)

    combine = jax.jit(lambda j: (gramian(j), jax.tree.map(lambda x: jnp.tensordot(jnp.ones((num_tasks,)), x, 1), j)))
    out = {"gramian_and_combine_ms": median_ms(combine, shared)}
    for name in methods:
        method = experiments[name].method
        if method.needs == "losses":
            continue
        inputs = MethodInputs(losses=losses, step=jnp.asarray(1, jnp.int32), gramian=gram,
                              jacobian=flat if method.needs == "jacobian" else None)
        state = method.init(num_tasks)
        update = jax.jit(lambda i, s, m=method: m.update(i, s, jax.random.key(0)))
        out[f"update_ms/{name}"] = median_ms(update, inputs, state)
    return out


def bench_k(num_tasks, num_rounds, methods, args, peer):
    dataset, x, y = make_dataset(num_tasks, args.seed)
    jax_impls, experiments, compile_s = {}, {}, {}
    for name in methods:
        start = time.perf_counter()
        exp = build_experiment(make_config(name), dataset)
        batch = to_global({"image": x, **{f"t{k}": y[:, k] for k in range(num_tasks)}}, exp.data_sharding)
        impl = JaxImpl(exp.train_step, exp.init(), batch, donates=True)
        impl.run(1)  # compile
        compile_s[name] = time.perf_counter() - start
        experiments[name], jax_impls[name] = exp, impl
    ew_exp = experiments["ew"]
    floor, _ = make_floor(ew_exp.model, dataset.tasks, dataset.input_key)
    params = jax.tree.map(jnp.copy, jax_impls["ew"].carry.params)
    jax_impls["floor"] = JaxImpl(floor, params, jax_impls["ew"].batch, donates=False)
    jax_impls["floor"].run(1)
    jax_impls["floor_heads_once"] = JaxImpl(make_floor_heads_once(ew_exp.model, dataset.tasks, dataset.input_key),
                                            params, jax_impls["ew"].batch, donates=False)
    jax_impls["floor_heads_once"].run(1)
    # XLA's rate on the step's largest GEMM ([K*B, 512] x [512, 512], the per-task cotangents through
    # the second layer), timed in the same rounds as the steps: the FLOP floor's denominator.
    gemm_a = jnp.ones((num_tasks * BATCH_SIZE, TRUNK[1]), jnp.float32) / TRUNK[1]
    gemm_b = jnp.ones((TRUNK[1], TRUNK[0]), jnp.float32)
    jax_impls["gemm"] = JaxImpl(jax.jit(jnp.dot), gemm_a, gemm_b, donates=False)
    jax_impls["gemm"].run(1)
    for needs in ("gramian", "jacobian"):  # the step's own cost of each path, solver excluded
        if any(experiments[m].method.needs == needs for m in methods):
            jax_impls[f"trivial_{needs}"] = JaxImpl(trivial_step(ew_exp, dataset, make_config("ew"), needs),
                                                    ew_exp.init(), jax_impls["ew"].batch, donates=True)
            jax_impls[f"trivial_{needs}"].run(1)

    torch_impls, torch_info = [], {}
    if peer is not None:
        wanted = list(TORCH_EXTRAS) + sorted({peer_of(m) for m in methods if peer_of(m)})
        if "nash_mtl" in methods:
            wanted.append("nash_mtl_cvxpy")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "batch.npz")
            np.savez(path, x=x, y=y)
            torch_info = peer.ask(cmd="setup", batch=path, num_tasks=num_tasks, impls=wanted, seed=args.seed)
        torch_impls = torch_info["impls"]

    def run(kind, name, n):
        if kind == "jax":
            return jax_impls[name].run(n)
        return peer.ask(cmd="time", impl=name, steps=n)["sec_per_step"]

    # Calibrate steps per round from one timed step of each implementation.
    order = [("jax", "ew"), ("jax", "floor"), ("jax", "floor_heads_once"), ("jax", "gemm")]
    order += [("torch", t) for t in TORCH_EXTRAS if t in torch_impls]
    order += [("jax", n) for n in ("trivial_gramian", "trivial_jacobian") if n in jax_impls]
    for name in methods:
        if name != "ew":
            order.append(("jax", name))
        if peer_of(name) in torch_impls and ("torch", peer_of(name)) not in order:
            order.append(("torch", peer_of(name)))
        if name == "nash_mtl" and "nash_mtl_cvxpy" in torch_impls:
            order.append(("torch", "nash_mtl_cvxpy"))
    steps = {key: steps_for(run(*key, 1), args.target_ms, args.min_steps) for key in order}
    samples = {key: [] for key in order}
    ends, core = order[:4], order[4:]
    for r in range(num_rounds):
        for key in ends + (core if r % 2 == 0 else core[::-1]) + ends:
            samples[key].append(run(*key, steps[key]))
        print(f"  K={num_tasks}: round {r + 1}/{num_rounds} done", file=sys.stderr, flush=True)

    ms = {f"{kind}:{name}": 1e3 * statistics.median(v) for (kind, name), v in samples.items()}
    pieces = time_pieces(methods, experiments, floor, params, jax_impls["ew"].batch, num_tasks,
                         reps=max(3, num_rounds)) if args.pieces else {}
    ew, fl = ms["jax:ew"], ms["jax:floor"]
    gemm_rate = 2.0 * num_tasks * BATCH_SIZE * TRUNK[1] * TRUNK[0] / (ms["jax:gemm"] / 1e3)
    flops = gramian_step_flops(num_tasks)
    flop_floor_ms = 1e3 * flops["total"] / gemm_rate
    rows = []
    for name in methods:
        method = experiments[name].method
        ours = ms[f"jax:{name}"]
        peer_key = f"torch:{peer_of(name)}" if peer_of(name) else None
        jd = ms.get(peer_key) if peer_key else None
        row = {"method": name, "needs": method.needs, "ours_ms": ours, "vs_ew": ours / ew,
               "vs_floor": ours / fl if method.needs != "losses" else None,
               "torchjd_ms": jd, "torchjd_over_ours": jd / ours if jd else None,
               "steps_per_round": steps[("jax", name)], "compile_s": compile_s[name]}
        if method.needs == "losses":
            row["target"] = f"<= {LOSS_TARGET}x EW"
            row["meets_target"] = row["vs_ew"] <= LOSS_TARGET
        else:
            row["target"] = f"<= {FLOOR_TARGET}x floor"
            row["meets_target"] = row["vs_floor"] <= FLOOR_TARGET
        row["meets_torchjd"] = None if jd is None else ours <= jd
        if name == "nash_mtl" and "torch:nash_mtl_cvxpy" in ms:
            row["nash_cvxpy_ms"] = ms["torch:nash_mtl_cvxpy"]
            row["cvxpy_over_ours"] = ms["torch:nash_mtl_cvxpy"] / ours
            row["meets_nash_target"] = row["cvxpy_over_ours"] >= NASH_TARGET
        if pieces.get(f"update_ms/{name}") is not None:
            row["update_alone_ms"] = pieces[f"update_ms/{name}"]
        if method.needs == "gramian" and "@" not in name:
            row["vs_flop_floor"] = ours / flop_floor_ms
        if name in EXACT_GRAMIAN and jd and num_tasks in TORCHJD_TARGETS:
            row["meets_issue_targets"] = (row["torchjd_over_ours"] >= TORCHJD_TARGETS[num_tasks]
                                          and row.get("vs_flop_floor", float("inf")) <= FLOP_FLOOR_TARGET)
        rows.append(row)
    profiles = profile_steps(experiments, jax_impls, args, num_tasks, gemm_rate) if args.profile else {}
    return {"num_tasks": num_tasks, "rounds": num_rounds, "ew_ms": ew, "floor_ms": fl,
            "gemm_gflops": gemm_rate / 1e9, "gramian_gflop": {k: v / 1e9 for k, v in flops.items()},
            "flop_floor_ms": flop_floor_ms, "profiles": profiles,
            "floor_heads_once_ms": ms["jax:floor_heads_once"], "ms": ms, "rows": rows, "pieces": pieces,
            "torch_skipped": torch_info.get("skipped", {}), "torch_version": torch_info.get("torch"),
            "torch_threads": torch_info.get("threads"),
            "steps_per_round": {f"{k}:{n}": s for (k, n), s in steps.items()}}


def free_executables() -> None:
    """Drop compiled executables: each holds code mappings (~2.5k for one K = 40 step here), and one
    process compiling every method at K = 2, 10 and 40 crossed the kernel's 65530-mapping limit
    (LLVM "Cannot allocate memory" during K = 40's compiles)."""
    jax.clear_caches()
    gc.collect()


def bench_k_in_groups(num_tasks, num_rounds, methods, args, peer):
    """``bench_k`` on at most ``args.group_size`` methods at a time (each group with its own EW,
    floor and peers, timed interleaved, then freed), merged into one result; rows keep their own
    group's ratios. ``group_size <= 0``: one group."""
    others = [m for m in methods if m != "ew"]
    size = args.group_size if args.group_size > 0 else len(others)
    if len(others) <= size:
        return bench_k(num_tasks, num_rounds, methods, args, peer)
    chunks = [others[start:start + size] for start in range(0, len(others), size)]
    parts = []
    for chunk in chunks:
        parts.append(bench_k(num_tasks, num_rounds, ["ew"] + chunk, args, peer))
        free_executables()
    first = parts[0]
    return {**first,
            "rows": first["rows"] + [r for part in parts[1:] for r in part["rows"] if r["method"] != "ew"],
            "pieces": {k: v for part in parts for k, v in part["pieces"].items()},
            "ms": {k: v for part in reversed(parts) for k, v in part["ms"].items()},  # the first group's EW / peers
            "groups": [{"methods": chunk, "ew_ms": part["ew_ms"], "floor_ms": part["floor_ms"]}
                       for chunk, part in zip(chunks, parts)]}


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_tables(results) -> None:
    for res in results:
        k, ms = res["num_tasks"], res["ms"]
        print(f"\n### K = {k} tasks (median ms per step; EW {res['ew_ms']:.2f} ms, floor {res['floor_ms']:.2f} ms"
              f", floor with each head differentiated once {res['floor_heads_once_ms']:.2f} ms"
              f"; torch sum {fmt(ms.get('torch:torch_sum'))} ms, TorchJD Mean {fmt(ms.get('torch:jd_mean'))} ms)\n")
        if res.get("groups"):
            print(f"Timed in {len(res['groups'])} groups, each row against its own group's EW / floor: EW "
                  + ", ".join(f"{g['ew_ms']:.2f}" for g in res["groups"]) + " ms; floor "
                  + ", ".join(f"{g['floor_ms']:.2f}" for g in res["groups"]) + " ms.\n")
        flops = res["gramian_gflop"]
        print(f"FLOP floor of the layer-wise Gramian step: {flops['total']:.2f} GFLOP ("
              + ", ".join(f"{k} {v:.2f}" for k, v in flops.items() if k != "total")
              + f") at {res['gemm_gflops']:.0f} GFLOP/s (XLA's [{k * BATCH_SIZE}, {TRUNK[1]}] x [{TRUNK[1]}, {TRUNK[0]}] "
              f"matmul, timed in the same rounds) = {res['flop_floor_ms']:.2f} ms")
        for needs in ("gramian", "jacobian"):
            if f"jax:trivial_{needs}" in ms:
                t = ms[f"jax:trivial_{needs}"]
                print(f"Our step on the '{needs}' path with a free solver: {t:.2f} ms = {t / res['floor_ms']:.2f}x floor")
        print()
        print("| method | needs | ours (ms) | / EW | / floor | target | met | TorchJD (ms) | TorchJD / ours | "
              "/ FLOP floor | issue 32 targets | update alone (ms) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            met = "yes" if r["meets_target"] else "NO"
            issue = {None: "-", True: "met", False: "NO"}[r.get("meets_issue_targets")]
            print(f"| {r['method']} | {r['needs']} | {r['ours_ms']:.2f} | {r['vs_ew']:.2f} | {fmt(r['vs_floor'])} | "
                  f"{r['target']} | {met} | {fmt(r['torchjd_ms'])} | {fmt(r['torchjd_over_ours'])} | "
                  f"{fmt(r.get('vs_flop_floor'))} | {issue} | {fmt(r.get('update_alone_ms'), '.3f')} |")
        if k in TORCHJD_TARGETS:
            print(f"\nIssue 32 targets for the exact Gramian methods at K = {k}: TorchJD / ours >= "
                  f"{TORCHJD_TARGETS[k]} and ours / FLOP floor <= {FLOP_FLOOR_TARGET}.")
        print_profiles(res.get("profiles") or {}, k)
        for r in res["rows"]:
            if "nash_cvxpy_ms" in r:
                print(f"\nNash-MTL: ours {r['ours_ms']:.2f} ms vs cvxpy-per-step original {r['nash_cvxpy_ms']:.2f} ms "
                      f"-> {r['cvxpy_over_ours']:.1f}x faster (target >= {NASH_TARGET}x: "
                      f"{'met' if r['meets_nash_target'] else 'MISSED'})")
        if res["pieces"]:
            print(f"\nGramian + weighted combination alone: {res['pieces']['gramian_and_combine_ms']:.2f} ms")
        if res["torch_skipped"]:
            print(f"\nTorch implementations that failed: {res['torch_skipped']}")


def print_profiles(profiles: dict, num_tasks: int) -> None:
    """The ``--profile`` tables of one K: per step, time by op kind and the top ops; the contraction routes."""
    for name, prof in profiles.get("steps", {}).items():
        summary = prof["summary"]
        print(f"\n#### Op profile: {name}, K = {num_tasks} (wall {summary['step_ms']:.2f} ms per step, ops "
              f"{summary['ops_ms']:.2f} ms summed over both threads, {summary['num_ops']} ops; XLA's FLOP count "
              f"{summary['flops'] / 1e9:.2f} GFLOP; peaks: {profiles['peak_gflops']:.0f} GFLOP/s, "
              f"{profiles['peak_gbytes']:.1f} GB/s)\n")
        print("| kind | ops | ms | % | GFLOP | MB |\n|---|---|---|---|---|---|")
        total = max(summary["ops_ms"], 1e-9)
        for kind, v in sorted(prof["by_kind"].items(), key=lambda kv: -kv[1]["ms"]):
            print(f"| {kind} | {v['ops']} | {v['ms']:.2f} | {100 * v['ms'] / total:.1f} | {v['gflop']:.3f} | "
                  f"{v['mb']:.1f} |")
        print()
        print(prof["table"])
    if profiles.get("contractions"):
        print(f"\n#### Layer-wise Gramian routes at K = {num_tasks} (kernel + bias, best of 5)\n")
        print("| layer | input_gram GFLOP | input_gram ms | explicit_rows GFLOP | explicit_rows ms | FLOP rule picks "
              "| fastest |\n|---|---|---|---|---|---|---|")
        for r in profiles["contractions"]:
            a, b = r[layerwise.INPUT_GRAM], r[layerwise.EXPLICIT_ROWS]
            print(f"| {r['layer']} | {a['gflop']:.3f} | {a['ms']:.2f} | {b['gflop']:.3f} | {b['ms']:.2f} | "
                  f"{r['chosen']} | {r['fastest']} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all", help="comma-separated mtl_jax method names, or 'all'")
    parser.add_argument("--tasks", default="2,10,40", help="comma-separated K values")
    parser.add_argument("--rounds", default="5,5,3", help="rounds per K (one value, or one per --tasks entry)")
    parser.add_argument("--target-ms", type=float, default=250.0, help="time per implementation per round")
    parser.add_argument("--min-steps", type=int, default=1)
    parser.add_argument("--torch-python", default=os.path.join(ROOT, ".peers-venv", "bin", "python"))
    parser.add_argument("--no-torch", action="store_true", help="skip the TorchJD / cvxpy peers")
    parser.add_argument("--no-pieces", dest="pieces", action="store_false", help="skip the update-alone timings")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads (match JAX's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-size", type=int, default=0,
                        help="time at most this many methods per group, each group against its own EW and floor "
                             "(0: all at once; K = 40 with every method needs ~10 to stay under 65530 mappings)")
    parser.add_argument("--json-out", default="", help="also write the JSON here")
    parser.add_argument("--profile", action="store_true",
                        help="per K, an op-by-op profile (benchmarks/op_profile.py) of the --profile-methods steps "
                             "and the timing of both layer-wise Gramian routes")
    parser.add_argument("--profile-methods", default="ew,upgrad", help="methods profiled with --profile")
    parser.add_argument("--profile-top", type=int, default=20, help="ops listed per profile table")
    parser.add_argument("--vjp-jvp", default="upgrad,mgda",
                        help=f"Gramian methods also timed with jacobian.gramian_mode='vjp_jvp' (as '<name>{VARIANT}')")
    parser.add_argument("--materialize", default="upgrad,mgda",
                        help="Gramian methods also timed with jacobian.gramian_mode='materialize' (as '<name>@materialize')")
    parser.add_argument("--variants", default="famo@extra_forward=False,gradnorm@jacobian.level=representation",
                        help="extra rows '<method>@<key>=<value>': the method with config.method.<key>=<value> "
                             "(config.<key>=<value> for a dotted key)")
    parser.add_argument("--host-malloc", choices=("reuse", "system"), default="reuse",
                        help="'reuse': mtl_jax.host_memory.reuse_freed_memory() here and the same glibc settings "
                             "(GLIBC_TUNABLES) in the torch peer; 'system': the C library's defaults on both sides")
    args = parser.parse_args()
    os.environ[ENV_VAR] = args.host_malloc
    host_malloc_applied = reuse_freed_memory()  # before the first computation starts JAX's CPU client
    peer_env = {**os.environ, "GLIBC_TUNABLES": glibc_tunables()} if host_malloc_applied else None
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    methods += [m for m in args.variants.split(",") if m]
    methods += [m + VARIANT for m in args.vjp_jvp.split(",") if m]
    methods += [m + "@materialize" for m in args.materialize.split(",") if m]
    unknown = [m for m in methods if m.partition("@")[0] not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {sorted(METHODS)}")
    methods = ["ew"] + [m for m in methods if m != "ew"]
    tasks = [int(k) for k in args.tasks.split(",")]
    rounds = [int(r) for r in args.rounds.split(",")]
    rounds = (rounds * len(tasks))[:len(tasks)] if len(rounds) == 1 else rounds
    if len(rounds) != len(tasks):
        parser.error(f"--rounds: give one value or {len(tasks)} (one per --tasks entry)")
    peer = start_peer("torchjd_step.py", args, peer_env, not_timed="TorchJD not timed (see the docstring to create it)")
    start = time.perf_counter()
    try:
        results = []
        for k, r in zip(tasks, rounds):  # each K's table goes to stderr as soon as it is done
            results.append(bench_k_in_groups(k, r, methods, args, peer))
            with contextlib.redirect_stdout(sys.stderr):
                print_tables(results[-1:])
            free_executables()
    finally:
        if peer is not None:
            peer.close()
    out = {"device": jax.devices()[0].platform, "cpu_count": os.cpu_count(), "jax": jax.__version__,
           "python": platform.python_version(), "batch_size": BATCH_SIZE, "model": "hps mlp 784-512-512 + linear heads",
           "host_malloc": args.host_malloc if host_malloc_applied or args.host_malloc == "system" else "system (not glibc)",
           "load_average": os.getloadavg(), "wall_s": time.perf_counter() - start,
           "results": results}
    print_json(out, args.json_out)
    print_tables(results)


if __name__ == "__main__":
    main()
