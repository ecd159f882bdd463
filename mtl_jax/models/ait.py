"""AiT's soft-token depth output (Ning et al. 2023, "All in Tokens: Unifying Output Space of Visual
Tasks via Soft Token", ICCV), as a depth head of a dense mtl_jax model.

AiT represents a depth map by the tokens of a VQ-VAE (van den Oord et al. 2017), trained first and
frozen; the task model predicts token logits and the VQ-VAE decoder turns them into depth.

* Tokenizer (:class:`DepthVQVAE`; the official ``vae/models/VQVAE.py``, config
  ``vae/configs/depth/ait_depth_vqvae.py``): encoder ``conv4x4/2 -> ReLU`` then ``log2(r) - 1`` more
  ``conv4x4/2 (x2 channels) -> ReLU``, residual blocks (``conv3-ReLU-conv3-ReLU-conv1 + x``), ``conv1``
  to the codebook dimension; a depth map [B, H, W, 1] becomes ``z_e`` [B, H/r, W/r, D]. Quantisation
  picks the nearest of K codebook vectors, ``k* = argmin_k ||z_e - e_k||``, ``z_q = e_{k*}``. The decoder
  (``conv1 -> ReLU``, residual blocks, ``log2(r)`` transposed ``conv4x4/2 -> ReLU``, ``conv1``) maps the
  token embeddings back to [B, H, W, 1]. AiT's depth setting: r = 32, K = 128, D = 512, hidden 16.
* VQ-VAE loss (van den Oord et al. Eq. 3), straight-through estimator for the encoder::

      L = L_rec(dec(z_e + sg(z_q - z_e)), d) + ||sg(z_e) - z_q||^2 + beta ||z_e - sg(z_q)||^2,  beta = 0.25

  with ``L_rec`` AiT's ``mse_ignore_zero`` (the mean squared error over pixels with depth > 0). AiT
  (``VectorQuantizerEMA``, decay 0.99) and :func:`pretrain_vqvae` replace the middle (codebook) term
  by exponential-moving-average updates of the codebook (van den Oord et al. App. A.1).
* Mask augmentation (the paper's "mask augmentation"; the official ``MaskGenerator``): while the VQ-VAE is
  trained, the input depth map has ``ceil(ratio * #patches)`` randomly chosen ``patch x patch`` patches
  set to 0 (AiT: ratio 0.5, patch 16) and the target is the full map, so the tokenizer learns to
  complete corrupted / invalid regions (:func:`mask_patches`).
* Soft token (the paper's "soft token"; the official ``decode_soft``): the decoder input is the expectation of the
  codebook under the predicted token distribution, ``sum_k softmax(tau * l)_k e_k`` per token, instead
  of the embedding of ``argmax l``; it is differentiable in the logits ``l``, so a loss on the decoded
  depth trains the token predictor (AiT adds this decoder loss to the token cross-entropy).

:class:`SoftTokenDepthHead` is the depth head: the shared feature map [B, H, W, C] -> token logits
[B, H/r, W/r, K] (conv3x3-ReLU, average pooling by r, conv1x1; AiT's task solver is an
autoregressive / parallel transformer, not reproduced) -> soft-token decode -> depth [B, H, W, 1],
so mtl_jax's depth task loss backpropagates through the soft tokens. The tokenizer's parameters
live under the head (``heads/<task>/tokenizer``); with ``freeze_tokenizer`` (AiT's default) they get
no gradient; :func:`with_tokenizer` puts pretrained ones (:func:`pretrain_vqvae`) in place. The
token cross-entropy against the tokenizer's codes of the target depth (:func:`token_targets`,
:func:`token_cross_entropy`) is available for a training loop that adds it; mtl_jax's depth task
loss alone is AiT's decoder loss with L1 instead of SILog.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

COMMITMENT_COST = 0.25


class ResBlock(nn.Module):
    """AiT's ``ResBlock_v1``: ``x + conv1(ReLU(conv3(ReLU(conv3(x)))))``, channels kept. [B, H, W, C]."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        y = nn.relu(nn.Conv(c, (3, 3), padding=1, name="conv_0")(x))
        y = nn.relu(nn.Conv(c, (3, 3), padding=1, name="conv_1")(y))
        return x + nn.Conv(c, (1, 1), name="conv_2")(y)


