"""What the train step feeds the methods beyond losses / Gramian / Jacobian, checked against
references written here: FAMO's extra forward (two steps by hand), GradNorm's last-shared-layer
Gramian, SDMGrad / MoDo's cross Gramian of two half-batches, and the Gramian built by VJP + JVP
columns without materialising J."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import tasks as T
from mtl_jax.config import apply_overrides, load_config
from mtl_jax.data import from_arrays
from mtl_jax.data.pipeline import to_global
from mtl_jax.train.methods import Method, MethodInputs, get_method
from mtl_jax.train.trainer import build_experiment
from mtl_jax.train.forward import make_forward, make_representation_forward
from mtl_jax.train.gradients.combine import task_gradients
from mtl_jax.train.gradients.double_sampling import cross_gramian_of_halves, half_batches
from mtl_jax.train.gradients.jacobian import linearize, params_gramian_by_jvp, per_task_jacobian
from mtl_jax.train.gradients.layerwise import gramian
from mtl_jax.train.gradients.options import GradientOptions, gradient_options, last_shared_layer, leaf_selector
from mtl_jax.train.gradients.representation import representation_losses_and_vjp

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
LR = 0.1


def tiny_dataset(num=64, seed=0):
    """8 features, two classification tasks and one regression (one learnable, one label noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, 8)).astype(np.float32)
    arrays = {"x": x, "a": (x[:, 0] + x[:, 1] > 0).astype(np.int32), "b": rng.integers(0, 3, num).astype(np.int32),
              "c": (x[:, 2:3] * 2.0).astype(np.float32)}
    tasks = [T.classification("a", 2), T.classification("b", 3), T.regression("c")]
    return from_arrays("tiny", {"train": arrays, "test": arrays}, tasks, input_key="x")


DATASET = tiny_dataset()


def batch_of(start=0, size=16):
    src = DATASET.splits["train"]
    rows = [src[i] for i in range(start, start + size)]
    return {k: np.stack([r[k] for r in rows]) for k in ("x", "a", "b", "c")}


def experiment(*overrides):
    config = load_config(os.path.join(ROOT, "configs", "digits_mlp.py"))
    config = apply_overrides(config, ["model.trunk_kwargs.features=(16, 8)", "optim.name='sgd'", f"optim.lr={LR}",
                                      "mesh.data=1", "mesh.model=1", "batch_size=16", "progress_bar=False"]
                             + list(overrides))
    return build_experiment(config, DATASET)


@functools.lru_cache(maxsize=None)
def plain_experiment():
    """The EW experiment (every test's model; all experiments here build the same model)."""
    return experiment()


@functools.lru_cache(maxsize=None)
def _loss_fn():
    forward = make_forward(plain_experiment().model, DATASET.tasks, "x")
    return jax.jit(lambda params, batch: forward(params, {}, batch, jax.random.key(0), True)[0])


def losses_fn(exp=None):
    """``loss(params, batch) -> [K]``, jitted once (the model is the same in every experiment here)."""
    del exp
    return _loss_fn()


@functools.lru_cache(maxsize=None)
def _shared_jacobian_fn():
    loss = _loss_fn()

    def flat_jacobian(params, batch):
        jac = jax.jacrev(lambda s: loss({"shared": s, "heads": params["heads"]}, batch))(params["shared"])
        return jnp.concatenate([j.reshape(3, -1) for j in jax.tree.leaves(jac)], axis=1)

    return jax.jit(flat_jacobian)


def shared_jacobian(exp, params, batch):
    """[K, P] per-task gradients of the shared parameters, by jax.jacrev (the reference)."""
    del exp
    return np.asarray(_shared_jacobian_fn()(params, batch), np.float64)


@functools.lru_cache(maxsize=None)
def _weighted_grad_fn():
    loss = _loss_fn()
    return jax.jit(jax.grad(lambda params, batch, w: jnp.dot(w, loss(params, batch))))


def weighted_grad(params, batch, weights):
    """grad of sum_k w_k L_k over every parameter (jitted reference)."""
    return _weighted_grad_fn()(params, batch, jnp.asarray(weights, jnp.float32))


def sgd(params, grads):
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)


# ------------------------------------------------------------------------------------------- FAMO


