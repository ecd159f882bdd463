"""A merge's inputs checked before or as they are read (``mtl_jax.merging.input_checks``):
non-finite values (refused naming the file and tensor in every streaming method, unless
``allow_nonfinite``), hyperparameters against the method's signature, paths that do not exist,
and leaf sets / shapes that differ (both files named)."""

import os

import jax
import ml_dtypes
import numpy as np
import pytest

from mtl_jax.errors import UsageError
from mtl_jax.merging import streaming as S
from mtl_jax.merging import consensus_merging, dare_merging, lines_merging, task_arithmetic, ties_merging
from mtl_jax.merging.input_checks import NonFiniteInputError

from .helpers import jit_merge

# "blocks.1.big" has more than S.CHUNK entries: a value in its second chunk is reported at its
# flat index in the leaf.
SHAPES = {"blocks.0.w": (8, 6), "blocks.0.b": (6,), "blocks.1.big": (300, 250)}
BIG = 70001
assert np.prod(SHAPES["blocks.1.big"]) > BIG > S.CHUNK


def _models(tmp_path, bad=None, dtype=np.float32):
    """pretrained + 3 fine-tuned files; ``bad = (model index, leaf, flat index, value)``."""
    rng = np.random.default_rng(0)
    p0 = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    models = [p0] + [{k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in p0.items()} for _ in range(3)]
    models = [{k: v.astype(dtype) for k, v in m.items()} for m in models]
    if bad is not None:
        i, leaf, pos, value = bad
        models[i][leaf].reshape(-1)[pos] = value
    paths = [str(tmp_path / name) for name in ["p0.safetensors", "ft0.safetensors", "ft1.safetensors", "ft2.safetensors"]]
    for m, p in zip(models, paths):
        S.save_safetensors(m, p)
    return paths, models


METHODS = [  # (method, hparams, the bad value): each kernel family, and the jitted per-group paths
    ("task_arithmetic", {}, (2, "blocks.1.big", BIG, np.nan)),
    ("weight_average", {}, (0, "blocks.1.big", BIG, np.inf)),  # theta_0 is not used, but it is an input
    ("ties", {}, (3, "blocks.1.big", BIG, -np.inf)),
    ("ties", {"per_tensor": True}, (2, "blocks.1.big", BIG, np.nan)),
    ("dare", {"p": 0.9}, (2, "blocks.1.big", BIG, np.nan)),  # the entry is dropped by most masks
    ("dare", {"p": 0.5, "combine": "ties"}, (1, "blocks.0.w", 5, np.inf)),
    ("consensus", {}, (2, "blocks.1.big", BIG, -np.inf)),  # -inf: seen by the min of the witness
    ("consensus", {"base": "ties"}, (0, "blocks.0.b", 3, np.nan)),
    ("lines", {}, (2, "blocks.1.big", BIG, np.inf)),
]
LABELS = ["p0.safetensors \\(pretrained\\)", "ft0.safetensors \\(finetuned\\[0\\]\\)", "ft1.safetensors \\(finetuned\\[1\\]\\)",
          "ft2.safetensors \\(finetuned\\[2\\]\\)"]


@pytest.mark.parametrize("method,hparams,bad", METHODS, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(METHODS)])
def test_nonfinite_input_is_refused_naming_file_and_tensor(tmp_path, method, hparams, bad):
    paths, _ = _models(tmp_path, bad)
    if method == "dare":
        hparams = dict(hparams, key=jax.random.key(0))
    i, leaf, pos, value = bad
    out = tmp_path / "out.safetensors"
    with pytest.raises(NonFiniteInputError, match=f"^{tmp_path}/{LABELS[i]}: tensor '{leaf}' holds a non-finite value "
                       f"\\({value}\\) at flat index {pos}; refusing to merge it \\(allow_nonfinite=True merges it anyway\\)$"):
        S.stream_merge(paths[0], paths[1:], str(out), method, **hparams)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(("out", ".out"))]  # nothing written, no temporary


def test_nonfinite_bf16_input_and_orbax_output(tmp_path):
    paths, _ = _models(tmp_path, (1, "blocks.0.w", 7, np.nan), dtype=ml_dtypes.bfloat16)
    with pytest.raises(NonFiniteInputError, match=r"ft0.safetensors \(finetuned\[0\]\): tensor 'blocks.0.w' .*flat index 7;"):
        S.stream_merge(paths[0], paths[1:], str(tmp_path / "out"), "task_arithmetic")
    assert not [f for f in os.listdir(tmp_path) if "out" in f]


