"""SegNet and MTAN-SegNet for dense multi-task prediction (NYUv2 / Cityscapes), the MTAN / Nash-MTL /
FAMO protocol.

Follows the official code: lorenmt/mtan ``im2im_pred/model_segnet_split.py`` (hard parameter
sharing) and ``im2im_pred/model_segnet_mtan.py`` (Liu, Johns & Davison 2019, "End-to-End Multi-Task
Learning with Attention", CVPR, Fig. 2), identical to AvivNavon/nash-mtl
``experiments/nyuv2/models.py`` and LibMTL ``examples/nyu/segnet_mtan.py``.

The shared network (``filters`` = 64-128-256-512-512 times ``width``), input [B, H, W, 3] with H and W
multiples of 32::

    encoder level i (0..4):  g_i^0 = encoder_block_i(x)           conv3x3-BN-ReLU to filters[i]
                             g_i^1 = conv_block_enc_i(g_i^0)      1 (levels 0, 1) or 2 conv3x3-BN-ReLU
                             x = maxpool2x2(g_i^1), remembering the argmax positions
    decoder step j (0..4), level i = 4 - j:
                             u_j = max-unpool(x, positions of level i)   (the max goes back where it came from)
                             d_j^0 = decoder_block_i(u_j)         conv3x3-BN-ReLU to filters[i - 1] (filters[0] at 0)
                             x = d_j^1 = conv_block_dec_i(d_j^0)  as conv_block_enc

``segnet_split`` (:class:`SegNet` as the trunk of ``HardParameterSharing``): d_4^1 [B, H, W, filters[0]]
feeds one :class:`DensePredictionHead` per task (conv3x3 -> conv1x1, the official ``pred_task``).

``mtan_segnet`` (:class:`MTANSegNet`): task t owns one attention module per encoder and decoder level
(conv1x1-BN-ReLU-conv1x1-BN-sigmoid); with the shared blocks ``encoder_block_att_i`` /
``decoder_block_att_i`` (conv3x3-BN-ReLU, shared by the tasks)::

    encoder:  a_0 = enc_att_0(g_0^0) * g_0^1;  a_i = enc_att_i([g_i^0 ; p_{i-1}]) * g_i^1
              p_i = maxpool2x2(encoder_block_att_i(a_i))
    decoder:  q_j = decoder_block_att_i(up2(previous))   (previous = p_4, then b_{j-1}; up2 bilinear,
                                                          align_corners=True)
              b_j = dec_att_i([u_j ; q_j]) * d_j^1
    head:     pred_t(b_4)

The masks are recorded as ``intermediates`` ``heads/<task>/encoder_mask_{i}`` / ``decoder_mask_{i}``.

Outputs ``{task: [B, H, W, num_outputs]}``: segmentation logits (the official code returns their
log-softmax: the same cross-entropy), depth, surface normals L2-normalised over the last axis (the task
kind 'normal'). Parameters: ``{"shared": ..., "heads": {task: ...}}``; the attention modules are the
task's (``heads/<task>/encoder_att_{i}`` ...), the shared blocks and the ``*_block_att`` blocks are
``shared`` (Nash-MTL's ``shared_parameters`` count the attention modules as shared too: a gradient
method's task Jacobian here leaves them out, they get only their own task's gradient either way).
BatchNorm: torch defaults (eps 1e-5, momentum 0.1), statistics in ``batch_stats``; a shared
``*_block_att`` block run once per task updates its running statistics once per task, in task order,
as the official model does. Convolutions: Xavier-normal weights, zero biases (the official init).

``arch_kwargs.depth_head = 'ait'`` (default 'conv', the official head) makes a depth task's prediction
layer AiT's soft-token head (``ait.SoftTokenDepthHead``, options in ``arch_kwargs.ait``): in
``segnet_split`` the task's head, in ``mtan_segnet`` its ``pred`` over the task's attended features
(``MTANSegNet(x, train, targets={task: label})`` hands the depth label to that head: AiT's token loss).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.checkpoints import CONV2D, IDENTITY, Rename
from mtl_jax.models.ait import soft_token_heads
from mtl_jax.models.blocks import PerTask, as_float, sow_unless_init
from mtl_jax.models.multitask import HardParameterSharing

SEGNET_FILTERS = (64, 128, 256, 512, 512)
NUM_LEVELS = len(SEGNET_FILTERS)
BN_MOMENTUM = 0.9  # torch momentum 0.1
BN_EPSILON = 1e-5
conv_init = nn.initializers.xavier_normal()


def segnet_filters(width: float) -> tuple[int, ...]:
    """The five levels' channels, 64-128-256-512-512 scaled by ``width`` (at least 1 each)."""
    if width <= 0:
        raise ValueError(f"SegNet width must be > 0, got {width}")
    return tuple(max(1, int(round(f * width))) for f in SEGNET_FILTERS)


