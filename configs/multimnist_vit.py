"""MultiMNIST on a small ViT trunk (patch 4, 4 blocks of width 64), linear heads, equal weighting."""

from mtl_jax.config import default_config, parse_arg, smoke


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    config = default_config()
    config.data.name = "multimnist"
    config.model.trunk = "vit"
    config.model.trunk_kwargs.update(dict(patch_size=4, dim=64, depth=4, num_heads=4, mlp_dim=128))
    config.model.head = "linear"
    config.model.head_kwargs = {}
    config.optim.update(dict(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=200))
    config.num_epochs = 10.0
    if arg.smoke:
        smoke(config)
        config.model.trunk_kwargs.update(dict(dim=32, depth=2, mlp_dim=64))
        config.optim.warmup_steps = 2
    return config
