"""Graph networks for molecules on padded graphs: Gilmer et al.'s MPNN (as in Nash-MTL's QM9
experiment) and a GIN(E) variant, as mtl_jax trunks (``graph [B, N, width] -> h [B, D]``).

Input: the packed array of ``mtl_jax.data.graphs`` (``unpack_graph``): per molecule ``N`` rows of
node features, positions, a node mask and bond one-hots. Every operation masks padding exactly:
a padded atom sends no message, is no neighbour, gets zero attention in the readout and adds
nothing to a sum, so the output is the same for any ``N`` >= the atom count and any atom order.

MPNN (Gilmer et al. 2017, "Neural Message Passing for Quantum Chemistry", the edge-network
message function + GRU update + set2set readout), written after Nash-MTL's
``experiments/quantum_chemistry/models.py`` (PyTorch Geometric's ``NNConv``, ``GRU``, ``Set2Set``):

* graph: ``Complete()`` + ``Distance(norm=False)``: every ordered pair of distinct atoms (i, j) is
  an edge with features ``e_ij = [bond one-hot (4), ||pos_i - pos_j||]`` (zeros for an unbonded pair).
* ``x^0 = relu(W_0 v)``; for 3 steps (one shared conv and GRU)::

      m_i   = relu( W_root x_i + b + mean_{j != i} Theta(e_ij) x_j )          (NNConv, aggr='mean')
      Theta(e) = reshape( W_2 relu(W_1 e + b_1) + b_2 , [dim, dim] )           (the edge network)
      x_i   = GRU(m_i, x_i)

* set2set (Vinyals et al. 2016) with 3 steps over the atoms::

      q_t = LSTM(q*_{t-1});  a_i = softmax_i(x_i . q_t);  r_t = sum_i a_i x_i;  q*_t = [q_t, r_t]

* ``h = relu(W_1 q*_3)`` [B, dim], the shared representation the per-task linear heads read.

The edge network's [dim, dim] matrix is never formed per edge: ``Theta(e_ij) x_j`` is linear in
``relu(W_1 e_ij + b_1)``, so the mean message is ``sum_k sum_j a_ij u_ijk (x_j W_2[k]) + (sum_j a_ij
x_j) B_2`` with ``a_ij`` = 1 / deg(i) on the edges (N^2 * 128 * dim multiply-adds per graph instead
of N^2 * 128 * dim^2). Parameters follow torch's layout one-to-one (``mpnn_renames``).

GIN (Xu et al. 2019, "How Powerful are Graph Neural Networks?", Eq. 4.1) with edge features
(GINE, Hu et al. 2020, "Strategies for Pre-training Graph Neural Networks", Eq. in Sec. 5.1):
over the chemical bonds (not the complete graph)::

      x_i^{l+1} = MLP_l( (1 + eps_l) x_i^l + sum_{j bonded to i} relu(x_j^l + W_e^l e_ij) )

readout (Xu et al. Eq. 4.2): the concatenation over layers of the sum over atoms,
``h = relu(W [sum_i x_i^1, ..., sum_i x_i^L])``. Deviation: the MLPs have no batch normalisation
(the model keeps no batch statistics, so evaluation equals training and padding is exact).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.data.graphs import NUM_BOND_TYPES, NUM_NODE_FEATURES, Graph, unpack_graph


def pair_mask(node_mask: jax.Array) -> jax.Array:
    """float [..., N, N]: 1 on the complete graph's edges (both atoms real, i != j)."""
    n = node_mask.shape[-1]
    return node_mask[..., :, None] * node_mask[..., None, :] * (1.0 - jnp.eye(n, dtype=node_mask.dtype))


