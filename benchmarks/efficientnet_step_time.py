"""Train-step time of our EfficientNet-Lite0 (flax, ``mtl_jax.models.pretrained.efficientnet_lite``)
against the PyTorch model (``efficientnet-lite-pytorch``) doing the same step.

    python -m benchmarks.efficientnet_step_time [--batch 32] [--image-size 224] [--rounds 3]

One step, both sides: batch of random images [B, 224, 224, 3] (the same numbers; NCHW for torch)
and random ImageNet labels, EfficientNet-Lite0 features + the linear classifier (1000 classes, random
initialisation), train mode (BatchNorm batch statistics and running-statistic updates, dropout 0.2,
drop connect 0.2), mean cross-entropy, backward, AdamW (lr 1e-3, weight decay 1e-2) over every
parameter.

* ours: one ``jax.jit`` of forward + ``value_and_grad`` + ``optax.adamw`` update with the whole
  state (params, batch_stats, optimiser state, rng key) donated; NHWC convolutions, depthwise
  convolutions as ``DepthwiseConv`` 'auto' (``--depthwise`` 'shifted_autodiff' / 'grouped' time
  JAX's own derivatives / XLA's grouped convolution instead);
* torch (``benchmarks/peers/efficientnet_torch_step.py``, a long-lived subprocess in ``.peers-venv``):
  the same model in ``channels_last`` memory format (``--formats channels_last,contiguous`` adds
  NCHW, several times slower here), with ``--threads`` intra-op threads (default the CPU count, as
  XLA:CPU uses) and with each count of ``--extra-torch-threads`` (default 1: on a machine where
  other processes hold a core, torch's OpenMP barriers stall its 2-thread steps, and its 1-thread
  step can be several times faster); the fastest torch configuration is the reference.

Rounds interleave the implementations (odd rounds in reverse order); each round runs ``--steps``
steps per implementation after one warm-up step each; the figure is the median over rounds of the
wall time per step, with the process CPU time per step and the best (least disturbed) round beside
it: on a shared machine the wall time also counts waiting for a core, and a busy sibling hyperthread
inflates both. Prints JSON, then a markdown table; target: ours >= 1.2x faster than the fastest
torch configuration.

Peers venv setup (once)::

    .peers-venv/bin/pip install torch
    .peers-venv/bin/pip install --no-deps efficientnet-lite-pytorch==0.1.0
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from benchmarks.torch_peer import ROOT, print_json, start_peer
from mtl_jax.host_memory import ENV_VAR, glibc_tunables, reuse_freed_memory

NUM_CLASSES = 1000
TARGET = 1.2


def make_jax_step(batch_size: int, image_size: int, lr: float, weight_decay: float, depthwise: str, seed: int):
    """-> ``(step, state, batch)``: ``step(state, batch) -> (state, loss)`` jitted with ``state`` donated."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mtl_jax.models.pretrained.efficientnet_lite import EfficientNetLite0

    rng = np.random.default_rng(seed)  # the same numbers as the torch peer's make_batch
    x = rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, (batch_size,))
    batch = (jnp.asarray(x), jnp.asarray(y, jnp.int32))
    model = EfficientNetLite0(num_classes=NUM_CLASSES, depthwise_impl=depthwise)
    tx = optax.adamw(lr, weight_decay=weight_decay)
    variables = jax.jit(lambda x: model.init(jax.random.key(seed), x, method="logits"))(batch[0][:1])
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]), jax.random.key(seed + 1))

    def step(state, batch):
        params, batch_stats, opt_state, key = state
        key, dropout_key = jax.random.split(key)
        x, y = batch

        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                          rngs={"dropout": dropout_key}, mutable=["batch_stats"], method="logits")
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state, key), loss

    return jax.jit(step, donate_argnums=0), state, batch


