"""TIES-Merging of a pool of fine-tuned safetensors checkpoints (Yadav et al., NeurIPS 2023).

``mtl-jax merge --config configs/merge/ties_example.py --config.model_pool=DIR``: DIR holds
``pretrained.safetensors`` and one ``*.safetensors`` per task. ``:smoke`` writes a tiny random
pool under /tmp and merges it (seconds). Global top-20% trim, lam=1 (the paper's no-validation
setting), streamed leaf by leaf within a 2 GiB working-set budget.
"""

from ml_collections import ConfigDict

from mtl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = ConfigDict()
    c.model_pool = "checkpoints/pool"  # dir of *.safetensors; or leave "" and set `finetuned`
    c.pretrained = "pretrained.safetensors"  # path, or a file name inside model_pool
    c.finetuned = ()  # explicit fine-tuned paths when model_pool is ""
    c.method = "ties"
    c.hparams = ConfigDict(dict(top_k=0.2, lam=1.0, per_tensor=False))
    c.streaming = True
    c.memory_budget = 2 * 2**30  # bytes of leaf working set per group; 0 = one leaf at a time
    c.output = "merged/ties.safetensors"
    c.output_format = ""  # "" = from the extension; "safetensors" or "orbax"
    c.progress = True
    c.threads = 0  # worker threads of the streaming kernels; 0 = every available core
    c.smoke_pool = ""
    c.smoke_num_tasks = 3
    if arg.smoke:
        c.smoke_pool = "/tmp/mtl_jax_merge_smoke/pool"
        c.model_pool = c.smoke_pool
        c.output = "/tmp/mtl_jax_merge_smoke/ties.safetensors"
        c.memory_budget = 1 << 20
        c.progress = False
    return c
