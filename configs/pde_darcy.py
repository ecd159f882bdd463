"""MT-DeepONet on the 2D Darcy flow -div(k grad u) = 10, one task per geometry (square, lshape,
hole; ``mtl_jax.data.pde``), random log-normal permeability k; geometry mask in the branch
input and in the loss (masked MSE); test metric relative L2.

``:smoke`` shrinks it to a seconds-long run; ``:task=lshape`` trains a single-task DeepONet.
"""

from mtl_jax.config import default_config, parse_arg, smoke
from mtl_jax.data.pde import darcy_grid_shape


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, task="")
    config = default_config()
    config.data.name = "pde_darcy"
    config.data.num_train, config.data.num_test = 1000, 200
    config.data.tasks = (arg.task,) if arg.task else ()
    config.model.name = "deeponet"
    config.model.arch_kwargs.update(dict(grid_shape=darcy_grid_shape(), branch_features=(128, 128),
                                         trunk_features=(128, 128, 64)))
    config.optim.update(dict(name="adam", lr=1e-3, schedule="cosine"))
    config.batch_size = 64
    config.num_steps = 3000
    config.eval_batch_size = 200
    config.log_every = 100
    config.checkpoint.every = 1000
    if arg.smoke:
        smoke(config)
        config.data.num_train, config.data.num_test = 128, 64
        config.model.arch_kwargs.update(dict(branch_features=(32,), trunk_features=(32, 16)))
    return config