class Encoder(nn.Module):
    """depth [B, H, W, 1] -> z_e [B, H/r, W/r, codebook_dim]; H, W multiples of ``downsample``."""

    hidden: int
    downsample: int
    codebook_dim: int
    num_res_blocks: int = 2

    @nn.compact
    def __call__(self, x):
        dim = self.hidden
        x = nn.relu(nn.Conv(dim, (4, 4), strides=2, padding=1, name="down_0")(x))
        for i in range(int(math.log2(self.downsample)) - 1):
            dim *= 2
            x = nn.relu(nn.Conv(dim, (4, 4), strides=2, padding=1, name=f"down_{i + 1}")(x))
        for i in range(self.num_res_blocks):
            x = ResBlock(name=f"res_{i}")(x)
        return nn.Conv(self.codebook_dim, (1, 1), name="to_codebook")(x)


class Decoder(nn.Module):
    """token embeddings [B, h, w, D] -> depth [B, h r, w r, channels]."""

    hidden: int
    downsample: int
    num_res_blocks: int = 2
    channels: int = 1

    @nn.compact
    def __call__(self, x):
        dim = self.hidden * self.downsample // 2
        x = nn.relu(nn.Conv(dim, (1, 1), name="from_codebook")(x))
        for i in range(self.num_res_blocks):
            x = ResBlock(name=f"res_{i}")(x)
        x = nn.relu(nn.ConvTranspose(dim, (4, 4), strides=(2, 2), padding="SAME", name="up_0")(x))
        for i in range(int(math.log2(self.downsample)) - 1):
            dim //= 2
            x = nn.relu(nn.ConvTranspose(dim, (4, 4), strides=(2, 2), padding="SAME", name=f"up_{i + 1}")(x))
        return nn.Conv(self.channels, (1, 1), name="out")(x)


def nearest_code(z_e: jax.Array, codebook: jax.Array) -> jax.Array:
    """int32 [...]: ``argmin_k ||z_e - e_k||^2`` for ``z_e`` [..., D], ``codebook`` [K, D]."""
    distances = (jnp.sum(jnp.square(z_e), -1, keepdims=True) - 2.0 * z_e @ codebook.T
                 + jnp.sum(jnp.square(codebook), -1))
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def quantize(z_e: jax.Array, codebook: jax.Array, commitment_cost: float = COMMITMENT_COST):
    """``(z_q_st, codes, vq_loss)``: nearest codes [...], the straight-through quantised vectors
    ``z_e + sg(e_codes - z_e)`` [..., D] (value e_codes, gradient identity to z_e), and
    ``||sg(z_e) - e||^2 + beta ||z_e - sg(e)||^2`` (means over every entry)."""
    codes = nearest_code(z_e, codebook)
    z_q = codebook[codes]
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z_e) - z_q))
    commitment = jnp.mean(jnp.square(z_e - jax.lax.stop_gradient(z_q)))
    return z_e + jax.lax.stop_gradient(z_q - z_e), codes, codebook_loss + commitment_cost * commitment


def soft_token_embedding(logits: jax.Array, codebook: jax.Array, tau: float = 1.0) -> jax.Array:
    """AiT's soft token: ``softmax(tau * logits) @ codebook``; logits [..., K], codebook [K, D] -> [..., D]."""
    return jax.nn.softmax(tau * logits, axis=-1) @ codebook


