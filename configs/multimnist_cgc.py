"""MultiMNIST (left / right digit), CGC architecture, equal weighting.

CGC (Tang et al. 2020): one shared and one task-specific LeNet expert per digit, one gate per digit.
``:smoke`` shrinks it to a seconds-long run; options: ``mtl_jax.models.architectures``.
"""

import os

from mtl_jax.config import default_config, parse_arg, smoke

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    config = default_config()
    config.data.name = "multimnist"
    config.model.name = "cgc"
    config.model.trunk = "lenet"
    config.model.trunk_kwargs.width = 1
    config.model.head = "mlp"
    config.model.head_kwargs.hidden = (50,)
    config.optim.update(dict(name="adam", lr=2e-3, schedule="cosine"))
    config.batch_size = 256
    config.num_epochs = 10.0
    config.model.arch_kwargs.num_shared_experts = 1
    config.model.arch_kwargs.num_specific_experts = 1
    config.baselines = os.path.join(ROOT, "experiments", "results", "multimnist_single_task.json")
    if arg.smoke:
        smoke(config)
        config.baselines = ""
    return config
