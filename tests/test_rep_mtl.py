"""Rep-MTL regulariser (mtl_jax/train/rep_mtl.py): closed forms, gradients, double backprop."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.train import rep_mtl

regularizer = jax.jit(rep_mtl.rep_mtl_regularizer)  # hyperparameters traced: one compile per shape


def tiny_mlp_params(key, d_in=3, d_z=4, num_tasks=2, hidden=3):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"shared": {"w": jax.random.normal(k1, (d_in, d_z)) * 0.8, "b": jnp.zeros(d_z)},
            "heads": {"w": jax.random.normal(k2, (num_tasks, hidden, d_z)) * 0.8,
                      "v": jax.random.normal(k3, (num_tasks, hidden))}}


def encode(shared, x):
    return jnp.tanh(x @ shared["w"] + shared["b"])


def decode_losses(heads, z, y):
    """[K] mean squared errors of the one-hidden-layer heads ``v_k . tanh(W_k z)``.

    (A rank-one head ``v_k tanh(w_k . z)`` would make ``S_kb`` parallel to ``w_k`` for every sample,
    so TSR and CSA would not depend on the trunk at all.)
    """
    preds = jnp.einsum("kh,bkh->bk", heads["v"], jnp.tanh(jnp.einsum("khd,bd->bkh", heads["w"], z)))
    return jnp.mean((preds - y) ** 2, axis=0)


def tiny_batch(key, batch=5, d_in=3, num_tasks=2):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (batch, d_in)), jax.random.normal(ky, (batch, num_tasks))


def objective(params, x, y, weights):
    """``weights[0] * sum_k L_k + weights[1] * L_TSR + weights[2] * L_CSA`` and rep_mtl_loss's aux."""
    z = encode(params["shared"], x)
    reg, aux = rep_mtl.rep_mtl_loss(lambda zz: decode_losses(params["heads"], zz, y), z,
                                    tsr_weight=weights[1], csa_weight=weights[2])
    return weights[0] * jnp.sum(aux["losses"]) + reg, aux


# compiled once per process and shared by the tests below (same shapes, float64)
objective_grad = jax.jit(jax.value_and_grad(objective, has_aux=True))


def float64_problem():
    params = jax.tree.map(lambda a: a.astype(jnp.float64), tiny_mlp_params(jax.random.key(5)))
    x, y = (a.astype(jnp.float64) for a in tiny_batch(jax.random.key(6)))
    return params, x, y


def assert_directional_derivatives_match(value_and_grad, x, key, num_directions=4, h=1e-5, rtol=1e-6):
    """``<grad f(x), v>`` against ``(f(x + h v) - f(x - h v)) / 2h`` for random v (float64).

    ``value_and_grad(x) -> (f(x), grad f(x))`` is one compiled function, reused for the differences.
    """
    leaves, treedef = jax.tree.flatten(x)
    keys = jax.random.split(key, len(leaves))
    grad = jax.tree.leaves(value_and_grad(x)[1])
    for n in range(num_directions):
        dirs = [jax.random.normal(jax.random.fold_in(k, n), a.shape, a.dtype) for k, a in zip(keys, leaves)]
        plus, minus = ([a + t * d for a, d in zip(leaves, dirs)] for t in (h, -h))
        value = lambda point: float(value_and_grad(jax.tree.unflatten(treedef, point))[0])
        central = (value(plus) - value(minus)) / (2 * h)
        analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(grad, dirs))
        assert abs(analytic) > 1e-6, analytic
        np.testing.assert_allclose(analytic, central, rtol=rtol, atol=1e-10)


# ---- saliency ---------------------------------------------------------------------------------

@pytest.mark.parametrize("z_shape", [(5, 4), (3, 2, 2, 3)])
def test_task_saliency_is_each_tasks_gradient_wrt_z(z_shape):
    z = jax.random.normal(jax.random.key(0), z_shape)
    w = jax.random.normal(jax.random.key(1), (3,) + z_shape[1:])

    def losses(zz):
        return jnp.stack([jnp.mean(jnp.sin(zz * w[k]) ** 2) + k * jnp.mean(zz) for k in range(3)])

    saliency, reference = jax.jit(lambda zz: (rep_mtl.task_saliency(losses, zz),
                                              [jax.grad(lambda z1, k=k: losses(z1)[k])(zz) for k in range(3)]))(z)
    assert saliency.shape == (3,) + z_shape
    np.testing.assert_allclose(saliency, np.stack(reference), rtol=1e-5, atol=1e-7)


def test_spatial_distribution_aggregates_channels_and_vectors_use_features_as_positions():
    spatial = jnp.array([[[[[1.0, -3.0]], [[0.5, 0.5]]]]])  # [K=1, B=1, H=2, W=1, C=2]
    np.testing.assert_allclose(rep_mtl.spatial_distribution(spatial, eps=0.0), [[[2 / 2.5, 0.5 / 2.5]]], rtol=1e-6)
    vector = jnp.array([[[2.0, -0.5]]])  # [K=1, B=1, D=2]: |S| over features
    np.testing.assert_allclose(rep_mtl.spatial_distribution(vector, eps=0.0), [[[0.8, 0.2]]], rtol=1e-6)


