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

import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet

from serve import build_runners, median_ms, parse_peer_args, peer_parser, serve

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
    """``(runners, skipped)`` of the ``setup`` command: a warmed-up Runner per memory format."""
    x, y = make_batch(cmd["batch_size"], cmd["image_size"], 1000, cmd.get("seed", 0))
    return build_runners(cmd["formats"], lambda memory_format: Runner(
        memory_format, x, y, cmd["lr"], cmd["weight_decay"], cmd.get("seed", 0)), cmd.get("warmup", 1))


def handlers() -> dict:
    """The ``setup`` and ``time`` commands of ``serve``, sharing the runners built by ``setup``."""
    runners: dict[str, Runner] = {}
    default_threads = torch.get_num_threads()

    def on_setup(cmd: dict) -> dict:
        nonlocal runners
        runners, skipped = setup(cmd)
        return {"ok": True, "formats": list(runners), "skipped": skipped, "torch": torch.__version__,
                "threads": torch.get_num_threads()}

    def on_time(cmd: dict) -> dict:
        torch.set_num_threads(cmd.get("threads", default_threads))
        wall, cpu = runners[cmd["format"]].time(cmd["steps"])
        return {"format": cmd["format"], "sec_per_step": wall, "cpu_sec_per_step": cpu}

    return {"setup": on_setup, "time": on_time}


def main():
    parser = peer_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_peer_args(parser)
    if args.serve:
        serve(handlers())
        return
    runners, skipped = setup({"batch_size": args.batch, "image_size": args.image_size, "formats": args.formats.split(","),
                              "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed})
    ms = median_ms(runners, args.rounds, args.steps, seconds=lambda wall_cpu: wall_cpu[0])
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "ms": ms, "skipped": skipped},
                     indent=2))


if __name__ == "__main__":
    main()
