"""``mtl-jax merge --mergekit-yaml`` against MergeKit 0.1.5 on tiny random Llama-layout models.

The models and YAMLs are :mod:`fixtures.mergekit.tiny_models` (regenerated here, bit-identical to
the ones MergeKit merged); MergeKit's outputs are ``fixtures/mergekit/mergekit_reference.*``
(``cd tests && ../.peers-venv/bin/python -m fixtures.mergekit.make_mergekit_reference``).
Deterministic methods: equal to float32 rounding (float32 configs: within 4 float32 epsilons of each tensor's scale; the bf16 TIES
config: bit-equal except entries whose |delta| ties at the TIES cut, where MergeKit's argsort
order is unspecified). DARE: the keep fraction and L1 rescaling statistics, as the masks are
random by design.
"""

import json
import os

import numpy as np
import pytest

from fixtures.mergekit.tiny_models import CONFIG, RANDOM, YAMLS, dare_statistics, make_models, weights, write_model, yaml_for
from mtl_jax.errors import UsageError
from mtl_jax.merging import cli
from mtl_jax.merging.mergekit import methods as mk_methods
from mtl_jax.merging.mergekit import run_mergekit_yaml
from mtl_jax.merging.streaming import load_safetensors

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures", "mergekit")
DETERMINISTIC = [n for n in YAMLS if n not in RANDOM]


@pytest.fixture(scope="module")
def reference():
    with open(os.path.join(FIXTURES, "mergekit_reference.json")) as f:
        meta = json.load(f)
    return np.load(os.path.join(FIXTURES, "mergekit_reference.npz")), meta


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mergekit_models"))
    make_models(path)
    return path


def _run(root, name, text=None, out=None, **kw):
    y = os.path.join(root, f"{name}.yml")
    with open(y, "w") as f:
        f.write(text if text is not None else yaml_for(name, root))
    out = out or os.path.join(root, "out", name)
    stats = run_mergekit_yaml(y, out, **kw)
    return out, stats


def _read(out):
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_safetensors(os.path.join(out, file)))
    assert sorted(tensors) == sorted(index["weight_map"])
    return tensors, index


def _rounding_error(a, b):
    """max |a - b| in float32 epsilons of the tensor's scale (max |b|, at least 1)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return float(np.max(np.abs(a - b)) / (np.finfo(np.float32).eps * max(1.0, float(np.max(np.abs(b))))))


def _tied_at_cut(densities):
    """Tensors where some input's bf16 |delta| has equal values on both sides of the TIES cut."""
    bf16 = np.dtype(mk_methods.BF16)
    base = {k: v.astype(bf16).astype(np.float32) for k, v in weights(0).items()}
    tied = set()
    for i, density in densities.items():
        for k, v in weights(i).items():
            d = np.sort(np.abs((v.astype(bf16).astype(np.float32) - base[k]).astype(bf16).astype(np.float32)).reshape(-1))[::-1]
            keep = max(1, int(density * d.size))
            if keep < d.size and d[keep - 1] == d[keep]:
                tied.add(k)
    return tied


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_equals_mergekit(root, reference, name):
    arrays, meta = reference
    out, _ = _run(root, name)
    got, index = _read(out)
    expected = {k.split("/", 1)[1]: arrays[k] for k in arrays.files if k.startswith(name + "/")}
    assert sorted(got) == sorted(expected)
    assert sorted({str(v.dtype) for v in got.values()}) == meta[name]["dtypes"]
    if name == "ties_bf16":
        tied = _tied_at_cut({1: 0.6, 2: 0.4})
        for k in expected:  # bit-equal unless an input's |delta| ties at the cut (argsort order unspecified)
            assert k in tied or np.array_equal(got[k].astype(np.float32), expected[k]), k
        assert len(tied) < len(expected)
    else:
        worst = max(_rounding_error(got[k], expected[k]) for k in expected)
        assert worst <= 4, (name, worst)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_hidden_layers"] == meta[name]["config"]["num_hidden_layers"]
    if "dtype: " in YAMLS[name]:
        assert cfg["dtype"] == meta[name]["config"]["dtype"]
    files = set(os.listdir(out))
    assert {"config.json", "mergekit_config.yml", "tokenizer.json", "tokenizer_config.json"} <= files
    assert set(meta[name]["files"]) - files <= {"README.md", "model.safetensors"}
    assert open(os.path.join(out, "mergekit_config.yml")).read() == yaml_for(name, root)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in got.values())


