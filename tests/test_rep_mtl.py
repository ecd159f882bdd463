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
    """``<grad f(x), v>`` against the fourth-order central difference of f along random v (float64).

    ``value_and_grad(x) -> (f(x), grad f(x))`` is one compiled function, reused for the differences.
    """
    leaves, treedef = jax.tree.flatten(x)
    keys = jax.random.split(key, len(leaves))
    grad = jax.tree.leaves(value_and_grad(x)[1])
    for n in range(num_directions):
        dirs = [jax.random.normal(jax.random.fold_in(k, n), a.shape, a.dtype) for k, a in zip(keys, leaves)]
        value = lambda t: float(value_and_grad(jax.tree.unflatten(treedef, [a + t * d for a, d in zip(leaves, dirs)]))[0])
        central = (8 * (value(h) - value(-h)) - (value(2 * h) - value(-2 * h))) / (12 * h)
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


def paper_reference(saliency, temperature, eps=0.0):
    """Rep-MTL's Eqs. 4-9 transcribed literally in numpy, with the explicit [C, C] matrices.

    ``saliency`` [T, B, *spatial, C]; returns (L_tsr, L_csa) in float64.
    """
    s = np.asarray(saliency, np.float64)
    t, b, c = s.shape[0], s.shape[1], s.shape[-1]
    s = s.reshape(t, b, -1, c)  # [T, B, P, C]
    s_hat = s.mean(axis=-1)  # Eq. 4
    dist = (np.abs(s_hat) + eps) / (np.abs(s_hat) + eps).sum(axis=0, keepdims=True)  # Eq. 5
    tsr = -(dist * np.log(dist)).sum(axis=0).mean()  # Eq. 6
    unit = lambda m: m.ravel() / np.linalg.norm(m.ravel())
    affinity = [[unit(s[k, i].T @ s[k, i]) for i in range(b)] for k in range(t)]  # Eq. 7, z^t_b
    anchors = []
    for i in range(b):
        a = s[:, i].mean(axis=1).T  # [C, T]: spatial mean of each task's saliency (Eq. 8)
        anchors.append(unit(a @ a.T))  # z^a_b
    total = 0.0
    for k in range(t):
        for i in range(b):
            negatives = sum(np.exp(anchors[i] @ anchors[j] / temperature) for j in range(b) if j != i)
            total += -np.log(np.exp(anchors[i] @ affinity[k][i] / temperature) / negatives)  # Eq. 9
    return tsr, total / (t * b)


@pytest.mark.parametrize("shape", [(2, 4, 3), (3, 5, 2, 2, 3), (2, 3, 4, 2)],
                         ids=["vector_P1", "spatial_P_gt_C", "tokens_P_gt_C"])
