"""A long-lived PyTorch peer: a script of ``benchmarks/peers/`` run by the peers venv's python with
``--serve --threads N``, driven by one JSON command per line on its stdin (one JSON reply per line
on its stdout), so that a benchmark's rounds alternate between the JAX steps and the peer's."""

from __future__ import annotations

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "benchmarks", "peers")


class TorchPeer:
    """``benchmarks/peers/<script> --serve --threads <threads>`` under ``python`` (cwd: the repository
    root); ``stderr``: where the peer's stderr goes (default: discarded)."""

    def __init__(self, script: str, python: str, threads: int, env: dict | None = None, stderr=subprocess.DEVNULL):
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
            self.proc.wait(timeout=60)