# ---- TSR --------------------------------------------------------------------------------------

def test_tsr_closed_form_and_bounds():
    q1, q2 = np.array([0.75, 0.25]), np.array([0.5, 0.5])
    want = -0.5 * sum(q[p] * math.log(q[p] / (q1[p] + q2[p])) for q in (q1, q2) for p in range(2))
    saliency = jnp.array([[[3.0, -1.0]], [[0.2, 0.2]]])  # [K=2, B=1, D=2] -> q1, q2 above
    _, aux = regularizer(saliency, eps=0.0)
    np.testing.assert_allclose(aux["tsr"], want, rtol=1e-6)
    # identical distributions: log K (whatever the tasks' scales); disjoint supports: 0
    same = jnp.array([[[1.0, 2.0, 3.0]], [[-10.0, 20.0, -30.0]], [[0.1, 0.2, 0.3]]])
    np.testing.assert_allclose(regularizer(same)[1]["tsr"], math.log(3), rtol=1e-6)
    np.testing.assert_allclose(regularizer(same)[1]["tsr_normalized"], 1.0, rtol=1e-6)
    disjoint = jnp.array([[[1.0, 0.0, 0.0]], [[0.0, 5.0, 2.0]]])
    assert float(regularizer(disjoint)[1]["tsr"]) < 1e-6


def test_tsr_is_the_batch_mean_and_scale_invariant_per_task_and_sample():
    s = jax.random.normal(jax.random.key(2), (2, 3, 4))
    tsr = lambda x: float(regularizer(x)[1]["tsr"])
    np.testing.assert_allclose(tsr(s), np.mean([tsr(s[:, b:b + 1]) for b in range(3)]), rtol=1e-6)
    scaled = s * jnp.array([1e-3, 50.0])[:, None, None] * jnp.array([2.0, 1e-2, 7.0])[None, :, None]
    np.testing.assert_allclose(tsr(scaled), tsr(s), rtol=1e-4)


def test_tsr_decreases_monotonically_as_task_saliencies_become_distinct():
    overlap = np.linspace(1.0, 0.0, 6)  # task 1 looks at [1, a], task 2 at [a, 1]
    values = [float(regularizer(jnp.array([[[1.0, a]], [[a, 1.0]]]))[1]["tsr"]) for a in overlap]
    assert values[0] == pytest.approx(math.log(2), rel=1e-6)
    assert values[-1] < 1e-6
    assert all(later < earlier for earlier, later in itertools.pairwise(values)), values


# ---- CSA --------------------------------------------------------------------------------------

def test_csa_closed_form_two_samples_two_tasks():
    g = {0: np.array([[1.0, 0.0], [1.0, 1.0]]), 1: np.array([[0.0, 2.0], [3.0, 1.0]])}  # task -> [B, D]
    tau = 0.3

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    rows = {}
    for k, s in g.items():
        c = cos(s[0], s[1])
        rows[k] = np.array([[1.0, c], [c, 1.0]]) / math.sqrt(1 + c * c)
    want = 0.0
    for k, j in ((0, 1), (1, 0)):
        for b in range(2):
            logits = np.array([rows[k][b] @ rows[j][c] for c in range(2)]) / tau
            want += -(logits[b] - np.log(np.exp(logits).sum()))
    want /= 4
    reg, aux = regularizer(jnp.array([g[0], g[1]]), tsr_weight=0.0, csa_weight=2.0, temperature=tau)
    np.testing.assert_allclose(aux["csa"], want, rtol=1e-5)
    np.testing.assert_allclose(reg, 2.0 * want, rtol=1e-5)


def test_csa_is_lower_when_tasks_share_the_sample_affinity_structure():
    s = jax.random.normal(jax.random.key(3), (6, 5))
    aligned = jnp.stack([s, 3.0 * s])  # same inter-sample structure under both tasks
    shuffled = jnp.stack([s, 3.0 * s[jnp.array([1, 2, 3, 4, 5, 0])]])
    csa = lambda x: float(regularizer(x, temperature=0.1)[1]["csa"])
    assert csa(aligned) < csa(shuffled) - 0.5
    assert csa(aligned) < math.log(6)  # beats the chance level of the 6-way InfoNCE
    # nothing to contrast: one task or one sample
    assert float(regularizer(s[None])[1]["csa"]) == 0.0
    np.testing.assert_allclose(regularizer(aligned[:, :1])[1]["csa"], 0.0, atol=1e-6)


# ---- gradients --------------------------------------------------------------------------------