def complete_edge_features(graph: Graph) -> jax.Array:
    """[..., N, N, num_bond_types + 1]: PyG's ``Complete()`` + ``Distance(norm=False)`` edge features,
    the bond one-hot (zero for an unbonded pair) then the Euclidean distance ``||pos_i - pos_j||``.

    The distance is differentiable everywhere (its square root sees a zero only on the diagonal and
    padding, where the sqrt is taken of a safe 1 and the result masked to 0).
    """
    diff = graph.positions[..., :, None, :] - graph.positions[..., None, :, :]
    sq = jnp.sum(jnp.square(diff), axis=-1)
    edge = pair_mask(graph.node_mask) > 0
    distance = jnp.where(edge, jnp.sqrt(jnp.where(edge, sq, 1.0)), 0.0)
    return jnp.concatenate([graph.bonds, distance[..., None]], axis=-1)


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to ``mask`` (bool, same shape): exactly 0 off the mask,
    and all 0 (not NaN, in value and gradient) for a row without any True entry (an empty padding graph)."""
    top = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    weights = jnp.where(mask, jnp.exp(jnp.where(mask, logits - top, 0.0)), 0.0)
    return weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), jnp.finfo(weights.dtype).tiny)


class TorchGRUCell(nn.Module):
    """torch.nn.GRU's cell (gates r, z, n in that order; both biases)::

        r = s(W_ir x + b_ir + W_hr h + b_hr); z = s(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = (1 - z) n + z h

    ``input`` / ``hidden`` are Dense(3 * features): kernels are torch's ``weight_ih_l0`` /
    ``weight_hh_l0`` transposed. x [..., D_in], h [..., features] -> h' [..., features].
    """

    features: int

    @nn.compact
    def __call__(self, x, h):
        gi = nn.Dense(3 * self.features, name="input")(x)
        gh = nn.Dense(3 * self.features, name="hidden")(h)
        ir, iz, i_n = jnp.split(gi, 3, axis=-1)
        hr, hz, hn = jnp.split(gh, 3, axis=-1)
        r = jax.nn.sigmoid(ir + hr)
        z = jax.nn.sigmoid(iz + hz)
        n = jnp.tanh(i_n + r * hn)
        return (1.0 - z) * n + z * h


class TorchLSTMCell(nn.Module):
    """torch.nn.LSTM's cell (gates i, f, g, o in that order; both biases)::

        c' = s(f) c + s(i) tanh(g);  h' = s(o) tanh(c')

    x [..., D_in], (h, c) [..., features] -> (h', c')."""

    features: int

    @nn.compact
    def __call__(self, x, carry):
        h, c = carry
        gates = nn.Dense(4 * self.features, name="input")(x) + nn.Dense(4 * self.features, name="hidden")(h)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c


class Set2Set(nn.Module):
    """Set2Set readout (Vinyals et al. 2016; PyG ``Set2Set(dim, processing_steps)``) over the real atoms.

    x [B, N, D], node_mask [B, N] -> q* [B, 2D]. Attention logits of padded atoms are -inf, so they get
    exactly zero weight; a graph's atoms all real or not, the softmax runs over its real atoms only.
    """

    steps: int = 3

    @nn.compact
    def __call__(self, x, node_mask):
        batch, _, dim = x.shape
        lstm = TorchLSTMCell(dim, name="lstm")
        h = c = jnp.zeros((batch, dim), x.dtype)
        q_star = jnp.zeros((batch, 2 * dim), x.dtype)
        real = node_mask > 0
        for _ in range(self.steps):
            h, c = lstm(q_star, (h, c))
            attention = masked_softmax(jnp.einsum("bnd,bd->bn", x, h), real)
            readout = jnp.einsum("bn,bnd->bd", attention, x)
            q_star = jnp.concatenate([h, readout], axis=-1)
        return q_star


class EdgeNetworkConv(nn.Module):
    """PyG ``NNConv(dim, dim, Sequential(Linear(E, hidden), ReLU(), Linear(hidden, dim * dim)), aggr='mean')``
    on the complete graph (Gilmer et al.'s edge network message function)::

        out_i = x_i W_root + bias + (1/deg_i) sum_{j: edge j->i} x_j Theta(e_ij)

    ``Theta(e) = (W_2 relu(W_1 e + b_1) + b_2).reshape(dim, dim)`` ([in, out], torch's ``view(-1, in, out)``).
    x [B, N, D], edges [B, N, N, E], edge_mask [B, N, N] (1 where j -> i is an edge; ``edge_mask[b, i, j]``)
    -> [B, N, D]. An atom without neighbours aggregates 0 (PyG's scatter mean of nothing).
    """

    features: int
    edge_hidden: int = 128

    @nn.compact
    def __call__(self, x, edges, edge_mask):
        d_in = x.shape[-1]
        hidden = nn.relu(nn.Dense(self.edge_hidden, name="edge_hidden")(edges))  # [B, N, N, K]
        kernel = self.param("edge_out_kernel", nn.initializers.lecun_normal(), (self.edge_hidden, d_in * self.features))
        bias = self.param("edge_out_bias", nn.initializers.zeros, (d_in * self.features,))
        degree = jnp.sum(edge_mask, axis=-1, keepdims=True)  # [B, N, 1]
        weights = edge_mask / jnp.maximum(degree, 1.0)  # a_ij
        weighted = hidden * weights[..., None]  # a_ij u_ijk
        # sum_j a_ij u_ijk x_j, then contract (k, d) with W_2 viewed as [K, D_in, D_out]
        pooled = jnp.einsum("bijk,bjd->bikd", weighted, x)
        message = jnp.einsum("bikd,kdo->bio", pooled, kernel.reshape(self.edge_hidden, d_in, self.features))
        message = message + jnp.einsum("bij,bjd->bid", weights, x) @ bias.reshape(d_in, self.features)
        root = nn.Dense(self.features, use_bias=False, name="root")(x)
        return message + root + self.param("bias", nn.initializers.zeros, (self.features,))


class MPNN(nn.Module):
    """Gilmer et al.'s MPNN as Nash-MTL's QM9 ``Net`` without its heads: graph [B, N, width] -> h [B, dim].

    ``num_node_features`` / ``num_bond_types`` say how the rows are packed (``data/graphs.py``).
    """

    dim: int = 64
    steps: int = 3
    set2set_steps: int = 3
    edge_hidden: int = 128
    num_node_features: int = NUM_NODE_FEATURES
    num_bond_types: int = NUM_BOND_TYPES

    @nn.compact
    def __call__(self, graph, train: bool = False):
        g = unpack_graph(graph, self.num_node_features, self.num_bond_types)
        edges = complete_edge_features(g)
        edge_mask = pair_mask(g.node_mask)
        out = nn.relu(nn.Dense(self.dim, name="lin0")(g.nodes))
        h = out
        conv = EdgeNetworkConv(self.dim, self.edge_hidden, name="conv")
        gru = TorchGRUCell(self.dim, name="gru")
        for _ in range(self.steps):
            m = nn.relu(conv(out, edges, edge_mask))
            h = gru(m, h)
            out = h
        pooled = Set2Set(self.set2set_steps, name="set2set")(out, g.node_mask)
        return nn.relu(nn.Dense(self.dim, name="lin1")(pooled))


class GIN(nn.Module):
    """GIN with edge features (GINE) over the bonds: graph [B, N, width] -> h [B, dim].

    Edge features are the bond one-hot and the distance (as the MPNN's, on bonded pairs only).
    ``eps`` is learned per layer (GIN-eps), initialised at 0.
    """

    dim: int = 64
    num_layers: int = 5
    num_node_features: int = NUM_NODE_FEATURES
    num_bond_types: int = NUM_BOND_TYPES

    @nn.compact
    def __call__(self, graph, train: bool = False):
        g = unpack_graph(graph, self.num_node_features, self.num_bond_types)
        edges = complete_edge_features(g)
        bonded = jnp.sum(g.bonds, axis=-1) * pair_mask(g.node_mask)  # [B, N, N]
        x = nn.Dense(self.dim, name="embed")(g.nodes)
        readouts = []
        for layer in range(self.num_layers):
            eps = self.param(f"eps_{layer}", nn.initializers.zeros, ())
            messages = nn.relu(x[:, None, :, :] + nn.Dense(self.dim, name=f"edge_{layer}")(edges))  # [B, i, j, D]
            aggregated = jnp.einsum("bij,bijd->bid", bonded, messages)
            y = (1.0 + eps) * x + aggregated
            y = nn.relu(nn.Dense(self.dim, name=f"mlp_{layer}_0")(y))
            x = nn.relu(nn.Dense(self.dim, name=f"mlp_{layer}_1")(y))
            readouts.append(jnp.einsum("bn,bnd->bd", g.node_mask, x))
        return nn.relu(nn.Dense(self.dim, name="readout")(jnp.concatenate(readouts, axis=-1)))


GRAPH_TRUNKS = {"mpnn": MPNN, "gin": GIN}


def build_graph_model(cfg, tasks: Sequence) -> nn.Module:
    """MODELS['mpnn'] / MODELS['gin']: the graph network (``cfg.arch_kwargs``: its fields) as the
    shared trunk of a hard-parameter-sharing model, one ``cfg.head`` per task (Nash-MTL: 'linear')."""
    from mtl_jax.models import _build
    from mtl_jax.models.architectures import _heads, _options
    from mtl_jax.models.multitask import HardParameterSharing

    trunk = _build(GRAPH_TRUNKS, cfg.name, _options(cfg, "arch_kwargs"), "model")
    return HardParameterSharing(trunk=trunk, heads=_heads(cfg, tasks))


def mpnn_renames(num_tasks: int = 0):
    """``Rename``s from Nash-MTL's torch ``Net`` state dict to ``{'shared': MPNN, 'heads': {task_i}}``
    (task names ``task_0 ... task_{num_tasks-1}``; 0: the trunk only)."""
    from mtl_jax.checkpoints import IDENTITY, LINEAR, Rename

    def linear(source, *target):
        return [Rename(f"{source}.weight", ("shared",) + target + ("kernel",), LINEAR),
                Rename(f"{source}.bias", ("shared",) + target + ("bias",), IDENTITY)]

    renames = linear("lin0", "lin0") + linear("lin1", "lin1") + linear("conv.nn.0", "conv", "edge_hidden")
    renames += [Rename("conv.nn.2.weight", ("shared", "conv", "edge_out_kernel"), LINEAR),
                Rename("conv.nn.2.bias", ("shared", "conv", "edge_out_bias"), IDENTITY),
                Rename("conv.lin.weight", ("shared", "conv", "root", "kernel"), LINEAR),
                Rename("conv.bias", ("shared", "conv", "bias"), IDENTITY)]
    for torch_name, flax_name in (("gru", ("gru",)), ("set2set.lstm", ("set2set", "lstm"))):
        for torch_part, flax_part in (("ih", "input"), ("hh", "hidden")):
            target = ("shared",) + flax_name + (flax_part,)
            renames += [Rename(f"{torch_name}.weight_{torch_part}_l0", target + ("kernel",), LINEAR),
                        Rename(f"{torch_name}.bias_{torch_part}_l0", target + ("bias",), IDENTITY)]
    for i in range(num_tasks):
        renames += [Rename(f"head_{i}.weight", ("heads", f"task_{i}", "out", "kernel"), LINEAR),
                    Rename(f"head_{i}.bias", ("heads", f"task_{i}", "out", "bias"), IDENTITY)]
    return renames