def famo_reference(exp, params, batches, steps=2, gamma=0.01, lr=0.025):
    """FAMO by hand (Liu et al. 2023, Alg. 1): w = z / (c L), SGD on sum_k w_k L_k, then the
    no-grad loss at theta_{t+1} on the same batch and one Adam step (+ L2 decay) on the logits."""
    loss = losses_fn(exp)
    logits, m, v = np.zeros(3), np.zeros(3), np.zeros(3)
    all_weights = []
    for t in range(steps):
        before = np.asarray(loss(params, batches[t]), np.float64)
        z = np.exp(logits) / np.exp(logits).sum()
        weights = z / (np.sum(z / before) * before)
        all_weights.append(weights)
        params = sgd(params, weighted_grad(params, batches[t], weights))
        after = np.asarray(loss(params, batches[t]), np.float64)
        delta = np.log(before) - np.log(after)
        grad = z * (delta - z @ delta) + gamma * logits  # softmax VJP, then add_decayed_weights
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad**2
        m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
        logits = logits - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    return params, logits, all_weights


def test_famo_extra_forward_matches_two_steps_by_hand():
    exp = experiment("method.name='famo'")
    state = exp.init()
    params0 = jax.device_get(state.params)
    batches = [batch_of(0), batch_of(16)]
    outs = []
    for b in batches:
        state, out = exp.train_step(state, to_global(b, exp.data_sharding))
        outs.append(out)
    want_params, want_logits, want_weights = famo_reference(exp, params0, batches)
    np.testing.assert_allclose(np.asarray(state.method_state.logits), want_logits, rtol=1e-3, atol=1e-6)
    for out, w in zip(outs, want_weights):
        np.testing.assert_allclose(np.asarray(out["weights"]), w, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # The logits moved: after step 1 they are not the zeros a method without the extra forward would keep.
    assert np.abs(want_logits).min() > 1e-3


# ---------------------------------------------------------------------------- recording methods


def recording(needs="losses", wants=()):
    """A method that returns ones and keeps what the step fed it in its state."""
    fields = ("gramian", "last_shared_gramian", "cross_gramian")

    def init(num_tasks):
        return {f: jnp.zeros((num_tasks, num_tasks), jnp.float32) for f in fields}

    def update(inputs, state, key):
        del key
        got = {f: getattr(inputs, f) for f in fields}
        return jnp.ones_like(inputs.losses), {f: state[f] if got[f] is None else got[f] for f in fields}

    return Method("record", init, update, needs, False, wants=wants)


def init_params(exp=None):
    del exp
    return jax.device_get(plain_experiment().init().params)


def test_last_shared_layer_defaults_to_the_trunks_last_layer_in_creation_order():
    exp = plain_experiment()
    sample = jnp.zeros((1, 8))
    assert last_shared_layer(exp.model, sample) == "^shared/dense_1/[^/]+$"
    vit = load_config(os.path.join(ROOT, "configs", "multimnist_vit.py"))
    from mtl_jax.models import build_model

    model = build_model(vit.model, [T.classification("l", 10), T.classification("r", 10)])
    # sorted order would give 'pos_embed'; the ViT applies its final LayerNorm last
    assert last_shared_layer(model, jnp.zeros((1, 36, 36, 1))) == "^shared/ln_final/[^/]+$"
    with pytest.raises(ValueError, match="matches no shared parameter"):
        leaf_selector("nope")(init_params(exp)["shared"])


def test_last_shared_gramian_is_the_last_layers_gradient_gramian():
    exp = plain_experiment()
    params, batch = init_params(exp), batch_of(0)
    method = recording(wants=("last_shared_gramian",))
    options = gradient_options(exp_config_jacobian(), method, exp.model, jnp.zeros((1, 8)))
    losses, vjp_fn = jax.vjp(lambda p: losses_fn(exp)(p, batch), params)
    _, _, state = jax.jit(lambda: task_gradients(method, losses, vjp_fn, method.init(3), jnp.int32(0),
                                                   jax.random.key(0), options))()
    full = shared_jacobian(exp, params, batch)
    # flattened in sorted leaf order: dense_0/{bias, kernel}, dense_1/{bias, kernel}
    start = sum(x.size for x in jax.tree.leaves(params["shared"]["dense_0"]))
    last = full[:, start:]
    assert last.shape[1] == 16 * 8 + 8
    np.testing.assert_allclose(np.asarray(state["last_shared_gramian"]), last @ last.T, rtol=1e-4, atol=1e-7)


def exp_config_jacobian(**kw):
    config = load_config(os.path.join(ROOT, "configs", "digits_mlp.py"))
    for k, v in kw.items():
        config.jacobian[k] = v
    return config.jacobian


def test_gradnorm_in_the_step_moves_weight_to_the_slower_task():
    """Task 'b' has random labels (its loss ratio stays ~1), 'a' and 'c' are learnable: GradNorm
    (Sec. 3.2) raises the target norm of the task with the largest inverse training rate, so its
    weight grows above the others' while the weights keep summing to K."""
    exp = experiment("method.name='gradnorm'", "method.lr=0.05", "optim.lr=0.05")
    state = exp.init()
    for i in range(40):
        state, out = exp.train_step(state, to_global(batch_of(16 * (i % 4)), exp.data_sharding))
    w, losses = np.asarray(out["weights"]), np.asarray(out["losses"])
    initial = np.asarray(state.method_state.initial_losses)
    rates = (losses / initial) / np.mean(losses / initial)
    assert np.argmax(rates) == 1 and np.argmax(w) == 1, (w, rates)
    assert abs(w.sum() - 3) < 1e-4


# ------------------------------------------------------------------------- cross Gramian (halves)


def test_cross_gramian_of_halves_matches_two_explicit_batches():
    exp = plain_experiment()
    params, batch = init_params(exp), batch_of(0)
    forward = make_forward(exp.model, DATASET.tasks, "x")
    even = {k: v[0::2] for k, v in batch.items()}
    odd = {k: v[1::2] for k, v in batch.items()}
    want = shared_jacobian(exp, params, even) @ shared_jacobian(exp, params, odd).T
    assert not np.allclose(want, want.T, atol=1e-4)  # a cross Gramian, not a Gramian
    split = make_representation_forward(exp.model, DATASET.tasks, "x")
    for mode, chunk, heads_once in (("materialize", 0, False), ("vjp_jvp", 2, False), ("materialize", 2, True),
                                    ("vjp_jvp", 0, True), ("layerwise", 2, True), ("layerwise", 0, False)):
        options = GradientOptions(chunk=chunk, gramian_mode=mode)
        got = jax.jit(lambda p, b: cross_gramian_of_halves(forward, p, {}, b, jax.random.key(0), 3, options,
                                                             split if heads_once else None, ["a", "b", "c"]))(
            params, jax.tree.map(jnp.asarray, batch))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-7, err_msg=f"{mode} {heads_once}")