def test_regularizer_matches_the_papers_equations_with_explicit_affinity_matrices(shape):
    """TSR (Eqs. 4-6) and CSA (Eqs. 7-9) against the literal [C, C] construction: the thin-Gram
    version must agree, for a vector representation (P = 1) and spatial / token ones (P > C)."""
    s = jax.random.normal(jax.random.key(len(shape)), shape) * 1e-3  # batch-mean-sized gradients
    tau = 0.3
    reg, aux = regularizer(s, tsr_weight=0.4, csa_weight=1.7, temperature=tau, eps=0.0)
    tsr, csa = paper_reference(s, tau)
    np.testing.assert_allclose(aux["tsr"], tsr, rtol=2e-5)
    np.testing.assert_allclose(aux["csa"], csa, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(reg, 0.4 * tsr + 1.7 * csa, rtol=2e-5, atol=5e-6)
    np.testing.assert_allclose(aux["tsr_normalized"], tsr / math.log(shape[0]), rtol=2e-5)


def test_regularizer_matches_the_equations_on_a_channel_heavy_map():
    """P < C takes the other Gram branch (P x P) for ||M_t[b]||."""
    s = jax.random.normal(jax.random.key(9), (2, 3, 2, 1, 6))
    _, aux = regularizer(s, temperature=0.5, eps=0.0)
    tsr, csa = paper_reference(s, 0.5)
    np.testing.assert_allclose([aux["tsr"], aux["csa"]], [tsr, csa], rtol=2e-5, atol=2e-6)


def test_task_distribution_is_the_signed_channel_mean_normalised_over_tasks():
    # [T=2, B=1, H=2, W=1, C=2]: channel means (-1, 0.5) for task 0 and (3, -0.5) for task 1
    s = jnp.array([[[[[1.0, -3.0]], [[0.5, 0.5]]]], [[[[4.0, 2.0]], [[-1.0, 0.0]]]]])
    np.testing.assert_allclose(rep_mtl.task_distribution(s, eps=0.0)[:, 0],
                               [[1 / 4, 0.5 / 1.0], [3 / 4, 0.5 / 1.0]], rtol=1e-6)


# ---- TSR --------------------------------------------------------------------------------------

def test_tsr_closed_form_and_bounds():
    # vector representation: one position per sample; channel means (1, 3) and (-2, 1) per task
    s = jnp.array([[[0.5, 1.5], [6.0, 0.0]], [[-4.0, 0.0], [0.0, 2.0]]])  # [T=2, B=2, C=2]
    entropy = lambda p: -sum(x * math.log(x) for x in p)
    want = 0.5 * (entropy([1 / 3, 2 / 3]) + entropy([3 / 4, 1 / 4]))
    np.testing.assert_allclose(regularizer(s, eps=0.0)[1]["tsr"], want, rtol=1e-6)
    # equal |channel mean| for every task: log T; one task alone at every position: 0
    same = jnp.array([[[1.0, 2.0, 3.0]], [[-2.0, -2.0, -2.0]], [[0.0, 0.0, 6.0]]])
    np.testing.assert_allclose(regularizer(same)[1]["tsr"], math.log(3), rtol=1e-6)
    np.testing.assert_allclose(regularizer(same)[1]["tsr_normalized"], 1.0, rtol=1e-6)
    alone = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [5.0, 2.0]]])
    assert float(regularizer(alone)[1]["tsr"]) < 1e-5


def test_tsr_is_the_mean_over_positions_and_invariant_to_a_common_scale_only():
    s = jax.random.normal(jax.random.key(2), (2, 3, 4, 5))  # [T, B, P=4, C]
    tsr = lambda x: float(regularizer(x)[1]["tsr"])
    per_position = [tsr(s[:, b:b + 1, p:p + 1]) for b in range(3) for p in range(4)]
    np.testing.assert_allclose(tsr(s), np.mean(per_position), rtol=1e-5)
    np.testing.assert_allclose(tsr(s * 1e-4), tsr(s), rtol=1e-5)  # batch-mean losses' 1/B
    assert abs(tsr(s * jnp.array([1.0, 30.0])[:, None, None, None]) - tsr(s)) > 0.05  # task scales matter


def test_tsr_decreases_monotonically_as_one_task_dominates_each_position():
    overlap = np.linspace(1.0, 0.0, 6)  # |channel means| (1, a) at position 0 and (a, 1) at position 1
    values = [float(regularizer(jnp.array([[[1.0], [a]], [[a], [1.0]]]))[1]["tsr"]) for a in overlap]
    assert values[0] == pytest.approx(math.log(2), rel=1e-6)
    assert values[-1] < 1e-6
    assert all(later < earlier for earlier, later in itertools.pairwise(values)), values


# ---- CSA --------------------------------------------------------------------------------------

