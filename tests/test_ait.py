"""AiT's soft-token depth output (mtl_jax/models/ait.py): VQ straight-through gradients, soft-token
decoding, mask augmentation, the tokenizer's fit, the depth head, and its token loss in training (the
train step, evaluation without labels, Rep-MTL)."""

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ml_collections import ConfigDict

from mtl_jax import tasks as T
from mtl_jax.checkpoints import CheckpointMismatchError
from mtl_jax.config import apply_overrides, load_config
from mtl_jax.data import from_arrays
from mtl_jax.models import ait
from mtl_jax.models import HardParameterSharing, build_model
from mtl_jax.models.moe_layers import AUX_LOSS, sow_aux_loss
from mtl_jax.train.forward import make_forward, make_task_losses, sows_aux_loss
from mtl_jax.train.gradients.base import StepContext
from mtl_jax.train.gradients.rep_mtl import rep_mtl_model_gradients
from mtl_jax.train.methods import get_method
from mtl_jax.train.step import make_eval_step, make_train_step
from mtl_jax.train.trainer import init_state, train_and_evaluate

TINY = dict(num_tokens=32, codebook_dim=16, hidden=8, downsample=4, num_res_blocks=1)


def depth_maps(n=16, size=16, seed=0):
    """Planes ``a + b x + c y`` with a disc 0.5 nearer: [n, size, size, 1], values in about [0.5, 6]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(1, 4), rng.uniform(-1, 1), rng.uniform(-1, 1)
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        d = a + b * x + c * y
        out.append(np.where((x - cx) ** 2 + (y - cy) ** 2 < r ** 2, d - 0.5, d))
    return np.asarray(out, np.float32)[..., None]


def test_quantize_picks_the_nearest_code_and_passes_gradients_straight_through():
    kz, kc, kw = jax.random.split(jax.random.key(0), 3)
    z_e = jax.random.normal(kz, (2, 3, 3, 4))
    codebook = jax.random.normal(kc, (5, 4))
    w = jax.random.normal(kw, z_e.shape)
    z_q, codes, _ = jax.jit(ait.quantize)(z_e, codebook)
    distances = np.linalg.norm(np.asarray(z_e)[..., None, :] - np.asarray(codebook), axis=-1)
    np.testing.assert_array_equal(codes, distances.argmin(-1))
    np.testing.assert_allclose(z_q, np.asarray(codebook)[np.asarray(codes)], rtol=1e-6, atol=1e-6)
    # d/dz_e <w, z_q> = w (identity), and the codebook gets nothing from the decoder's side
    g_z, g_c = jax.jit(jax.grad(lambda z, c: jnp.sum(w * ait.quantize(z, c)[0]), argnums=(0, 1)))(z_e, codebook)
    np.testing.assert_allclose(g_z, w, rtol=1e-6)
    np.testing.assert_array_equal(g_c, 0.0)
    # the VQ loss: codebook term moves only the chosen codes, towards their inputs; commitment pulls z_e
    g_z, g_c = jax.jit(jax.grad(lambda z, c: ait.quantize(z, c, 0.25)[2], argnums=(0, 1)))(z_e, codebook)
    n = z_e.size
    one_hot = np.eye(5)[np.asarray(codes).reshape(-1)]
    flat = np.asarray(z_e).reshape(-1, 4)
    want_c = -2.0 / n * (one_hot.T @ flat - one_hot.sum(0)[:, None] * np.asarray(codebook))
    np.testing.assert_allclose(g_c, want_c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_z, 0.25 * 2.0 / n * (np.asarray(z_e) - np.asarray(z_q)), rtol=1e-5, atol=1e-7)
    unused = np.setdiff1d(np.arange(5), np.asarray(codes))
    assert np.all(np.asarray(g_c)[unused] == 0.0)


@pytest.fixture(scope="module")
def tiny_vqvae():
    model = ait.DepthVQVAE(**TINY)
    params = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 1)))["params"]
    return model, params


def test_soft_token_decode_is_differentiable_and_tends_to_the_hard_decode(tiny_vqvae):
    model, params = tiny_vqvae
    logits = jax.random.normal(jax.random.key(2), (2, 4, 4, 32)) * 3.0
    decode = jax.jit(lambda lg, tau: model.apply({"params": params}, lg, tau, method=ait.DepthVQVAE.decode_soft))
    out = decode(logits, 1.0)
    assert out.shape == (2, 16, 16, 1)
    # gradient w.r.t. the logits against central differences (float64)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        lg = logits.astype(jnp.float64)
        direction = jax.random.normal(jax.random.key(3), lg.shape, jnp.float64)
        f = jax.jit(lambda x: jnp.sum(jnp.sin(model.apply({"params": p64}, x, 1.0,
                                                           method=ait.DepthVQVAE.decode_soft))))
        grad = jax.jit(jax.grad(f))(lg)
        h = 1e-4
        central = (f(lg + h * direction) - f(lg - h * direction)) / (2 * h)
        assert float(jnp.abs(grad).max()) > 0
        np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(central), rtol=1e-6)
    # tau -> infinity: the softmax is the one-hot of the argmax (AiT's hard token)
    hard = jax.jit(lambda c: model.apply({"params": params}, c, method=ait.DepthVQVAE.decode_codes))(
        jnp.argmax(logits, -1))
    np.testing.assert_allclose(decode(logits, 1e4), hard, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out - hard).max()) > 1e-4  # soft differs at tau = 1


def test_mask_augmentation_statistics():
    ratio, patch, batch = 0.3, 4, 2000
    depth = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (batch, 16, 16, 1)), jnp.float32)
    masked = np.asarray(jax.jit(lambda k, d: ait.mask_patches(k, d, ratio, patch))(jax.random.key(4), depth))
    d = np.asarray(depth)
    # every pixel is kept unchanged or zeroed; zeros come in whole patches; exactly ceil(ratio * 16) per map
    assert np.all((masked == d) | (masked == 0.0))
    patches = (masked == 0).reshape(batch, 4, patch, 4, patch).transpose(0, 1, 3, 2, 4).reshape(batch, 16, -1)
    assert np.all(patches.all(-1) | ~patches.any(-1))
    per_map = patches.all(-1).sum(-1)
    assert np.all(per_map == math.ceil(ratio * 16))
    # each patch masked with probability ceil(ratio * 16) / 16, independently of its place (binomial, 5 sigma)
    p = math.ceil(ratio * 16) / 16
    freq = patches.all(-1).mean(0)
    assert np.all(np.abs(freq - p) < 5 * math.sqrt(p * (1 - p) / batch)), freq
    assert len({tuple(np.flatnonzero(m)) for m in patches.all(-1)[:50]}) > 40  # maps get different masks
    with pytest.raises(ValueError, match="multiple of patch"):
        ait.mask_patches(jax.random.key(0), depth[:, :15], ratio, patch)


def test_vqvae_reconstructs_depth_maps_after_a_short_fit():
    """The tokenizer (EMA codebook, mask augmentation on) fit for 500 steps reconstructs 16 depth maps
    through 4x4 tokens: mean absolute error under 0.6x that of each map's own mean (its best constant)."""
    maps = depth_maps()
    model = ait.DepthVQVAE(**TINY)
    fit = ait.pretrain_vqvae(jax.random.key(0), maps, model, steps=500, batch_size=8, learning_rate=3e-3,
                             mask_ratio=0.25, mask_patch=4, ema_decay=0.9)
    out = model.apply({"params": fit.params}, jnp.asarray(maps))
    mae = float(jnp.mean(jnp.abs(out.reconstruction - maps)))
    constant = float(np.mean(np.abs(maps - maps.mean(axis=(1, 2, 3), keepdims=True))))
    print(f"VQ-VAE fit: reconstruction MAE {mae:.4f}, per-map-mean baseline {constant:.4f}, "
          f"codes used {len(np.unique(np.asarray(out.codes)))}, loss {fit.losses[0]:.3f} -> {fit.losses[-1]:.4f}")
    assert mae < 0.6 * constant, (mae, constant)
    assert fit.reconstruction[-20:].mean() < 0.02 * fit.reconstruction[0]
    assert len(np.unique(np.asarray(out.codes))) > 4  # the codebook did not collapse


