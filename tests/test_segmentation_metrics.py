"""Segmentation metrics (DSC/NSD/IoU), their empty cases, and the ``medkt metrics`` command."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from helpers_segmentation import write_mask_png
from medkt.errors import DataError
from medkt.segmentation.cli import register
from medkt.segmentation.metrics import binarize, pair_by_name, score_folders, segmentation_scores


def square(shape=(40, 40), y0=10, x0=10, size=12):
    m = np.zeros(shape, bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def test_identical_masks_score_one():
    m = square()
    assert segmentation_scores(m, m) == {"dsc": 1.0, "nsd": 1.0, "iou": 1.0}


def test_dsc_iou_values_match_hand_computation():
    a = square(x0=10)  # 144 px
    b = square(x0=14)  # shifted by 4 px: overlap 12 x 8 = 96
    s = segmentation_scores(a, b)
    assert s["dsc"] == pytest.approx(2 * 96 / 288)
    assert s["iou"] == pytest.approx(96 / (288 - 96))


def test_nsd_tolerance_in_pixels_and_mm():
    a = square(x0=10)
    b = square(x0=13)  # 3-px shift of the vertical edges
    tight = segmentation_scores(a, b, nsd_tolerance=1.0)["nsd"]
    loose = segmentation_scores(a, b, nsd_tolerance=3.0)["nsd"]
    assert 0.0 < tight < loose == pytest.approx(1.0)
    # 0.5 mm pixels: a 3 px shift is 1.5 mm, inside a 2 mm tolerance, outside 1 mm
    assert segmentation_scores(a, b, nsd_tolerance=2.0, spacing=(0.5, 0.5))["nsd"] == pytest.approx(1.0)
    assert segmentation_scores(a, b, nsd_tolerance=1.0, spacing=(0.5, 0.5))["nsd"] < 1.0


@pytest.mark.parametrize(
    "pred_empty,gt_empty,expected",
    [(True, True, 1.0), (True, False, 0.0), (False, True, 0.0)],
)
def test_empty_cases(pred_empty, gt_empty, expected):
    z = np.zeros((32, 32), bool)
    m = square((32, 32))
    s = segmentation_scores(z if pred_empty else m, z if gt_empty else m)
    assert s == {"dsc": expected, "nsd": expected, "iou": expected}


def test_shape_mismatch_is_an_error():
    with pytest.raises(DataError, match="shape"):
        segmentation_scores(np.zeros((4, 4)), np.zeros((5, 5)))


def test_binarize_formats():
    assert binarize(np.array([[0, 255]], np.uint8)).tolist() == [[False, True]]
    assert binarize(np.array([[0, 1]], np.uint8)).tolist() == [[False, True]]
    assert binarize(np.array([[0.0, 1.0]])).tolist() == [[False, True]]
    # grey / probability maps need an explicit threshold; label maps a label (ambiguous otherwise)
    assert binarize(np.array([[0.2, 0.7]]), threshold=0.5).tolist() == [[False, True]]
    assert binarize(np.array([[120, 140]], np.uint8), threshold=0.5).tolist() == [[False, True]]  # JPEG-ish grey
    assert binarize(np.array([[0, 2, 1]], np.uint8), label=2).tolist() == [[False, True, False]]
    for arr in (np.array([[0.2, 0.7]]), np.array([[120, 140]], np.uint8), np.array([[0, 2]], np.uint8)):
        with pytest.raises(DataError, match="ambiguous mask values"):
            binarize(arr)


def test_pairing_is_by_name_and_strict(tmp_path):
    pred = {"b.png": tmp_path / "b.png", "a.png": tmp_path / "a.png"}
    gt = {"a.png": tmp_path / "x/a.png", "b.png": tmp_path / "x/b.png"}
    assert [n for n, _, _ in pair_by_name(pred, gt)] == ["a.png", "b.png"]
    with pytest.raises(DataError, match="without ground truth"):
        pair_by_name({**pred, "c.png": tmp_path / "c.png"}, gt)


def _folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    write_mask_png(gt / "img1.png", square())
    write_mask_png(pred / "img1.png", square())
    write_mask_png(gt / "img2.png", square(x0=10))
    write_mask_png(pred / "img2.png", square(x0=14))
    write_mask_png(gt / "img3.png", np.zeros((40, 40), bool))  # both empty -> 1
    write_mask_png(pred / "img3.png", np.zeros((40, 40), bool))
    return pred, gt


def test_score_folders_means(tmp_path):
    pred, gt = _folders(tmp_path)
    table = score_folders(pred, gt)
    assert table.names == ["img1.png", "img2.png", "img3.png"]
    m = table.means()
    assert m["dsc"] == pytest.approx((1 + 2 / 3 + 1) / 3)


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:  # keep "metrics" a sub-command, as in the real medkt app
        pass

    register(app)
    return app


def test_cli_metrics_prints_means_and_writes_csv(tmp_path):
    pred, gt = _folders(tmp_path)
    out = tmp_path / "scores.csv"
    res = CliRunner().invoke(_app(), ["metrics", "--pred", str(pred), "--gt", str(gt), "--nsd-tolerance", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "DSC: 0.8889" in res.output and "IoU:" in res.output and "NSD@2px:" in res.output
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["name", "dsc", "nsd", "iou"]
    assert [r["name"] for r in rows] == ["img1.png", "img2.png", "img3.png"]
    assert float(rows[1]["dsc"]) == pytest.approx(2 / 3, abs=1e-6)
    assert float(rows[2]["iou"]) == 1.0


def test_cli_metrics_mismatch_exit_2(tmp_path):
    pred, gt = _folders(tmp_path)
    write_mask_png(pred / "extra.png", square())
    res = CliRunner().invoke(_app(), ["metrics", "--pred", str(pred), "--gt", str(gt)])
    assert res.exit_code == 2
    assert "extra.png" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_cli_metrics_unreadable_file_exit_2(tmp_path):
    pred, gt = _folders(tmp_path)
    (pred / "img1.png").write_bytes(b"not a png")
    res = CliRunner().invoke(_app(), ["metrics", "--pred", str(pred), "--gt", str(gt)])
    assert res.exit_code == 2
    assert "unreadable" in res.output and "img1.png" in res.output


@pytest.mark.slow  # two interpreter start-ups with the whole CLI imported (~15 s each on this machine)
def test_real_medkt_entry_point_exit_codes(tmp_path):
    """Through ``python -m medkt`` (the app runs with standalone_mode=False there)."""
    import os
    import subprocess
    import sys

    pred, gt = _folders(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "medkt", "metrics", "--pred", str(pred), "--gt", str(gt)],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "DSC: 0.8889" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "medkt", "metrics", "--pred", str(pred), "--gt", str(tmp_path / "none")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
