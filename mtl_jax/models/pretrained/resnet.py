"""ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition") in flax linen, in
torchvision's layout (``torchvision.models.resnet``), so torchvision state dicts load by name.

torchvision's version: stem conv 7x7 s2 pad 3 (64) -> BN -> ReLU -> max pool 3x3 s2 pad 1; four stages
of 64, 128, 256, 512 planes, the first block of stages 2-4 strided; bottleneck blocks stride their 3x3
conv ("ResNet v1.5"); a projection shortcut (conv 1x1 strided + BN) where the shape changes; global
average pool; ``fc``. BatchNorm eps 1e-5, momentum 0.9 (torch momentum 0.1).

Flax names (torchvision names): ``conv1``, ``bn1``, ``layer{s}_{b}`` (``layer{s}.{b}``) holding
``conv1``/``bn1``, ``conv2``/``bn2``, [``conv3``/``bn3``], ``downsample_conv``/``downsample_bn``
(``downsample.0`` / ``downsample.1``), ``fc``.

Input [B, H, W, C]: float images already normalised, or uint8 (``normalise_images``: scaled to
[0, 1], then normalised with ``input_mean`` / ``input_std``, ImageNet's, when C is 3). ``conv1`` takes
C from the input (torchvision's ``conv1`` with other input channels loads too).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.checkpoints import CONV2D, IDENTITY, LINEAR, Rename, export, load_into, read_checkpoint
from mtl_jax.models.trunks import remat_block

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}
DEPTHS = {18: ((2, 2, 2, 2), "basic"), 34: ((3, 4, 6, 3), "basic"), 50: ((3, 4, 6, 3), "bottleneck"),
          101: ((3, 4, 23, 3), "bottleneck"), 152: ((3, 8, 36, 3), "bottleneck")}


def normalise_images(x, mean: Sequence[float], std: Sequence[float]):
    """uint8 images [..., C] -> float32 ``x / 255``, then ``(x - mean) / std`` when C == len(mean)
    (other channel counts stay in [0, 1], as ``models.blocks.as_float`` scales them); floating inputs
    unchanged (normalised by the caller)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x
    x = x.astype(jnp.float32) / 255.0
    if x.shape[-1] != len(mean):
        return x
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """torchvision's BatchNorm: batch statistics in training, running ones in evaluation."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def conv(features: int, kernel: int, stride: int, name: str, dilation: int = 1) -> nn.Conv:
    """torchvision's bias-free conv with padding ``dilation * (kernel // 2)`` on each side."""
    pad = dilation * (kernel // 2)
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                   kernel_dilation=dilation, use_bias=False, name=name)