@pytest.mark.parametrize("method,fn,hparams", [("task_arithmetic", task_arithmetic, {"lam": 0.3}),
                                               ("ties", ties_merging, {"top_k": 0.2})])
def test_allow_nonfinite_merges_as_the_in_memory_code(tmp_path, method, fn, hparams):
    """With ``allow_nonfinite`` the values go through as before: TA makes the entry NaN, TIES
    ranks NaN above inf and never keeps it; both equal the in-memory merges."""
    paths, models = _models(tmp_path, (2, "blocks.1.big", BIG, np.nan))
    models[3]["blocks.0.w"][1, 2] = np.inf
    S.save_safetensors(models[3], paths[3])
    out = str(tmp_path / "out.safetensors")
    S.stream_merge(paths[0], paths[1:], out, method, allow_nonfinite=True, **hparams)
    merged, expected = S.load_safetensors(out), jit_merge(fn, **hparams)(models[0], models[1:])
    for k in SHAPES:
        np.testing.assert_allclose(merged[k], np.asarray(expected[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    assert np.isnan(merged["blocks.1.big"].reshape(-1)[BIG]) == (method == "task_arithmetic")


def test_hyperparameters_are_checked_against_the_method(tmp_path):
    paths, _ = _models(tmp_path)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(UsageError, match=r"^unknown hyperparameter 'lamb' for merge method 'task_arithmetic'; valid: lam$"):
        S.stream_merge(paths[0], paths[1:], out, "task_arithmetic", lamb=0.3)
    with pytest.raises(UsageError, match=r"^unknown hyperparameter 'topk' for merge method 'ties'; valid: top_k, lam, per_tensor$"):
        S.stream_merge(paths[0], paths[1:], out, "ties", topk=0.3)
    with pytest.raises(UsageError, match=r"^merge method 'dare' needs hyperparameter 'key'; valid: key, p, combine, lam$"):
        S.stream_merge(paths[0], paths[1:], out, "dare")
    assert not os.path.exists(out)


@pytest.mark.parametrize("method,fn,hparams,message", [
    ("consensus", consensus_merging, dict(base="nope"), r"^unknown consensus base 'nope'; valid names: \['ta', 'ties'\]$"),
    ("lines", lines_merging, dict(base="nope"), r"^unknown LiNeS base 'nope'; valid names: \['ta', 'ties'\]$"),
    ("dare", dare_merging, dict(p=1.0), r"^DARE drop rate must be in \[0, 1\), got 1.0$"),
    ("dare", dare_merging, dict(combine="nope"), r"^unknown DARE combine 'nope'; valid names: \['ta', 'ties'\]$"),
    ("ties", ties_merging, dict(top_k=1.5), r"^top-k fraction must be in \[0, 1\], got 1.5$"),
])
def test_hyperparameter_values_are_checked_by_the_in_memory_check(tmp_path, method, fn, hparams, message):
    """A streaming merge takes the in-memory method's checked hyperparameters: the same error,
    raised before any input is opened or output written."""
    paths, models = _models(tmp_path)
    if method == "dare":
        hparams = dict(hparams, key=jax.random.key(0))
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match=message):
        S.stream_merge(paths[0], paths[1:], out, method, **hparams)
    with pytest.raises(ValueError, match=message):
        fn(models[0], models[1:], **hparams)
    assert not os.path.exists(out)


def test_missing_inputs_and_different_leaves_name_the_files(tmp_path):
    paths, models = _models(tmp_path)
    out = str(tmp_path / "out.safetensors")
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(UsageError, match=f"^finetuned\\[1\\] '{missing}' does not exist$"):
        S.stream_merge(paths[0], [paths[1], missing], out)
    del models[2]["blocks.0.b"]
    S.save_safetensors(models[2], paths[2])
    with pytest.raises(UsageError, match=r"^leaf names differ between pretrained and finetuned\[1\]: missing \['blocks.0.b'\], "
                       f"unexpected \\[\\] \\({paths[0]} vs {paths[2]}\\)$"):
        S.stream_merge(paths[0], paths[1:], out)
    assert not os.path.exists(out)
