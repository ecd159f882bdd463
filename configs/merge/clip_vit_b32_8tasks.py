"""The CLIP ViT-B/32 8-task merging suite (experiments/merging/clip_suite.py) on a user's checkpoints.

    python -m experiments.merging.clip_suite --config configs/merge/clip_vit_b32_8tasks.py \\
        --config.pretrained=/ckpt/clip-vit-base-patch32/model.safetensors --config.layout=hf \\
        --config.tokenizer=/ckpt/clip-vit-base-patch32/tokenizer.json --config.data_root=/data \\
        --config.finetuned.sun397=/ckpt/clip-vit-base-patch32_sun397/model.safetensors ...
    python -m experiments.merging.clip_suite --config configs/merge/clip_vit_b32_8tasks.py:smoke

Checkpoints: ``pretrained`` a full CLIP (both towers; open_clip ``ViT-B-32-quickgelu`` / OpenAI
state dict, or HF ``CLIPModel``), ``finetuned.<task>`` one image encoder per task in the same
layout (a full CLIP, an open_clip / task_vectors ``[model.]visual.*`` state dict, or an HF
``CLIPVisionModel`` such as FusionBench's ``tanganke/clip-vit-base-patch32_<task>``); safetensors or
torch state-dict files (never whole pickled modules: convert task_vectors' ``finetuned.pt`` with
``torch.save(torch.load(p).state_dict(), out)`` in your own torch environment). ``tokenizer``: a
Hugging Face CLIP ``tokenizer.json``. Data: ``<data_root>/<datasets.<task>.folder>/<split>/<class>/<image>``,
the first existing split name of ``datasets.<task>.train`` / ``.test`` (task_vectors' folders use
``val`` as SUN397's and DTD's test split).

Hyperparameters follow the papers' protocol: grids searched on validation images held out of the
train split (task_vectors: 10% of train; here the first ``val_per_task`` of a fixed permutation),
task arithmetic lambda in 0.1..1.0 (0.3 is the value AdaMerging / FusionBench fix), TIES top-20%
with lambda 0.1..1.5 (tall_masks / LiNeS grid), TALL lambda_t in 0.2..0.6, AdaMerging Adam lr 1e-3,
500 steps, batch 16 per task, init 0.3; RegMean / Fisher on 256 examples.
``:smoke``: tiny generated fixtures (random tiny CLIP in ``layout``, 3 classes per task) in a tmp dir.
"""

import os
import tempfile

from ml_collections import ConfigDict

from mtl_jax.config import linspace_grid, parse_arg

TASKS = ("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
# Folder names of task_vectors' data preparation (README / src/datasets/*.py); other datasets: export them to this layout.
FOLDERS = {"sun397": "sun397", "cars": "stanford_cars", "resisc45": "resisc45", "eurosat": "EuroSAT_splits",
           "svhn": "svhn", "gtsrb": "gtsrb", "mnist": "mnist", "dtd": "dtd"}


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, layout="open_clip")
    c = ConfigDict()
    c.tasks = TASKS
    c.layout = arg.layout  # "open_clip" or "hf": the names in every checkpoint (pretrained and fine-tuned)
    c.model = ConfigDict(dict(preset="vit_b32", vision=ConfigDict(), text=ConfigDict()))  # field overrides
    c.pretrained = ""  # full CLIP checkpoint (both towers)
    c.tokenizer = ""  # HF CLIP tokenizer.json
    c.finetuned = ConfigDict({t: "" for t in TASKS})  # fine-tuned image encoder per task
    c.data_root = ""
    c.datasets = ConfigDict({t: ConfigDict(dict(folder=FOLDERS[t], train=("train",), test=("test", "val")))
                             for t in TASKS})
    c.classnames = ConfigDict({t: ConfigDict() for t in TASKS})  # {task: {folder: CLIP class name}} overrides
    c.data_seed = 0  # the validation / statistics permutation of each train folder
    c.max_test = 0  # > 0: a fixed random subset of N test images per task (0 = all)
    c.workers = 0  # image-decoding threads (0 = cpu count)
    c.eval_batch = 256
    c.methods = ()  # rows after the baselines (names as in the table); () = every method
    c.merge = ConfigDict(dict(
        val_per_task=256,  # validation images per task for every grid search
        ta_lambdas=linspace_grid(0.1, 1.0, 10),
        dare_lambdas=linspace_grid(0.1, 1.0, 10),  # DARE (TA) and Consensus TA
        ties_lambdas=linspace_grid(0.1, 1.5, 15),
        ties_top_k=0.2,
        dare_p=0.9,
        consensus_k=2,
        tall_lambda=0.4,
        lines_betas=linspace_grid(0.0, 1.0, 11),
        svd_alphas=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
        tall_lambdas=linspace_grid(0.2, 0.6, 5),
        stats_examples=256,
        stats_chunk=16,  # Fisher / RegMean images per pass (per-example Fisher gradients: chunk x the parameters)
        regmean_alpha=0.95,
    ))
    c.learned = ConfigDict(dict(
        steps=500, lr=1e-3, init=0.3, batch_per_task=16, pool_per_task=512, top_k=0.2,  # AdaMerging
        atlas_steps=200, atlas_lr=1e-3, atlas_weight_decay=0.1, atlas_examples_per_task=64, atlas_eval_every=50,
        sp_steps=200, sp_lr=1e-2,
    ))
    c.fixtures = ConfigDict(dict(generate=False, dir="", classes_per_task=3, seed=0))
    c.cache_dir = "runs/clip_suite/cache"  # decoded uint8 images (224 x 224: ~150 KB each)
    c.out = "runs/clip_suite/clip_vit_b32_8tasks"
    if arg.smoke:
        root = os.path.join(tempfile.gettempdir(), f"mtl_jax_clip_suite_smoke_{c.layout}")
        c.model.preset = "tiny"
        c.model.text = ConfigDict(dict(vocab_size=512, context_length=32))  # experiments.merging.clip_suite fixtures
        c.fixtures.update(dict(generate=True, dir=os.path.join(root, "fixtures")))
        c.pretrained = os.path.join(root, "fixtures", "pretrained.safetensors")
        c.tokenizer = os.path.join(root, "fixtures", "tokenizer.json")
        c.data_root = os.path.join(root, "fixtures", "data")
        c.finetuned = ConfigDict({t: os.path.join(root, "fixtures", "finetuned", f"{t}.safetensors") for t in TASKS})
        c.datasets = ConfigDict({t: ConfigDict(dict(folder=t, train=("train",), test=("test",))) for t in TASKS})
        c.workers = 2
        c.eval_batch = 16
        c.merge.update(dict(val_per_task=8, stats_examples=8, ta_lambdas=(0.3, 1.0), dare_lambdas=(0.3,),
                            ties_lambdas=(1.0,), lines_betas=(0.5,), svd_alphas=(1.0,), tall_lambdas=(0.3, 0.5)))
        c.learned.update(dict(steps=3, batch_per_task=4, pool_per_task=8, atlas_steps=3, atlas_examples_per_task=4,
                              atlas_eval_every=3, sp_steps=3))
        c.cache_dir = os.path.join(root, "cache")
        c.out = os.path.join(root, "clip_vit_b32_8tasks")
    return c
