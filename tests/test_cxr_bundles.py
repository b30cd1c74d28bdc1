"""End-to-end chest X-ray bundles on a tiny MedCLIP-shaped model and synthetic data written in the
real on-disk formats: JSRT raw .IMG (+ a DICOM copy), CheXpert JPEG; bad input -> exit 2."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from helpers_medclip import chest_like, write_dicom
from medkt.data.prepare import prepare
from medkt.data.readers import write_jsrt_raw

TINY_INVERSION = json.dumps({"steps": 3, "lr": 0.1, "checkpoint_every": 0})
FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """MEDKT_DATA layout: jsrt/ (raw .IMG, one DICOM) and chexpert/ (JPEG), manifests prepared."""
    base = tmp_path_factory.mktemp("medkt_data")
    rng = np.random.default_rng(0)
    jsrt = base / "jsrt"
    clinical = []
    for i, kind in enumerate(["cancer", "benign", "cancer", "benign"], start=1):
        img = chest_like(rng, 2048, nodule=0.25, kind=kind)
        name = f"JPCLN{i:03d}"
        if i == 4:  # a user-converted DICOM copy of a JSRT image
            write_dicom(jsrt / "images" / f"{name}.dcm", img[::8, ::8], window=(2048, 4096))
        else:
            write_jsrt_raw(img, jsrt / "images" / f"{name}.IMG")
        clinical.append(f"{name}.IMG\t3\t20\t60\tmale\t1000\t1000\t{'malignant' if kind == 'cancer' else 'benign'}\tr.upper lobe\tx")
    (jsrt / "CLNDAT_EN.txt").write_text("\n".join(clinical) + "\n")
    prepare("jsrt", jsrt)

    chex = base / "chexpert"
    ds = chex / "CheXpert-v1.0-small"
    ds.mkdir(parents=True)
    records = []
    for c in FIVE:
        for k in range(2):
            rel = f"CheXpert-v1.0-small/train/patient{len(records):05d}/study1/view1_frontal.jpg"
            (chex / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.rint(chest_like(rng, 48, nodule=0.1 * k, kind="benign") * 255).astype(np.uint8)).save(chex / rel)
            rec = {"Path": rel, "Frontal/Lateral": "Frontal", "AP/PA": "AP", "No Finding": ""}
            rec.update({f: "" for f in ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                                        "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                                        "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]})
            rec[c] = "1.0"
            records.append(rec)
    with open(ds / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    prepare("chexpert_5x200c", chex, n_per_class=2, seed=0)
    return base


def _cli(monkeypatch, capsys, *args):
    """Run `medkt ARGS` in-process; returns (exit code, captured out/err)."""
    from conftest import run_medkt_in_process

    return run_medkt_in_process(monkeypatch, capsys, *args)


def test_jsrt_nodules_bundle_end_to_end(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDKT_DATA", str(data_dir))
    out = tmp_path / "run"
    code, io = _cli(monkeypatch, capsys, "transfer", "--bundle", "jsrt_nodules", "--output", str(out),
                    "--set", "backend=medclip:tiny@random", "--set", f"inversion={TINY_INVERSION}",
                    "--set", "multipliers=[1, 1, 3]")
    assert code == 0, io.err
    results = json.loads((out / "results.json").read_text())
    assert results["pipeline"] == "cxr_transfer_sweep" and not (tmp_path / "run.partial").exists()
    info = results["evaluation_sets"]
    assert info["jsrt"]["n_images"] == 4 and info["chexpert_5x200c"]["n_images"] == 10
    assert info["chexpert_5x200c"]["n_prompts"] == {c: 10 for c in FIVE}
    runs = results["runs"]
    # both concepts (Tab.2: benign base lr 1e-5, lung cancer 1e-4) x the selected multipliers
    assert [(r["concepts"], r["multiplier"]) for r in runs] == [
        (["benign nodule"], 1.0), (["benign nodule"], 1.0), (["benign nodule"], 3.0),
        (["lung cancer"], 1.0), (["lung cancer"], 1.0), (["lung cancer"], 3.0)]
    assert [r["lr"] for r in runs] == pytest.approx([1e-5, 1e-5, 3e-5, 1e-4, 1e-4, 3e-4])
    # every run starts from the original weights: two identical runs give identical scores
    assert runs[0]["evaluations"] == runs[1]["evaluations"] and runs[3]["evaluations"] == runs[4]["evaluations"]
    assert all(r["finetune"]["steps"] == 3 for r in runs)  # 10 inverted images, batch 4, 1 epoch
    table = results["summary_table"]
    for needle in ("| JSRT | benign nodule |", "| JSRT | lung cancer |", "| CheXpert-5x200c | Pleural Effusion |",
                   "| CheXpert-5x200c | **top-1** |", "baseline", "lung cancer x3 (lr 3e-04)"):
        assert needle in table
    assert table in io.out  # the CLI prints the one table
    report = (out / "report.md").read_text()
    assert "0 bad rows skipped" in report and (out / "inversion" / "lung_cancer" / "grid.png").is_file()
    # forgetting warnings: per run against the baseline, all of them at the top of the report
    from medkt.evaluation import forgetting_warnings

    n_warn = sum(len(forgetting_warnings(results["baseline"][n]["per_class"], r["evaluations"][n]["per_class"],
                                         r["concepts"])) for r in runs for n in r["evaluations"])
    assert results["warnings"] == [w for r in runs for w in r["warnings"]] and len(results["warnings"]) == n_warn
    head = report.split("- backend:")[0]
    assert all(w in head for w in results["warnings"])


def test_chexpert_bundles_end_to_end(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDKT_DATA", str(data_dir))
    code, io = _cli(monkeypatch, capsys, "transfer", "--bundle", "chexpert_5x200c_medclip", "--output",
                    str(tmp_path / "eval"), "--set", "backend=medclip:tiny@random")
    assert code == 0, io.err
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    ev = res["evaluations"]["chexpert_5x200c"]
    assert sorted(ev["per_class"]) == sorted(FIVE) and ev["n_images"] == 10
    assert 0.0 <= ev["accuracy"] <= 1.0 and "| CheXpert-5x200c | **top-1** |" in io.out

    code, io = _cli(monkeypatch, capsys, "transfer", "--bundle", "chexpert_clip_out_of_domain", "--output",
                    str(tmp_path / "ood"), "--set", "backend=clip:medkt-tiny-ViT@random",
                    "--set", f"inversion={TINY_INVERSION}", "--set", "concepts#0#n_images=2",
                    "--set", "finetune#epochs=1")
    assert code == 0, io.err
    res = json.loads((tmp_path / "ood" / "results.json").read_text())
    assert res["mode"] == "joint" and len(res["runs"]) == 1
    assert res["runs"][0]["concepts"] == sorted(FIVE) and res["runs"][0]["lr"] == pytest.approx(5e-5)


def _copy_manifest(data_dir, tmp_path, rows_extra):
    src = data_dir / "jsrt" / "jsrt.csv"
    dst = tmp_path / "jsrt_bad.csv"
    dst.write_text(src.read_text() + "".join(rows_extra))
    return dst


@pytest.mark.parametrize("extra, message", [
    ("images/JPCLN009.IMG,lung cancer,,test,\n", "jsrt_bad.csv:6: file not found"),
    ("images/JPCLN001.IMG,pneumonia,,test,\n", "jsrt_bad.csv:6: label 'pneumonia' is not one of the classes"),
    ("images/corrupt.IMG,lung cancer,,test,\n", "jsrt_bad.csv:6: "),
])
def test_bad_rows_exit_2_with_one_line_and_no_output(data_dir, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setenv("MEDKT_DATA", str(data_dir))
    (data_dir / "jsrt" / "images" / "corrupt.IMG").write_bytes(b"\x00" * 1000)
    manifest = _copy_manifest(data_dir, tmp_path, [extra])
    out = tmp_path / "run"
    args = ["transfer", "--bundle", "jsrt_nodules", "--output", str(out), "--set", "backend=medclip:tiny@random",
            "--set", f"inversion={TINY_INVERSION}", "--set", "multipliers=[1]", "--set", f"jsrt_manifest={manifest}"]
    code, io = _cli(monkeypatch, capsys, *args)
    assert code == 2 and io.err.startswith("error: ") and io.err.count("\n") == 1, io.err
    assert message in io.err
    assert not out.exists() and not (tmp_path / "run.partial").exists()
    # --skip-bad (bundle key skip_bad): the run completes and the report counts the row
    code, io = _cli(monkeypatch, capsys, *args, "--set", "skip_bad=true", "--set", 'concept_filter=["lung cancer"]')
    assert code == 0, io.err
    res = json.loads((out / "results.json").read_text())
    assert res["evaluation_sets"]["jsrt"]["skipped_rows"] == 1
    assert "1 bad rows skipped" in (out / "report.md").read_text()


def test_empty_class_is_an_error(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDKT_DATA", str(data_dir))
    src = (data_dir / "jsrt" / "jsrt.csv").read_text().splitlines()
    only_cancer = tmp_path / "cancer_only.csv"
    only_cancer.write_text("\n".join([src[0]] + [r for r in src[1:] if "lung cancer" in r]) + "\n")
    code, io = _cli(monkeypatch, capsys, "transfer", "--bundle", "jsrt_nodules", "--output", str(tmp_path / "r"),
                    "--set", "backend=medclip:tiny@random", "--set", f"jsrt_manifest={only_cancer}",
                    "--set", f"jsrt_root={data_dir / 'jsrt'}")
    assert code == 2 and "no rows for class(es) ['benign nodule']" in io.err and io.err.count("\n") == 1
    assert not (tmp_path / "r").exists()