def test_regularizer_gradient_wrt_spatial_saliency_matches_finite_differences():
    with jax.enable_x64(True):
        s = jax.random.normal(jax.random.key(4), (2, 3, 2, 2, 3), dtype=jnp.float64) + 0.5  # off |.|'s kink
        f = lambda x: rep_mtl.rep_mtl_regularizer(x, tsr_weight=1.0, csa_weight=1.0, temperature=0.5)[0]
        assert_directional_derivatives_match(jax.jit(jax.value_and_grad(f)), s, jax.random.key(40))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.0, 1.0, 1.0)], ids=["full", "regulariser_only"])
def test_double_backprop_gradient_matches_finite_differences_on_a_tiny_mlp(weights):
    with jax.enable_x64(True):
        params, x, y = float64_problem()
        w = jnp.array(weights, jnp.float64)
        _, grads = objective_grad(params, x, y, w)
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))

        def value_and_grad(p):
            (value, _), g = objective_grad(p, x, y, w)
            return value, g

        assert_directional_derivatives_match(value_and_grad, params, jax.random.key(41))


def test_regularizer_gradient_reaches_heads_and_trunk():
    with jax.enable_x64(True):
        params, x, y = float64_problem()
        for weights in ([0.0, 1.0, 0.0], [0.0, 0.0, 1.0]):  # TSR alone, CSA alone
            _, grads = objective_grad(params, x, y, jnp.array(weights, jnp.float64))
            assert float(jnp.abs(grads["shared"]["w"]).max()) > 1e-4, weights
            assert float(jnp.abs(grads["heads"]["w"]).max()) > 1e-4, weights


def test_minimising_tsr_through_double_backprop_makes_task_saliencies_distinct():
    with jax.enable_x64(True):
        params, x, y = float64_problem()
        tsr_only = jnp.array([0.0, 1.0, 0.0], jnp.float64)
        (_, aux), _ = objective_grad(params, x, y, tsr_only)
        before = float(aux["tsr"])
        for _ in range(40):
            (_, aux), grads = objective_grad(params, x, y, tsr_only)
            params = jax.tree.map(lambda a, g: a - 0.5 * g, params, grads)
        (_, aux), _ = objective_grad(params, x, y, tsr_only)
        assert float(aux["tsr"]) < 0.4 * before, (before, float(aux["tsr"]))


# ---- convenience wrapper and the real model ---------------------------------------------------

def test_rep_mtl_loss_returns_the_task_losses_and_the_weighted_terms():
    with jax.enable_x64(True):
        params, x, y = float64_problem()
        (value, aux), _ = objective_grad(params, x, y, jnp.array([1.0, 0.3, 0.7], jnp.float64))
        np.testing.assert_allclose(aux["losses"], decode_losses(params["heads"], encode(params["shared"], x), y),
                                   rtol=1e-12)
        np.testing.assert_allclose(value, jnp.sum(aux["losses"]) + 0.3 * aux["tsr"] + 0.7 * aux["csa"], rtol=1e-12)
        assert 0.0 < float(aux["tsr_normalized"]) <= 1.0 and float(aux["csa"]) > 0.0
        (value, _), grads = objective_grad(params, x, y, jnp.zeros(3, jnp.float64))
        assert float(value) == 0.0 and all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_with_make_representation_forward_on_a_hard_parameter_sharing_model():
    from mtl_jax.models import HardParameterSharing
    from mtl_jax.models.heads import LinearHead
    from mtl_jax.models.trunks import MLP
    from mtl_jax.tasks import TaskSpec
    from mtl_jax.train.step import make_representation_forward

    tasks = (TaskSpec("digit", "classification", 3), TaskSpec("size", "regression", 1))
    model = HardParameterSharing(trunk=MLP(features=(6,)), heads={t.name: LinearHead(t.num_outputs) for t in tasks})
    kx, kl, ks = jax.random.split(jax.random.key(13), 3)
    batch = {"image": jax.random.normal(kx, (8, 5)), "digit": jax.random.randint(kl, (8,), 0, 3),
             "size": jax.random.normal(ks, (8, 1))}
    params = jax.jit(model.init)(jax.random.key(14), batch["image"])["params"]
    enc, dec = make_representation_forward(model, tasks, "image")
    key = jax.random.key(0)

    def hps_objective(p):
        z = enc(p["shared"], batch, key, True)
        reg, aux = rep_mtl.rep_mtl_loss(lambda zz: dec(p["heads"], zz, batch, key, True), z, has_aux=True)
        return jnp.sum(aux["losses"]) + reg, aux

    grads, aux = jax.jit(jax.grad(hps_objective, has_aux=True))(params)
    assert set(aux["decode_aux"]) == {"digit", "size"}  # has_aux passes the predictions through
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert np.isfinite(float(aux["tsr"])) and np.isfinite(float(aux["csa"]))
    assert 0.0 <= float(aux["tsr"]) <= math.log(2) + 1e-6
