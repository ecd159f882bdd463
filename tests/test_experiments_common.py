"""experiments.common's result files: every writer goes through a temporary sibling and a rename,
so a process killed mid-write (or a value JSON rejects) leaves the previous file intact and no
temporary behind; the merging benchmark's per-row results cache survives such a kill."""

import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments import common
from experiments.merging import rows as merging_rows


class Killed(BaseException):
    """Stands for the process being killed mid-write (not an Exception: nothing catches it)."""


def _dump_then_die(data, f, **kw):
    f.write(json.dumps(data, **kw)[:7])  # part of the document reaches the file, then the process dies
    raise Killed


def test_write_json_keeps_the_old_file_when_a_write_dies(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    common.write_json(path, {"a": 1})
    monkeypatch.setattr(common.json, "dump", _dump_then_die)
    with pytest.raises(Killed):
        common.write_json(path, {"a": 1, "b": [1.0, 2.0, 3.0]})
    monkeypatch.undo()
    assert common.read_json(path) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]
    with pytest.raises(TypeError):
        common.write_json(path, {"a": object()})  # json.dump raises part-way through the document
    assert common.read_json(path) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]


def test_read_json_names_a_broken_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"a": [1, 2')
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        common.read_json(str(path))
    assert path.read_text() == '{"a": [1, 2'  # left in place


def test_write_text_and_save_tree_are_atomic(tmp_path, monkeypatch):
    md = str(tmp_path / "table.md")
    common.write_text(md, "old\n")
    monkeypatch.setattr(common.np, "savez", lambda f, **arrays: (f.write(b"PK\x03"), (_ for _ in ()).throw(Killed)))
    tree_path = str(tmp_path / "tree.npz")
    with pytest.raises(Killed):
        common.save_tree(tree_path, {"w": np.ones(3)})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["table.md"] and open(md).read() == "old\n"
    common.save_tree(tree_path, {"w": np.arange(3.0)})
    np.testing.assert_array_equal(np.load(tree_path)["w"], np.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["table.md", "tree.npz"]


def _merging_config():
    c = ConfigDict()
    for key in ("probe", "finetune", "multitask", "merge", "learned"):
        c[key] = ConfigDict({"x": 1})
    c.eval_batch, c.freeze_heads = 8, False
    return c


def test_run_seed_resumes_the_rows_written_before_a_kill(tmp_path, monkeypatch):
    computed = []

    def fake_seed_rows(config, trainers, trunk, pretrained, tasks, seed, folder, done, hooks, save):
        rows = {}
        for name in ("Task arithmetic", "TIES"):
            if name not in done:
                computed.append(name)
                rows[name] = {"acc": [0.5], "hparams": {}, "seconds": 1.0}
                save(rows)
        return {**rows, **done}

    monkeypatch.setattr(merging_rows, "seed_rows", fake_seed_rows)
    real_dump = json.dump
    calls = []

    def dies_on_second_save(data, f, **kw):
        calls.append(1)
        return _dump_then_die(data, f, **kw) if len(calls) == 2 else real_dump(data, f, **kw)

    monkeypatch.setattr(common.json, "dump", dies_on_second_save)
    with pytest.raises(Killed):
        merging_rows.run_seed(_merging_config(), None, None, None, [], 0, str(tmp_path))
    monkeypatch.setattr(common.json, "dump", real_dump)
    results = merging_rows.run_seed(_merging_config(), None, None, None, [], 0, str(tmp_path))
    assert computed == ["Task arithmetic", "TIES", "TIES"]  # the restart computes only the row the kill lost
    assert sorted(results) == ["TIES", "Task arithmetic"]
    (folder,) = os.listdir(tmp_path)
    (stored,) = os.listdir(tmp_path / folder)
    assert sorted(common.read_json(str(tmp_path / folder / stored))) == ["TIES", "Task arithmetic"]