def test_csa_closed_form_when_every_sample_is_the_same():
    """Identical samples: every anchor-anchor cosine is 1, so L_csa = log(B - 1) + 1/tau - mean_t sim_t / tau,
    with sim_t = <A^, M_t> / (||A^|| ||M_t||) (vector representation: M_t = s_t s_t^T, A^ = sum_t s_t s_t^T)."""
    s1, s2 = np.array([1.0, 2.0, 0.0]), np.array([0.0, 1.0, -1.0])
    batch, tau = 4, 0.25
    s = jnp.array([np.tile(s1, (batch, 1)), np.tile(s2, (batch, 1))])  # [T=2, B=4, C=3]
    anchor = np.outer(s1, s1) + np.outer(s2, s2)
    sims = [np.sum(anchor * np.outer(v, v)) / np.linalg.norm(anchor) / np.linalg.norm(np.outer(v, v)) for v in (s1, s2)]
    want = math.log(batch - 1) + 1 / tau - np.mean(sims) / tau
    np.testing.assert_allclose(regularizer(s, temperature=tau, eps=0.0)[1]["csa"], want, rtol=1e-5)


def test_csa_is_lower_when_samples_anchors_differ_and_zero_without_negatives():
    """Negatives are the other samples' anchors: saliencies on disjoint channels per sample (orthogonal
    anchors) give a lower loss than the same per-sample saliencies all on one channel set."""
    batch = 4
    distinct = np.zeros((2, batch, 2 * batch))
    for b in range(batch):
        distinct[0, b, 2 * b], distinct[1, b, 2 * b + 1] = 1.0 + b, 2.0  # sample b's own channels
    shared = np.zeros_like(distinct)
    for b in range(batch):
        shared[0, b, 0], shared[1, b, 1] = 1.0 + b, 2.0  # the same values on channels 0 and 1 for every sample
    csa = lambda x: float(regularizer(jnp.asarray(x, jnp.float32), temperature=0.1)[1]["csa"])
    assert csa(distinct) < csa(shared) - 1.0
    assert float(regularizer(jnp.asarray(distinct[:, :1], jnp.float32))[1]["csa"]) == 0.0  # B = 1


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
    from mtl_jax.train.forward import make_representation_forward

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


# ---- spatial representations: a dense model with batch statistics ------------------------------

