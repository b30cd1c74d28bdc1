"""The generality benchmark's WiSE-FT sweep and frontier report (benchmarks/phantom_generality/)."""
from __future__ import annotations

import argparse
import json

import pytest


def test_wise_sweep_equals_retraining_and_report_draws_the_frontier(tmp_path):
    from benchmarks.phantom_generality import report, run

    out = tmp_path / "g.json"
    args = argparse.Namespace(split="val", seeds=1, first_seed=0, findings="nodule", recipes="transfer,full",
                              eval_per_class=6, backend="phantom:base", no_placebo=False, placebo="full",
                              oracle="full", wise="0.5", quick=True, out=str(out))
    res = run(args)
    rows = res["findings"]["nodule"]["per_seed"]
    # evaluating start + 0.5 (fine-tuned - start) equals fine-tuning with wise_alpha 0.5 (the bundle recipe)
    assert rows["full"][0]["after_wise"]["0.5"]["confusion"] == rows["transfer"][0]["after"]["confusion"]
    curves = res["findings"]["nodule"]["summary"]["full"]["wise"]
    assert set(curves) == {"after", "placebo", "oracle"} and set(curves["oracle"]) == {"0.5", "1"}
    assert "placebo" not in rows["transfer"][0] and "oracle" in rows["full"][0]
    plot = tmp_path / "frontier.png"
    reach = report([out], plot)
    assert plot.stat().st_size > 0 and set(reach["nodule"]) == {"full"}
    assert [p["alpha"] for p in reach["nodule"]["full"]] == [0.5, 1.0]
    assert json.loads(out.read_text())["wise_alphas"] == [0.5, 1.0]
    # results of one finding split over several files (one run per recipe) are merged, not overwritten
    other = json.loads(out.read_text())
    f = other["findings"]["nodule"]
    f["summary"] = {"full2": f["summary"]["full"]}
    other["recipes"] = {"full2": other["recipes"]["full"]}
    (tmp_path / "g2.json").write_text(json.dumps(other))
    assert set(report([out, tmp_path / "g2.json"], None)["nodule"]) == {"full", "full2"}


def test_at_equal_loss_interpolates_along_known_loss():
    from benchmarks.phantom_generality import at_equal_loss

    curve = [{"known_loss": 0.0, "novel_gain": 0.0}, {"known_loss": 0.1, "novel_gain": 0.5},
             {"known_loss": 0.04, "novel_gain": 0.2}]
    assert at_equal_loss(curve, 0.07, "novel_gain") == pytest.approx(0.35)
    assert at_equal_loss(curve, 0.5, "novel_gain") == pytest.approx(0.5)  # beyond the end: the end value