class ResidualBlock(nn.Module):
    """torchvision's ``BasicBlock`` (3x3 -> 3x3, ``block='basic'``) or ``Bottleneck`` (1x1 -> 3x3 strided
    -> 1x1 to 4 ``planes``, ``block='bottleneck'``), each conv followed by BN, ReLU after all but the
    last; ReLU(branch + shortcut). x [B, H, W, C] -> [B, H / stride, W / stride, planes * expansion].

    ``dilation``: of the 3x3 convs; ``entry_dilation``: of the 3x3 conv that carries the stride
    (basic: conv1, bottleneck: conv2; 0: ``dilation``); LibMTL's ``resnet_dilated`` output stride 8
    removes the strides of stages 3 and 4 and dilates their convs (see ``ResNet.output_stride``)."""

    planes: int
    stride: int = 1
    block: str = "basic"
    dilation: int = 1
    entry_dilation: int = 0

    @nn.compact
    def __call__(self, x, train: bool = False):
        out_features = self.planes * EXPANSION[self.block]
        entry = self.entry_dilation or self.dilation
        if self.block == "basic":
            y = nn.relu(batch_norm(train, "bn1")(conv(self.planes, 3, self.stride, "conv1", entry)(x)))
            y = batch_norm(train, "bn2")(conv(self.planes, 3, 1, "conv2", self.dilation)(y))
        else:
            y = nn.relu(batch_norm(train, "bn1")(conv(self.planes, 1, 1, "conv1")(x)))
            y = nn.relu(batch_norm(train, "bn2")(conv(self.planes, 3, self.stride, "conv2", entry)(y)))
            y = batch_norm(train, "bn3")(conv(out_features, 1, 1, "conv3")(y))
        if self.stride != 1 or x.shape[-1] != out_features:
            x = batch_norm(train, "downsample_bn")(conv(out_features, 1, self.stride, "downsample_conv")(x))
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet trunk: ``module(x [B, H, W, C], train) -> [B, 512 * expansion]`` (global average pool,
    the trunk contract of ``models/trunks.py``); ``feature_map`` gives the last stage's [B, H / s, W / s,
    512 * expansion] (s = ``output_stride``); ``logits`` [B, num_classes] through ``fc`` (``num_classes`` 0: no classifier).
    BatchNorm running statistics live in ``batch_stats`` (updated when ``train``).

    ``stage_sizes``: blocks per stage (ResNet-18: (2, 2, 2, 2), ResNet-50: (3, 4, 6, 3)); ``block``:
    'basic' or 'bottleneck'. ``remat``: every residual block runs under ``nn.remat``.

    ``output_stride`` 32 (torchvision), 16 or 8: the feature map's stride. Below 32 the last stage (16)
    or the last two (8) keep their input resolution: a dilated stage (dilation d: 2 for stage 3 at 8
    and stage 4 at 16, 4 for stage 4 at 8) has stride 1 everywhere, dilation d / 2 in the 3x3 conv of
    its first block that carried the stride and d in its other 3x3 convs, as LibMTL's ``ResnetDilated``
    (``LibMTL/model/resnet_dilated.py``, ``_nostride_dilate``) makes of a torchvision ResNet; parameter names and shapes are unchanged, so
    torchvision weights load as they are."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    num_classes: int = 0
    input_mean: Sequence[float] = IMAGENET_MEAN
    input_std: Sequence[float] = IMAGENET_STD
    remat: bool = False
    output_stride: int = 32

    def setup(self):
        if self.block not in EXPANSION:
            raise ValueError(f"ResNet block must be one of {sorted(EXPANSION)}, got {self.block!r}")
        if len(self.stage_sizes) > len(STAGE_PLANES):
            raise ValueError(f"ResNet stage_sizes has {len(self.stage_sizes)} stages; at most {len(STAGE_PLANES)}")
        self.conv1 = conv(64, 7, 2, "conv1")
        self.bn1 = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
        block = remat_block(ResidualBlock, self.remat)
        dilations = stage_dilations(self.output_stride, len(self.stage_sizes))
        self.blocks = [block(planes, 2 if s > 0 and b == 0 and dilations[s] == 1 else 1, self.block,
                             dilation=dilations[s], entry_dilation=max(dilations[s] // 2, 1) if b == 0 else 0,
                             name=f"layer{s + 1}_{b}")
                       for s, (size, planes) in enumerate(zip(self.stage_sizes, STAGE_PLANES)) for b in range(size)]
        if self.num_classes:
            self.fc = nn.Dense(self.num_classes)

    def feature_map(self, x, train: bool = False):
        """x [B, H, W, C] -> the last stage's output [B, ~H / output_stride, ~W / output_stride,
        planes * expansion]."""
        x = normalise_images(x, self.input_mean, self.input_std)
        x = nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x = block(x, train)
        return x

    def __call__(self, x, train: bool = False):
        """x [B, H, W, C] -> pooled features [B, planes * expansion]."""
        return self.feature_map(x, train).mean(axis=(1, 2))

    def logits(self, x, train: bool = False):
        """x [B, H, W, C] -> logits [B, num_classes]."""
        if not self.num_classes:
            raise ValueError("ResNet.logits needs num_classes > 0 (the model has no fc classifier)")
        return self.fc(self(x, train))


OUTPUT_STRIDES = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}


def stage_dilations(output_stride: int, num_stages: int = 4) -> tuple[int, ...]:
    """Each stage's dilation for ``output_stride`` (1: the stage strides as torchvision's)."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"ResNet output_stride must be one of {sorted(OUTPUT_STRIDES)}, got {output_stride}")
    return OUTPUT_STRIDES[output_stride][:num_stages]


def resnet18(num_classes: int = 0, **kwargs) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2) -> [B, 512]."""
    return ResNet(stage_sizes=DEPTHS[18][0], block=DEPTHS[18][1], num_classes=num_classes, **kwargs)


