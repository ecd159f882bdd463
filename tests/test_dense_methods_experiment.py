"""experiments/dense_methods.py: its smoke mode end to end (real training on a tiny rendered set), and
the table / Delta-m% bookkeeping on known numbers."""

import json

import numpy as np
import pytest

from experiments import dense_methods
from mtl_jax.data.rendered_scenes import rendered_scenes_tasks


def _results(scale: float) -> dict:
    """Results of all three tasks, every metric ``scale`` times a fixed reference."""
    return {"segmentation": {"miou": 0.5 * scale, "pixel_accuracy": 0.8 * scale},
            "depth": {"abs_err": 0.4 * scale, "rel_err": 0.2 * scale},
            "normal": {"angle_mean": 30.0 * scale, "angle_median": 25.0 * scale, "within_11_25": 0.3 * scale,
                       "within_22_5": 0.5 * scale, "within_30": 0.6 * scale}}


def test_plan_is_seed_major_with_single_task_fmtl_and_rep_mtl_rows():
    plan = dense_methods.plan_runs(["ew", "famo"], ["", "fmtl"], [0.9], [0, 1])
    assert len(plan) == 2 * (3 + 4 + 2)
    assert [p[0] for p in plan] == [0] * 9 + [1] * 9
    rows = [p[1] for p in plan[:9]]
    assert rows[:3] == ["single/segmentation", "single/depth", "single/normal"]
    assert rows[3:] == ["ew/plain", "ew/fmtl", "famo/plain", "famo/fmtl", "ew/segnet_split",
                        "ew/segnet_split_repmtl0.9"]
    assert plan[0][3] == "task=segmentation"
    rep = plan[8][4]
    assert "model.name='segnet_split'" in rep and "rep_mtl.tsr_weight=0.9" in rep
    assert dense_methods.row_label("ew/segnet_split_repmtl0.9") == ("ew", "SegNet HPS + Rep-MTL λ=0.9")
    assert dense_methods.row_label("famo/fmtl") == ("famo", "F-MTL")


def test_report_averages_nine_metrics_against_the_single_task_mean(tmp_path):
    tasks = rendered_scenes_tasks()
    single = {f"single/{t.name}": {0: {t.name: _results(1.0)[t.name]}, 1: {t.name: _results(1.0)[t.name]}}
              for t in tasks}
    # every metric 10% larger: the 5 higher-is-better terms gain, the 4 lower-is-better ones lose
    results = {**single, "ew/plain": {0: _results(1.1), 1: _results(1.1)}}
    plan = dense_methods.plan_runs(["ew"], [""], [], [0, 1, 2])
    out = str(tmp_path / "dense")
    text = dense_methods.write_report(out, "caption", results, tasks, plan, ["--seeds=0,1,2"])
    expected = 100 * (4 * 0.1 - 5 * 0.1) / 9
    stored = json.load(open(out + ".json"))
    np.testing.assert_allclose(stored["delta_m"]["ew/plain"], [expected, expected], atol=1e-9)
    assert "partial: 8 of 12 runs" in text
    row = next(line for line in text.splitlines() if line.startswith("| ew |"))
    assert row.count("|") == 14 and f"{expected:.2f} ± 0.00" in row
    assert "| single-task | - | 2 | 50.00 |" in text


@pytest.mark.slow
def test_smoke_mode_end_to_end(tmp_path):
    out = str(tmp_path / "dense_methods")
    argv = ["--smoke", "--methods=ew", "--sharpness=", "--rep-mtl=", "--seeds=0", f"--workdir={tmp_path / 'runs'}",
            f"--out={out}", f"--config.data.data_dir={tmp_path / 'data'}"]
    dense_methods.main(argv)
    stored = json.load(open(out + ".json"))
    assert set(stored["runs"]) == {"single/segmentation", "single/depth", "single/normal", "ew/plain"}
    assert set(stored["baselines"]) == {"segmentation", "depth", "normal"}
    assert np.isfinite(stored["delta_m"]["ew/plain"][0])
    text = open(out + ".md").read()
    assert "| ew | - | 1 |" in text and "partial" not in text
    # a second call reads every run back from the cache
    dense_methods.main(argv)
    assert json.load(open(out + ".json"))["runs"] == stored["runs"]
