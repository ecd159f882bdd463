"""Device mesh and sharding rules.

The mesh has axes ``('data', 'expert', 'model')``: batches are split on 'data' (and on 'expert'
when it has more than one device: expert parallelism, GShard-style); parameters are replicated
unless a rule shards them; stacked mixture-of-experts weights (paths matching ``EXPERT_PATTERN``,
leaves [E, ...]) are split over 'expert' on their leading axis. A rule is ``(regex, spec)``: every
parameter whose '/'-joined path (e.g. ``shared/dense_0/kernel``) matches ``regex`` (``re.search``;
first match wins) gets ``PartitionSpec(*spec)``. Optimiser moments of a parameter follow its
sharding; the rest of the train state is replicated.

FSDP (``config.sharding.fsdp``; ZeRO-3 style, Rajbhandari et al. 2020): every parameter no rule
matches is split over mesh axis 'data' along its largest dimension that the axis size divides
(``fsdp_spec``); leaves under ``FSDP_MIN_SIZE`` elements, or with no such dimension, stay
replicated. Its optimiser moments follow it, so parameters and optimiser state take ~1/N of their
replicated bytes per device (N = the 'data' axis size); XLA (GSPMD) all-gathers a parameter where
the step needs it whole and reduce-scatters its gradient, so the step computes the same function as
the replicated one (to float rounding: reductions may run in another order).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "expert", "model")
# Stacked experts of the sparse MoE layers (mtl_jax.models.moe_layers.SparseMoE): leaves [E, ...].
EXPERT_PATTERN = r"(^|/)moe/experts/[^/]+$"
# FSDP leaves smaller than this stay replicated (biases, norms, small heads: gathering them costs
# more latency than their memory is worth).
FSDP_MIN_SIZE = 2**12


def make_mesh(data: int = -1, model: int = 1, devices=None, expert: int = 1) -> Mesh:
    """A ('data', 'expert', 'model') mesh over ``devices`` (default: all); data=-1 means 'all
    remaining devices'.

    A mesh smaller than the device count uses the first ``data * expert * model`` devices (e.g.
    data=1, model=1 runs on one device).
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    if data == -1:
        if n % (model * expert):
            raise ValueError(f"mesh: expert={expert} x model={model} does not divide the {n} devices")
        data = n // (model * expert)
    if data * expert * model > n:
        raise ValueError(f"mesh: data={data} x expert={expert} x model={model} needs {data * expert * model} "
                         f"devices; {n} available")
    return Mesh(devices[: data * expert * model].reshape(data, expert, model), AXES,
                axis_types=(AxisType.Auto,) * len(AXES))


def key_path_str(path) -> str:
    """'/'-joined names of a jax key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], rules: Sequence, mesh: Mesh, fsdp: bool = False) -> P:
    """PartitionSpec for one leaf: the first matching rule's, else (``fsdp``) ``fsdp_spec``, else
    replicated; errors name the path when a matching rule does not fit it."""
    spec = rule_spec(path, shape, rules, mesh)
    if spec is not None:
        return spec
    return fsdp_spec(shape, mesh) if fsdp else P()


def fsdp_spec(shape: Sequence[int], mesh: Mesh, axis: str = "data", min_size: int = FSDP_MIN_SIZE) -> P:
    """``axis`` on the largest dimension of ``shape`` that the axis size divides (the first of equal
    ones); ``P()`` (replicated) for a leaf under ``min_size`` elements, one with no such dimension,
    or a mesh whose ``axis`` has one device."""
    size = dict(mesh.shape).get(axis, 1)
    if size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    fits = [d for d in range(len(shape)) if shape[d] >= size and shape[d] % size == 0]
    if not fits:
        return P()
    dim = max(fits, key=lambda d: (shape[d], -d))
    return P(*(axis if d == dim else None for d in range(len(shape))))


def rule_spec(path: str, shape: Sequence[int], rules: Sequence, mesh: Mesh) -> P | None:
    """The first rule matching ``path``'s PartitionSpec (checked against ``shape``), or None."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            spec = tuple(spec)
            if len(spec) != len(shape):
                raise ValueError(f"sharding rule {pattern!r} -> {spec} matches '{path}' of shape "
                                 f"{tuple(shape)}: the spec needs one entry per dimension")
            for dim, axis in zip(shape, spec):
                size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
                if dim % size:
                    raise ValueError(f"sharding rule {pattern!r}: '{path}' dim {dim} of {tuple(shape)} is "
                                     f"not divisible by mesh axis {axis!r} of size {size}")
            return P(*spec)
    return None


def tree_shardings(tree, mesh: Mesh, rules: Sequence = (), fsdp: bool = False):
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs) by the rules (and
    ``fsdp_spec`` for the leaves no rule matches, with ``fsdp``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(key_path_str(path), leaf.shape, rules, mesh, fsdp)), tree)


def train_state_shardings(abstract_state, optimizers: dict, mesh: Mesh, rules: Sequence = (), fsdp: bool = False):
    """NamedShardings for a TrainState: params by the rules (with ``fsdp``, the others split over
    'data': ``fsdp_spec``), each optimiser's param-shaped state (Adam's mu, nu, ...) like its
    params, everything else replicated."""
    from mtl_jax.train.optim import map_groups

    rules = tuple(rules) + expert_rules(abstract_state.params, mesh)
    param_shardings = tree_shardings(abstract_state.params, mesh, rules, fsdp)
    rep = replicated(mesh)
    opt_shardings = map_groups(
        lambda tx, opt_state, shardings: optax.tree_map_params(
            tx, lambda _, sharding: sharding, opt_state, shardings, transform_non_params=lambda _: rep),
        optimizers, abstract_state.opt_state, param_shardings)
    everything_else = jax.tree.map(lambda _: rep, abstract_state.replace(params=None, opt_state=None))
    return everything_else.replace(params=param_shardings, opt_state=opt_shardings)


def expert_rules(params, mesh: Mesh) -> tuple:
    """Rules putting the leading (expert) axis of every ``EXPERT_PATTERN`` leaf on mesh axis
    'expert' (none when the mesh has no 'expert' axis of size > 1); a leaf whose expert count the
    axis does not divide raises, naming it. They come after the user's rules (first match wins)."""
    size = dict(mesh.shape).get("expert", 1)
    if size == 1:
        return ()
    rules = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = key_path_str(path)
        if re.search(EXPERT_PATTERN, name):
            if leaf.shape[0] % size:
                raise ValueError(f"mesh axis 'expert' of size {size} does not divide the {leaf.shape[0]} experts of "
                                 f"'{name}' {tuple(leaf.shape)}; use an expert count divisible by {size}")
            rules.append((f"^{re.escape(name)}$", ("expert",) + (None,) * (leaf.ndim - 1)))
    return tuple(rules)


def per_device_bytes(tree, device=None) -> int:
    """Bytes of ``tree``'s array leaves held on ``device`` (default: this process's first device):
    the sum of their addressable shards there."""
    device = jax.local_devices()[0] if device is None else device
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


def sharded_bytes(abstract_tree, shardings) -> int:
    """Per-device bytes of ``abstract_tree`` (ShapeDtypeStructs) laid out by ``shardings`` (no arrays
    needed): each leaf's bytes over the devices its spec splits it across."""
    def leaf_bytes(leaf, sharding):
        shard_shape = sharding.shard_shape(leaf.shape)
        return int(np.prod(shard_shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree.map(leaf_bytes, abstract_tree, shardings)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over 'data' (and 'expert' when it has more than one device)."""
    if dict(mesh.shape).get("expert", 1) > 1:
        return NamedSharding(mesh, P(("data", "expert")))
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
