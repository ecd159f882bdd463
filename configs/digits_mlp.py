"""scikit-learn digits (8x8): digit class, parity and ink regression on an MLP trunk, equal weighting.

A seconds-long real-data config (three task kinds in one model); ``:smoke`` shrinks it further.
"""

from mtl_jax.config import default_config, parse_arg, smoke


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    config = default_config()
    config.data.name = "digits"
    config.model.trunk = "mlp"
    config.model.trunk_kwargs.features = (128, 128)
    config.model.head = "linear"
    config.model.head_kwargs = {}
    config.batch_size = 64
    config.num_epochs = 20.0
    config.eval_batch_size = 512
    config.log_every = 20
    config.checkpoint.every = 200
    if arg.smoke:
        smoke(config)
    return config