def test_soft_token_depth_head_trains_through_the_soft_tokens(tiny_vqvae):
    """Frozen: the tokenizer sits in the 'frozen' collection (no param, so no gradient or optimiser
    update); unfrozen: it is a param and the depth loss reaches it."""
    _, tokenizer_params = tiny_vqvae
    tok = dict(num_tokens=32, codebook_dim=16, tokenizer_hidden=8, downsample=4, num_res_blocks=1)
    features = jax.random.normal(jax.random.key(5), (2, 16, 16, 6))
    target = jnp.asarray(depth_maps(2))
    for freeze in (True, False):
        head = ait.SoftTokenDepthHead(1, **tok, freeze_tokenizer=freeze, hidden=8)
        variables = ait.with_tokenizer(head.init(jax.random.key(6), features), tokenizer_params)
        assert ("tokenizer" in variables["params"]) != freeze and ("frozen" in variables) == freeze
        rest = {k: v for k, v in variables.items() if k != "params"}

        def run(p):  # eager: compiling these small convolutions costs more than running them
            out = head.apply({"params": p, **rest}, features)
            logits = head.apply({"params": p, **rest}, features, logits_only=True)
            want = ait.DepthVQVAE(**TINY).apply({"params": tokenizer_params}, logits,
                                                 method=ait.DepthVQVAE.decode_soft)
            grads = jax.grad(lambda q: jnp.mean(jnp.abs(head.apply({"params": q, **rest}, features) - target)))(p)
            return out, logits, want, grads

        out, logits, want, grads = run(variables["params"])
        assert out.shape == (2, 16, 16, 1)
        assert logits.shape == (2, 4, 4, 32)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(grads["token_logits"]["kernel"]).max()) > 0  # the task loss reaches the logits
        if not freeze:
            assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["tokenizer"])) > 0.0
    with pytest.raises(ValueError, match="do not match"):
        ait.with_tokenizer(variables, jax.eval_shape(ait.DepthVQVAE(**{**TINY, "num_tokens": 8}).init,
                                                     jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"])
    with pytest.raises(ValueError, match="no SoftTokenDepthHead tokenizer"):
        ait.with_tokenizer({"params": {"out": {"kernel": jnp.zeros(2)}}}, tokenizer_params)


def test_tokenizer_file_round_trip_and_errors(tiny_vqvae, tmp_path):
    """save_tokenizer -> tokenizer_file: init puts the saved tokenizer in place (frozen or trained);
    a tokenizer of other sizes or a missing file fails naming the file."""
    _, tokenizer_params = tiny_vqvae
    path = str(tmp_path / "tokenizer.safetensors")
    ait.save_tokenizer(path, tokenizer_params)
    features = jnp.zeros((1, 16, 16, 3))
    tok = dict(num_tokens=32, codebook_dim=16, tokenizer_hidden=8, downsample=4, num_res_blocks=1, hidden=4)
    for freeze, collection in ((True, "frozen"), (False, "params")):
        head = ait.SoftTokenDepthHead(**tok, freeze_tokenizer=freeze, tokenizer_file=path)
        loaded = head.init(jax.random.key(0), features)[collection]["tokenizer"]
        jax.tree.map(np.testing.assert_array_equal, loaded, tokenizer_params)
    other = ait.SoftTokenDepthHead(**{**tok, "codebook_dim": 8}, tokenizer_file=path)
    with pytest.raises(CheckpointMismatchError, match="tokenizer.safetensors"):
        other.init(jax.random.key(0), features)
    with pytest.raises(ValueError, match="does not exist"):
        ait.SoftTokenDepthHead(**tok, tokenizer_file=str(tmp_path / "absent.safetensors")).init(
            jax.random.key(0), features)


def test_token_loss_is_sown_as_the_depth_tasks_aux_loss(tiny_vqvae):
    """With the target depth, the head sows weight * mean_b CE(logits, tokens(target)) at its task's
    entry of a [num_tasks] vector (mtl_jax's aux-loss convention)."""
    _, tokenizer_params = tiny_vqvae
    tok = dict(num_tokens=32, codebook_dim=16, tokenizer_hidden=8, downsample=4, num_res_blocks=1, hidden=8)
    head = ait.SoftTokenDepthHead(**tok, token_loss_weight=0.5, task_index=1, num_tasks=3)
    features = jax.random.normal(jax.random.key(7), (2, 16, 16, 6))
    target = jnp.asarray(depth_maps(2))
    variables = ait.with_tokenizer(head.init(jax.random.key(8), features), tokenizer_params)
    out, sown = head.apply(variables, features, depth_target=target, mutable=[AUX_LOSS])
    logits = head.apply(variables, features, logits_only=True)
    codes = ait.token_targets(ait.DepthVQVAE(**TINY), tokenizer_params, target)
    want = 0.5 * float(ait.token_cross_entropy(logits, codes).mean())
    (value,) = sown[AUX_LOSS]["token_cross_entropy"]
    np.testing.assert_allclose(value, [0.0, want, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out, head.apply(variables, features))  # the prediction is unchanged
    assert not head.apply(variables, features, mutable=[AUX_LOSS])[1]  # nothing without a target


def test_token_targets_and_cross_entropy(tiny_vqvae):
    model, params = tiny_vqvae
    maps = jnp.asarray(depth_maps(3))
    codes = jax.jit(lambda m: ait.token_targets(model, params, m))(maps)
    assert codes.shape == (3, 4, 4) and codes.dtype == jnp.int32
    confident = 50.0 * jax.nn.one_hot(codes, 32)
    np.testing.assert_allclose(ait.token_cross_entropy(confident, codes), 0.0, atol=1e-6)
    uniform = jnp.zeros((3, 4, 4, 32))
    np.testing.assert_allclose(ait.token_cross_entropy(uniform, codes), math.log(32), rtol=1e-6)
    target = jnp.array([[[[0.0], [3.0]], [[1.0], [0.0]]]])  # valid pixels 3 and 1: errors 4 and 0
    np.testing.assert_allclose(ait.mse_ignore_zero(jnp.ones((1, 2, 2, 1)), target), 2.0, rtol=1e-6)


DENSE_TASKS = (T.segmentation("segmentation", 4), T.depth("depth"), T.normal("normal"))
HEAD = dict(num_tokens=16, codebook_dim=8, tokenizer_hidden=4, downsample=4, num_res_blocks=0, hidden=8)
MODELS_AT = {"segnet_split": ({"width": 0.0625}, (2, 32, 32, 3), ("heads", "depth")),
             "mtan_segnet": ({"width": 0.0625}, (2, 32, 32, 3), ("heads", "depth", "pred")),
             "resnet_aspp": ({"depth": 18, "aspp_features": 8}, (2, 32, 40, 3), ("heads", "depth", "soft_token"))}


def dense_model(name, **arch_kwargs):
    return build_model(ConfigDict({"name": name, "arch_kwargs": arch_kwargs}), DENSE_TASKS)


def shapes(tree):
    return jax.tree.map(lambda a: a.shape, tree)


@pytest.mark.parametrize("name", list(MODELS_AT))
def test_depth_head_option_of_the_dense_models(name):
    """depth_head='ait' replaces only the depth task's prediction layer by the soft-token head (its
    tokenizer in the 'frozen' collection); 'conv' is the default model; output shapes are kept."""
    kwargs, shape, path = MODELS_AT[name]
    x = jnp.zeros(shape)
    init = lambda m: jax.eval_shape(lambda: m.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x))
    conv, explicit = init(dense_model(name, **kwargs)), init(dense_model(name, **kwargs, depth_head="conv"))
    assert shapes(conv) == shapes(explicit)
    head_options = {**HEAD, "downsample": 8} if name == "resnet_aspp" else HEAD  # tokens at the output stride
    model = dense_model(name, **kwargs, depth_head="ait", ait=head_options)
    variables = init(model)
    head = functools.reduce(lambda t, k: t[k], path, variables["params"])
    assert {"predictor_conv", "token_logits"} <= set(head) and "tokenizer" not in head
    tokenizer = functools.reduce(lambda t, k: t[k], path, variables["frozen"])["tokenizer"]
    assert tokenizer["codebook"].shape == (16, 8)
    assert list(variables["frozen"]["heads"]) == ["depth"]
    for task in ("segmentation", "normal"):
        assert shapes(variables["params"]["heads"][task]) == shapes(conv["params"]["heads"][task])
    assert shapes(variables["params"]["shared"]) == shapes(conv["params"]["shared"])
    out = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert {t: o.shape for t, o in out.items()} == {"segmentation": shape[:3] + (4,), "depth": shape[:3] + (1,),
                                                   "normal": shape[:3] + (3,)}


def test_depth_head_option_errors(tmp_path):
    with pytest.raises(ValueError, match="depth_head 'vq' unknown"):
        dense_model("segnet_split", depth_head="vq")
    with pytest.raises(ValueError, match="unknown arch_kwargs.ait option"):
        dense_model("mtan_segnet", depth_head="ait", ait={"codebook_size": 8})
    with pytest.raises(ValueError, match="depth_head is 'conv'"):
        dense_model("resnet_aspp", ait={"tau": 2.0})
    with pytest.raises(ValueError, match="does not exist"):
        dense_model("segnet_split", depth_head="ait", ait={"tokenizer_file": str(tmp_path / "absent.safetensors")})
    with pytest.raises(ValueError, match="needs a task of kind 'depth'"):
        build_model(ConfigDict({"name": "segnet_split", "arch_kwargs": {"depth_head": "ait"}}), DENSE_TASKS[:1])
    model = dense_model("segnet_split", width=0.0625, depth_head="ait", ait={**HEAD, "downsample": 64})
    with pytest.raises(ValueError, match="token stride 64 must divide the depth map 32x32"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def tiny_dense_dataset(n=2, size=32, seed=0):
    rng = np.random.default_rng(seed)

    def split():
        image = rng.uniform(size=(n, size, size, 3)).astype(np.float32)
        normal = image - 0.5
        return {"image": image, "segmentation": (image[..., 0] * 4).astype(np.int64),
                "depth": (1.0 + image[..., 1:2]).astype(np.float32),
                "normal": (normal / np.linalg.norm(normal, axis=-1, keepdims=True)).astype(np.float32)}

    return from_arrays("tiny_dense", {"train": split(), "test": split()}, DENSE_TASKS)


def test_segnet_split_with_the_ait_head_trains_with_its_tokenizer_frozen(tmp_path):
    """segnet_split (width 1/16, 32x32) with depth_head='ait', AiT's token loss (weight 1) and a saved
    tokenizer trains 2 steps of AdamW with weight decay through train_and_evaluate: the tokenizer stays
    bit-identical to the file (it is model state, not a param), the token predictor moves, depth comes
    out [B, 32, 32, 1]."""
    tokenizer = ait.DepthVQVAE(16, 8, 4, 4, 0)
    tokenizer_params = tokenizer.init(jax.random.key(3), jnp.zeros((1, 4, 4, 1)))["params"]
    path = str(tmp_path / "tokenizer.safetensors")
    ait.save_tokenizer(path, tokenizer_params)
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "digits_mlp.py"))
    config.model = ConfigDict({"name": "segnet_split", "arch_kwargs": {
        "width": 0.0625, "depth_head": "ait", "ait": {**HEAD, "tokenizer_file": path, "token_loss_weight": 1.0}}})
    config.progress_bar = False
    config = apply_overrides(config, ["num_steps=2", "batch_size=2", "eval_batch_size=2", "log_every=1", "mesh.data=1",
                                      "optim.name='adamw'", "optim.weight_decay=0.1", "optim.lr=0.01",
                                      "checkpoint.enabled=False", "baselines=''"])
    dataset = tiny_dense_dataset()
    token_kernels = []
    record = lambda step, state: token_kernels.append(np.array(state.params["heads"]["depth"]["token_logits"]["kernel"]))
    out = train_and_evaluate(config, str(tmp_path / "run"), dataset=dataset, on_step=record)
    state = out["state"]
    assert int(state.step) == 2 and len(token_kernels) == 2
    frozen = state.model_state["frozen"]["heads"]["depth"]["tokenizer"]
    jax.tree.map(np.testing.assert_array_equal, frozen, tokenizer_params)
    assert "tokenizer" not in state.params["heads"]["depth"]
    assert np.abs(token_kernels[1] - token_kernels[0]).max() > 0  # the token predictor trains
    assert np.isfinite(out["results"]["depth"]["abs_err"])
    model = build_model(config.model, DENSE_TASKS)
    preds = jax.eval_shape(model.apply, {"params": state.params, **state.model_state},
                           jnp.asarray(dataset.splits["test"].arrays["image"]))
    assert preds["depth"].shape == (2, 32, 32, 1)


def test_dense_models_hand_the_depth_label_to_the_ait_head_for_the_token_loss(tiny_vqvae):
    """``ASPPSoftTokenHead(y, train, depth_target=...)`` and ``MTANSegNet(x, train, targets=...)`` pass the
    depth label to the soft-token head: the token loss is sown at the depth task's entry (the head's
    own value), predictions are unchanged, and without a target nothing is sown."""
    from mtl_jax.models.dense_resnet import ASPP, ASPPSoftTokenHead
    from mtl_jax.models.segnet import MTANSegNet

    _, tokenizer_params = tiny_vqvae
    tok = dict(num_tokens=32, codebook_dim=16, tokenizer_hidden=8, downsample=4, num_res_blocks=1, hidden=4)
    target = jnp.asarray(depth_maps(1))
    soft = ait.SoftTokenDepthHead(**tok, token_loss_weight=0.5, feature_stride=4)
    aspp = ASPPSoftTokenHead(soft, (1,), 4)
    y = jax.random.uniform(jax.random.key(9), (1, 4, 4, 3))
    with jax.disable_jit():  # eager: these small convolutions compile slower than they run
        variables = ait.with_tokenizer(aspp.init(jax.random.key(10), y), tokenizer_params)
        plain, state = aspp.apply(variables, y, mutable=[AUX_LOSS])
        out, sown = aspp.apply(variables, y, depth_target=target, mutable=[AUX_LOSS])
        features = ASPP((1,), 4).apply({c: v["aspp"] for c, v in variables.items() if "aspp" in v}, y)
        head_vars = {c: v["soft_token"] for c, v in variables.items() if "soft_token" in v}
        _, want = soft.apply(head_vars, features, depth_target=target, mutable=[AUX_LOSS])
    assert not state
    np.testing.assert_array_equal(out, plain)
    (value,) = sown[AUX_LOSS]["soft_token"]["token_cross_entropy"]
    np.testing.assert_allclose(value, want[AUX_LOSS]["token_cross_entropy"][0], rtol=1e-6)
    assert float(value[0]) > 0.0
    # MTAN: traced only (the MTAN forward compiles slowly); the token loss is sown for the depth task alone
    head = ait.SoftTokenDepthHead(**tok, token_loss_weight=0.5, task_index=1, num_tasks=2)
    mtan = MTANSegNet({"segmentation": (4, False), "depth": (1, False)}, width=0.0625, pred_heads={"depth": head})
    x, depth = jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 32, 32, 1))
    variables = jax.eval_shape(lambda: mtan.init(jax.random.key(0), x))
    run = lambda v, **kw: jax.eval_shape(lambda v_, kw_: mtan.apply(v_, x, mutable=[AUX_LOSS], **kw_), v, kw)
    assert not run(variables)[1]
    out, sown = run(variables, targets={"depth": depth, "segmentation": jnp.zeros((1, 32, 32), jnp.int32)})
    assert sown[AUX_LOSS]["heads"]["depth"]["pred"]["token_cross_entropy"][0].shape == (2,)
    assert {t: o.shape for t, o in out.items()} == {"segmentation": (1, 32, 32, 4), "depth": (1, 32, 32, 1)}


