"""`mtl-jax merge` end to end on tiny generated safetensors pools."""

import json
import os

import numpy as np
import pytest

from mtl_jax.errors import UsageError
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


# ------------------------------------------------------------------ what the user names or feeds in


def _ta(pool, out, *extra):
    return ["merge", "--config", TIES_CONFIG, f"--config.model_pool={pool}", f"--config.output={out}",
            "--config.method=task_arithmetic", "--config.hparams={'lam': 0.3}", "--config.progress=False", *extra]


@pytest.mark.parametrize("method,streaming,valid", [
    ("task_arithmetic", True, "lam"), ("ties", True, "top_k, lam, per_tensor"), ("dare", True, "seed, p, combine, lam"),
    ("slerp", False, "t, dot_threshold")])
def test_cli_unknown_hyperparameter_names_it_and_the_valid_ones(tmp_path, method, streaming, valid):
    pool, _, _ = _pool(tmp_path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(UsageError, match=f"^unknown hyperparameter 'lamb' for merge method '{method}'; valid: {valid}$"):
        main(["--config", TIES_CONFIG, f"--config.model_pool={pool}", f"--config.output={out}", f"--config.method={method}",
              "--config.hparams={'lamb': 0.3}", f"--config.streaming={streaming}"])
    assert not out.exists()


def test_cli_missing_inputs_are_one_line_naming_them(tmp_path):
    pool, _, _ = _pool(tmp_path)
    out = tmp_path / "out.safetensors"
    nope = tmp_path / "nope"
    cases = [([f"--config.model_pool={nope}"], f"^config.model_pool '{nope}' is not a directory$"),
             (["--config.pretrained=missing.safetensors"], f"^config.pretrained '{pool}/missing.safetensors' does not exist$"),
             (["--config.model_pool=", f"--config.pretrained={pool}/pretrained.safetensors",
               f"--config.finetuned=('{pool}/task_0.safetensors', '{nope}')"], f"^config.finetuned '{nope}' does not exist$")]
    for args, message in cases:
        with pytest.raises(UsageError, match=message):
            main(["--config", TIES_CONFIG, f"--config.model_pool={pool}", f"--config.output={out}", *args])
    assert not out.exists()


@pytest.mark.parametrize("streaming", [True, False])
def test_cli_nonfinite_input_is_refused_unless_allowed(tmp_path, capsys, streaming):
    pool, p0, fts = _pool(tmp_path)
    fts[1]["blocks.1.mlp.bias"][3] = np.nan
    S.save_safetensors(fts[1], str(pool / "task_1.safetensors"))
    out = tmp_path / "out.safetensors"
    args = _ta(pool, out, f"--config.streaming={streaming}")
    with pytest.raises(UsageError, match=f"^{pool}/task_1.safetensors \\(finetuned\\[1\\]\\): tensor 'blocks.1.mlp.bias' "
                       "holds a non-finite value \\(nan\\) at flat index 3; refusing to merge it"):
        main(args)
    assert sorted(os.listdir(tmp_path)) == ["pool"]
    main(args + ["--config.allow_nonfinite=True"])
    merged = S.load_safetensors(str(out))
    assert np.isnan(merged["blocks.1.mlp.bias"][3]) and np.isfinite(merged["embed.weight"]).all()


def test_cli_output_rules_and_overwrite_flag(tmp_path, monkeypatch, capsys):
    """``.`` (the directory holding the pool) and the pool itself are refused, nothing is
    deleted; an existing directory of the user's needs ``--overwrite``; a re-run replaces its own
    previous output."""
    pool, _, _ = _pool(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("keep")
    listing = sorted(os.listdir(tmp_path)), sorted(os.listdir(pool))
    for out, message in [(".", "is the current directory"), ("pool", "contains the input pretrained"),
                         ("pool/task_0.safetensors", r"is the input finetuned\[0\]")]:
        for extra in ([], ["--overwrite"]):
            with pytest.raises(UsageError, match=message):
                main(_ta("pool", out, *extra))
    with pytest.raises(UsageError, match="^output 'results' is an existing directory that is not a previous merge output"):
        main(_ta("pool", "results"))
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(pool))) == listing
    assert (tmp_path / "results" / "table.csv").read_text() == "keep"
    main(_ta("pool", "results", "--overwrite", "--config.output_format=orbax"))
    assert "mtl_jax_merge.json" in os.listdir(tmp_path / "results") and not (tmp_path / "results" / "table.csv").exists()
    main(_ta("pool", "results", "--config.output_format=orbax", "--config.hparams={'lam': 0.5}"))  # ours: replaced
    assert sorted(os.listdir(tmp_path)) == listing[0]


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    """Through the console entry point: a bad input ends the command with exit code 2 and one
    line naming what is wrong."""
    from mtl_jax.main import run

    pool, _, _ = _pool(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x00\x00\x00\x00\x00\x00\x80{}")
    for args, message in [
        (_ta(pool, tmp_path / "o.safetensors", "--config.hparams.lamb=0.3"), "unknown hyperparameter 'lamb'"),
        (_ta(pool, tmp_path / "o.safetensors", f"--config.pretrained={bad}"),
         f"{bad}: not a valid safetensors file: header length 9223372036854775808 is over the format's limit"),
        (_ta(pool, pool), "contains the input pretrained"),
    ]:
        with pytest.raises(SystemExit) as info:
            run(args)
        err = capsys.readouterr().err.splitlines()
        assert info.value.code == 2 and len(err) == 1 and message in err[0], err


def test_smoke_pool_replaces_only_its_own_files(tmp_path):
    pool = tmp_path / "pool"
    make_smoke_pool(str(pool), num_tasks=2, seed=1)
    make_smoke_pool(str(pool), num_tasks=2, seed=2)  # its own files: replaced
    S.save_safetensors({"w": np.ones(3, np.float32)}, str(pool / "task_1.safetensors"))  # the user's model
    before = (pool / "task_1.safetensors").read_bytes()
    with pytest.raises(UsageError, match=f"^smoke_pool: '{pool}/task_1.safetensors' exists and is not a smoke-pool file"):
        make_smoke_pool(str(pool), num_tasks=2, seed=3)
    assert (pool / "task_1.safetensors").read_bytes() == before


def test_merge_package_and_cli_import_no_jax():
    """``import mtl_jax.merging`` (names loaded lazily) and the merge command's module import no
    JAX; the names still resolve, ``boom`` staying the function over its submodule."""
    import subprocess
    import sys

    code = ("import sys, mtl_jax.merging as M, mtl_jax.merging.cli; assert 'jax' not in sys.modules, 'jax imported'; "
            "import mtl_jax.merging.boom; assert callable(M.boom) and M.apply is M.apply_task_vector; "
            "assert M.get_merge_method('ties') is M.ties_merging and len(M.MERGE_METHODS) == 14; "
            "assert set(M.__all__) <= set(dir(M))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
