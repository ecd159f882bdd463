"""MultiMNIST (left / right digit), Learning-to-Branch architecture, equal weighting.

Learning-to-Branch (Guo et al. 2020): one staged LeNet per digit, Gumbel-softmax branching between
stages. ``:smoke`` shrinks it to a seconds-long run; options: ``mtl_jax.models.architectures``.
"""

import math
import os

from mtl_jax.config import default_config, parse_arg, smoke

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    config = default_config()
    config.data.name = "multimnist"
    config.model.name = "ltb"
    config.model.trunk = "lenet"
    config.model.trunk_kwargs.width = 1
    config.model.head = "mlp"
    config.model.head_kwargs.hidden = (50,)
    config.optim.update(dict(name="adam", lr=2e-3, schedule="cosine"))
    config.batch_size = 256
    config.num_epochs = 10.0
    # LibMTL's schedule in epochs of this run: warm-up in epoch 0, then tau = epochs / 20 / sqrt(epoch + 1).
    config.model.arch_kwargs.epochs = int(config.num_epochs)
    config.model.arch_kwargs.steps_per_epoch = math.ceil(config.data.num_train / config.batch_size)
    config.baselines = os.path.join(ROOT, "experiments", "results", "multimnist_single_task.json")
    if arg.smoke:
        smoke(config)
        config.model.arch_kwargs.steps_per_epoch = 2  # leave the warm-up within the 20 smoke steps
        config.baselines = ""
    return config
