"""MultiMNIST (left / right digit), Learning-to-Branch architecture, equal weighting.

Learning-to-Branch (Guo et al. 2020): one staged LeNet per digit, Gumbel-softmax branching between
stages. The rest (data, optimiser, budget, ``:smoke``) is configs/multimnist.py's; options: ``mtl_jax.models.architectures``.
"""

import math
import os

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.model.name = "ltb"
    config.model.trunk_kwargs.width = 1
    # LibMTL's schedule in epochs of this run: warm-up in epoch 0, then tau = epochs / 20 / sqrt(epoch + 1).
    config.model.arch_kwargs.epochs = int(config.num_epochs)
    steps = config.num_steps or math.ceil(config.num_epochs * config.data.num_train / config.batch_size)
    config.model.arch_kwargs.steps_per_epoch = max(1, steps // config.model.arch_kwargs.epochs)
    return config