def dense_problem(valid="both", batch=4, size=6, head_norm=True):
    """A conv trunk with BatchNorm -> z [B, H, W, 5] and two depth heads (1x1 conv, BatchNorm unless not
    ``head_norm``, 1x1 conv).

    ``valid``: 'both' (every pixel labelled for both tasks) or 'halves' (task 0's depth valid on the
    left half only, task 1's on the right half: each position's saliency belongs to one task).
    """
    import flax.linen as nn

    from mtl_jax.models import HardParameterSharing
    from mtl_jax.tasks import depth

    class Trunk(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(6, (3, 3), name="conv_0")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
            return jnp.tanh(nn.Conv(5, (1, 1), name="conv_1")(x))

    class PixelHead(nn.Module):
        num_outputs: int

        @nn.compact
        def __call__(self, z, train=False):
            z = nn.Conv(4, (1, 1), name="conv_0")(z)
            if head_norm:
                z = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(z)
            z = jnp.tanh(z)
            return nn.Conv(self.num_outputs, (1, 1), name="out")(z)

    tasks = (depth("near"), depth("far"))
    model = HardParameterSharing(trunk=Trunk(), heads={t.name: PixelHead(1) for t in tasks})
    kx, k0, k1 = jax.random.split(jax.random.key(21), 3)
    x = jax.random.normal(kx, (batch, size, size, 3))
    targets = [jax.random.uniform(k, (batch, size, size, 1), minval=0.5, maxval=2.0) for k in (k0, k1)]
    if valid == "halves":
        left = (jnp.arange(size) < size // 2)[None, None, :, None]
        targets = [jnp.where(left, targets[0], 0.0), jnp.where(left, 0.0, targets[1])]
    variables = model.init(jax.random.key(22), x)
    batch_ = {"image": x, "near": targets[0], "far": targets[1]}
    return model, tasks, variables["params"], {"batch_stats": variables["batch_stats"]}, batch_


def test_task_distribution_map_has_the_spatial_shape_of_the_representation():
    s = jax.random.normal(jax.random.key(3), (3, 2, 4, 5, 6))
    maps = rep_mtl.task_distribution_map(s)
    assert maps.shape == (3, 2, 4, 5)
    np.testing.assert_allclose(maps.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(maps.reshape(3, 2, 20), rep_mtl.task_distribution(s), rtol=0)


def test_tsr_on_a_dense_model_reads_which_task_owns_each_pixel():
    """Spatial saliency dL_t/dz [T, B, H, W, C] of a dense model: with depth labels on disjoint halves
    (1x1 heads without batch statistics, which would couple the pixels), every pixel's saliency is one
    task's, so TSR is ~0; on shared pixels it is not."""
    from mtl_jax.train.gradients.rep_mtl import make_stateful_representation_forward

    values = {}
    for valid in ("halves", "both"):
        model, tasks, params, state, batch = dense_problem(valid, head_norm=False)
        encode, decode = make_stateful_representation_forward(model, tasks, "image")
        key = jax.random.key(0)

        def run(p):
            (z, _), st = encode(p["shared"], state, batch, key, True)
            saliency = rep_mtl.task_saliency(lambda zz: decode(p["heads"], st, zz, batch, key, True)[0], z)
            return saliency, rep_mtl.rep_mtl_regularizer(saliency)[1]

        saliency, aux = jax.jit(run)(params)
        assert saliency.shape == (2, 4, 6, 6, 5)
        values[valid] = float(aux["tsr_normalized"])
        if valid == "halves":  # task 0's saliency vanishes on the right half, task 1's on the left
            assert float(jnp.abs(saliency[0, :, :, 3:]).max()) == 0.0
            assert float(jnp.abs(saliency[1, :, :, :3]).max()) == 0.0
    assert values["halves"] < 1e-4, values
    assert values["both"] > 0.2, values


def test_rep_mtl_step_on_a_dense_model_with_batch_statistics():
    """``rep_mtl_model_gradients`` on a spatial representation with BatchNorm in trunk and heads: the
    gradient of ``sum_t L_t + R(S)`` (written here with the model's stages and mutable batch_stats),
    and the batch statistics of the whole model's training forward."""
    from ml_collections import ConfigDict

    from mtl_jax.train.gradients.base import StepContext
    from mtl_jax.train.gradients.rep_mtl import rep_mtl_model_gradients
    from mtl_jax.train.methods import get_method

    model, tasks, params, state, batch = dense_problem("both")
    cfg = ConfigDict(dict(tsr_weight=0.7, csa_weight=1.3, temperature=0.5))
    method = get_method("ew")
    key = jax.random.key(5)
    strategy = rep_mtl_model_gradients(method, cfg, model, tasks, "image")
    ctx = StepContext(params, state, batch, key, method.init(2), jnp.zeros((), jnp.int32), jax.random.key(6))
    out = jax.jit(strategy)(ctx)

    from mtl_jax.train.forward import make_task_losses

    task_losses = make_task_losses(tasks)
    enc_key, dec_key = jax.random.split(key)

    def total(p):
        z, st = model.apply({"params": {"shared": p["shared"]}, **state}, batch["image"], True, stage="trunk",
                            mutable=["batch_stats"], rngs={"dropout": enc_key})
        st = {**state, **st}

        def losses(zz):
            preds, _ = model.apply({"params": {"heads": p["heads"]}, **st}, zz, True, stage="heads",
                                   mutable=["batch_stats"], rngs={"dropout": dec_key})
            return task_losses(preds, batch)

        reg, aux = rep_mtl.rep_mtl_loss(losses, z, tsr_weight=0.7, csa_weight=1.3, temperature=0.5)
        return jnp.sum(aux["losses"]) + reg, aux["losses"]

    (_, losses), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    np.testing.assert_allclose(out.losses, losses, rtol=1e-6)
    np.testing.assert_allclose(out.weights, [1.0, 1.0])
    for a, b in zip(jax.tree.leaves(out.grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    _, whole = model.apply({"params": params, **state}, batch["image"], True, mutable=["batch_stats"])
    assert jax.tree.structure(out.model_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(out.model_state), jax.tree.leaves(whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(out.model_state),
                                                               jax.tree.leaves(state)))
