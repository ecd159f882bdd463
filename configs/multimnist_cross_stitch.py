"""MultiMNIST (left / right digit), Cross-stitch architecture, equal weighting.

Cross-stitch (Misra et al. 2016): one staged LeNet per digit, cross-stitch units between stages.
``:smoke`` shrinks it to a seconds-long run; options: ``mtl_jax.models.architectures``.
"""

import os

from mtl_jax.config import default_config, parse_arg, smoke

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    config = default_config()
    config.data.name = "multimnist"
    config.model.name = "cross_stitch"
    config.model.trunk = "lenet"
    config.model.trunk_kwargs.width = 1
    config.model.head = "mlp"
    config.model.head_kwargs.hidden = (50,)
    config.optim.update(dict(name="adam", lr=2e-3, schedule="cosine"))
    config.batch_size = 256
    config.num_epochs = 10.0
    config.model.arch_kwargs.alpha_self = 1.0
    config.model.arch_kwargs.alpha_other = 1.0
    config.baselines = os.path.join(ROOT, "experiments", "results", "multimnist_single_task.json")
    if arg.smoke:
        smoke(config)
        config.baselines = ""
    return config
