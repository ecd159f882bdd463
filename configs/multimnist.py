"""MultiMNIST (left / right digit), LeNet hard-parameter sharing, equal weighting.

The default ``make run`` job. ``:smoke`` shrinks it to a seconds-long run; ``:task=left`` trains a
single-task baseline (the same config on one task).
"""

from mtl_jax.config import default_config, parse_arg, smoke


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, task="")
    config = default_config()
    config.data.name = "multimnist"
    config.data.tasks = (arg.task,) if arg.task else ()
    config.model.trunk = "lenet"
    config.model.head = "mlp"
    config.model.head_kwargs.hidden = (50,)
    config.optim.lr = 1e-3
    config.batch_size = 256
    config.num_epochs = 10.0
    config.baselines = "experiments/results/multimnist_single_task.json" if not arg.task else ""
    if arg.smoke:
        smoke(config)
        config.baselines = ""
    return config
