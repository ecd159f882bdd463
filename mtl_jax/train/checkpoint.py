"""Orbax checkpoints of the train state and the data-iterator position.

A checkpoint holds ``state`` (the TrainState pytree, restored onto the mesh through a sharded
abstract target) and ``data`` (the grain iterator state, JSON). Saves are asynchronous; a state
with a non-finite parameter is never written.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mtl_jax.train.step import tree_all_finite


def make_manager(directory: str, *, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
    """Starts an async save of ``state`` at ``step``.

    The state is copied first, so the caller may donate its buffers to the next step while the
    write is in flight.
    """
    if not bool(tree_all_finite(state.params)):
        raise FloatingPointError(f"refusing to checkpoint step {step}: the parameters hold NaN/Inf")
    snapshot = jax.tree.map(jnp.copy, state)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(snapshot),
                                                data=ocp.args.JsonSave(data_state)), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """(state, data_state) of the newest checkpoint, or None. ``abstract_state`` carries shardings."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return restored.state, restored.data
