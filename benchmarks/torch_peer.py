"""A long-lived PyTorch peer: a script of ``benchmarks/peers/`` run by the peers venv's python with
``--serve --threads N``, driven by one JSON command per line on its stdin (one JSON reply per line
on its stdout), so that a benchmark's rounds alternate between the JAX steps and the peer's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "benchmarks", "peers")


class TorchPeer:
    """``benchmarks/peers/<script> --serve --threads <threads>`` under ``python`` (cwd: the repository
    root); ``stderr``: where the peer's stderr goes (default: discarded; None: this process's stderr);
    ``quit_timeout``: seconds ``close`` waits for the peer to exit."""

    def __init__(self, script: str, python: str, threads: int, env: dict | None = None, stderr=subprocess.DEVNULL,
                 quit_timeout: float = 60):
        self.quit_timeout = quit_timeout
        self.proc = subprocess.Popen(
            [python, os.path.join(PEERS, script), "--serve", "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=env)

    def ask(self, **cmd) -> dict:
        """Sends ``cmd`` (one JSON line) and returns the peer's reply; RuntimeError if the peer exited."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch peer exited (code {self.proc.poll()}) on {cmd}")
        return json.loads(line)

    def close(self) -> None:
        """Sends ``quit`` and waits for the peer to exit."""
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=self.quit_timeout)


def start_peer(script: str, args, env: dict | None = None, not_timed: str = "torch not timed",
               **kwargs) -> TorchPeer | None:
    """The peer ``TorchPeer(script, args.torch_python, args.threads, env, **kwargs)`` of a benchmark
    whose ``args`` has ``no_torch``, ``torch_python`` and ``threads``; None for ``--no-torch``, or
    (saying ``no peers venv at <path>: <not_timed>`` on stderr) where ``args.torch_python`` is missing."""
    if args.no_torch:
        return None
    if not os.path.exists(args.torch_python):
        print(f"no peers venv at {args.torch_python}: {not_timed}", file=sys.stderr)
        return None
    return TorchPeer(script, args.torch_python, args.threads, env, **kwargs)


def print_json(out: dict, path: str = "") -> None:
    """Prints ``out`` as indented JSON and, where ``path`` is given, also writes it there."""
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
