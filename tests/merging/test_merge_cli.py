"""`mtl-jax merge` end to end on tiny generated safetensors pools."""

import json
import os

import numpy as np
import pytest

from mtl_jax.merging import streaming as S
from mtl_jax.merging import task_arithmetic, ties_merging
from mtl_jax.merging.cli import main, make_smoke_pool

from .helpers import jit_merge

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIES_CONFIG = os.path.join(REPO, "configs", "merge", "ties_example.py")


def _pool(tmp_path):
    pool = tmp_path / "pool"
    make_smoke_pool(str(pool), num_tasks=3, seed=1)
    p0 = S.load_safetensors(str(pool / "pretrained.safetensors"))
    fts = [S.load_safetensors(str(pool / f"task_{t}.safetensors")) for t in range(3)]
    return pool, p0, fts


def test_cli_ties_from_model_pool(tmp_path, capsys):
    pool, p0, fts = _pool(tmp_path)
    out = tmp_path / "merged" / "ties.safetensors"
    main(["merge", "--config", TIES_CONFIG, f"--config.model_pool={pool}", f"--config.output={out}",
          "--config.hparams.top_k=0.3", "--config.memory_budget=60000", "--config.progress=False"])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["method"] == "ties" and stats["passes"] == 2 and stats["num_groups"] > 1
    merged = S.load_safetensors(str(out))
    expected = jit_merge(ties_merging, top_k=0.3, lam=1.0)(p0, fts)
    for k in p0:
        np.testing.assert_allclose(merged[k], np.asarray(expected[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_cli_explicit_paths_in_memory_and_smoke_arg(tmp_path, capsys):
    pool, p0, fts = _pool(tmp_path)
    out = tmp_path / "ta.safetensors"
    finetuned = [str(pool / f"task_{t}.safetensors") for t in range(3)]
    main(["--config", TIES_CONFIG + ":smoke", "--config.model_pool=", f"--config.pretrained={pool / 'pretrained.safetensors'}",
          f"--config.finetuned={finetuned}", "--config.smoke_pool=", "--config.method=task_arithmetic",
          "--config.hparams={'lam': 0.5}", "--config.streaming=False", f"--config.output={out}"])
    merged = S.load_safetensors(str(out))
    expected = task_arithmetic(p0, fts, lam=0.5)
    for k in p0:
        np.testing.assert_allclose(merged[k], np.asarray(expected[k]), rtol=1e-6, atol=1e-7)


def test_cli_unknown_method_and_key(tmp_path):
    pool, _, _ = _pool(tmp_path)
    with pytest.raises(ValueError, match=r"unknown merge method 'foo'.*valid: consensus, dare, lines, task_arithmetic, ties"):
        main(["--config", TIES_CONFIG, f"--config.model_pool={pool}", "--config.method=foo"])
    with pytest.raises(KeyError, match="unknown config key 'nope'"):
        main(["--config", TIES_CONFIG, "--config.nope=1"])