class JaxImpl:
    """A jitted step with its carried state: ``run(n)`` -> (wall, process CPU) seconds per step."""

    def __init__(self, step, state, batch):
        self.step, self.state, self.batch = step, state, batch

    def run(self, steps: int) -> tuple[float, float]:
        import jax

        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.state, loss = self.step(self.state, self.batch)
        jax.block_until_ready(loss)
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="steps per implementation per round")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--depthwise", default="auto", choices=("auto", "shifted", "shifted_autodiff", "grouped"),
                        help="our depthwise convolution (DepthwiseConv impl)")
    parser.add_argument("--formats", default="channels_last", help="torch memory formats timed (channels_last, contiguous)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads (match JAX's)")
    parser.add_argument("--extra-torch-threads", default="1",
                        help="comma-separated torch thread counts also timed ('' for none)")
    parser.add_argument("--torch-python", default=os.path.join(ROOT, ".peers-venv", "bin", "python"))
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()
    os.environ.setdefault(ENV_VAR, "reuse")
    host_malloc = reuse_freed_memory()  # before JAX's CPU client starts; the peer gets the same glibc settings
    peer_env = {**os.environ, "GLIBC_TUNABLES": glibc_tunables()} if host_malloc else None

    import jax

    start = time.perf_counter()
    step, state, batch = make_jax_step(args.batch, args.image_size, args.lr, args.weight_decay, args.depthwise,
                                       args.seed)
    compile_start = time.perf_counter()
    state, loss = step(state, batch)  # compile + warm-up
    jax.block_until_ready(loss)
    impls = {"ours": JaxImpl(step, state, batch)}
    compile_s = time.perf_counter() - compile_start

    peer, torch_info = None, {}
    try:
        peer = start_peer("efficientnet_torch_step.py", args, peer_env, stderr=None, quit_timeout=120)
        if peer is not None:
            torch_info = peer.ask(cmd="setup", batch_size=args.batch, image_size=args.image_size,
                                  formats=args.formats.split(","), lr=args.lr, weight_decay=args.weight_decay,
                                  seed=args.seed, warmup=1)
            counts = [args.threads] + [int(t) for t in args.extra_torch_threads.split(",") if t and int(t) != args.threads]
            for fmt in torch_info["formats"]:
                for count in counts:
                    impls[f"torch_{fmt}_{count}t"] = (fmt, count)
        samples = {name: [] for name in impls}
        names = list(impls)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                if name == "ours":
                    samples[name].append(impls[name].run(args.steps))
                else:
                    fmt, count = impls[name]
                    reply = peer.ask(cmd="time", format=fmt, threads=count, steps=args.steps)
                    samples[name].append((reply["sec_per_step"], reply["cpu_sec_per_step"]))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {1e3 * s[-1][0]:.0f} ms" for n, s in samples.items()),
                  file=sys.stderr, flush=True)
    finally:
        if peer is not None:
            peer.close()

    ms = {name: 1e3 * statistics.median(w for w, _ in s) for name, s in samples.items()}
    cpu_ms = {name: 1e3 * statistics.median(c for _, c in s) for name, s in samples.items()}
    best_ms = {name: 1e3 * min(w for w, _ in s) for name, s in samples.items()}
    torch_names = [n for n in ms if n != "ours"]
    best = min(torch_names, key=ms.get) if torch_names else None
    out = {"device": jax.devices()[0].platform, "cpu_count": os.cpu_count(), "jax": jax.__version__,
           "python": platform.python_version(), "torch": torch_info.get("torch"),
           "torch_threads": torch_info.get("threads"), "torch_skipped": torch_info.get("skipped", {}),
           "batch_size": args.batch, "image_size": args.image_size, "rounds": args.rounds, "steps": args.steps,
           "depthwise": args.depthwise, "compile_s": compile_s, "ms": ms, "cpu_ms": cpu_ms,
           "samples_ms": {n: [1e3 * w for w, _ in s] for n, s in samples.items()},
           "reference": best, "speedup": ms[best] / ms["ours"] if best else None,
           "cpu_speedup": cpu_ms[best] / cpu_ms["ours"] if best else None,
           "best_ms": best_ms, "best_speedup": best_ms[best] / best_ms["ours"] if best else None, "target": TARGET,
           "meets_target": (ms[best] / ms["ours"] >= TARGET) if best else None,
           "host_malloc": "reuse" if host_malloc else "system", "load_average": os.getloadavg(),
           "wall_s": time.perf_counter() - start}
    print_json(out, args.json_out)
    print(f"\n### EfficientNet-Lite0 train step, batch {args.batch}, {args.image_size}x{args.image_size}, "
          f"{os.cpu_count()} CPU cores (median of {args.rounds} rounds x {args.steps} steps; load average "
          f"{out['load_average'][0]:.1f})\n")
    print("| implementation | wall ms / step (median) | CPU ms / step (median) | wall ms / step (best) | "
          "its median / ours |")
    print("|---|---|---|---|---|")
    for name in ms:
        ratio = "-" if name == "ours" else f"{ms[name] / ms['ours']:.2f}"
        print(f"| {name} | {ms[name]:.0f} | {cpu_ms[name]:.0f} | {best_ms[name]:.0f} | {ratio} |")
    if best:
        print(f"\nours vs {best}: {out['speedup']:.2f}x faster by median wall time (target >= {TARGET}x: "
              f"{'met' if out['meets_target'] else 'MISSED'}); {out['cpu_speedup']:.2f}x by CPU time, "
              f"{out['best_speedup']:.2f}x by best wall time")


if __name__ == "__main__":
    main()