def test_sdmgrad_step_uses_the_cross_gramian_and_one_full_batch_combination():
    exp = experiment("method.name='sdmgrad'")
    state = exp.init()
    params, batch = jax.device_get(state.params), batch_of(0)
    even = {k: v[0::2] for k, v in batch.items()}
    odd = {k: v[1::2] for k, v in batch.items()}
    cross = shared_jacobian(exp, params, even) @ shared_jacobian(exp, params, odd).T
    loss = losses_fn(exp)(params, batch)
    method = get_method("sdmgrad", num_tasks=3)
    w, _ = method.update(MethodInputs(losses=loss, step=jnp.int32(0), cross_gramian=jnp.asarray(cross)),
                         method.init(3), None)
    shared = weighted_grad(params, batch, w)["shared"]
    heads = weighted_grad(params, batch, np.ones(3))["heads"]
    want = sgd(params, {"shared": shared, "heads": heads})
    state, out = exp.train_step(state, to_global(batch, exp.data_sharding))
    np.testing.assert_allclose(np.asarray(out["weights"]), np.asarray(w), rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    full = shared_jacobian(exp, params, batch)
    w_single, _ = method.update(MethodInputs(losses=loss, step=jnp.int32(0), gramian=jnp.asarray(full @ full.T)),
                                method.init(3), None)
    assert not np.allclose(w, w_single, atol=1e-4)  # the cross Gramian changed the weights


# ------------------------------------------------------------- per-task VJPs at the representation


def _hps_with_big_heads(num_tasks=8):
    """A trunk + heads model whose heads dominate the cost (dropout 0.5 in the trunk), its params,
    a batch, a dropout key, the whole forward and the split (encode, decode)."""
    from mtl_jax.models.heads import MLPHead
    from mtl_jax.models.multitask import HardParameterSharing
    from mtl_jax.models.trunks import MLP

    tasks = [T.classification(f"t{k}", 3) for k in range(num_tasks)]
    model = HardParameterSharing(trunk=MLP(features=(8,), dropout=0.5),
                                 heads={t.name: MLPHead(num_outputs=3, hidden=(256, 256)) for t in tasks})
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(32, 6)), jnp.float32),
             **{t.label_key: jnp.asarray(rng.integers(0, 3, 32), jnp.int32) for t in tasks}}
    params = model.init(jax.random.key(0), batch["x"])["params"]
    names = [t.name for t in tasks]
    return (params, batch, jax.random.key(3), make_forward(model, tasks, "x"),
            make_representation_forward(model, tasks, "x"), names)


