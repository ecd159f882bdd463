"""LibMTL's NYUv2 model: a dilated ResNet encoder (output stride 8) shared by the tasks, one DeepLabV3
ASPP decoder per task, predictions upsampled to the input size.

Follows LibMTL ``examples/nyu/main.py`` (``resnet_dilated('resnet50')`` + ``DeepLabHead(2048, n_t)``
per task, hard parameter sharing, ``process_preds``: bilinear ``align_corners=True`` upsampling to the
image size), ``LibMTL/model/resnet_dilated.py`` (strides of stages 3 and 4 removed, their convs
dilated: ``ResNet(output_stride=8)``) and ``examples/nyu/aspp.py`` (Chen et al. 2017, "Rethinking
Atrous Convolution for Semantic Image Segmentation", DeepLabV3)::

    shared:  ResNet stem, stages 1-4                     x [B, H, W, 3] -> [B, H/8, W/8, 2048]
    head t:  ASPP: 1x1 conv | 3x3 conv dilation 12 | 24 | 36 | global average pool -> 1x1 conv,
                   each -> 256 + BN + ReLU (the pooled branch broadcast back)   -> concat [.., 1280]
                   -> 1x1 conv 256 + BN + ReLU + Dropout(0.5)
             conv3x3 256 (no bias) + BN + ReLU -> conv1x1 n_t (bias)           [B, H/8, W/8, n_t]
             bilinear (align_corners=True) to [B, H, W, n_t]; normals L2-normalised (LibMTL's normal
             loss and metric normalise the upsampled prediction)

H and W must be multiples of 8. The shared parameters are a ``ResNet``'s with torchvision's names
unchanged: torchvision's ImageNet weights (``models.pretrained.resnet.load_resnet(path, 50,
num_classes=0)``) are ``params['shared']`` / ``batch_stats['shared']`` as they are (``weights.fill_trunks``
matches them too). Parameters ``{"shared": <ResNet>, "heads": {task: <DeepLabHead>}}``; BatchNorm statistics
in ``batch_stats``; the head's dropout needs a 'dropout' rng in training. ``arch_kwargs.depth_head =
'ait'`` replaces a depth task's DeepLabHead by :class:`ASPPSoftTokenHead` (ASPP, then AiT's soft-token
head on the stride-8 features; options in ``arch_kwargs.ait``, see ``models/ait.py``).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from mtl_jax.models.ait import soft_token_heads
from mtl_jax.models.multitask import HardParameterSharing
from mtl_jax.models.pretrained.resnet import DEPTHS, EXPANSION, STAGE_PLANES, ResNet, batch_norm, conv
from mtl_jax.models.segnet import (arch_options, check_image, dense_task_outputs, l2_normalize,
                                   resize_bilinear_align_corners)

ASPP_RATES = (12, 24, 36)
ASPP_FEATURES = 256


class DilatedResNet(ResNet):
    """A ``ResNet`` whose call returns the feature map: x [B, H, W, C] -> [B, H / output_stride,
    W / output_stride, 512 * expansion] (default output stride 8, LibMTL's ``resnet_dilated``)."""

    output_stride: int = 8

    def __call__(self, x, train: bool = False):
        check_image(x, self.output_stride, f"ResNet with output stride {self.output_stride}")
        return self.feature_map(x, train)


class ConvBNReLU(nn.Module):
    """Bias-free conv (``kernel``, ``dilation``, 'same' padding) -> BatchNorm -> ReLU (aspp.py's blocks)."""

    features: int
    kernel: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = conv(self.features, self.kernel, 1, "conv", self.dilation)(x)
        return nn.relu(batch_norm(train, "bn")(x))


class ASPP(nn.Module):
    """DeepLabV3 atrous spatial pyramid pooling (LibMTL ``examples/nyu/aspp.py`` ``ASPP``).
    x [B, h, w, C] -> [B, h, w, features]."""

    rates: Sequence[int] = ASPP_RATES
    features: int = ASPP_FEATURES
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        branches = [ConvBNReLU(self.features, 1, name="branch_0")(x, train)]
        branches += [ConvBNReLU(self.features, 3, rate, name=f"branch_{k + 1}")(x, train)
                     for k, rate in enumerate(self.rates)]
        pooled = ConvBNReLU(self.features, 1, name="pool")(x.mean(axis=(1, 2), keepdims=True), train)
        branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.features,)))
        y = ConvBNReLU(self.features, 1, name="project")(jnp.concatenate(branches, axis=-1), train)
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class DeepLabHead(nn.Module):
    """LibMTL's ``DeepLabHead`` + upsampling: ASPP -> conv3x3 + BN + ReLU -> conv1x1 ``num_outputs``,
    then bilinear (align_corners=True) by ``upsample``. [B, h, w, C] -> [B, h * upsample, w * upsample,
    num_outputs], L2-normalised over the last axis when ``normalize``."""

    num_outputs: int
    normalize: bool = False
    upsample: int = 8
    rates: Sequence[int] = ASPP_RATES
    features: int = ASPP_FEATURES

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = ASPP(self.rates, self.features, name="aspp")(x, train)
        y = ConvBNReLU(self.features, 3, name="conv")(y, train)
        y = nn.Conv(self.num_outputs, (1, 1), name="out")(y)
        y = resize_bilinear_align_corners(y, x.shape[1] * self.upsample, x.shape[2] * self.upsample)
        return l2_normalize(y) if self.normalize else y


