"""The fused (numba) output passes of the MergeKit YAML path give the numpy path's bits.

:mod:`mtl_jax.merging.mergekit.fused` runs ``linear`` and task arithmetic in one pass per block;
here both paths merge the same random tensors (bfloat16 / float16 / float32, NaN, inf, +-0,
subnormals, values that round to inf, sizes crossing the chunks and the kernel blocks) and the
fixture YAMLs of tests/merging/test_mergekit_yaml.py, and the outputs are compared bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from fixtures.mergekit.tiny_models import YAMLS, make_models, yaml_for
from mtl_jax.merging.mergekit import methods as M
from mtl_jax.merging.mergekit import run_mergekit_yaml
from mtl_jax.merging.streaming import load_safetensors

if importlib.util.find_spec("numba") is None:
    print("numba not installed (pip install 'mtl_jax[fast]'): the fused MergeKit kernels are not tested")
    pytest.skip("numba not installed: pip install 'mtl_jax[fast]'", allow_module_level=True)

from mtl_jax.merging.mergekit import fused  # noqa: E402  (after the skip: it imports numba)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN / inf arithmetic on purpose
F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
N = M.CHUNK + 3 * fused.BLOCK + 7  # two chunks, the second not a whole number of kernel blocks
SPECIAL = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -3e-39, 1e-45, 3.3e38, -3.39e38, 65504.0],
                   np.float32)


def _input(rng: np.random.Generator, dtype: np.dtype, n: int, special_every: int) -> np.ndarray:
    """Normal(0, 1) values, every ~``special_every``-th one a special value (NaN, inf, +-0,
    float32 / bfloat16 subnormals, values near the float32 / float16 limits)."""
    x = rng.standard_normal(n).astype(np.float32)
    idx = rng.choice(n, n // special_every, replace=False)
    x[idx] = rng.choice(SPECIAL, idx.size)
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype)


def _merge(method: str, inputs, out_dtype, work, shared, per_input, numpy: bool, monkeypatch) -> np.ndarray:
    monkeypatch.setenv(M.NUMPY_KERNELS_ENV, "1" if numpy else "0")
    out = np.empty(inputs[0].size, out_dtype)
    base = None if method == "linear" else 0
    job = M.TensorJob("t", list(inputs), base, shared, per_input, M.Precision(work), out)
    with np.errstate(all="ignore"):
        M.merge_tensor(M.METHODS[method], job)
    return out


@pytest.fixture
def fused_calls(monkeypatch):
    """Loads the fused kernels and counts their calls: {kernel name: calls}."""
    assert M.fused_kernels(wait=True) is fused
    calls = {}
    for name in ("task_arithmetic_chunk", "linear_chunk"):
        kernel = getattr(fused, name)

        def counted(*args, _kernel=kernel, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _kernel(*args)

        monkeypatch.setattr(fused, name, counted)
    return calls


CASES = [  # (input dtypes (base first), working dtype, output dtype)
    ((M.BF16,) * 3, M.BF16, M.BF16),
    ((M.BF16,) * 3, M.BF16, F32),
    ((F32,) * 3, M.BF16, M.BF16),
    ((M.BF16, F32, F32), M.BF16, M.BF16),
    ((F32,) * 3, F32, F32),
    ((M.BF16,) * 3, F32, M.BF16),
    ((F16,) * 3, F16, F16),  # not fused: the numpy path both times
    ((M.BF16, F16, F16), F32, F32),  # not fused
]


@pytest.mark.parametrize("dtypes,work,out", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("special_every", [50_000, 200])
def test_task_arithmetic_bits(dtypes, work, out, special_every, fused_calls, monkeypatch):
    rng = np.random.default_rng(special_every)
    inputs = [_input(rng, d, N, special_every) for d in dtypes]
    for shared, weights in (({"normalize": False, "lambda": 0.7}, (0.3, -1.25)), ({"normalize": True, "lambda": 1.0}, (0.5, 0.5))):
        shared = {"int8_mask": False, "rescale": False, **shared}
        per_input = [{}] + [{"weight": w, "density": 1.0} for w in weights]
        want = _merge("task_arithmetic", inputs, out, work, shared, per_input, True, monkeypatch)
        got = _merge("task_arithmetic", inputs, out, work, shared, per_input, False, monkeypatch)
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (dtypes, work, out, shared)
    fusable = work != F16 and F16 not in dtypes
    assert bool(fused_calls.get("task_arithmetic_chunk")) == fusable


@pytest.mark.parametrize("dtypes,work,out", CASES, ids=lambda v: str(v))
def test_linear_bits(dtypes, work, out, fused_calls, monkeypatch):
    rng = np.random.default_rng(1)
    inputs = [_input(rng, d, N, 300) for d in dtypes]
    for normalize, weights in ((True, (0.2, 0.5, 0.9)), (False, (1.5, -0.5, 3.0))):
        per_input = [{"weight": w} for w in weights]
        want = _merge("linear", inputs, out, work, {"normalize": normalize}, per_input, True, monkeypatch)
        got = _merge("linear", inputs, out, work, {"normalize": normalize}, per_input, False, monkeypatch)
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (dtypes, work, out, normalize)
    fusable = work != F16 and F16 not in dtypes and len(set(dtypes)) == 1
    assert bool(fused_calls.get("linear_chunk")) == fusable


def test_round_bf16_equals_the_cast():
    """The kernels' in-register rounding against ml_dtypes' cast on random and edge patterns."""
    import numba

    @numba.njit
    def round_all(x, out):
        for j in range(x.size):
            out[j] = fused.round_bf16(x[j])

    rng = np.random.default_rng(0)
    edges = np.array([0, 0x8000, 0x7FFF, 0x18000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F800000, 0xFF800000,
                      0x80000000, 0x80000001, 0x00007FFF, 0x3F808000, 0x3F818000, 0xBF808000], np.uint32)
    bits = np.concatenate([edges, rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32)])
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]  # NaN: left as is by the kernels (their blocks are recomputed by numpy)
    got = np.empty_like(x)
    round_all(x, got)
    want = x.astype(M.BF16).view(np.uint16).astype(np.uint32) << 16
    assert np.array_equal(got.view(np.uint32), want)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mergekit_fused_models"))
    make_models(path)
    return path


def _read(out):
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_safetensors(os.path.join(out, file)))
    return tensors


def test_fixture_yamls_same_bits_with_and_without_numba(root, fused_calls, monkeypatch):
    """The 13 fixture YAMLs end to end: fused and numpy outputs equal bit for bit."""
    outputs = {}
    for numpy in (True, False):
        monkeypatch.setenv(M.NUMPY_KERNELS_ENV, "1" if numpy else "0")
        for name in YAMLS:
            y = os.path.join(root, f"{name}.yml")
            with open(y, "w") as f:
                f.write(yaml_for(name, root))
            out = os.path.join(root, "numpy" if numpy else "fused", name)
            run_mergekit_yaml(y, out)
            outputs[numpy, name] = _read(out)
    for name in YAMLS:
        a, b = outputs[True, name], outputs[False, name]
        assert sorted(a) == sorted(b), name
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), (name, k)
    assert fused_calls.get("task_arithmetic_chunk") and fused_calls.get("linear_chunk"), fused_calls
