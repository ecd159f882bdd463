"""A run's claim on its workdir: an exclusive lock, and the config the workdir was started with.

``lock``: ``<workdir>/lock`` held with ``fcntl.flock`` by process 0 for the whole run, holding
``{"pid", "host", "started"}``. The kernel releases it when the process ends, however it ends, so a
lock left by a killed run is stale by construction and is taken over; a live one refuses the second
run naming its pid and host. ``config.json``: the config of the run that started the workdir,
written once (temporary file, fsync, rename); a later run with a config that differs in a key that
changes the training is refused, listing the keys, unless ``config.resume_mismatch='allow'`` (then
the old file is kept as ``config.<time>.json`` and the new one stored).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from mtl_jax.errors import UsageError

LOCK = "lock"
CONFIG = "config.json"
# Keys that change what is logged or how the step is laid out in memory (rematerialisation, FSDP,
# micro-batches: the same update to float rounding), not the trained model: they may differ on resume.
RESUME_FREE = ("progress_bar", "log_every", "eval_every", "eval_batch_size", "checkpoint.every", "checkpoint.keep",
               "checkpoint.enabled", "max_nonfinite_steps", "resume_mismatch", "distributed", "baselines",
               "profile_steps", "remat", "sharding.fsdp", "grad_accum_steps")


class WorkdirLock:
    """An open, flock-ed ``<workdir>/lock``; ``release()`` (or process exit) frees it."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def lock(workdir: str) -> WorkdirLock:
    """Takes ``<workdir>/lock`` or raises UsageError naming the run that holds it."""
    path = os.path.join(workdir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise UsageError(f"workdir '{workdir}' is in use by another run (pid {holder.get('pid', '?')} on "
                         f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to end "
                         f"or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    os.fsync(fd)
    return WorkdirLock(fd, path)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}


def flat(tree: dict, prefix: str = "") -> dict:
    """``{'a.b': value}`` of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_as_json(config) -> dict:
    """The config as plain JSON data (tuples as lists), as it is stored."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def differing_keys(stored: dict, current: dict) -> list[str]:
    """Keys whose values differ between two stored configs, ignoring ``RESUME_FREE`` keys."""
    a, b = flat(stored), flat(current)
    free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUME_FREE)
    return sorted(k for k in set(a) | set(b) if not free(k) and a.get(k, "<absent>") != b.get(k, "<absent>"))


def check_config(workdir: str, config) -> None:
    """Stores the config on a workdir's first run; refuses a later run whose config differs in a
    training key unless ``config.resume_mismatch == 'allow'``."""
    path = os.path.join(workdir, CONFIG)
    current = config_as_json(config)
    if os.path.exists(path):
        try:
            with open(path) as f:
                stored = json.load(f)
        except ValueError as err:
            raise UsageError(f"'{path}' is not valid JSON ({err}); it records this workdir's config") from None
        keys = differing_keys(stored, current)
        if not keys:
            return
        if config.get("resume_mismatch", "refuse") != "allow":
            a, b = flat(stored), flat(current)
            shown = ", ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys[:6])
            raise UsageError(f"workdir '{workdir}' holds a run with another config ({shown}"
                             f"{', ...' if len(keys) > 6 else ''}); use another --workdir, or pass "
                             f"--config.resume_mismatch=allow to continue it with the new config")
        os.replace(path, os.path.join(workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}.json"))
    write_json_atomic(path, current)


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to a temporary sibling, fsyncs it, renames it over ``path`` and fsyncs the folder:
    a crash leaves the old file or the new one, never a partial one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, data) -> None:
    """``write_text_atomic`` of ``data`` as JSON (NaN / Inf refused: the file stays valid JSON)."""
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