# ---- the token loss in training: forward, train step, evaluation, Rep-MTL ------------------------

TOKEN_HEAD = dict(num_tokens=8, codebook_dim=4, tokenizer_hidden=2, downsample=4, num_res_blocks=0, hidden=4)
PIXEL_TASKS = (T.segmentation("segmentation", 3), T.depth("depth"))


class TinyTrunk(nn.Module):
    """conv3x3 -> tanh: [B, H, W, 3] -> [B, H, W, 4]; sows ``aux_weight * mean(z^2)`` (a scalar auxiliary
    loss, shared by the tasks) when ``aux_weight`` > 0."""

    aux_weight: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        z = jnp.tanh(nn.Conv(4, (3, 3), padding=1, name="conv")(x))
        if self.aux_weight > 0:
            sow_aux_loss(self, "activity", self.aux_weight * jnp.mean(jnp.square(z)))
        return z


class PixelHead(nn.Module):
    num_outputs: int

    @nn.compact
    def __call__(self, z, train: bool = False):
        return nn.Conv(self.num_outputs, (1, 1), name="out")(z)


def token_loss_model(weight, freeze=True, trunk_aux=0.0):
    """Hard parameter sharing on 8x8 images: segmentation (1x1 conv) and depth (AiT's soft-token head,
    2x2 tokens of 8 codes, token loss weight ``weight``)."""
    head = ait.SoftTokenDepthHead(**TOKEN_HEAD, freeze_tokenizer=freeze, token_loss_weight=weight, task_index=1,
                                  num_tasks=2)
    return HardParameterSharing(trunk=TinyTrunk(trunk_aux), heads={"segmentation": PixelHead(3), "depth": head})