def test_representation_vjp_equals_the_whole_forward_vjp_and_runs_each_head_backward_once():
    """``representation_losses_and_vjp`` (what the step uses for trunk + heads models) gives the
    VJP of the whole training forward (same dropout masks: dropout 0.5 in the trunk), and its
    per-task Jacobian differentiates each head once, where vmapping the whole forward's VJP over
    e_k runs every head's backward K times (measured by XLA's FLOP count, heads made dominant)."""
    params, batch, key, forward, split, names = _hps_with_big_heads()
    num_tasks = len(names)

    def whole(p, c):
        _, vjp_fn = jax.vjp(lambda q: forward(q, {}, batch, key, True)[0], p)
        return vjp_fn(c)[0], per_task_jacobian(lambda e: (vjp_fn(e)[0]["shared"],), num_tasks)

    def by_representation(p, c):
        vjp_fn = representation_losses_and_vjp(*split, p, batch, key, names).vjp_fn
        return vjp_fn(c)[0], per_task_jacobian(lambda e: (vjp_fn(e)[0]["shared"],), num_tasks)

    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=num_tasks), jnp.float32)
    expected, got = jax.jit(whole)(params, cotangent), jax.jit(by_representation)(params, cotangent)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    flops = lambda fn: jax.jit(fn).lower(params, cotangent).compile().cost_analysis()["flops"]
    assert flops(by_representation) < 0.3 * flops(whole)


def test_one_layer_heads_read_z_once_with_the_copies_routes_results():
    """For linear heads ``heads_once`` runs the heads on the one ``z`` (their kernels' gradients one
    GEMM over it) and takes ``Z_t`` from the heads' VJP on per-task copies: the losses, predictions,
    head gradients and ``Z`` equal those of the copies route (one VJP of the heads on K copies of z,
    what it does for deeper heads), and no product reads the [K, B, D] copies (the copies route's
    forward and kernel gradients both do)."""
    from mtl_jax.models.heads import LinearHead
    from mtl_jax.models.multitask import HardParameterSharing
    from mtl_jax.models.trunks import MLP
    from mtl_jax.train.gradients import representation

    tasks = [T.classification(f"t{k}", 5) for k in range(12)]
    model = HardParameterSharing(trunk=MLP(features=(64,)), heads={t.name: LinearHead(num_outputs=5) for t in tasks})
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(32, 6)), jnp.float32),
             **{t.label_key: jnp.asarray(rng.integers(0, 5, 32), jnp.int32) for t in tasks}}
    params = model.init(jax.random.key(0), batch["x"])["params"]
    names = [t.name for t in tasks]
    encode, decode = make_representation_forward(model, tasks, "x")
    assert representation.one_layer_heads(params["heads"])
    assert not representation.one_layer_heads({"a": {"dense_0": {"kernel": jnp.ones((2, 2))},
                                                     "out": {"kernel": jnp.ones((2, 2))}}})

    def heads(p, one_layer):
        z = encode(p["shared"], batch, jax.random.key(1), True)
        original = representation.one_layer_heads
        representation.one_layer_heads = lambda _: one_layer  # the route, fixed at trace time
        try:
            return representation.heads_once(decode, p["heads"], z, batch, jax.random.key(2), names)
        finally:
            representation.one_layer_heads = original

    fast, copies = jax.jit(lambda p: heads(p, True)), jax.jit(lambda p: heads(p, False))
    for a, b in zip(jax.tree.leaves(copies(params)), jax.tree.leaves(fast(params))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    reads_copies = lambda fn: [line for line in fn.lower(params).as_text().splitlines()
                               if "dot_general" in line and "tensor<12x32x64xf32>" in line.split("->")[0].split(" : ")[-1]]
    assert len(reads_copies(copies)) == 2 and not reads_copies(fast), (reads_copies(copies), reads_copies(fast))


def test_representation_jvp_and_its_vjp_jvp_gramian_skip_the_heads():
    """With ``with_jvp`` the split forward's ``jvp_fn`` equals ``jax.jvp`` of the whole training
    forward (a random tangent of every parameter), the Gramian built column by column as
    ``J (J^T e_l)`` from it equals ``J J^T`` of the materialised shared Jacobian, and it costs
    under 0.3x the FLOPs of the same Gramian from a linearisation of the whole forward (which
    pushes every column through all K heads twice)."""
    params, batch, key, forward, split, names = _hps_with_big_heads()
    num_tasks = len(names)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(2)
    tangent = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves])
    whole_losses = lambda q: forward(q, {}, batch, key, True)[0]

    def split_jvp(p, t):
        return representation_losses_and_vjp(*split, p, batch, key, names, with_jvp=True).jvp_fn(t)

    np.testing.assert_allclose(jax.jit(split_jvp)(params, tangent),
                               jax.jit(lambda p, t: jax.jvp(whole_losses, (p,), (t,))[1])(params, tangent),
                               rtol=1e-4, atol=1e-5)

    def gram_split(p, _):
        lin = representation_losses_and_vjp(*split, p, batch, key, names, with_jvp=True)
        vjp_fn, jvp_fn = lin.vjp_fn, lin.jvp_fn
        return params_gramian_by_jvp(vjp_fn, jvp_fn, p, num_tasks, jnp.float32)

    def gram_whole(p, _):
        _, vjp_fn, jvp_fn = linearize(whole_losses, p)
        return params_gramian_by_jvp(vjp_fn, jvp_fn, p, num_tasks, jnp.float32)

    def gram_materialised(p):
        _, vjp_fn = jax.vjp(whole_losses, p)
        return gramian(per_task_jacobian(lambda e: (vjp_fn(e)[0]["shared"],), num_tasks))

    expected = jax.jit(gram_materialised)(params)
    np.testing.assert_allclose(jax.jit(gram_split)(params, 0), expected, rtol=1e-4, atol=1e-7)
    flops = lambda fn: jax.jit(fn).lower(params, 0).compile().cost_analysis()["flops"]
    assert flops(gram_split) < 0.3 * flops(gram_whole)


