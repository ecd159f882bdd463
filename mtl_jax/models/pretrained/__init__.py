"""Pretrained backbones in flax linen with converters from their published checkpoint layouts.

Each ``<family>.py`` holds the module(s) (following the trunk contract of ``models/trunks.py``:
``module(x, train=False) -> [B, D]``), a ``<family>_renames(...)`` function mapping the published
parameter names onto ours (``mtl_jax.checkpoints.Rename``), and ``load_<model>(...)`` functions
reading installed offline assets.
"""