def pixel_batch(n=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(size=(n, size, size, 3)).astype(np.float32)
    depth = (1.0 + image[..., 1:2]).astype(np.float32)
    depth[:, :2] = 0.0  # invalid pixels
    return {"image": jnp.asarray(image), "segmentation": jnp.asarray((image[..., 0] * 3).astype(np.int32)),
            "depth": jnp.asarray(depth), "mask": jnp.ones((n,), jnp.float32)}


def decoder_and_token_losses(model, variables, batch):
    """By hand, from ``variables``: the decoder losses [K] (the tasks' losses of the predictions) and
    AiT's token cross-entropy mean_b CE(logits, tokens(depth)) of the depth head."""
    preds = model.apply(variables, batch["image"])
    z = model.apply(variables, batch["image"], stage="trunk")
    head = model.heads["depth"]
    head_vars = {c: v["heads"]["depth"] for c, v in variables.items() if "heads" in v and "depth" in v["heads"]}
    logits = head.apply(head_vars, z, logits_only=True)
    tokenizer = head_vars["frozen" if head.freeze_tokenizer else "params"]["tokenizer"]
    vqvae = ait.DepthVQVAE(head.num_tokens, head.codebook_dim, head.tokenizer_hidden, head.downsample,
                           head.num_res_blocks, parent=None)
    codes = ait.token_targets(vqvae, tokenizer, batch["depth"])
    return make_task_losses(PIXEL_TASKS)(preds, batch), ait.token_cross_entropy(logits, codes).mean()


def train_step_losses(model, batch):
    """The losses one jitted ``make_train_step`` step reports (EW, SGD), the variables it started from
    and the updated state."""
    optimizers = {"shared": optax.sgd(0.1), "heads": {t.name: optax.sgd(0.1) for t in PIXEL_TASKS}}
    method = get_method("ew")
    state = init_state(model, optimizers, method, PIXEL_TASKS, batch["image"], seed=0)
    step = jax.jit(make_train_step(model, PIXEL_TASKS, optimizers, method, "image"))
    variables = {"params": state.params, **state.model_state}
    new_state, out = step(state, batch)
    return np.asarray(out["losses"]), variables, new_state


def test_train_step_adds_the_weighted_token_loss_to_the_depth_loss():
    """A train step (make_train_step, EW) with ``token_loss_weight`` 0.7 reports the depth loss
    decoder loss + 0.7 x CE(token logits, tokens of the label), computed here by hand from the same
    parameters, and the other task's loss unchanged; with weight 0 the depth loss is the decoder's
    alone, and the token predictor's update differs between the two."""
    batch = pixel_batch()
    weighted = token_loss_model(0.7)
    losses, variables, state = train_step_losses(weighted, batch)
    decoder, ce = decoder_and_token_losses(weighted, variables, batch)
    assert float(ce) > 0.1
    np.testing.assert_allclose(losses, [decoder[0], decoder[1] + 0.7 * ce], rtol=1e-5)
    plain = token_loss_model(0.0)
    losses0, variables0, state0 = train_step_losses(plain, batch)
    jax.tree.map(np.testing.assert_array_equal, variables0, variables)  # same seed, same initial variables
    np.testing.assert_allclose(losses0, decoder, rtol=1e-5)
    kernel = lambda s: np.asarray(s.params["heads"]["depth"]["token_logits"]["kernel"])
    assert np.abs(kernel(state) - kernel(state0)).max() > 1e-6  # the token loss reaches the token logits
    jax.tree.map(np.testing.assert_array_equal, state.model_state, {"frozen": variables["frozen"]})  # frozen


TARGETS_SEEN = []


class LabelSpy(nn.Module):
    """Appends to ``TARGETS_SEEN``, at trace time, which labels its ``targets`` held (None: none given)."""

    @nn.compact
    def __call__(self, x, train: bool = False, targets=None):
        TARGETS_SEEN.append(None if targets is None else sorted(targets))
        return {"depth": nn.Conv(1, (1, 1), name="out")(x)}


def test_targets_reach_the_model_in_training_only():
    """make_forward gives a model that takes ``targets`` the labels in training; evaluation
    (``make_eval_step``, the forward with train=False) gives none, and the AiT model's evaluation
    losses are the decoder losses alone."""
    tasks = (T.depth("depth"),)
    seen = TARGETS_SEEN
    seen.clear()
    spy = LabelSpy()
    batch = pixel_batch()
    params = spy.init(jax.random.key(0), batch["image"])["params"]
    forward = make_forward(spy, tasks, "image")
    forward(params, {}, batch, jax.random.key(1), True)
    assert seen[-1] == ["depth"]
    seen.clear()
    make_eval_step(spy, tasks, "image")(params, {}, batch)
    forward(params, {}, batch, jax.random.key(1), False)
    assert seen == [None, None]
    model = token_loss_model(0.7)
    variables = model.init(jax.random.key(2), batch["image"])
    state = {k: v for k, v in variables.items() if k != "params"}
    evaluate = jax.jit(lambda v: make_forward(model, PIXEL_TASKS, "image")(v["params"], state, batch,
                                                                           jax.random.key(3), False)[0])
    np.testing.assert_allclose(evaluate(variables), decoder_and_token_losses(model, variables, batch)[0], rtol=1e-6)


def test_sows_aux_loss_sees_the_token_loss():
    """The heads-once split is skipped for a model that sows (forward.sows_aux_loss): an unfrozen
    tokenizer's model (no state) sows the token loss once given the labels (from the tasks, or the
    batch's keys), not with weight 0."""
    batch = pixel_batch()
    for weight in (0.5, 0.0):
        model = token_loss_model(weight, freeze=False)
        params = jax.eval_shape(model.init, jax.random.key(0), batch["image"])["params"]
        assert sows_aux_loss(model, params, batch, "image", PIXEL_TASKS) == (weight > 0)


@pytest.mark.parametrize("rep_weights", [(0.0, 0.0), (0.6, 0.8)])
def test_rep_mtl_keeps_the_auxiliary_losses(rep_weights):
    """Rep-MTL's step (rep_mtl_model_gradients) reports make_forward's training losses, with the depth
    head's token loss and the trunk's scalar auxiliary loss (split over the tasks); with the
    regularisers off its gradients are those of sum_k L_k through the whole model's forward."""
    batch = pixel_batch()
    model = token_loss_model(0.7, trunk_aux=0.3)
    variables = model.init(jax.random.key(4), batch["image"])
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    method = get_method("ew")
    cfg = ConfigDict(dict(tsr_weight=rep_weights[0], csa_weight=rep_weights[1], temperature=0.5))
    ctx = StepContext(params, state, batch, jax.random.key(5), method.init(2), jnp.zeros((), jnp.int32),
                      jax.random.key(6))
    out = jax.jit(rep_mtl_model_gradients(method, cfg, model, PIXEL_TASKS, "image"))(ctx)
    forward = make_forward(model, PIXEL_TASKS, "image")
    (_, want), grads = jax.jit(jax.value_and_grad(lambda p: (lambda l, a: (l.sum(), l))(
        *forward(p, state, batch, jax.random.key(5), True)), has_aux=True))(params)
    decoder, ce = decoder_and_token_losses(model, variables, batch)
    trunk_aux = 0.3 * float(jnp.mean(jnp.square(model.apply(variables, batch["image"], stage="trunk"))))
    np.testing.assert_allclose(want, decoder + jnp.array([0.0, 0.7 * ce]) + trunk_aux / 2, rtol=1e-5)
    np.testing.assert_allclose(out.losses, want, rtol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, out.model_state, state)  # the frozen tokenizer
    if rep_weights == (0.0, 0.0):
        for a, b in zip(jax.tree.leaves(out.grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