def resnet50(num_classes: int = 0, **kwargs) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3) -> [B, 2048]."""
    return ResNet(stage_sizes=DEPTHS[50][0], block=DEPTHS[50][1], num_classes=num_classes, **kwargs)


def batch_norm_renames(source: str, target: tuple) -> list[Rename]:
    """torch ``BatchNorm2d`` ``<source>.weight`` / ``.bias`` / ``.running_mean`` / ``.running_var`` ->
    flax ``("params", *target, "scale" / "bias")``, ``("batch_stats", *target, "mean" / "var")``."""
    return [Rename(f"{source}.{torch_name}", (collection, *target, flax_name), IDENTITY)
            for torch_name, collection, flax_name in (("weight", "params", "scale"), ("bias", "params", "bias"),
                                                      ("running_mean", "batch_stats", "mean"),
                                                      ("running_var", "batch_stats", "var"))]


def _conv_bn(source: str, target: tuple, conv_name: str, bn_name: str, flax_conv: str, flax_bn: str) -> list[Rename]:
    """Renames of the bias-free conv ``<source><conv_name>.weight`` and its BatchNorm ``<source><bn_name>.*``."""
    return ([Rename(f"{source}{conv_name}.weight", ("params", *target, flax_conv, "kernel"), CONV2D)]
            + batch_norm_renames(f"{source}{bn_name}", (*target, flax_bn)))


def _stages(depth_or_stages) -> tuple[Sequence[int], str]:
    if isinstance(depth_or_stages, int):
        if depth_or_stages not in DEPTHS:
            raise ValueError(f"ResNet depth {depth_or_stages} unknown; valid depths: {sorted(DEPTHS)}")
        return DEPTHS[depth_or_stages]
    return depth_or_stages


def resnet_renames(depth: int | tuple = 18, num_classes: int = 1000) -> list[Rename]:
    """torchvision ResNet names (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``layer1.0.downsample.0``
    / ``.1``, ``fc``) -> ``ResNet`` variables ``{"params", "batch_stats"}``. ``depth``: 18, 34, 50,
    101, 152, or ``(stage_sizes, block)``. Convs OIHW -> HWIO, BatchNorm weight / bias / running_mean
    / running_var -> scale / bias (params), mean / var (batch_stats); ``num_batches_tracked`` is not
    loaded (``export_resnet`` writes zeros). ``num_classes`` 0: no ``fc``."""
    stage_sizes, block = _stages(depth)
    renames = _conv_bn("", (), "conv1", "bn1", "conv1", "bn1")
    convs = 2 if block == "basic" else 3
    in_features = 64
    for s, size in enumerate(stage_sizes):
        out_features = STAGE_PLANES[s] * EXPANSION[block]
        for b in range(size):
            source, target = f"layer{s + 1}.{b}.", (f"layer{s + 1}_{b}",)
            for c in range(1, convs + 1):
                renames += _conv_bn(source, target, f"conv{c}", f"bn{c}", f"conv{c}", f"bn{c}")
            if b == 0 and (s > 0 or in_features != out_features):
                renames += _conv_bn(source, target, "downsample.0", "downsample.1", "downsample_conv", "downsample_bn")
            in_features = out_features
    if num_classes:
        renames += [Rename("fc.weight", ("params", "fc", "kernel"), LINEAR),
                    Rename("fc.bias", ("params", "fc", "bias"), IDENTITY)]
    return renames


def without_num_batches_tracked(state: dict) -> dict:
    """``state`` without BatchNorm ``num_batches_tracked`` counters (torch bookkeeping, not weights)."""
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def with_num_batches_tracked(state: dict) -> dict:
    """``state`` with an int64 zero ``<bn>.num_batches_tracked`` after every ``<bn>.running_var``."""
    out = {}
    for k, v in state.items():
        out[k] = v
        if k.endswith(".running_var"):
            out[k[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


def variables_template(module: ResNet, image_size: int = 224, channels: int = 3) -> dict:
    """``module``'s variables ``{"params", "batch_stats"}`` as ShapeDtypeStructs (nothing computed)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    method = module.logits if module.num_classes else module.__call__
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, method=method), x)


def load_resnet(path_or_state, depth: int | tuple = 18, num_classes: int | None = None, **module_kwargs):
    """-> ``(ResNet, variables)`` from a torchvision ResNet state dict (a file ``read_checkpoint`` reads:
    safetensors, torch zip or legacy; or a ``{name: array}`` mapping). ``depth``: 18, 34, 50, 101, 152
    or ``(stage_sizes, block)``. ``num_classes``: None, the checkpoint's ``fc`` rows; 0, the trunk alone
    (``fc`` ignored). Input channels: ``conv1``'s. Raises ``CheckpointMismatchError`` naming missing /
    unexpected / mis-shaped tensors."""
    stage_sizes, block = _stages(depth)
    what = f"ResNet-{depth}" if isinstance(depth, int) else "ResNet"
    if isinstance(path_or_state, str):
        what += f" ({path_or_state})"
        state = read_checkpoint(path_or_state)
    else:
        state = dict(path_or_state)
    state = without_num_batches_tracked(state)
    if num_classes is None:
        num_classes = int(np.shape(state["fc.weight"])[0]) if "fc.weight" in state else 0
    if not num_classes:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    module = ResNet(stage_sizes=stage_sizes, block=block, num_classes=num_classes, **module_kwargs)
    renames = resnet_renames((stage_sizes, block), num_classes)
    channels = int(np.shape(state["conv1.weight"])[1]) if "conv1.weight" in state else 3
    return module, load_into(variables_template(module, channels=channels), state, renames, what=what)


def export_resnet(variables: dict, depth: int | tuple = 18, num_classes: int = 1000) -> dict[str, np.ndarray]:
    """``variables`` of a ``ResNet`` -> the torchvision state dict ``{name: np.ndarray}``
    (``num_batches_tracked`` zeros), ready for ``write_safetensors``."""
    return with_num_batches_tracked(export(variables, resnet_renames(depth, num_classes)))
