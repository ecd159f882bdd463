"""MultiMNIST (left / right digit) on M3ViT (Liang et al., NeurIPS 2022): a ViT (patch 4, 4 blocks of
width 64) whose every other MLP is a sparse MoE of 8 experts, top-2 per token, one router per task;
linear heads, equal weighting, Switch load balancing (weight 0.01).

``:smoke`` shrinks it to a seconds-long run; options: ``mtl_jax.models.moe_vit``. Expert
parallelism: ``--config.mesh.expert=4`` splits the experts over 4 devices.
"""

from mtl_jax.config import default_config, parse_arg, smoke


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    config = default_config()
    config.data.name = "multimnist"
    config.model.name = "m3vit"
    config.model.head = "linear"
    config.model.head_kwargs = {}
    config.model.arch_kwargs.update(dict(patch_size=4, dim=64, depth=4, num_heads=4, mlp_dim=128, num_experts=8,
                                         top_k=2, capacity_factor=1.25, moe_every=2, load_balance_weight=0.01))
    config.optim.update(dict(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=200))
    config.num_epochs = 10.0
    if arg.smoke:
        smoke(config)
        config.model.arch_kwargs.update(dict(patch_size=7, dim=16, depth=2, num_heads=2, mlp_dim=32, num_experts=4))
        config.optim.warmup_steps = 2
    return config
