"""Where a merge may write (``mtl_jax.merging.output_safety``): never over an input, a directory
holding one or the current directory; over an existing path only if a merge of ours wrote it or
with ``overwrite``; always through a hidden temporary sibling renamed into place, so that a
failed merge leaves no output and keeps a previous one."""

import os

import numpy as np
import pytest

from mtl_jax.errors import UsageError
from mtl_jax.merging import output_safety as O
from mtl_jax.merging import streaming as S

LEAVES = {"a": (4, 3), "b": (5,)}


def _pool(directory, num_tasks=2, seed=0):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    p0 = {k: rng.normal(size=s).astype(np.float32) for k, s in LEAVES.items()}
    paths = [os.path.join(directory, "pretrained.safetensors")]
    S.save_safetensors(p0, paths[0])
    for t in range(num_tasks):
        paths.append(os.path.join(directory, f"task_{t}.safetensors"))
        S.save_safetensors({k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in p0.items()}, paths[-1])
    return paths


def _snapshot(directory):
    """{relative path: bytes} of every file below ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), directory)] = fh.read()
    return out


def _orbax(path):
    writer = S.OrbaxWriter(str(path), [S.LeafSpec("a", (2,), np.dtype(np.float32))])
    writer.write("a", np.ones(2, np.float32))
    return writer


def _merge(paths, output, **kw):
    return S.stream_merge(paths[0], paths[1:], str(output), "task_arithmetic", **kw)


def test_output_that_is_an_input_is_refused_and_left_intact(tmp_path):
    paths = _pool(tmp_path / "pool")
    before = _snapshot(tmp_path)
    for i, label in [(0, "pretrained"), (2, r"finetuned\[1\]")]:
        for overwrite in (False, True):
            with pytest.raises(O.OutputPathError, match=f"^output '{paths[i]}' is the input {label} "):
                _merge(paths, paths[i], overwrite=overwrite)
    via_link = tmp_path / "link.safetensors"
    os.symlink(paths[1], via_link)
    with pytest.raises(O.OutputPathError, match=r"is the input finetuned\[0\]"):
        _merge(paths, via_link, overwrite=True)
    os.remove(via_link)
    assert _snapshot(tmp_path) == before


def test_output_holding_an_input_or_the_working_directory_is_refused(tmp_path, monkeypatch):
    """The model pool, its parent, ``.`` and an orbax input's inside: refused even with
    ``overwrite``, before anything is written (the pool and the directory stay as they were)."""
    paths = _pool(tmp_path / "pool")
    S.save_safetensors({"x": np.ones(2, np.float32)}, str(tmp_path / "unrelated.safetensors"))
    before = _snapshot(tmp_path)
    for output, what in [(tmp_path / "pool", "contains the input pretrained"), (tmp_path, "contains the input pretrained")]:
        with pytest.raises(O.OutputPathError, match=f"^output '{output}' {what} '{paths[0]}'; name a new path$"):
            _merge(paths, output, overwrite=True, output_format="orbax")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for output in (".", "..", "/"):
        with pytest.raises(O.OutputPathError, match=f"^output '{output}' is the current directory or one above it"):
            _merge(paths, output, overwrite=True)
    assert _snapshot(tmp_path) == before
    orbax_input = tmp_path / "orbax_in"
    _orbax(orbax_input).close()
    with pytest.raises(O.OutputPathError, match="is inside the input pretrained"):
        S.stream_merge(str(orbax_input), paths[1:], str(orbax_input / "merged.safetensors"))


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_existing_output_not_ours_needs_overwrite(tmp_path, fmt):
    """A directory of the user's (or a file that no merge of ours wrote) is refused and kept;
    with ``overwrite`` it is replaced by the new output (moved aside and deleted only after)."""
    paths = _pool(tmp_path / "pool")
    for kind in ("directory", "file"):
        output = tmp_path / f"{kind}.{fmt}"
        if kind == "directory":
            output.mkdir()
            (output / "notes.txt").write_text("mine")
        else:
            S.save_safetensors({"x": np.ones(2, np.float32)}, str(output))
        before = _snapshot(tmp_path)
        with pytest.raises(O.OutputPathError, match=f"^output '{output}' is an existing {kind} that is not a previous "
                           "merge output .*; pass --overwrite to replace it$"):
            _merge(paths, output, output_format=fmt)
        assert _snapshot(tmp_path) == before
        _merge(paths, output, output_format=fmt, overwrite=True)
        assert O.is_previous_output(str(output)) and not os.path.exists(output / "notes.txt")
    assert sorted(os.listdir(tmp_path)) == sorted(["pool", f"directory.{fmt}", f"file.{fmt}"])  # no temporaries


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_a_rerun_replaces_its_previous_output(tmp_path, fmt):
    paths = _pool(tmp_path / "pool")
    output = tmp_path / f"merged.{fmt}"
    _merge(paths, output, output_format=fmt, lam=0.3)
    assert O.is_previous_output(str(output))
    _merge(paths, output, output_format=fmt, lam=1.0)
    merged = S.open_checkpoint(str(output))
    p0, ft = S.load_safetensors(paths[0]), [S.load_safetensors(p) for p in paths[1:]]
    np.testing.assert_allclose(merged.read("a"), p0["a"] + sum(f["a"] - p0["a"] for f in ft), rtol=1e-6)
    merged.close()
    assert sorted(os.listdir(tmp_path)) == sorted(["pool", f"merged.{fmt}"])


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_a_failed_merge_leaves_no_output_and_keeps_the_previous_one(tmp_path, fmt):
    """The failure comes while the output is being written (a NaN in the last fine-tuned leaf):
    neither the new output nor a temporary remains, and the previous output is untouched."""
    paths = _pool(tmp_path / "pool")
    output = tmp_path / f"merged.{fmt}"
    bad = S.load_safetensors(paths[2])
    bad["b"][4] = np.nan
    S.save_safetensors(bad, paths[2])
    with pytest.raises(UsageError, match="non-finite"):
        _merge(paths, output, output_format=fmt)
    assert sorted(os.listdir(tmp_path)) == ["pool"]
    _merge(paths, output, output_format=fmt, allow_nonfinite=True)
    before = _snapshot(tmp_path)
    with pytest.raises(UsageError, match="non-finite"):
        _merge(paths, output, output_format=fmt, lam=0.5)
    assert _snapshot(tmp_path) == before


def test_commit_fsyncs_and_removes_the_old_output_last(tmp_path, monkeypatch):
    """The file, and the directory after the rename, are fsynced; replacing a directory renames
    the old one aside first, and a failed rename of the new one puts the old one back."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    out = tmp_path / "out.safetensors"
    S.save_safetensors({"a": np.ones(3, np.float32)}, str(out))
    assert len(synced) == 2 and os.path.basename(synced[0]).startswith(".out.safetensors.partial-")
    assert synced[1] == str(tmp_path)

    old = tmp_path / "old_dir"
    old.mkdir()
    (old / O.MARKER_FILE).write_text("{}")
    (old / "payload").write_text("previous output")
    new = tmp_path / "new_dir"
    new.mkdir()
    real_rename = os.rename

    def failing_rename(src, dst):
        if str(src) == str(new):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        O.commit(str(new), str(old))
    assert (old / "payload").read_text() == "previous output"
    assert sorted(os.listdir(tmp_path)) == ["new_dir", "old_dir", "out.safetensors"]
    monkeypatch.setattr(os, "rename", real_rename)
    O.commit(str(new), str(old))
    assert sorted(os.listdir(tmp_path)) == ["old_dir", "out.safetensors"] and os.listdir(old) == []


def test_writers_never_remove_a_directory_that_is_not_ours(tmp_path):
    """Used directly (no ``check_output``), a writer still refuses to replace a user's directory."""
    target = tmp_path / "data"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    writer = S.SafetensorsWriter(str(target), [S.LeafSpec("a", (2,), np.dtype(np.float32))])
    writer.write("a", np.ones(2, np.float32))
    with pytest.raises(O.OutputPathError, match="is an existing directory that is not a previous merge output"):
        writer.close()
    with pytest.raises(O.OutputPathError, match="is an existing directory"):
        _orbax(target).close()
    assert sorted(os.listdir(tmp_path)) == ["data"] and (target / "keep.txt").read_text() == "x"
