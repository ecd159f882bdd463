"""What the torch peer scripts beside this file share: their command line (``--serve``,
``--threads``), the command loop that ``benchmarks/torch_peer.TorchPeer`` drives (one JSON command
per line on stdin, one JSON reply per line on stdout), and the warmed-up runners they time. The
scripts import it as ``from serve import ...`` (a script's own folder is on its import path)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any, Callable, Iterable

import torch


def peer_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with a peer script's ``--serve`` (the command loop) and ``--threads`` (torch
    intra-op threads)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--serve", action="store_true", help="JSON-lines command loop on stdin/stdout")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def parse_peer_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser.parse_args()`` (a ``peer_parser``), with torch set to ``--threads`` intra-op threads
    and one inter-op thread."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    return args


def serve(handlers: dict[str, Callable[[dict], dict]]) -> None:
    """Answers each command ``{"cmd": name, ...}`` on stdin with ``handlers[name](command)`` as one
    JSON line on stdout (``{"error": ...}`` for a name not in ``handlers``); returns on ``quit`` or
    at the end of stdin."""
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            return
        handler = handlers.get(cmd["cmd"])
        reply = handler(cmd) if handler else {"error": f"unknown command {cmd['cmd']!r}"}
        print(json.dumps(reply), flush=True)


def build_runners(names: Iterable[str], build: Callable[[str], Any], warmup: int) -> tuple[dict, dict]:
    """``(runners, skipped)``: ``runners[name] = build(name)`` after ``warmup`` calls of its ``step()``;
    a name whose build or warm-up raises is reported in ``skipped[name]`` (``"<Error>: <message>"``)
    instead, not fatal."""
    runners, skipped = {}, {}
    for name in names:
        try:
            runner = build(name)
            for _ in range(warmup):
                runner.step()
            runners[name] = runner
        except Exception as e:  # a runner that fails to build or run is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {e}"
    return runners, skipped


def median_ms(runners: dict, rounds: int, steps: int, seconds: Callable[[Any], float] = float) -> dict[str, float]:
    """``{name: median ms per step}`` over ``rounds`` rounds, each timing every runner in turn for
    ``steps`` steps; ``seconds`` picks the seconds per step from what ``runner.time(steps)`` returns."""
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name].append(seconds(runner.time(steps)))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}