def check_image(x, multiple: int = 2 ** NUM_LEVELS, what: str = "SegNet") -> None:
    """Raises naming the shape unless x is [B, H, W, C] with H and W multiples of ``multiple``."""
    if x.ndim != 4 or x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(f"{what} needs images [B, H, W, C] with H and W multiples of {multiple}; got shape "
                         f"{tuple(x.shape)}")


def max_pool_with_positions(x):
    """2x2 stride-2 max pool remembering where each maximum was (torch ``MaxPool2d(2, 2,
    return_indices=True)``). x [B, H, W, C] -> (pooled [B, H/2, W/2, C], positions int32 [B, H/2, 1,
    W/2, 1, C] in 0..3: row-major place in the window of the first maximum, as torch picks). The
    gradient flows to that place only, as torch's."""
    b, h, w, c = x.shape
    windows = x.reshape(b, h // 2, 2, w // 2, 2, c)
    codes = jnp.arange(4, dtype=jnp.int32).reshape(1, 1, 2, 1, 2, 1)
    peak = jax.lax.stop_gradient(windows.max(axis=(2, 4), keepdims=True))
    positions = jnp.where(jax.lax.stop_gradient(windows) == peak, codes, 4).min(axis=(2, 4), keepdims=True)
    pooled = jnp.where(codes == positions, windows, 0).sum(axis=(2, 4))
    return pooled, positions


def max_unpool(x, positions):
    """Inverse of ``max_pool_with_positions`` (torch ``MaxUnpool2d(2, 2)``): x [B, h, w, C] ->
    [B, 2h, 2w, C], each value at the remembered place of its window, zeros elsewhere."""
    b, h, w, c = x.shape
    codes = jnp.arange(4, dtype=jnp.int32).reshape(1, 1, 2, 1, 2, 1)
    out = jnp.where(codes == positions, x.reshape(b, h, 1, w, 1, c), 0)
    return out.reshape(b, 2 * h, 2 * w, c)


def max_pool(x):
    """2x2 stride-2 max pool (torch ``F.max_pool2d(x, 2, 2)``); x [B, H, W, C] -> [B, H/2, W/2, C]."""
    return max_pool_with_positions(x)[0]


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in]: bilinear interpolation weights with ``align_corners=True`` (torch
    ``F.interpolate(..., mode='bilinear', align_corners=True)`` along one axis)."""
    if size_out == 1 or size_in == 1:
        src = np.zeros(size_out)
    else:
        src = np.arange(size_out) * (size_in - 1) / (size_out - 1)
    low = np.clip(np.floor(src).astype(int), 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = src - low
    matrix = np.zeros((size_out, size_in), np.float32)
    np.add.at(matrix, (np.arange(size_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


def resize_bilinear_align_corners(x, height: int, width: int):
    """x [B, h, w, C] -> [B, height, width, C], bilinear with ``align_corners=True`` (two small matmuls)."""
    rows = jnp.asarray(bilinear_matrix(x.shape[1], height), x.dtype)
    cols = jnp.asarray(bilinear_matrix(x.shape[2], width), x.dtype)
    return jnp.einsum("oh,pw,bhwc->bopc", rows, cols, x)


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


class ConvBNReLU(nn.Module):
    """The official ``conv_layer``: conv3x3 (padding 1, bias) -> BatchNorm -> ReLU. [B, H, W, C] -> [B, H, W, features]."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init, name="conv")(x)
        return nn.relu(batch_norm(train, "bn")(x))


class ConvStack(nn.Module):
    """``num_layers`` ConvBNReLU of ``features`` (``layer_{k}``): the official ``conv_block_enc`` /
    ``conv_block_dec`` entries."""

    features: int
    num_layers: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        for k in range(self.num_layers):
            x = ConvBNReLU(self.features, name=f"layer_{k}")(x, train)
        return x


