"""Wikipedia vital articles (six tasks on the same English extracts), MiniLM-L6 trunk, equal weighting.

Fine-tuned (default): the pretrained all-MiniLM-L6-v2 encoder (``model.pretrained='minilm_l6'``),
mean-pooled, one linear head per task, AdamW with linear decay after a warm-up, the whole model trained.

``:frozen``: the encoder frozen; its mean-pooled features are computed once (``data.frozen_features``,
cached under the data dir) and a shared 2-layer MLP (trainable) + linear heads train on them, so the
multi-task methods still have shared parameters to act on.

``:smoke`` shrinks either to a seconds-long run; ``:task=topic`` trains a single-task baseline;
``:max_len=64`` tokens per extract (default 128).
"""

from mtl_jax.config import default_config, parse_arg, smoke


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, task="", frozen=False, max_len=128)
    config = default_config()
    config.data.name = "wiki"
    config.data.max_len = arg.max_len
    config.data.tasks = (arg.task,) if arg.task else ()
    config.model.head = "linear"
    config.model.head_kwargs = {}
    config.eval_split = "test"
    config.eval_batch_size = 256
    if arg.frozen:
        config.data.frozen_features = "minilm_l6"
        config.model.trunk = "mlp"
        config.model.trunk_kwargs.features = (384, 384)
        config.optim.update(dict(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=50))
        config.batch_size = 128
        config.num_epochs = 20.0
    else:
        config.model.trunk = "bert"
        config.model.pretrained = "minilm_l6"
        config.optim.update(dict(name="adamw", lr=1e-4, weight_decay=0.01, schedule="linear", warmup_steps=20))
        config.head_optim = {}
        config.batch_size = 32
        config.num_epochs = 2.0
    config.checkpoint.every = 1000
    config.log_every = 50
    if arg.smoke:
        smoke(config)
        config.data.max_examples = 256
        config.data.max_len = 32
        config.batch_size = 16
        config.eval_batch_size = 64
    return config
