"""PyTorch peer of ``benchmarks/efficientnet_step_time.py``: EfficientNet-Lite0 train steps.

Runs in the peers venv (``.peers-venv``: torch CPU, ``efficientnet-lite-pytorch`` 0.1.0)::

    .peers-venv/bin/python benchmarks/peers/efficientnet_torch_step.py --batch 32 --steps 2 --rounds 3

prints ``{format: median wall ms per step}`` as JSON. ``efficientnet_step_time.py`` starts it with
``--serve`` and drives it with one JSON command per line on stdin (``setup``, ``time``, ``quit``;
``time`` may set the intra-op thread count for its steps), so that its rounds alternate with the JAX
steps; each reply is one JSON line.

Model: ``efficientnet_lite_pytorch.EfficientNet.from_name('efficientnet-lite0')`` (1000 classes,
random initialisation), train mode (BatchNorm batch statistics, dropout 0.2, drop connect 0.2).
One step: forward, mean cross-entropy, backward, ``torch.optim.AdamW(lr, weight_decay)``,
``zero_grad(set_to_none=True)``. Formats: ``contiguous`` (NCHW) and ``channels_last`` (the model and
input in ``torch.channels_last`` memory format, oneDNN's preferred layout on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet

FORMATS = ("contiguous", "channels_last")


def make_batch(batch_size: int, image_size: int, num_classes: int, seed: int):
    """The benchmark's batch (the JAX side draws the same numbers): x [B, 3, H, W] float32, y [B] int64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32)
    y = rng.integers(0, num_classes, (batch_size,))
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y.astype(np.int64))


class Runner:
    """One model + optimiser + batch in one memory format; ``time(n)``: seconds per step over n steps."""

    def __init__(self, memory_format: str, x, y, lr: float, weight_decay: float, seed: int):
        if memory_format not in FORMATS:
            raise ValueError(f"unknown format {memory_format!r}; valid: {FORMATS}")
        torch.manual_seed(seed)
        self.model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
        self.x, self.y = x, y
        if memory_format == "channels_last":
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = x.contiguous(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(self) -> float:
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def time(self, steps: int) -> tuple[float, float]:
        """(wall, process CPU) seconds per step over ``steps`` steps."""
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def setup(cmd: dict) -> tuple[dict, dict]:
    x, y = make_batch(cmd["batch_size"], cmd["image_size"], 1000, cmd.get("seed", 0))
    runners, skipped = {}, {}
    for memory_format in cmd["formats"]:
        try:
            runner = Runner(memory_format, x, y, cmd["lr"], cmd["weight_decay"], cmd.get("seed", 0))
            for _ in range(cmd.get("warmup", 1)):
                runner.step()
            runners[memory_format] = runner
        except Exception as e:  # a format that fails to build or run is reported, not fatal
            skipped[memory_format] = f"{type(e).__name__}: {e}"
    return runners, skipped


def serve() -> None:
    runners: dict[str, Runner] = {}
    default_threads = torch.get_num_threads()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "setup":
            runners, skipped = setup(cmd)
            reply = {"ok": True, "formats": list(runners), "skipped": skipped, "torch": torch.__version__,
                     "threads": torch.get_num_threads()}
        elif cmd["cmd"] == "time":
            torch.set_num_threads(cmd.get("threads", default_threads))
            wall, cpu = runners[cmd["format"]].time(cmd["steps"])
            reply = {"format": cmd["format"], "sec_per_step": wall, "cpu_sec_per_step": cpu}
        elif cmd["cmd"] == "quit":
            return
        else:
            reply = {"error": f"unknown command {cmd['cmd']!r}"}
        print(json.dumps(reply), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="JSON-lines command loop on stdin/stdout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if args.serve:
        serve()
        return
    runners, skipped = setup({"batch_size": args.batch, "image_size": args.image_size, "formats": args.formats.split(","),
                              "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed})
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            times[name].append(runner.time(args.steps)[0])
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "ms": {name: 1e3 * statistics.median(t) for name, t in times.items()}, "skipped": skipped},
                     indent=2))


if __name__ == "__main__":
    main()