class AttentionMask(nn.Module):
    """The official ``att_layer``: conv1x1 -> BN -> ReLU -> conv1x1 -> BN -> sigmoid.
    [B, H, W, C_in] -> mask [B, H, W, features] in (0, 1)."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (1, 1), kernel_init=conv_init, name="hidden")(x)
        x = nn.relu(batch_norm(train, "hidden_bn")(x))
        x = nn.Conv(self.features, (1, 1), kernel_init=conv_init, name="out")(x)
        return nn.sigmoid(batch_norm(train, "out_bn")(x))


class DensePredictionHead(nn.Module):
    """The official ``pred_task``: conv3x3 (same width, bias) -> conv1x1 to ``num_outputs``; no
    normalisation or activation in between. [B, H, W, C] -> [B, H, W, num_outputs], L2-normalised
    over the last axis when ``normalize`` (surface normals)."""

    num_outputs: int
    normalize: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(x.shape[-1], (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init, name="hidden")(x)
        x = nn.Conv(self.num_outputs, (1, 1), kernel_init=conv_init, name="out")(x)
        return l2_normalize(x) if self.normalize else x


def l2_normalize(x, eps: float = 1e-12):
    """x / ||x|| over the last axis (the official ``t3_pred / torch.norm(t3_pred, dim=1)``; ``eps``
    keeps an all-zero vector finite)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _conv_block_layers(level: int) -> int:
    return 1 if level < 2 else 2


def encoder_level(filters: Sequence[int], level: int, x, train: bool):
    """Shared encoder level ``level`` (call inside a compact method: parameters ``encoder_block_{level}``,
    ``conv_block_enc_{level}`` of the caller). x -> (g^0, g^1, pooled, positions)."""
    g0 = ConvBNReLU(filters[level], name=f"encoder_block_{level}")(x, train)
    g1 = ConvStack(filters[level], _conv_block_layers(level), name=f"conv_block_enc_{level}")(g0, train)
    pooled, positions = max_pool_with_positions(g1)
    return g0, g1, pooled, positions


def decoder_level(filters: Sequence[int], level: int, x, positions, train: bool):
    """Shared decoder level ``level`` (parameters ``decoder_block_{level}``, ``conv_block_dec_{level}``).
    x [B, h, w, filters[level]] -> (unpooled u, d^0, d^1 [B, 2h, 2w, filters[max(level - 1, 0)]])."""
    out = filters[max(level - 1, 0)]
    unpooled = max_unpool(x, positions)
    d0 = ConvBNReLU(out, name=f"decoder_block_{level}")(unpooled, train)
    d1 = ConvStack(out, _conv_block_layers(level), name=f"conv_block_dec_{level}")(d0, train)
    return unpooled, d0, d1


def segnet_features(filters: Sequence[int], x, train: bool) -> dict:
    """The shared encoder-decoder (call inside a compact method). x [B, H, W, 3] -> {'encoder': [(g^0,
    g^1)] per level, 'unpooled': [u_j] per decoder step, 'decoder': [d_j^1] per decoder step}."""
    check_image(x)
    x = as_float(x)
    encoder, positions = [], []
    for level in range(NUM_LEVELS):
        g0, g1, x, pos = encoder_level(filters, level, x, train)
        encoder.append((g0, g1))
        positions.append(pos)
    unpooled, decoder = [], []
    for step in range(NUM_LEVELS):
        level = NUM_LEVELS - 1 - step
        u, _, x = decoder_level(filters, level, x, positions[level], train)
        unpooled.append(u)
        decoder.append(x)
    return {"encoder": encoder, "unpooled": unpooled, "decoder": decoder}


class SegNet(nn.Module):
    """The shared SegNet of ``model_segnet_split.py`` as a trunk: x [B, H, W, 3] -> the last decoder
    features [B, H, W, filters[0]] (H, W multiples of 32; uint8 images scaled to [0, 1])."""

    width: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        return segnet_features(segnet_filters(self.width), x, train)["decoder"][-1]


class MTANSegNetShared(nn.Module):
    """MTAN-SegNet's shared parameters, run part by part: ``part`` 'features' (x -> ``segnet_features``),
    'encoder_block_att' / 'decoder_block_att' (level ``level``'s shared attention block, conv3x3-BN-ReLU)."""

    filters: Sequence[int]

    @nn.compact
    def __call__(self, part: str, x, train: bool = False, level: int = 0):
        f = self.filters
        if part == "features":
            return segnet_features(f, x, train)
        if part == "encoder_block_att":  # filters[i] -> filters[i + 1] (level 4: filters[4])
            return ConvBNReLU(f[min(level + 1, NUM_LEVELS - 1)], name=f"encoder_block_att_{level}")(x, train)
        if part == "decoder_block_att":  # filters[i] -> filters[i - 1] (levels 0 and 4 keep the width)
            out = f[level] if level in (0, NUM_LEVELS - 1) else f[level - 1]
            return ConvBNReLU(out, name=f"decoder_block_att_{level}")(x, train)
        raise ValueError(f"unknown MTAN-SegNet shared part {part!r}")