@pytest.mark.parametrize("name", RANDOM)
def test_dare_statistics_match_mergekit(root, reference, name):
    _, meta = reference
    out, _ = _run(root, name)
    got, _ = _read(out)
    ours = dare_statistics({k: v.astype(np.float32) for k, v in got.items()}, weights(0), weights(1))
    theirs = meta[name]["statistics"]
    assert abs(ours["changed"] - theirs["changed"]) < 0.04, (ours, theirs)  # ~2300 entries: std of a fraction ~0.01
    assert abs(ours["l1_ratio"] - theirs["l1_ratio"]) < 0.03, (ours, theirs)
    if name == "dare_linear":  # one input, weight 1: the merged delta is the rescaled masked delta, per tensor
        assert abs(ours["l1_ratio"] - 1) < 1e-5 and ours["l1_ratio_spread"] < 1e-5
        assert abs(ours["changed"] - 0.5) < 0.04
    again, _ = _run(root, name, out=os.path.join(root, "out", name + "_again"))
    assert all(np.array_equal(v, _read(again)[0][k]) for k, v in got.items())  # seeded: reproducible


def test_rank_window_ties_by_position():
    a = np.array([3, 1, 2, 2, 2, 5, 0], np.float32)
    window = mk_methods.RankWindow(a.copy(), 3, 6)  # ascending ranks 3..5: the last two 2s (by position) and the 3
    assert window(a[:3]).tolist() == [True, False, False] and window(a[3:]).tolist() == [True, True, False, False]
    assert window.kept_sum == 7 and window.total_sum == 15


def _mergekit_window(absd, lo, hi):
    """MergeKit's keep-mask: ascending ranks [lo, hi) of ``torch.sort(|d|)`` (NaN after every
    number; stable order here, the inputs have no ties)."""
    mask = np.zeros(absd.size, bool)
    mask[np.argsort(absd, kind="stable")[lo:hi]] = True
    return mask


@pytest.mark.parametrize("method,density,gamma", [("ties", 0.5, None), ("ties", 0.25, None),
                                                  ("breadcrumbs", 0.5, 0.1), ("breadcrumbs", 0.5, 0.05)])
