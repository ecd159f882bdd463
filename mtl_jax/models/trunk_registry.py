"""Every trunk by name: the small trunks of ``trunks.py`` and the pretrained architectures of
``pretrained/backbones.py``."""

from mtl_jax.models.pretrained.backbones import BACKBONES
from mtl_jax.models.trunks import TRUNKS as SMALL_TRUNKS

TRUNKS = {**SMALL_TRUNKS, **BACKBONES}