class MTANSegNetTask(nn.Module):
    """One task's parameters in MTAN-SegNet: ``encoder_att_{i}``, ``decoder_att_{i}`` (AttentionMask)
    and ``pred`` (DensePredictionHead, or ``pred_head`` when given, e.g. AiT's soft-token depth head).
    ``part`` 'encoder_att' / 'decoder_att': the masked features ``mask(inputs) * features`` (the mask
    sown as ``encoder_mask_{i}`` / ``decoder_mask_{i}``); 'pred': the prediction from ``inputs``
    (``target``, the task's label, goes to ``pred_head`` as ``depth_target``: AiT's token loss)."""

    num_outputs: int
    normalize: bool = False
    pred_head: nn.Module | None = None

    @nn.compact
    def __call__(self, part: str, inputs, features=None, train: bool = False, level: int = 0, target=None):
        if part == "pred":
            if self.pred_head is not None:
                kwargs = {} if target is None else {"depth_target": target}
                return self.pred_head.clone(parent=self, name="pred")(inputs, train, **kwargs)
            return DensePredictionHead(self.num_outputs, self.normalize, name="pred")(inputs, train)
        if part not in ("encoder_att", "decoder_att"):
            raise ValueError(f"unknown MTAN-SegNet task part {part!r}")
        mask = AttentionMask(features.shape[-1], name=f"{part}_{level}")(inputs, train)
        sow_unless_init(self, f"{part.split('_')[0]}_mask_{level}", mask)
        return mask * features


class MTANSegNet(nn.Module):
    """MTAN on SegNet (module docstring). x [B, H, W, 3] -> {task: [B, H, W, n_t]}.

    ``tasks``: {task name: (num_outputs, normalize)}; ``width`` scales every level's channels;
    ``pred_heads``: {task name: module} replacing that task's ``pred`` (DensePredictionHead), reading
    the task's attended features b_4. ``targets``: {task name: label batch}; a task with a
    ``pred_heads`` entry gets its label as ``depth_target`` (``ait.SoftTokenDepthHead`` then sows AiT's
    token loss), other tasks' labels are not read."""

    tasks: Mapping[str, tuple]
    width: float = 1.0
    pred_heads: Mapping[str, nn.Module] | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, targets: Mapping | None = None):
        filters = segnet_filters(self.width)
        shared = MTANSegNetShared(filters, name="shared")
        pred_heads = self.pred_heads or {}
        towers = PerTask({t: MTANSegNetTask(n, normalize, pred_heads.get(t), parent=None)
                          for t, (n, normalize) in self.tasks.items()}, name="heads")
        names = list(self.tasks)
        g = shared("features", x, train)
        enc, unpooled, dec = g["encoder"], g["unpooled"], g["decoder"]
        prev = {}
        for level in range(NUM_LEVELS):
            g0, g1 = enc[level]
            inputs = {t: g0 if level == 0 else jnp.concatenate([g0, prev[t]], axis=-1) for t in names}
            attended = towers({t: ("encoder_att", inputs[t], g1, train, level) for t in names})
            prev = {t: max_pool(shared("encoder_block_att", attended[t], train, level)) for t in names}
        for step in range(NUM_LEVELS):
            level = NUM_LEVELS - 1 - step
            u = unpooled[step]
            up = {t: resize_bilinear_align_corners(prev[t], u.shape[1], u.shape[2]) for t in names}
            q = {t: shared("decoder_block_att", up[t], train, level) for t in names}
            prev = towers({t: ("decoder_att", jnp.concatenate([u, q[t]], axis=-1), dec[step], train, level)
                           for t in names})
        targets = {t: y for t, y in (targets or {}).items() if t in pred_heads}
        return towers({t: ("pred", prev[t], None, train, 0, targets.get(t)) for t in names})


def dense_task_outputs(tasks: Sequence) -> dict:
    """{task name: (num_outputs, normalize)}: normals (kind 'normal') are L2-normalised."""
    return {t.name: (t.num_outputs, getattr(t, "kind", "") == "normal") for t in tasks}


def arch_options(cfg, valid: Sequence[str], model: str) -> dict:
    """``cfg.arch_kwargs`` as a dict; raises naming the unknown options and the valid ones."""
    kwargs = dict(cfg.get("arch_kwargs") or {})
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model '{model}'; valid options: {list(valid)}")
    return kwargs


ARCH_OPTIONS = ("width", "depth_head", "ait")