def test_nan_deltas_rank_above_every_number(method, density, gamma):
    """A NaN |delta| takes a top rank at the TIES / breadcrumbs cut (MergeKit's sort), the numbers keep
    theirs: with one input of weight 1 the merge is base + delta * mask, NaN where delta is NaN."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=20).astype(np.float32)
    delta = (rng.permutation(np.linspace(0.1, 2, 20)) * rng.choice([-1, 1], 20)).astype(np.float32)
    delta[[3, 11]] = np.nan
    n = delta.size
    if gamma is None:
        lo, hi = n - max(1, int(density * n)), n
    else:
        lo = max(0, n - int(density * n) - int(gamma * n))
        hi = lo + int(density * n)
    expected = base + np.where(_mergekit_window(np.abs(delta), lo, hi), delta, 0)
    expected[np.isnan(delta)] = np.nan
    spec = mk_methods.METHODS[method]
    shared = {p.name: p.default for p in spec.params if p.scope == "shared"}
    per_input = {"weight": 1.0, "density": density, **({"gamma": gamma} if gamma else {})}
    out = np.empty(n, np.float32)
    job = mk_methods.TensorJob("t", [base, base + delta], 0, shared, [{}, per_input],
                               mk_methods.Precision(np.float32), out, (n,))
    mk_methods.merge_tensor(spec, job)
    np.testing.assert_array_equal(out, expected)


def test_dare_rescales_float16_deltas_in_float32():
    """MergeKit's ``bernoulli`` (CPU) casts a float16 delta to float32, scales it by the float32 L1
    ratio and rounds the product to float16 once (|delta| >= 0.06: the sums are exact in float32)."""
    rng = np.random.default_rng(1)
    n, density, seed = 64, 0.3, 5
    base = rng.normal(size=n).astype(np.float16)
    x = (base.astype(np.float32) + rng.uniform(0.1, 1.0, n) * rng.choice([-1, 1], n)).astype(np.float16)
    spec = mk_methods.METHODS["dare_linear"]
    shared = {p.name: p.default for p in spec.params if p.scope == "shared"}
    out = np.empty(n, np.float16)
    job = mk_methods.TensorJob("t", [base, x], 0, shared, [{}, {"weight": 1.0, "density": density}],
                               mk_methods.Precision(np.float16), out, (n,), seed=seed)
    mk_methods.merge_tensor(spec, job)
    d = (x.astype(np.float32) - base.astype(np.float32)).astype(np.float16).astype(np.float32)
    keep = mk_methods.dare_keep(seed, "t", 1, 0, n, density)
    scale = np.float32(np.abs(d).sum(dtype=np.float32)) / np.float32(np.abs(d * keep).sum(dtype=np.float32))
    rescaled = (d * keep * scale).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out, (base.astype(np.float32) + rescaled).astype(np.float16))


def test_sharded_output_and_cli(root, capsys):
    y = os.path.join(root, "cli.yml")
    with open(y, "w") as f:
        f.write(yaml_for("task_arithmetic", root))
    out = os.path.join(root, "out", "cli_sharded")
    cli.main(["merge", "--mergekit-yaml", y, out, "--max-shard-size", "2000"])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["method"] == "task_arithmetic" and stats["output"] == os.path.abspath(out)
    got, index = _read(out)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    ref, _ = _read(_run(root, "task_arithmetic", out=os.path.join(root, "out", "ta_one_shard"))[0])
    assert all(np.array_equal(got[k], ref[k]) for k in ref)


def test_output_safety(root, monkeypatch):
    out = os.path.join(root, "out", "safety")
    os.makedirs(out)
    with pytest.raises(UsageError, match="--overwrite"):
        _run(root, "linear", out=out)
    _run(root, "linear", out=out, overwrite=True)
    _run(root, "linear", out=out)  # our own previous output is replaced without the flag
    before = sorted(os.listdir(os.path.dirname(out)))
    calls = []

    def failing(spec, job):
        calls.append(job.name)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(spec, job)

    real = mk_methods.merge_tensor
    monkeypatch.setattr("mtl_jax.merging.mergekit.run.merge_tensor", failing)
    fresh = os.path.join(root, "out", "interrupted")
    with pytest.raises(KeyboardInterrupt):
        _run(root, "linear", out=fresh)
    assert not os.path.exists(fresh)
    assert sorted(os.listdir(os.path.dirname(out))) == before  # no partial sibling left
    with pytest.raises(UsageError, match="is the input|inside the input|contains the input"):
        _run(root, "linear", out=os.path.join(root, "m1"))


def _bad_models(root):
    bad = os.path.join(root, "bad")
    if not os.path.isdir(bad):
        w = weights(1)
        write_model(os.path.join(bad, "mistral"), w, {**CONFIG, "architectures": ["MistralForCausalLM"]})
        write_model(os.path.join(bad, "gpt2"), w, {**CONFIG, "architectures": ["GPT2LMHeadModel"]})
        big = {n: (np.concatenate([v, v[:8]]) if n in ("model.embed_tokens.weight", "lm_head.weight") else v) for n, v in w.items()}
        write_model(os.path.join(bad, "vocab40"), big, {**CONFIG, "vocab_size": 40})
        wide = dict(w, **{"model.layers.1.mlp.up_proj.weight": np.zeros((24, 8), np.float32)})
        write_model(os.path.join(bad, "shape"), wide, CONFIG)
        write_model(os.path.join(bad, "nolayers"), w, {k: v for k, v in CONFIG.items() if k != "num_hidden_layers"})
        biased = dict(w, **{f"model.layers.{i}.self_attn.{p}_proj.bias": np.zeros(n, np.float32)
                            for i in range(CONFIG["num_hidden_layers"]) for p, n in (("q", 8), ("k", 4), ("v", 4))})
        write_model(os.path.join(bad, "bias"), biased, {**CONFIG, "attention_bias": True})
        rotary = dict(w, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32)})
        write_model(os.path.join(bad, "rotary"), rotary, CONFIG)
        write_model(os.path.join(bad, "deeper"), w, {**CONFIG, "num_hidden_layers": CONFIG["num_hidden_layers"] - 1})
    return bad


TA = "merge_method: task_arithmetic\nbase_model: {root}/m0\nmodels:\n  - model: {other}\n    parameters: {{weight: 0.5}}\n"
BAD = {
    "unknown top key": ("merge_method: linear\nmodels:\n  - model: {root}/m1\n    parameters: {{weight: 1}}\nmerge_methd: x\n",
                        r"unknown key mergekit yaml.merge_methd; valid keys: base_model, dtype"),
    "unknown method": ("merge_method: tiez\nbase_model: {root}/m0\nmodels:\n  - model: {root}/m1\n",
                       r"unknown merge_method 'tiez'; valid: breadcrumbs, .*ties"),
    "unknown parameter": ("merge_method: ties\nbase_model: {root}/m0\nmodels:\n  - model: {root}/m1\n    parameters: {{weight: 1, densty: 0.5}}\n",
                          r"models\[0\].parameters.densty: unknown parameter for merge_method 'ties'; valid: int8_mask"),
    "unknown model key": ("merge_method: linear\nmodels:\n  - model: {root}/m1\n    params: {{weight: 1}}\n",
                          r"unknown key models\[0\].params; valid keys: model, parameters"),
    "shared parameter per model": ("merge_method: ties\nbase_model: {root}/m0\nmodels:\n  - model: {root}/m1\n    parameters: {{weight: 1, normalize: false}}\n",
                                   r"'normalize' is shared by all inputs"),
    "missing folder": (TA.replace("{other}", "{root}/nowhere"), r"models\[0\].model: model folder '.*nowhere' does not exist"),
    "missing weight": ("merge_method: ties\nbase_model: {root}/m0\nmodels:\n  - model: {root}/m1\n",
                       r"needs parameter 'weight' for models\[0\]"),
    "architecture": (TA.replace("{other}", "{root}/bad/mistral"), r"architectures differ: .* LlamaForCausalLM, .* MistralForCausalLM"),
    "unsupported architecture": (TA.replace("{other}", "{root}/bad/gpt2"), r"architecture 'GPT2LMHeadModel' is not supported"),
    "vocab": (TA.replace("{other}", "{root}/bad/vocab40"), r"vocab sizes differ: .* has 32, .* has 40"),
    "no layer count": (TA.replace("{other}", "{root}/bad/nolayers"), r"config.json': num_hidden_layers must be a "
                       r"non-negative integer, got None"),
    "shape": (TA.replace("{other}", "{root}/bad/shape"), r"tensor shapes differ at 'model.layers.1.mlp.up_proj.weight'"),
    "attention bias": (TA.replace("{other}", "{root}/bad/bias"),
                       r"bias' holds tensors outside the Llama template that the merge would drop \(MergeKit's llama "
                       r"template drops them too\): model.layers.0.self_attn.k_proj.bias, "
                       r"model.layers.0.self_attn.q_proj.bias, model.layers.0.self_attn.v_proj.bias and 6 more"),
    "layers past num_hidden_layers": (TA.replace("{other}", "{root}/bad/deeper"),
                                      r"deeper' holds tensors outside .*: model.layers.2.input_layernorm.weight, "),
    "layer range": ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {root}/m1\n        layer_range: [1, 4]\n",
                    r"slices\[0\].sources\[0\].layer_range \[1, 4\] goes past the 3 layers"),
    "slice lengths": ("merge_method: slerp\nbase_model: {root}/m1\nparameters: {{t: 0.5}}\nslices:\n  - sources:\n"
                      "      - model: {root}/m1\n        layer_range: [0, 2]\n      - model: {root}/m2\n        layer_range: [0, 3]\n",
                      r"all sources must span the same number of layers"),
    "slerp inputs": ("merge_method: slerp\nbase_model: {root}/m0\nparameters: {{t: 0.5}}\nmodels:\n  - model: {root}/m1\n  - model: {root}/m2\n",
                     r"'slerp' takes exactly 2 inputs"),
    "no base": ("merge_method: ties\nmodels:\n  - model: {root}/m1\n    parameters: {{weight: 1}}\n", r"'ties' needs a base_model"),
    "tokenizer": ("merge_method: linear\ntokenizer_source: union\nmodels:\n  - model: {root}/m1\n    parameters: {{weight: 1}}\n",
                  r"tokenizer_source: 'union' is not supported"),
    "bad dtype": ("merge_method: linear\ndtype: float8\nmodels:\n  - model: {root}/m1\n    parameters: {{weight: 1}}\n",
                  r"dtype: unknown dtype 'float8'; valid: bfloat16"),
    "bad value": ("merge_method: linear\nmodels:\n  - model: {root}/m1\n    parameters: {{weight: heavy}}\n",
                  r"parameter 'weight': 'heavy' is not a valid float"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_refused_before_writing(root, case):
    _bad_models(root)
    text, pattern = BAD[case]
    out = os.path.join(root, "out_bad", case.replace(" ", "_"))
    with pytest.raises(UsageError, match=pattern) as info:
        _run(root, "bad", text=text.format(root=root), out=out)
    assert "\n" not in str(info.value)
    assert not os.path.exists(out)
    parent = os.path.dirname(out)
    assert not os.path.isdir(parent) or not os.listdir(parent)


def test_rotary_buffers_are_not_refused(root):
    bad = _bad_models(root)
    out, _ = _run(root, "rotary", text=TA.replace("{other}", os.path.join(bad, "rotary")).format(root=root))
    tensors, _ = _read(out)
    assert "model.layers.0.self_attn.q_proj.weight" in tensors and not any("inv_freq" in n for n in tensors)