class ASPPSoftTokenHead(nn.Module):
    """AiT's depth output on the ASPP decoder: ASPP (as DeepLabHead's, ``aspp``) -> ``soft_token_head``
    (parameters ``soft_token``; an ``ait.SoftTokenDepthHead`` whose ``feature_stride`` is the encoder's
    output stride: token logits from the ASPP features, decoded to depth at the input size).
    [B, h, w, C] -> [B, h s, w s, 1];
    ``depth_target`` [B, h s, w s, 1] goes to the soft-token head (AiT's token loss)."""

    soft_token_head: nn.Module
    rates: Sequence[int] = ASPP_RATES
    features: int = ASPP_FEATURES

    @nn.compact
    def __call__(self, x, train: bool = False, depth_target=None):
        y = ASPP(self.rates, self.features, name="aspp")(x, train)
        return self.soft_token_head.clone(parent=self, name="soft_token")(y, train, depth_target=depth_target)


ARCH_OPTIONS = ("depth", "output_stride", "aspp_rates", "aspp_features", "depth_head", "ait")


def build_resnet_aspp(cfg, tasks: Sequence) -> nn.Module:
    """``resnet_aspp``: dilated ResNet + one DeepLabHead per task. arch_kwargs: depth=50 (18, 34, 50,
    101, 152), output_stride=8 (8, 16, 32), aspp_rates=(12, 24, 36), aspp_features=256,
    depth_head='conv' | 'ait' (depth tasks get an ``ASPPSoftTokenHead``, options in ``ait``)."""
    kwargs = arch_options(cfg, ARCH_OPTIONS, "resnet_aspp")
    depth = kwargs.get("depth", 50)
    if depth not in DEPTHS:
        raise ValueError(f"resnet_aspp: arch_kwargs.depth {depth} unknown; valid depths: {sorted(DEPTHS)}")
    stage_sizes, block = DEPTHS[depth]
    output_stride = kwargs.get("output_stride", 8)
    trunk = DilatedResNet(stage_sizes=stage_sizes, block=block, output_stride=output_stride)
    rates, features = tuple(kwargs.get("aspp_rates", ASPP_RATES)), kwargs.get("aspp_features", ASPP_FEATURES)
    ait_heads = soft_token_heads(kwargs, tasks, "resnet_aspp", feature_stride=output_stride)
    heads = {name: ASPPSoftTokenHead(ait_heads[name], rates, features) if name in ait_heads
             else DeepLabHead(n, normalize, output_stride, rates, features)
             for name, (n, normalize) in dense_task_outputs(tasks).items()}
    return HardParameterSharing(trunk=trunk, heads=heads)


def encoder_features(depth: int = 50) -> int:
    """Channels of the dilated ResNet's feature map (2048 for ResNet-50, 512 for ResNet-18)."""
    return STAGE_PLANES[-1] * EXPANSION[DEPTHS[depth][1]]


DENSE_RESNET_MODELS = {"resnet_aspp": build_resnet_aspp}
