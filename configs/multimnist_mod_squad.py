"""MultiMNIST on Mod-Squad (Chen et al., CVPR 2023) trained on heterogeneous data: every training
pair is labelled for one digit only (drawn with equal ratios, ``multimnist_one_task``), the losses
are masked to each task's own examples; a ViT (patch 4, 4 blocks of width 64) with a sparse MoE MLP
of 8 experts (top-2) in every block, one router per task, load balancing (0.01) and the
task-expert mutual-information loss (1.0). The test split keeps both labels.

The MI weight is ours (the paper's is not reachable here). Measured with
experiments/moe_inference_flops.py (1000 steps, one seed; experiments/results/moe_inference_flops_mod_squad*.md):
at 0.01 and 0.1 each task still routes to (nearly) every expert; at 1.0 the two tasks split the 8
experts of every block into disjoint sets of 3-5, so ``extract_task_model`` keeps about half of them,
at the same accuracy (left / right 69.9 / 58.6% vs 70.4 / 58.0% at 0.01). On five tasks
(``--config.data.name=multimnist_derived --config.model.arch_kwargs.num_experts=16``) each task's extracted
sub-model costs 8.4-9.1% of the all-task FLOPs (experiments/results/moe_inference_flops_mod_squad_5tasks.md).

``:smoke`` shrinks it to a seconds-long run; options: ``mtl_jax.models.moe_vit``.
"""

import os

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist_m3vit.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.data.name = "multimnist_one_task"
    config.model.name = "mod_squad"
    config.model.arch_kwargs.update(dict(moe_every=1, mi_weight=1.0))
    return config
