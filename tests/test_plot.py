"""mtl_jax.plot: learning curves from a workdir's metrics.jsonl (written by the trainer's own
MetricWriter), the methods Delta-m% chart from the committed results, coefficient heatmaps."""

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="matplotlib not installed: pip install -e '.[experiments]'")

from matplotlib.image import imread  # noqa: E402

from mtl_jax import plot  # noqa: E402
from mtl_jax.train.reporting import MetricWriter  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def assert_png(path, min_width=200):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    height, width = imread(path).shape[:2]
    assert width >= min_width and height >= 100, (path, width, height)


def write_run(workdir, steps=40, eval_every=10, resume_from=None):
    """A workdir in the trainer's on-disk format: train window averages every 5 steps, an eval every
    ``eval_every``, results.json at the end; ``resume_from``: a second writer appends from that step
    (what a resumed run does)."""
    def log(writer, start):
        for step in range(start, steps + 1, 5):
            writer.write(step, "train", {"left/loss": 2.0 / step, "left/accuracy": 1 - 1 / step,
                                         "right/loss": 3.0 / step, "right/accuracy": 1 - 2 / step,
                                         "steps_per_sec": 10.0, "nonfinite_total": 0})
            if step % eval_every == 0:
                writer.write(step, "test", {"left/loss": 2.5 / step, "left/accuracy": 1 - 1.5 / step,
                                            "right/loss": math.nan, "right/accuracy": 1 - 2.5 / step})
    writer = MetricWriter(str(workdir))
    log(writer, 5)
    writer.close()
    if resume_from is not None:
        writer = MetricWriter(str(workdir))
        log(writer, resume_from)
        writer.close()
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"steps": steps, "delta_m": 1.25, "results": {}}, f)


def test_plot_run_writes_png_from_workdir(tmp_path):
    write_run(tmp_path, resume_from=25)
    curves = plot.read_metrics(str(tmp_path))
    assert sorted(curves) == ["test", "train"]
    steps, values = curves["train"]["left/loss"]
    np.testing.assert_array_equal(steps, np.arange(5, 41, 5))  # resumed steps appear once
    np.testing.assert_allclose(values, 2.0 / steps)
    assert "steps_per_sec" not in curves["train"]
    assert np.isnan(curves["test"]["right/loss"][1]).all()  # null (non-finite) -> NaN
    path = plot.plot_run(str(tmp_path))
    assert path == os.path.join(str(tmp_path), plot.RUN_FIGURE)
    assert_png(path)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left


def test_plot_main_and_truncated_last_line(tmp_path, capsys):
    write_run(tmp_path)
    with open(os.path.join(tmp_path, plot.METRICS_FILE), "a") as f:
        f.write('{"step": 45, "split": "tr')  # a run killed mid-write
    out = str(tmp_path / "curves.png")
    assert plot.main([str(tmp_path), "--out", out]) == [out]
    assert capsys.readouterr().out.strip() == out
    assert_png(out)


def test_plot_run_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot.plot_run(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot.plot_run(str(tmp_path))
    with open(tmp_path / plot.METRICS_FILE, "w") as f:
        f.write('not json\n{"step": 5, "split": "train", "left/loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a metrics line"):
        plot.plot_run(str(tmp_path))
    with pytest.raises(SystemExit):
        plot.main([])


def test_methods_chart_from_committed_results(tmp_path):
    paths = [os.path.join(ROOT, "experiments", "results", name) for name in plot.METHODS_RESULTS]
    results = plot.load_methods_results(paths)
    deltas = plot.methods_delta_m(results)
    # The table's numbers (experiments/results/multimnist_methods.md): EW 4.86 +- 1.05, DB-MTL 2.70 +- 1.06.
    assert f"{deltas['ew', 'plain'].mean():.2f} ± {deltas['ew', 'plain'].std():.2f}" == "4.86 ± 1.05"
    assert f"{deltas['db_mtl', 'plain'].mean():.2f}" == "2.70"
    assert len({m for m, v in deltas if v == "fmtl"}) == 26
    assert_png(plot.plot_methods(results, str(tmp_path / "methods.png"), title="t"))


def test_merge_coefficient_heatmap(tmp_path):
    tasks = ["a", "b", "c"]
    assert_png(plot.plot_merge_coefficients(np.linspace(0, 1, 12).reshape(3, 4), tasks, str(tmp_path / "lw.png")),
               min_width=100)
    assert_png(plot.plot_merge_coefficients([0.3, 0.2, 0.4], tasks, str(tmp_path / "tw.png")), min_width=100)
    with pytest.raises(ValueError, match="do not match 3 tasks"):
        plot.plot_merge_coefficients(np.ones((2, 4)), tasks, str(tmp_path / "bad.png"))
    results = {"config": {"tasks": tasks}, "results": {"0": {
        "AdaMerging (layer-wise)": {"coefficients": np.ones((3, 2)).tolist(), "coefficient_groups": ["b0", "b1"]},
        "Task arithmetic": {"hparams": {"lam": 0.1}}}}}
    with open(tmp_path / "merging.json", "w") as f:
        json.dump(results, f)
    written = plot.merge_coefficient_figures(str(tmp_path / "merging.json"), str(tmp_path / "img"))
    assert [os.path.basename(p) for p in written] == ["merging_adamerging_layer_wise_seed0.png"]
