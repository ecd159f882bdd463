"""The pretrained architectures as MTL trunks (``config.model.trunk``), each with its published
configuration as the default options, so ``config.model.pretrained`` weights fit them.

================  ====================================  ===========================
trunk             architecture                          input per example
================  ====================================  ===========================
``bert``          BERT encoder, all-MiniLM-L6-v2 size   token ids [L] int
``efficientnet_lite0``  EfficientNet-Lite0              image [H, W, 3]
``resnet18``      ResNet-18 (torchvision)               image [H, W, 3]
``resnet50``      ResNet-50 (torchvision)               image [H, W, 3]
``vit_b16``       ViT-B/16 (HF layout)                  image [224, 224, 3]
``clip_vit_b32``  CLIP ViT-B/32 image tower             image [224, 224, 3]
================  ====================================  ===========================
"""

from __future__ import annotations

from typing import Sequence

from mtl_jax.models.pretrained.bert import BertEncoder
from mtl_jax.models.pretrained.clip import CLIPImageEncoder
from mtl_jax.models.pretrained.efficientnet_lite import EfficientNetLite0
from mtl_jax.models.pretrained.resnet import ResNet
from mtl_jax.models.pretrained.vit import ViT


class ResNet50(ResNet):
    """ResNet-50: bottleneck blocks, stages (3, 4, 6, 3)."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"


BACKBONES = {"bert": BertEncoder, "efficientnet_lite0": EfficientNetLite0, "resnet18": ResNet, "resnet50": ResNet50,
             "vit_b16": ViT, "clip_vit_b32": CLIPImageEncoder}
IMAGE_BACKBONES = ("efficientnet_lite0", "resnet18", "resnet50", "vit_b16", "clip_vit_b32")