def build_segnet_split(cfg, tasks: Sequence) -> nn.Module:
    """``segnet_split``: SegNet trunk + one DensePredictionHead per task. arch_kwargs: width=1.0,
    depth_head='conv' | 'ait' (depth tasks get ``ait.SoftTokenDepthHead``, options in ``ait``)."""
    kwargs = arch_options(cfg, ARCH_OPTIONS, "segnet_split")
    ait_heads = soft_token_heads(kwargs, tasks, "segnet_split")
    heads = {name: ait_heads[name] if name in ait_heads else DensePredictionHead(n, normalize)
             for name, (n, normalize) in dense_task_outputs(tasks).items()}
    return HardParameterSharing(trunk=SegNet(kwargs.get("width", 1.0)), heads=heads)


def build_mtan_segnet(cfg, tasks: Sequence) -> nn.Module:
    """``mtan_segnet``: MTAN-SegNet. arch_kwargs: width=1.0, depth_head='conv' | 'ait' (a depth task's
    ``pred`` becomes ``ait.SoftTokenDepthHead`` over its attended features, options in ``ait``)."""
    kwargs = arch_options(cfg, ARCH_OPTIONS, "mtan_segnet")
    ait_heads = soft_token_heads(kwargs, tasks, "mtan_segnet")
    return MTANSegNet(tasks=dense_task_outputs(tasks), width=kwargs.get("width", 1.0), pred_heads=ait_heads or None)


SEGNET_MODELS = {"segnet_split": build_segnet_split, "mtan_segnet": build_mtan_segnet}


# ----------------------------------------------------------------------------------------------------
# The official checkpoints' names (model_segnet_mtan.py / nash-mtl ``SegNetMtan.segnet``).

def _conv_renames(source: str, target: tuple) -> list[Rename]:
    return [Rename(f"{source}.weight", ("params", *target, "kernel"), CONV2D),
            Rename(f"{source}.bias", ("params", *target, "bias"), IDENTITY)]


def _bn_renames(source: str, target: tuple) -> list[Rename]:
    return [Rename(f"{source}.{name}", (collection, *target, flax_name), IDENTITY)
            for name, collection, flax_name in (("weight", "params", "scale"), ("bias", "params", "bias"),
                                                ("running_mean", "batch_stats", "mean"),
                                                ("running_var", "batch_stats", "var"))]


def _conv_layer_renames(source: str, target: tuple) -> list[Rename]:
    """torch ``conv_layer`` (Sequential conv, BN, ReLU) -> ConvBNReLU."""
    return _conv_renames(f"{source}.0", (*target, "conv")) + _bn_renames(f"{source}.1", (*target, "bn"))


def mtan_segnet_renames(task_names: Sequence[str], prefix: str = "") -> list[Rename]:
    """Official MTAN-SegNet state-dict names -> ``MTANSegNet`` variables ``{"params", "batch_stats"}``.

    ``task_names``: our task names in the official order (task 1 segmentation, 2 depth, 3 normals:
    ``encoder_att.{j}`` / ``pred_task{j + 1}`` -> ``heads/<task_names[j]>``); ``prefix``: e.g.
    'segnet.' for nash-mtl's ``SegNetMtan``. ``num_batches_tracked`` and ``logsigma`` are not weights
    of the network (drop them before ``load_into``)."""
    renames = []
    for level in range(NUM_LEVELS):
        for kind, part in (("encoder_block", "enc"), ("decoder_block", "dec")):
            renames += _conv_layer_renames(f"{prefix}{kind}.{level}", ("shared", f"{kind}_{level}"))
            block = f"{prefix}conv_block_{part}.{level}"
            target = ("shared", f"conv_block_{part}_{level}")
            if _conv_block_layers(level) == 1:
                renames += _conv_layer_renames(block, (*target, "layer_0"))
            else:
                for k in range(2):
                    renames += _conv_layer_renames(f"{block}.{k}", (*target, f"layer_{k}"))
            renames += _conv_layer_renames(f"{prefix}{kind}_att.{level}", ("shared", f"{kind}_att_{level}"))
    for j, task in enumerate(task_names):
        for kind in ("encoder_att", "decoder_att"):
            for level in range(NUM_LEVELS):
                source, target = f"{prefix}{kind}.{j}.{level}", ("heads", task, f"{kind}_{level}")
                renames += (_conv_renames(f"{source}.0", (*target, "hidden"))
                            + _bn_renames(f"{source}.1", (*target, "hidden_bn"))
                            + _conv_renames(f"{source}.3", (*target, "out"))
                            + _bn_renames(f"{source}.4", (*target, "out_bn")))
        renames += (_conv_renames(f"{prefix}pred_task{j + 1}.0", ("heads", task, "pred", "hidden"))
                    + _conv_renames(f"{prefix}pred_task{j + 1}.1", ("heads", task, "pred", "out")))
    return renames
