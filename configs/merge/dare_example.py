"""DARE drop-and-rescale + task arithmetic (Yu et al., ICML 2024) into an orbax checkpoint.

``mtl-jax merge --config configs/merge/dare_example.py --config.model_pool=DIR``. Drop rate 0.9
(the paper's headline), lam=0.3 (task-arithmetic default), PRNG seed 0. ``:smoke`` merges a tiny
random pool under /tmp. Set ``--config.hparams.combine=ties`` for DARE-TIES.
"""

from ml_collections import ConfigDict

from mtl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = ConfigDict()
    c.model_pool = "checkpoints/pool"
    c.pretrained = "pretrained.safetensors"
    c.finetuned = ()
    c.method = "dare"
    c.hparams = ConfigDict(dict(p=0.9, combine="ta", lam=0.3, seed=0))
    c.streaming = True
    c.memory_budget = 0  # one leaf at a time
    c.output = "merged/dare"  # no .safetensors extension: orbax checkpoint dir
    c.output_format = "orbax"
    c.progress = True
    c.threads = 0  # worker threads of the streaming kernels; 0 = every available core
    c.smoke_pool = ""
    c.smoke_num_tasks = 3
    if arg.smoke:
        c.smoke_pool = "/tmp/mtl_jax_merge_smoke/pool"
        c.model_pool = c.smoke_pool
        c.output = "/tmp/mtl_jax_merge_smoke/dare_orbax"
        c.progress = False
    return c