class VQOutput(NamedTuple):
    """:class:`DepthVQVAE`'s forward: ``reconstruction`` [B, H, W, 1], ``codes`` [B, h, w], ``vq_loss``
    (scalar), ``z_e`` [B, h, w, D] the encoder output."""

    reconstruction: jax.Array
    codes: jax.Array
    vq_loss: jax.Array
    z_e: jax.Array


class DepthVQVAE(nn.Module):
    """AiT's depth tokenizer. ``__call__(depth) -> VQOutput``; methods
    ``encode`` (depth -> z_e), ``tokens`` (depth -> codes [B, h, w]), ``decode_codes`` (codes -> depth),
    ``decode_soft`` (logits [B, h, w, K] -> depth). Depth values enter unscaled (AiT's ``use_norm=False``)."""

    num_tokens: int = 128
    codebook_dim: int = 512
    hidden: int = 16
    downsample: int = 32
    num_res_blocks: int = 2
    commitment_cost: float = COMMITMENT_COST

    def setup(self):
        self.encoder = Encoder(self.hidden, self.downsample, self.codebook_dim, self.num_res_blocks)
        self.decoder = Decoder(self.hidden, self.downsample, self.num_res_blocks)
        limit = 1.0 / self.num_tokens  # the official uniform(-1/K, 1/K) initialisation
        init = lambda k, shape: jax.random.uniform(k, shape, minval=-limit, maxval=limit)
        self.codebook = self.param("codebook", init, (self.num_tokens, self.codebook_dim))

    def encode(self, depth):
        return self.encoder(depth)

    def tokens(self, depth):
        return nearest_code(self.encoder(depth), self.codebook)

    def decode_codes(self, codes):
        return self.decoder(self.codebook[codes])

    def decode_soft(self, logits, tau: float = 1.0):
        return self.decoder(soft_token_embedding(logits, self.codebook, tau))

    def __call__(self, depth):
        z_e = self.encoder(depth)
        z_q, codes, vq_loss = quantize(z_e, self.codebook, self.commitment_cost)
        return VQOutput(self.decoder(z_q), codes, vq_loss, z_e)


def mse_ignore_zero(pred: jax.Array, target: jax.Array) -> jax.Array:
    """AiT's ``MseIgnoreZeroLoss``: mean of (pred - target)^2 over the pixels with target > 0 (0 if none)."""
    valid = target > 0
    return jnp.sum(jnp.where(valid, jnp.square(pred - target), 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def mask_patches(key: jax.Array, depth: jax.Array, ratio: float = 0.5, patch: int = 16) -> jax.Array:
    """AiT's mask augmentation: per example, ``ceil(ratio * n)`` of the n ``patch x patch`` patches
    (chosen uniformly without replacement) set to 0. depth [B, H, W, C], H and W multiples of ``patch``."""
    batch, height, width = depth.shape[:3]
    if height % patch or width % patch or not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask_patches: depth {height}x{width} must be a multiple of patch {patch} and ratio in "
                         f"(0, 1]; got ratio {ratio}")
    rows, cols = height // patch, width // patch
    count = int(np.ceil(rows * cols * ratio))
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, rows * cols)), axis=1), axis=1)
    keep = (rank >= count).reshape(batch, rows, 1, cols, 1)
    keep = jnp.broadcast_to(keep, (batch, rows, patch, cols, patch)).reshape(batch, height, width, 1)
    return jnp.where(keep, depth, 0.0)


class VQVAETraining(NamedTuple):
    """What :func:`pretrain_vqvae` returns: ``params`` of the :class:`DepthVQVAE`, the loss per step
    ``losses`` [steps] (reconstruction + commitment) and ``reconstruction`` [steps]."""

    params: dict
    losses: np.ndarray
    reconstruction: np.ndarray


