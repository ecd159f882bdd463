"""MultiMNIST (left / right digit), LeNet hard-parameter sharing, equal weighting.

The default ``make run`` job. ``:smoke`` shrinks it to a seconds-long run; ``:task=left`` trains a
single-task baseline (the same config on one task).
"""

import os

from mtl_jax.config import default_config, parse_arg, smoke

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, task="")
    config = default_config()
    config.data.name = "multimnist"
    config.data.tasks = (arg.task,) if arg.task else ()
    config.model.trunk = "lenet"
    config.model.trunk_kwargs.width = 2  # MGDA's LeNet at twice the channels: both tasks > 85% in 10 epochs
    config.model.head = "mlp"
    config.model.head_kwargs.hidden = (50,)
    config.optim.update(dict(name="adam", lr=2e-3, schedule="cosine"))
    config.batch_size = 256
    config.num_epochs = 10.0
    # Single-task baselines of this same config (experiments/single_task_baselines.py) for Delta-m%.
    config.baselines = "" if arg.task else os.path.join(ROOT, "experiments", "results", "multimnist_single_task.json")
    if arg.smoke:
        smoke(config)
        config.baselines = ""
    return config
