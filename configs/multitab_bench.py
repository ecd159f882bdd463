"""MultiTab-Bench (synthetic multitask tabular data: 16 features, three tasks of polynomial degree
1, 2, 3 with task correlation 0.5; task_1 binary classification) on MultiTab-Net, equal weighting.

``:smoke`` shrinks it to a seconds-long run; ``:task=task_0`` trains a single-task baseline.
The generator's knobs (correlation, degrees, ...) are arguments of
``mtl_jax.data.multitab_bench.make_multitab_bench``.
"""

from mtl_jax.config import default_config, parse_arg, smoke


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, task="")
    config = default_config()
    config.data.name = "multitab_bench"
    config.data.num_train, config.data.num_test = 20_000, 5_000
    config.data.tasks = (arg.task,) if arg.task else ()
    config.model.name = "multitab"
    config.model.head = "mlp"
    config.model.head_kwargs.hidden = (64,)
    config.model.arch_kwargs.update(dict(dim=32, depth=2, num_heads=4, mlp_dim=64, mask_tasks=True,
                                         mask_features_to_tasks=False))
    config.optim.update(dict(name="adamw", lr=1e-3, schedule="cosine"))
    config.batch_size = 256
    config.num_epochs = 10.0
    config.eval_batch_size = 1000
    if arg.smoke:
        smoke(config)
        config.model.arch_kwargs.update(dict(dim=16, depth=1, mlp_dim=32))
    return config