def ema_codebook_update(cluster_size, embed_sum, z_e, codes, num_tokens: int, decay: float, eps: float = 1e-5):
    """AiT's ``VectorQuantizerEMA`` update: ``(cluster_size [K], embed_sum [K, D], codebook [K, D])``.

    ``N_k <- decay N_k + (1 - decay) n_k`` (Laplace-smoothed), ``m_k <- decay m_k + (1 - decay) sum_{i: k_i = k}
    z_e,i``, ``e_k = m_k / N_k``; ``z_e`` [..., D], ``codes`` [...] of one batch."""
    one_hot = jax.nn.one_hot(codes.reshape(-1), num_tokens, dtype=z_e.dtype)
    flat = z_e.reshape(-1, z_e.shape[-1])
    cluster_size = decay * cluster_size + (1.0 - decay) * one_hot.sum(axis=0)
    total = cluster_size.sum()
    cluster_size = (cluster_size + eps) / (total + num_tokens * eps) * total
    embed_sum = decay * embed_sum + (1.0 - decay) * one_hot.T @ flat
    return cluster_size, embed_sum, embed_sum / cluster_size[:, None]


def pretrain_vqvae(key: jax.Array, depth_maps, model: DepthVQVAE, steps: int = 1000, batch_size: int = 8,
                   learning_rate: float = 3e-4, mask_ratio: float = 0.5, mask_patch: int = 16,
                   ema_decay: float = 0.99) -> VQVAETraining:
    """Trains ``model`` on ``depth_maps`` [N, H, W, 1] (0 = invalid) as AiT trains its tokenizer: Adam on
    ``mse_ignore_zero(reconstruction, depth) + beta ||z_e - sg(z_q)||^2`` with mask-augmented inputs
    (``mask_ratio`` 0 turns the augmentation off) and the codebook updated by exponential moving averages
    (``ema_codebook_update``, decay ``ema_decay``) instead of by its gradient.

    Deviations, for short fits: the codebook starts at encoder outputs of random training maps (data
    initialisation; the official starts from N(0, 1) with zero cluster sizes), with cluster sizes 1; the
    learning rate is constant (AiT: 3e-4 decayed by 0.98 every 500 steps, 20 epochs, batch 8). Pure
    apart from the returned numpy histories (a jitted scan over the steps).
    """
    depth_maps = jnp.asarray(depth_maps, jnp.float32)
    init_key, data_key, key = jax.random.split(key, 3)
    params = model.init(init_key, depth_maps[:1])["params"]
    z0 = model.apply({"params": params}, depth_maps[:batch_size], method=DepthVQVAE.encode)
    z0 = z0.reshape(-1, z0.shape[-1])
    codebook = z0[jax.random.randint(data_key, (model.num_tokens,), 0, z0.shape[0])]
    codebook = codebook + 1e-3 * jnp.std(z0) * jax.random.normal(data_key, codebook.shape)
    params = {**params, "codebook": codebook}
    tx = optax.adam(learning_rate)

    def loss_fn(p, inputs, target):
        out = model.apply({"params": p}, inputs)
        rec = mse_ignore_zero(out.reconstruction, target)
        commitment = jnp.mean(jnp.square(out.z_e - jax.lax.stop_gradient(p["codebook"][out.codes])))
        return rec + model.commitment_cost * commitment, (rec, out)

    def step(carry, k):
        p, opt_state, cluster_size, embed_sum = carry
        k_batch, k_mask = jax.random.split(k)
        target = depth_maps[jax.random.randint(k_batch, (batch_size,), 0, depth_maps.shape[0])]
        inputs = mask_patches(k_mask, target, mask_ratio, mask_patch) if mask_ratio > 0 else target
        (loss, (rec, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, inputs, target)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        cluster_size, embed_sum, codebook = ema_codebook_update(cluster_size, embed_sum, jax.lax.stop_gradient(out.z_e),
                                                                out.codes, model.num_tokens, ema_decay)
        return ({**p, "codebook": codebook}, opt_state, cluster_size, embed_sum), (loss, rec)

    carry = (params, tx.init(params), jnp.ones((model.num_tokens,)), codebook)
    run = jax.jit(lambda c, keys: jax.lax.scan(step, c, keys))
    (params, *_), (losses, rec) = run(carry, jax.random.split(key, steps))
    return VQVAETraining(params, np.asarray(losses), np.asarray(rec))


class SoftTokenDepthHead(nn.Module):
    """Depth head through AiT's soft tokens: features [B, H, W, C] -> depth [B, H, W, 1] (H, W multiples
    of the tokenizer's ``downsample``). ``num_outputs`` must be 1 (the mtl_jax head contract).

    ``num_tokens``, ``codebook_dim``, ``tokenizer_hidden``, ``downsample``, ``num_res_blocks``: the
    :class:`DepthVQVAE` (params ``tokenizer``) whose codebook and decoder turn token logits into depth;
    ``freeze_tokenizer``: no gradient reaches its parameters (AiT trains the tokenizer first and
    freezes it); ``tau``: the softmax sharpness; ``hidden``: channels of the token predictor.
    ``logits_only``: return the token logits [B, H/r, W/r, K] instead.
    """

    num_outputs: int = 1
    num_tokens: int = 128
    codebook_dim: int = 512
    tokenizer_hidden: int = 16
    downsample: int = 32
    num_res_blocks: int = 2
    freeze_tokenizer: bool = True
    tau: float = 1.0
    hidden: int = 64

    def tokenizer_module(self, name=None) -> DepthVQVAE:
        return DepthVQVAE(self.num_tokens, self.codebook_dim, self.tokenizer_hidden, self.downsample,
                          self.num_res_blocks, name=name)

    @nn.compact
    def __call__(self, features, train: bool = False, logits_only: bool = False):
        if self.num_outputs != 1:
            raise ValueError(f"SoftTokenDepthHead predicts depth (1 output); got num_outputs={self.num_outputs}")
        r = self.downsample
        y = nn.relu(nn.Conv(self.hidden, (3, 3), padding=1, name="predictor_conv")(features))
        y = nn.avg_pool(y, (r, r), strides=(r, r))
        logits = nn.Conv(self.num_tokens, (1, 1), name="token_logits")(y)
        if logits_only:
            return logits
        tokenizer = self.tokenizer_module(name="tokenizer")
        if self.is_initializing():
            tokenizer(jnp.zeros(features.shape[:3] + (1,), features.dtype))  # creates the encoder's params too
        if not self.freeze_tokenizer:
            return tokenizer.decode_soft(logits, self.tau)
        frozen = jax.tree.map(jax.lax.stop_gradient, self.variables["params"]["tokenizer"])
        return self.tokenizer_module().apply({"params": frozen}, logits, self.tau, method=DepthVQVAE.decode_soft)


def with_tokenizer(head_params: dict, tokenizer_params: dict) -> dict:
    """``head_params`` of a :class:`SoftTokenDepthHead` with its ``tokenizer`` subtree replaced by
    pretrained :class:`DepthVQVAE` params (shapes must agree)."""
    old = head_params["tokenizer"]
    if jax.tree.structure(old) != jax.tree.structure(tokenizer_params) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(tokenizer_params))):
        raise ValueError("with_tokenizer: the pretrained tokenizer's parameters do not match the head's DepthVQVAE "
                         "(num_tokens, codebook_dim, hidden, downsample, num_res_blocks)")
    return {**head_params, "tokenizer": tokenizer_params}


def token_targets(model: DepthVQVAE, params: dict, depth: jax.Array) -> jax.Array:
    """int32 [B, h, w]: the tokenizer's codes of the target depth (AiT's token labels)."""
    return model.apply({"params": params}, depth, method=DepthVQVAE.tokens)


def token_cross_entropy(logits: jax.Array, codes: jax.Array) -> jax.Array:
    """[B]: AiT's token loss, the mean over token positions of CE(logits [B, h, w, K], codes [B, h, w])."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
    return ce.reshape(ce.shape[0], -1).mean(axis=1)