# ------------------------------------------------------------------------------ Gramian by JVPs


def test_gramian_by_vjp_jvp_equals_the_materialised_gramian():
    exp = plain_experiment()
    params, batch = init_params(exp), batch_of(0)
    full = shared_jacobian(exp, params, batch)
    for chunk in (0, 2):  # all columns at once; 2 + 1 columns

        def gram(p, b):
            _, vjp_fn, jvp_fn = linearize(lambda q: losses_fn(exp)(q, b), p)
            return params_gramian_by_jvp(vjp_fn, jvp_fn, p, 3, jnp.float32, chunk)

        got = jax.jit(gram)(params, jax.tree.map(jnp.asarray, batch))
        np.testing.assert_allclose(np.asarray(got), full @ full.T, rtol=1e-4, atol=1e-7, err_msg=str(chunk))


def assert_mode_steps_like_materialize(mode, *overrides):
    """Two train steps with ``jacobian.gramian_mode=mode`` give the weights and parameters of the
    same steps with 'materialize'."""
    results = []
    for m in ("materialize", mode):
        exp = experiment(*overrides, f"jacobian.gramian_mode='{m}'")
        state = exp.init()
        for i in range(2):
            state, out = exp.train_step(state, to_global(batch_of(16 * i), exp.data_sharding))
        results.append((jax.device_get(state.params), np.asarray(out["weights"])))
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_vjp_jvp_step_equals_the_materialised_step():
    assert_mode_steps_like_materialize("vjp_jvp", "method.name='upgrad'", "jacobian.chunk=2")


def test_bad_gradient_options_name_the_problem():
    method = get_method("mgda", num_tasks=3)
    with pytest.raises(ValueError, match="unknown jacobian.gramian_mode 'jvp'.*materialize"):
        gradient_options(exp_config_jacobian(gramian_mode="jvp"), method)
    with pytest.raises(ValueError, match="set config.jacobian.last_shared"):
        gradient_options(exp_config_jacobian(), get_method("gradnorm", num_tasks=3))
    with pytest.raises(ValueError, match="gramian_mode='vjp_jvp' applies to the parameter-level"):
        experiment("method.name='mgda'", "jacobian.gramian_mode='vjp_jvp'", "sharpness.kind='fmtl'")
    with pytest.raises(ValueError, match="even batch size"):
        half_batches({"x": jnp.zeros((5, 2))})
    for name in ("moco", "excess_mtl"):  # per-parameter state: no representation level
        with pytest.raises(ValueError, match=f"method '{name}' keeps per-parameter state.*jacobian.level='params'"):
            experiment(f"method.name='{name}'", "jacobian.level='representation'")
