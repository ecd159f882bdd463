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

:class:`SoftTokenDepthHead` is the depth head: the feature map [B, h, w, C] -> token logits
[B, H/r, W/r, K] (conv3x3-ReLU, average pooling to the token grid, conv1x1; AiT's task solver is an
autoregressive / parallel transformer, not reproduced) -> soft-token decode -> depth [B, H, W, 1],
so mtl_jax's depth task loss (AiT's decoder loss, with L1 instead of SILog) backpropagates through
the soft tokens. The dense models take it as their depth head (:func:`soft_token_heads`)::

    config.model.arch_kwargs = {"width": 0.25, "depth_head": "ait",          # default 'conv'
                                "ait": {"num_tokens": 128, "downsample": 32, "tau": 1.0,
                                        "freeze_tokenizer": True, "tokenizer_file": "tok.safetensors"}}

(``segnet_split``: on the shared decoder output; ``mtan_segnet``: the depth task's ``pred`` over its
attended features; ``resnet_aspp``: after the depth task's ASPP, tokens from the stride-8 features).
A frozen tokenizer (AiT's setting) is not a parameter: its variables are in the ``frozen``
collection (``frozen/heads/<task>/.../tokenizer``), which the trainer keeps in ``model_state``
beside ``batch_stats``, so no optimiser, weight decay or gradient method changes it; unfrozen, it is
``params/heads/<task>/.../tokenizer`` and trains with the head. Pretrained tokenizers
(:func:`pretrain_vqvae`) go in through a file (:func:`save_tokenizer`, ``ait.tokenizer_file``, read at
init) or :func:`with_tokenizer` on a model's variables.

AiT's depth loss (the official ``ait/code/model/depth/depth_head.py`` ``DepthHead.loss2``, normalised
per token in ``ait/code/model/ait.py`` ``forward_train``) is the token cross-entropy against the frozen
tokenizer's codes of the target depth plus ``decoder_loss_weight`` times the decoder loss on the soft
decode (SILog; ``decoder_loss_weight = 1.0`` in the soft-token configs, e.g.
``ait/configs/swinv2b_480reso_depthonly.py``). Here the depth task's loss is::

    L_depth = L1(decode_soft(logits), d) + token_loss_weight * mean_b CE(logits, tokens(d))

(:func:`token_targets`, :func:`token_cross_entropy`), AiT's sum scaled by ``1 / decoder_loss_weight``:
``token_loss_weight = 1`` is AiT's setting; the default 0 leaves the decoder loss alone (with a
tokenizer not trained first, its codes are no labels). The head sows the weighted cross-entropy into
the ``aux_loss`` collection when it is given the target depth (``depth_target``), and the training
forward adds it to the depth task's loss (``train/forward.py`` ``make_forward`` /
``aux_task_losses``): a model whose ``__call__`` takes ``targets`` gets ``{task: label}`` in training
(never in evaluation), ``HardParameterSharing`` (``segnet_split``, ``resnet_aspp``) hands the label to
heads that take ``depth_target`` (``dense_resnet.ASPPSoftTokenHead`` passes it on), ``MTANSegNet`` to
its ``pred_heads``. Rep-MTL (``train/gradients/rep_mtl.py``) keeps the term too; the
representation-level gradients (``jacobian.level='representation'``) run the heads without labels
(they refuse models with state, so a frozen tokenizer's model does not reach them).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.checkpoints import IDENTITY, Rename, export, flatten, load_into, read_checkpoint, write_safetensors
from mtl_jax.models.moe_layers import sow_aux_loss

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


FROZEN = "frozen"  # the variable collection of a frozen tokenizer (model_state: no optimiser reads it)
DEPTH_HEADS = ("conv", "ait")
HEAD_OPTIONS = ("num_tokens", "codebook_dim", "tokenizer_hidden", "downsample", "num_res_blocks", "freeze_tokenizer",
                "tau", "hidden", "tokenizer_file", "token_loss_weight")


@functools.lru_cache(maxsize=8)
def _read_tokenizer_file(path: str, mtime_ns: int, size: int) -> dict:
    del mtime_ns, size  # cache keys: a rewritten file is read again
    return read_checkpoint(path)


def tokenizer_renames(template: dict) -> list[Rename]:
    """One Rename per leaf of a :class:`DepthVQVAE`'s params: file name = the '/'-joined path
    (``encoder/down_0/kernel``, ``codebook``, ...), values as they are."""
    return [Rename("/".join(path), path, IDENTITY) for path in flatten(template)]


def save_tokenizer(path: str, params: dict, overwrite: bool = False) -> None:
    """Writes a :class:`DepthVQVAE`'s ``params`` (e.g. :func:`pretrain_vqvae`'s) to the safetensors file
    ``path`` (names as :func:`tokenizer_renames`), for ``arch_kwargs.ait.tokenizer_file``."""
    write_safetensors(path, export(params, tokenizer_renames(params)), overwrite=overwrite)


def load_tokenizer(path: str, template: dict) -> dict:
    """The :class:`DepthVQVAE` params in ``path`` (written by :func:`save_tokenizer`), shaped like
    ``template`` (params or their ``jax.eval_shape``); a CheckpointMismatchError names the file and
    the missing, unexpected or mis-shaped tensors (a tokenizer of other sizes)."""
    if not os.path.isfile(path):
        raise ValueError(f"AiT tokenizer_file {path!r} does not exist (write one with mtl_jax.models.ait.save_tokenizer)")
    stat = os.stat(path)
    state = _read_tokenizer_file(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    return load_into(template, state, tokenizer_renames(template), what=f"AiT tokenizer {path}")


class SoftTokenDepthHead(nn.Module):
    """Depth head through AiT's soft tokens: features [B, h, w, C] at ``feature_stride`` (h = H /
    feature_stride) -> token logits [B, H/r, W/r, K] -> depth [B, H, W, 1]; H, W multiples of the
    tokenizer's ``downsample`` r, r a multiple of ``feature_stride``. ``num_outputs`` must be 1.

    ``num_tokens``, ``codebook_dim``, ``tokenizer_hidden``, ``downsample``, ``num_res_blocks``: the
    :class:`DepthVQVAE` whose codebook and decoder turn token logits into depth. ``freeze_tokenizer``
    (AiT's setting: the tokenizer is trained first, then fixed): its variables live in the ``frozen``
    collection (``frozen/.../tokenizer``; the trainer keeps them in ``model_state``, so no optimiser,
    weight decay or gradient method touches them); otherwise they are params ``.../tokenizer``,
    trained with the head. ``tokenizer_file``: a safetensors file (:func:`save_tokenizer`) whose
    tokenizer ``init`` puts in place (read when the model is initialised); '' = random. ``tau``: the
    softmax sharpness; ``hidden``: channels of the token predictor.

    AiT's token loss: with ``depth_target`` [B, H, W, 1] given and ``token_loss_weight`` > 0, the call
    sows ``token_loss_weight * mean_b token_cross_entropy(logits, tokens(depth_target))`` into the
    ``aux_loss`` collection, as entry ``task_index`` of a [``num_tasks``] vector (the task's own term,
    which the training forward adds to the task's decoder loss; AiT's setting is weight 1, see the
    module docstring).
    ``logits_only``: return the token logits instead of depth.
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
    tokenizer_file: str = ""
    feature_stride: int = 1
    token_loss_weight: float = 0.0
    task_index: int = 0
    num_tasks: int = 1

    def tokenizer_module(self) -> DepthVQVAE:
        return DepthVQVAE(self.num_tokens, self.codebook_dim, self.tokenizer_hidden, self.downsample,
                          self.num_res_blocks)

    def initial_tokenizer(self, key) -> dict:
        """The tokenizer's params at init: ``tokenizer_file``'s, or a random :class:`DepthVQVAE`'s."""
        r = self.downsample
        init = lambda k: self.tokenizer_module().init(k, jnp.zeros((1, r, r, 1)))["params"]
        if not self.tokenizer_file:
            return init(key)
        loaded = load_tokenizer(self.tokenizer_file, jax.eval_shape(init, key))
        return jax.tree.map(jnp.asarray, loaded)

    def tokenizer_params(self) -> dict:
        if self.freeze_tokenizer:
            tokenizer = self.variable(FROZEN, "tokenizer", lambda: self.initial_tokenizer(self.make_rng("params")))
            return jax.tree.map(jax.lax.stop_gradient, tokenizer.value)
        return self.param("tokenizer", self.initial_tokenizer)

    @nn.compact
    def __call__(self, features, train: bool = False, logits_only: bool = False, depth_target=None):
        if self.num_outputs != 1:
            raise ValueError(f"SoftTokenDepthHead predicts depth (1 output); got num_outputs={self.num_outputs}")
        r, stride = self.downsample, self.feature_stride
        height, width = features.shape[1] * stride, features.shape[2] * stride
        if r % stride or height % r or width % r:
            raise ValueError(f"AiT depth head: token stride {r} must divide the depth map {height}x{width} and be a "
                             f"multiple of the feature stride {stride} (features {tuple(features.shape)})")
        y = nn.relu(nn.Conv(self.hidden, (3, 3), padding=1, name="predictor_conv")(features))
        y = nn.avg_pool(y, (r // stride, r // stride), strides=(r // stride, r // stride))
        logits = nn.Conv(self.num_tokens, (1, 1), name="token_logits")(y)
        params = self.tokenizer_params()
        if logits_only:
            return logits
        tokenizer = self.tokenizer_module()
        if depth_target is not None and self.token_loss_weight > 0:
            codes = tokenizer.apply({"params": jax.lax.stop_gradient(params)}, depth_target.astype(logits.dtype),
                                    method=DepthVQVAE.tokens)
            loss = self.token_loss_weight * token_cross_entropy(logits, codes).mean()
            sow_aux_loss(self, "token_cross_entropy", jax.nn.one_hot(self.task_index, self.num_tasks) * loss)
        return tokenizer.apply({"params": params}, logits, self.tau, method=DepthVQVAE.decode_soft)


def with_tokenizer(variables: dict, tokenizer_params: dict) -> dict:
    """``variables`` (a model's or a head's, any nesting; params or the ``frozen`` collection) with
    every :class:`SoftTokenDepthHead`'s ``tokenizer`` subtree replaced by ``tokenizer_params``
    (pretrained :class:`DepthVQVAE` params, e.g. :func:`pretrain_vqvae`'s or :func:`load_tokenizer`'s).
    Raises when there is no tokenizer or the shapes differ."""
    found = []

    def replace(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {}
        for key, value in tree.items():
            if key == "tokenizer" and isinstance(value, Mapping) and "codebook" in value:
                if jax.tree.structure(value) != jax.tree.structure(tokenizer_params) or any(
                        a.shape != b.shape for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(tokenizer_params))):
                    raise ValueError("with_tokenizer: the pretrained tokenizer's parameters do not match the head's "
                                     "DepthVQVAE (num_tokens, codebook_dim, hidden, downsample, num_res_blocks)")
                found.append(key)
                out[key] = tokenizer_params
            else:
                out[key] = replace(value)
        return out

    out = replace(variables)
    if not found:
        raise ValueError("with_tokenizer: no SoftTokenDepthHead tokenizer in these variables")
    return out


def soft_token_heads(arch_kwargs: Mapping, tasks: Sequence, model: str, feature_stride: int = 1) -> dict:
    """``{task: SoftTokenDepthHead}`` for the depth tasks when ``arch_kwargs['depth_head'] == 'ait'``
    (options from ``arch_kwargs['ait']``, any of ``HEAD_OPTIONS``), ``{}`` for 'conv' (the model's own
    head). ``feature_stride``: the resolution of the features the heads read (1 = the input's)."""
    kind = arch_kwargs.get("depth_head", "conv")
    options = dict(arch_kwargs.get("ait") or {})
    if kind not in DEPTH_HEADS:
        raise ValueError(f"{model}: arch_kwargs.depth_head {kind!r} unknown; valid: {list(DEPTH_HEADS)}")
    if kind != "ait":
        if options:
            raise ValueError(f"{model}: arch_kwargs.ait is set but depth_head is {kind!r}; set depth_head='ait'")
        return {}
    unknown = [k for k in options if k not in HEAD_OPTIONS]
    if unknown:
        raise ValueError(f"{model}: unknown arch_kwargs.ait option(s) {unknown}; valid options: {list(HEAD_OPTIONS)}")
    path = options.get("tokenizer_file", "")
    if path and not os.path.isfile(path):
        raise ValueError(f"{model}: arch_kwargs.ait.tokenizer_file {path!r} does not exist")
    depth = [(k, t) for k, t in enumerate(tasks) if getattr(t, "kind", "") == "depth"]
    if not depth:
        raise ValueError(f"{model}: depth_head='ait' needs a task of kind 'depth'; tasks: "
                         f"{[(t.name, getattr(t, 'kind', '')) for t in tasks]}")
    return {t.name: SoftTokenDepthHead(t.num_outputs, **options, feature_stride=feature_stride, task_index=k,
                                       num_tasks=len(tasks))
            for k, t in depth}


def token_targets(model: DepthVQVAE, params: dict, depth: jax.Array) -> jax.Array:
    """int32 [B, h, w]: the tokenizer's codes of the target depth (AiT's token labels)."""
    return model.apply({"params": params}, depth, method=DepthVQVAE.tokens)


def token_cross_entropy(logits: jax.Array, codes: jax.Array) -> jax.Array:
    """[B]: AiT's token loss, the mean over token positions of CE(logits [B, h, w, K], codes [B, h, w])."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
    return ce.reshape(ce.shape[0], -1).mean(axis=1)
