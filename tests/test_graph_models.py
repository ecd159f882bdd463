"""Graph trunks (mtl_jax/models/graph.py): parity with Nash-MTL's torch MPNN, exact padding and
permutation invariance, the model registry, gradients."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from fixtures.pretrained.deterministic_weights import deterministic_state_dict
from fixtures.pretrained.make_mpnn_reference import DIM, NUM_TASKS, reference_molecules, state_shapes
from mtl_jax.checkpoints import load_into
from mtl_jax.data.graphs import pack_graph, unpack_graph
from mtl_jax.models import build_model
from mtl_jax.models.graph import GIN, MPNN, complete_edge_features, masked_softmax, mpnn_renames
from mtl_jax.tasks import TaskSpec

REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained", "mpnn_reference.npz")
TASKS = tuple(TaskSpec(f"task_{i}", "regression", 1) for i in range(NUM_TASKS))


def packed(max_nodes=14, order=None):
    """The reference molecules packed to ``max_nodes`` rows; ``order``: a permutation per molecule of its atoms."""
    out = []
    for g, (nodes, positions, bonds) in enumerate(reference_molecules()):
        p = np.arange(nodes.shape[0]) if order is None else order(g, nodes.shape[0])
        out.append(pack_graph(nodes[p], positions[p], bonds[p][:, p], max_nodes))
    return jnp.asarray(np.stack(out))


def model_cfg(name, **arch):
    return ConfigDict(dict(name=name, head="linear", head_kwargs={}, arch_kwargs=arch))


@pytest.fixture(scope="module")
def mpnn():
    model = build_model(model_cfg("mpnn", dim=DIM), TASKS)
    template = jax.eval_shape(model.init, jax.random.key(0), packed())["params"]
    params = load_into(template, deterministic_state_dict(state_shapes()), mpnn_renames(NUM_TASKS), what="MPNN")
    return model, params, jax.jit(lambda p, x: model.apply({"params": p}, x))


def test_mpnn_matches_nash_mtl_torch_reference(mpnn):
    """Output parity with the torch transcription (edge-list NNConv / GRU / Set2Set), float32."""
    model, params, apply = mpnn
    ref = np.load(REFERENCE)
    preds = apply(params, packed())
    got = np.concatenate([np.asarray(preds[t.name]) for t in TASKS], axis=1)
    np.testing.assert_allclose(got, ref["predictions"], rtol=0, atol=1e-5)
    rep = model.apply({"params": params}, packed(), stage="trunk")
    np.testing.assert_allclose(rep, ref["representation"], rtol=0, atol=1e-5)


def test_mpnn_is_invariant_to_padding_and_atom_order(mpnn):
    _, params, _ = mpnn
    model = build_model(model_cfg("mpnn", dim=DIM), TASKS)
    trunk = jax.jit(lambda x: model.apply({"params": params}, x, stage="trunk"))
    base = trunk(packed(14))
    np.testing.assert_allclose(trunk(packed(29)), base, rtol=0, atol=1e-6)
    perm = lambda g, n: np.random.default_rng(g).permutation(n)
    np.testing.assert_allclose(trunk(packed(14, perm)), base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["mpnn", "gin"])
def test_garbage_in_padding_rows_changes_nothing_and_gradients_are_finite(name):
    """Padded rows carry arbitrary node features / positions (mask 0): the output must not move, and an
    all-padding graph (an evaluation batch's filler) gives finite values and gradients."""
    model = build_model(model_cfg(name, dim=8), TASKS[:2])
    x = packed(14)
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    g = unpack_graph(np.asarray(x))
    noisy = np.array(x)
    pad = g.node_mask == 0
    noisy[..., :14][pad] = np.random.default_rng(0).standard_normal((int(pad.sum()), 14))  # nodes + positions
    apply = jax.jit(lambda p, xx: model.apply({"params": p}, xx, stage="trunk"))
    np.testing.assert_allclose(apply(params, jnp.asarray(noisy)), apply(params, x), rtol=0, atol=1e-6)
    with_empty = jnp.concatenate([x, jnp.zeros_like(x[:1])])
    loss = lambda p: sum(jnp.sum(v ** 2) for v in model.apply({"params": p}, with_empty).values())
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(grads))


def test_gin_is_invariant_to_padding_and_atom_order():
    model = GIN(dim=8, num_layers=3)
    params = jax.jit(model.init)(jax.random.key(2), packed())
    apply = jax.jit(model.apply)
    base = apply(params, packed(14))
    perm = lambda g, n: np.random.default_rng(10 + g).permutation(n)
    np.testing.assert_allclose(apply(params, packed(29)), base, rtol=0, atol=1e-5)
    np.testing.assert_allclose(apply(params, packed(14, perm)), base, rtol=0, atol=1e-5)
    assert base.shape == (5, 8) and float(jnp.abs(base).max()) > 0


def test_edge_features_are_bonds_and_distances_on_the_complete_graph():
    nodes, positions, bonds = reference_molecules()[2]
    g = unpack_graph(packed(14)[2])
    e = np.asarray(complete_edge_features(g))
    n = nodes.shape[0]
    want = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    np.testing.assert_allclose(e[:n, :n, 4], want, rtol=1e-6)
    np.testing.assert_array_equal(e[:n, :n, :4], bonds)
    assert np.all(e[n:] == 0) and np.all(e[:, n:] == 0)


def test_masked_softmax_zero_off_mask_and_on_empty_rows():
    logits = jnp.array([[1.0, 2.0, 50.0], [3.0, 4.0, 5.0]])
    mask = jnp.array([[True, True, False], [False, False, False]])
    out = masked_softmax(logits, mask)
    np.testing.assert_allclose(out[0], [1 / (1 + np.e), np.e / (1 + np.e), 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)


def test_registry_and_shapes():
    for name, trunk in (("mpnn", MPNN), ("gin", GIN)):
        model = build_model(model_cfg(name, dim=8), TASKS[:3])
        assert isinstance(model.trunk, trunk)
        variables = jax.eval_shape(model.init, jax.random.key(0), packed())
        assert set(variables) == {"params"} and set(variables["params"]) == {"shared", "heads"}
        out = jax.eval_shape(model.apply, variables, packed())
        assert {k: v.shape for k, v in out.items()} == {f"task_{i}": (5, 1) for i in range(3)}
    with pytest.raises(ValueError, match="unknown option"):
        build_model(model_cfg("mpnn", width=3), TASKS)
