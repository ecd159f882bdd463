"""Molecular graphs as one padded array per molecule (mtl_jax models take a single input array).

A molecule of at most ``max_nodes`` atoms is packed into ``graph [max_nodes, width]``; row ``n`` is

    [ node_features[n] (num_node_features) | position[n] (3) | node_mask[n] (1) |
      bonds[n, :, :].reshape(max_nodes * num_bond_types) ]

``bonds[n, m]`` is the one-hot bond type between atoms n and m (zero where there is no bond, on the
diagonal and on padding rows / columns), so the whole graph, its geometry and its padding travel as
one float32 array that batches, shards and caches like an image.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# QM9 (PyTorch Geometric's featurisation, which the Nash-MTL / FAMO / LibMTL QM9 experiments use):
# one-hot H C N O F, atomic number, aromatic, sp, sp2, sp3, number of attached hydrogens.
NUM_NODE_FEATURES = 11
# one-hot single, double, triple, aromatic.
NUM_BOND_TYPES = 4
MAX_NODES = 29


class Graph(NamedTuple):
    """An unpacked batch of graphs (leading dims ``...``, e.g. the batch)."""

    nodes: object      # [..., N, num_node_features]
    positions: object  # [..., N, 3]
    node_mask: object  # [..., N] 1 for an atom, 0 for padding
    bonds: object      # [..., N, N, num_bond_types]


def graph_width(max_nodes: int = MAX_NODES, num_node_features: int = NUM_NODE_FEATURES,
                num_bond_types: int = NUM_BOND_TYPES) -> int:
    """Columns of a packed graph row."""
    return num_node_features + 3 + 1 + max_nodes * num_bond_types


def pack_graph(nodes: np.ndarray, positions: np.ndarray, bonds: np.ndarray, max_nodes: int = MAX_NODES) -> np.ndarray:
    """One molecule -> float32 ``[max_nodes, graph_width]``.

    Args:
      nodes: [n, F] node features; positions: [n, 3]; bonds: [n, n, num_bond_types], n <= max_nodes.
    """
    n, num_features = nodes.shape
    num_bond_types = bonds.shape[-1]
    if n > max_nodes:
        raise ValueError(f"a molecule of {n} atoms does not fit max_nodes={max_nodes}")
    if positions.shape != (n, 3) or bonds.shape != (n, n, num_bond_types):
        raise ValueError(f"pack_graph: nodes {nodes.shape}, positions {positions.shape}, bonds {bonds.shape} "
                         f"disagree (expected positions ({n}, 3), bonds ({n}, {n}, B))")
    out = np.zeros((max_nodes, graph_width(max_nodes, num_features, num_bond_types)), np.float32)
    out[:n, :num_features] = nodes
    out[:n, num_features:num_features + 3] = positions
    out[:n, num_features + 3] = 1.0
    padded = np.zeros((n, max_nodes, num_bond_types), np.float32)
    padded[:, :n] = bonds
    out[:n, num_features + 4:] = padded.reshape(n, -1)
    return out


def unpack_graph(graph, num_node_features: int = NUM_NODE_FEATURES, num_bond_types: int = NUM_BOND_TYPES) -> Graph:
    """``graph [..., N, width]`` (numpy or jax) -> :class:`Graph`; the inverse of :func:`pack_graph`."""
    n = graph.shape[-2]
    f = num_node_features
    if graph.shape[-1] != graph_width(n, f, num_bond_types):
        raise ValueError(f"graph rows of width {graph.shape[-1]} are not packed for {n} nodes, {f} node features "
                         f"and {num_bond_types} bond types (width {graph_width(n, f, num_bond_types)})")
    bonds = graph[..., f + 4:].reshape(graph.shape[:-1] + (n, num_bond_types))
    return Graph(nodes=graph[..., :f], positions=graph[..., f:f + 3], node_mask=graph[..., f + 3], bonds=bonds)
