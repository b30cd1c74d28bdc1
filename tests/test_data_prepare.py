"""Manifests and dataset preparers: JSRT (raw .IMG), CheXpert-5x200c (JPEG), imagefolder (DICOM),
bad rows, --skip-bad, and the `medkt data` CLI (one-line errors, exit code 2, nothing half-written)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from helpers_medclip import chest_like, write_dicom
from medkt.data.manifest import ManifestProblem, ManifestRow, read_manifest, write_manifest
from medkt.data.prepare import list_preparers, prepare, register_preparer
from medkt.data.readers import write_jsrt_raw
from medkt.errors import DataError, UnknownNameError

JSRT_CLINICAL = [
    # file, subtlety, size(mm), age, sex, x, y, pathology, position, diagnosis (JSRT layout)
    "JPCLN001.IMG\t5\t15\t53\tmale\t1634\t692\tmalignant\tl.upper lobe\tlung cancer",
    "JPCLN002.IMG\t5\t30\t60\tfemale\t1500\t800\tbenign\tr.lower lobe\thamartoma",
    "JPCLN003.IMG\t4\t12\t71\tmale\t600\t900\tmalignant\tr.upper lobe\tadenocarcinoma",
]


def make_jsrt(root, rng, clinical=True):
    imgs = root / "All247images"
    for i, kind in [(1, "cancer"), (2, "benign"), (3, "cancer")]:
        write_jsrt_raw(chest_like(rng, 2048, nodule=0.2, kind=kind), imgs / f"JPCLN{i:03d}.IMG")
    write_jsrt_raw(chest_like(rng, 2048), imgs / "JPCNN001.IMG")
    if clinical:
        (root / "CLNDAT_EN.txt").write_text("\n".join(JSRT_CLINICAL) + "\n")
    return root


def test_prepare_jsrt_from_raw_img(tmp_path):
    root = make_jsrt(tmp_path / "jsrt", np.random.default_rng(0))
    out = prepare("jsrt", root, sha256=True)
    assert out == root / "jsrt.csv"
    rows = read_manifest(out, classes=["benign nodule", "lung cancer"], verify_hashes=True)
    assert [(r.path, r.label) for r in rows] == [
        ("All247images/JPCLN001.IMG", "lung cancer"),
        ("All247images/JPCLN002.IMG", "benign nodule"),
        ("All247images/JPCLN003.IMG", "lung cancer"),
    ]
    assert all(r.split == "test" and len(r.sha256) == 64 for r in rows)
    # a file changed after the manifest was built is detected
    with open(root / "All247images/JPCLN002.IMG", "r+b") as fh:
        fh.write(b"\x00\x01")
    with pytest.raises(DataError, match=r"jsrt\.csv:3: sha256 mismatch"):
        read_manifest(out, verify_hashes=True)
    extra = prepare("jsrt", root, tmp_path / "with_normals.jsonl", include_non_nodule=True)
    assert [r.label for r in read_manifest(extra, root)][-1] == "non-nodule"


def test_prepare_jsrt_without_clinical_file_is_a_clear_error(tmp_path):
    root = make_jsrt(tmp_path / "jsrt", np.random.default_rng(0), clinical=False)
    with pytest.raises(DataError, match="CLNDAT_EN.txt"):
        prepare("jsrt", root)
    assert not (root / "jsrt.csv").exists()


def make_chexpert(root, rng, per_class=3):
    ds = root / "CheXpert-v1.0-small"
    findings = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices"]
    five = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    records, n = [], 0

    def add(labels, view="Frontal"):
        nonlocal n
        n += 1
        rel = f"CheXpert-v1.0-small/train/patient{n:05d}/study1/view1_{view.lower()}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(chest_like(rng, 40) * 255).astype(np.uint8)).save(root / rel)
        rec = {"Path": rel, "Sex": "Male", "Age": "50", "Frontal/Lateral": view, "AP/PA": "AP"}
        rec.update({f: labels.get(f, "") for f in findings})
        records.append(rec)
        return rel

    bad = []
    for c in five:
        for _ in range(per_class):
            add({c: "1.0", "No Finding": ""})
        bad.append(add({c: "1.0"}, view="Lateral"))  # lateral view: excluded
        bad.append(add({c: "1.0", "Support Devices": "1.0"}))  # another finding: excluded
        bad.append(add({c: "1.0", "Lung Opacity": "-1.0"}))  # uncertain other finding: excluded
    with open(ds / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    return root, set(bad)


def test_prepare_chexpert_5x200c_rule_and_seed(tmp_path):
    root, excluded = make_chexpert(tmp_path / "chexpert", np.random.default_rng(1))
    m1 = prepare("chexpert_5x200c", root, tmp_path / "a.csv", n_per_class=2, seed=0)
    rows = read_manifest(m1, root, classes=["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"])
    assert len(rows) == 10 and all(r.path not in excluded for r in rows)
    assert all(r.path.endswith("frontal.jpg") for r in rows)
    again = read_manifest(prepare("chexpert_5x200c", root, tmp_path / "b.csv", n_per_class=2, seed=0), root)
    assert [r.path for r in again] == [r.path for r in rows]
    other = [read_manifest(prepare("chexpert_5x200c", root, tmp_path / f"s{s}.csv", n_per_class=2, seed=s), root)
             for s in (1, 2, 3)]
    assert any([r.path for r in o] != [r.path for r in rows] for o in other)
    with pytest.raises(DataError, match="only 3 frontal images exclusively positive for 'Atelectasis'"):
        prepare("chexpert_5x200c", root, tmp_path / "c.csv", n_per_class=4)
    assert not (tmp_path / "c.csv").exists()
    # the dataset folder itself as root (CSV paths start with the folder name)
    inner = prepare("chexpert_5x200c", root / "CheXpert-v1.0-small", tmp_path / "d.csv", n_per_class=1)
    assert read_manifest(inner, root / "CheXpert-v1.0-small")[0].path.startswith("train/patient")


def test_imagefolder_with_dicom(tmp_path):
    rng = np.random.default_rng(2)
    for label in ("benign nodule", "lung cancer"):
        write_dicom(tmp_path / "data" / label / "a.dcm", chest_like(rng, 24))
    rows = read_manifest(prepare("imagefolder", tmp_path / "data"))
    assert sorted(r.label for r in rows) == ["benign nodule", "lung cancer"]


def _write_rows(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def test_manifest_bad_rows_and_skip_bad(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    m = _write_rows(tmp_path / "sub" / "m.csv", [["a.png", "x"], ["missing.png", "x"], ["b.png", "zebra"],
                                                 ["../../etc/passwd", "y"], ["b.png", "y"]])
    classes = ["x", "y"]
    with pytest.raises(DataError, match=r"m\.csv:3: file not found"):
        read_manifest(m, tmp_path, classes=classes)
    problems: list[ManifestProblem] = []
    rows = read_manifest(m, tmp_path, classes=classes, skip_bad=True, problems=problems)
    assert [r.path for r in rows] == ["a.png", "b.png"]
    assert [p.where.rsplit(":", 1)[1] for p in problems] == ["3", "4", "5"]
    assert "not one of the classes" in problems[1].message and "escapes the data root" in problems[2].message
    assert rows[1].source.endswith("m.csv:6")
    # an empty class is an error even with skip_bad
    with pytest.raises(DataError, match=r"no rows for class\(es\) \['z'\]"):
        read_manifest(m, tmp_path, classes=["x", "y", "z"], skip_bad=True)
    # absolute paths cannot escape either
    m2 = _write_rows(tmp_path / "abs.csv", [[str(tmp_path.parent / "x.png"), "x"]])
    with pytest.raises(DataError, match="escapes the data root"):
        read_manifest(m2, tmp_path)


def test_write_manifest_roundtrip_ignores_source(tmp_path):
    rows = [ManifestRow("a.png", "x", mask="a_mask.png", split="test", source="elsewhere:3")]
    for name in ("m.csv", "m.jsonl"):
        path = write_manifest(rows, tmp_path / name)
        assert "elsewhere" not in path.read_text()
        back = read_manifest(path, check_files=False)
        assert back == rows


def test_registry_lists_and_names_unknown(tmp_path):
    names = list_preparers()
    assert {"jsrt", "chexpert_5x200c", "imagefolder"} <= set(names)
    with pytest.raises(UnknownNameError, match="Did you mean 'jsrt'"):
        prepare("jsrtt", tmp_path)

    @register_preparer("unit_test_set")
    def _prep(root, **kw):
        """A test dataset."""
        return [ManifestRow("a.png", "x")]

    assert list_preparers()["unit_test_set"] == "A test dataset."
    with pytest.raises(DataError, match="listed image is missing"):
        prepare("unit_test_set", tmp_path)
    assert not (tmp_path / "unit_test_set.csv").exists()


def _cli(monkeypatch, capsys, *args):
    """Run `medkt ARGS` in-process; returns (exit code, captured out/err)."""
    from conftest import run_medkt_in_process

    return run_medkt_in_process(monkeypatch, capsys, *args)


def test_cli_prepare_list_check(tmp_path, monkeypatch, capsys):
    root = make_jsrt(tmp_path / "jsrt", np.random.default_rng(3))
    code, out = _cli(monkeypatch, capsys, "data", "prepare", "jsrt", "--root", str(root), "--out", str(tmp_path / "j.csv"))
    assert code == 0 and "3 images" in out.out and "lung cancer: 2" in out.out
    code, out = _cli(monkeypatch, capsys, "data", "list")
    assert code == 0 and "chexpert_5x200c" in out.out
    # a corrupt image: `check` names the row, exit 2, one line; --skip-bad counts it instead
    (root / "All247images/JPCLN003.IMG").write_bytes(b"\x00" * 100)
    code, out = _cli(monkeypatch, capsys, "data", "check", str(tmp_path / "j.csv"), "--root", str(root))
    assert code == 2 and out.err.count("\n") == 1 and "j.csv:4" in out.err and "JPCLN003.IMG" in out.err
    code, out = _cli(monkeypatch, capsys, "data", "check", str(tmp_path / "j.csv"), "--root", str(root), "--skip-bad")
    assert code == 0 and "2 good rows, 1 skipped" in out.out
    # unknown dataset: exit 2, no manifest written
    code, out = _cli(monkeypatch, capsys, "data", "prepare", "jsrtx", "--root", str(root), "--out", str(tmp_path / "x.csv"))
    assert code == 2 and "Did you mean 'jsrt'" in out.err and not (tmp_path / "x.csv").exists()
