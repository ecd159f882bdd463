"""AiT's soft-token depth output (mtl_jax/models/ait.py): VQ straight-through gradients, soft-token
decoding, mask augmentation, the tokenizer's fit, the depth head."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models import ait

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
    _, tokenizer_params = tiny_vqvae
    tok = dict(num_tokens=32, codebook_dim=16, tokenizer_hidden=8, downsample=4, num_res_blocks=1)
    features = jax.random.normal(jax.random.key(5), (2, 16, 16, 6))
    target = jnp.asarray(depth_maps(2))
    for freeze in (True, False):
        head = ait.SoftTokenDepthHead(1, **tok, freeze_tokenizer=freeze, hidden=8)
        params = head.init(jax.random.key(6), features)["params"]
        params = ait.with_tokenizer(params, tokenizer_params)

        def run(p):  # eager: compiling these small convolutions costs more than running them
            out = head.apply({"params": p}, features)
            logits = head.apply({"params": p}, features, logits_only=True)
            want = ait.DepthVQVAE(**TINY).apply({"params": tokenizer_params}, logits,
                                                 method=ait.DepthVQVAE.decode_soft)
            grads = jax.grad(lambda q: jnp.mean(jnp.abs(head.apply({"params": q}, features) - target)))(p)
            return out, logits, want, grads

        out, logits, want, grads = run(params)
        assert out.shape == (2, 16, 16, 1)
        assert logits.shape == (2, 4, 4, 32)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(grads["token_logits"]["kernel"]).max()) > 0  # the task loss reaches the logits
        decoder_grad = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["tokenizer"]))
        assert (decoder_grad == 0.0) if freeze else (decoder_grad > 0.0)
    with pytest.raises(ValueError, match="do not match"):
        ait.with_tokenizer(params, jax.eval_shape(ait.DepthVQVAE(**{**TINY, "num_tokens": 8}).init,
                                                  jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"])


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
