"""Orbax checkpoints of the train state and the data-iterator position, verified on restore.

A checkpoint holds ``state`` (the TrainState pytree, restored onto the mesh through a sharded
abstract target) and ``data`` (the grain iterator state, JSON). Saves are asynchronous; a state
with a non-finite floating leaf is never written. Once a save is complete, a SHA-256 digest of each
item's files is written beside them (``checksums.json`` in the step's directory); a restore checks
the digests first and falls back to the newest step that verifies and restores, moving the damaged
newer steps to ``<workdir>/damaged_checkpoints/`` (never deleting them) and naming each with why.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mtl_jax.train.step import guarded_leaves
from mtl_jax.train.workdir import write_json_atomic

ITEMS = ("state", "data")
CHECKSUMS = "checksums.json"
DAMAGED = "damaged_checkpoints"


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them verifies and restores."""


class Restored(NamedTuple):
    state: object
    data: dict
    step: int
    skipped: list  # [(step, reason)] of the newer steps that did not verify or restore


def make_manager(directory: str, *, keep: int) -> ocp.CheckpointManager:
    if keep < 1:
        raise ValueError(f"checkpoint.keep must be >= 1 (got {keep}): it is how many checkpoints stay on disk")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def nonfinite_paths(state) -> list[str]:
    """Paths of the floating leaves of ``state`` (params, optimiser, method and model state) that
    hold a NaN or Inf."""
    flags = jax.device_get([jnp.isfinite(x).all() for _, x in guarded_leaves(state)])
    return [path for (path, _), ok in zip(guarded_leaves(state), flags) if not ok]


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
    """Starts an async save of ``state`` at ``step``, after recording the digests of the saves
    that completed since the last call.

    The state is copied first, so the caller may donate its buffers to the next step while the
    write is in flight.
    """
    bad = nonfinite_paths(state)
    if bad:
        raise FloatingPointError(f"refusing to checkpoint step {step}: non-finite values in {bad[:5]}")
    manager.wait_until_finished()
    record_checksums(manager)
    check_free_space(str(manager.directory), step, state)
    snapshot = jax.tree.map(jnp.copy, state)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(snapshot),
                                                data=ocp.args.JsonSave(data_state)), force=True)


def check_free_space(directory: str, step: int, state) -> None:
    """Raises ENOSPC before a save that the disk cannot hold (the state's bytes, +10% and 1 KiB per
    leaf of metadata): a save that runs out of space mid-write fails inside orbax's writer threads."""
    leaves = jax.tree.leaves(state)
    need = int(1.1 * sum(x.nbytes for x in leaves)) + 1024 * len(leaves) + (64 << 10)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device for the step-{step} checkpoint (needs about "
                                    f"{need / 2**20:.2f} MiB, {free / 2**20:.2f} MiB free)", directory)


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for the save in flight, records its digests and closes the manager."""
    try:
        manager.wait_until_finished()
        record_checksums(manager)
    finally:
        manager.close()


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def item_digest(directory: str) -> str:
    """SHA-256 over the sorted relative paths and contents of every file under ``directory``."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


def record_checksums(manager: ocp.CheckpointManager) -> None:
    """Writes ``checksums.json`` ({item: digest}) into every completed step directory that lacks one
    (process 0; temporary file, fsync, rename)."""
    if jax.process_index() != 0:
        return
    for step in manager.all_steps():
        directory = step_dir(manager, step)
        target = os.path.join(directory, CHECKSUMS)
        if os.path.exists(target) or not os.path.isdir(directory):
            continue
        write_json_atomic(target, {item: item_digest(os.path.join(directory, item)) for item in ITEMS})


def verify(directory: str) -> str | None:
    """Why the step in ``directory`` is damaged (a missing item, a digest mismatch), or None. A step
    without ``checksums.json`` (the run stopped before it was recorded) is checked for its items only."""
    missing = [item for item in ITEMS if not os.path.isdir(os.path.join(directory, item))]
    if missing:
        return f"item(s) {missing} missing"
    target = os.path.join(directory, CHECKSUMS)
    if not os.path.exists(target):
        return None
    try:
        with open(target) as f:
            expected = json.load(f)
    except (OSError, ValueError) as err:
        return f"unreadable {CHECKSUMS}: {err}"
    changed = [item for item in ITEMS if expected.get(item) != item_digest(os.path.join(directory, item))]
    return f"checksum mismatch in item(s) {changed}" if changed else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def restore_latest(manager: ocp.CheckpointManager, abstract_state) -> Restored | None:
    """The newest checkpoint that verifies and restores, or None when there is none at all.

    Newer steps that fail are moved to ``<workdir>/damaged_checkpoints/<step>`` (so new saves do
    not collide with them) and listed in ``skipped``. Raises :class:`CheckpointError` naming every
    step and its reason when checkpoints exist but none restores. ``abstract_state`` carries shardings.
    """
    skipped = []
    for step in sorted(manager.all_steps(), reverse=True):
        reason = verify(step_dir(manager, step))
        if reason is None:
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 - any failure of a damaged step means: try the next one
                reason = _first_line(err)
            else:
                if restored.data is None:
                    reason = "the data-iterator item is empty"
                else:
                    bad = nonfinite_paths(restored.state)
                    reason = f"non-finite values in {bad[:3]}" if bad else None
            if reason is None:
                _quarantine(manager, [s for s, _ in skipped])
                return Restored(restored.state, restored.data, step, skipped)
        skipped.append((step, reason))
    if skipped:
        raise CheckpointError(f"no checkpoint in {manager.directory} restores: " + "; ".join(
            f"step {s}: {r}" for s, r in skipped) + ". Move the directory aside to start afresh.")
    return None


def _quarantine(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves the given step directories to ``<parent>/damaged_checkpoints/<step>[.n]`` (process 0)."""
    if not steps:
        return
    if jax.process_index() == 0:
        target_root = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED)
        os.makedirs(target_root, exist_ok=True)
        for step in steps:
            target = os.path.join(target_root, str(step))
            if os.path.exists(target):
                target = f"{target}.{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(step_dir(manager, step), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mtl_jax checkpoint quarantine")
    manager.reload()
