"""Sidecar files and unreadable images (issue 18, item 7).

``medkt data prepare`` leaves files that are not images (a DICOM export's ``DICOMDIR``, notes,
hidden files) out of the manifest and says how many; ``medkt evaluate`` / ``medkt transfer``
stop at an unreadable image unless ``--skip-unreadable`` is given, which lists them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_medclip import write_dicom
from medkt.data.manifest import read_manifest
from medkt.data.prepare import prepare
from test_kill_resume import TINY
from test_resume_safety import error_line

TINY_CLIP = "clip:medkt-tiny-ViT@random"


def _write_dicomdir(path: Path) -> Path:
    """A minimal DICOMDIR: the DICM preamble and the Media Storage Directory SOP class."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.FileSetID = "EXPORT"
    ds.DirectoryRecordSequence = []
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def dicom_export(tmp_path):
    """ROOT/<label>/: two DICOMs (one named by a UID, no suffix) plus sidecars that are not images."""
    root = tmp_path / "export"
    rng = np.random.default_rng(0)
    for label in ("mass", "no_finding"):
        folder = root / label
        write_dicom(folder / "IM0001.dcm", rng.random((16, 16)))
        write_dicom(folder / "1.2.826.0.1.3680043.8.498.1", rng.random((16, 16)))
        _write_dicomdir(folder / "DICOMDIR")
        (folder / "notes.txt").write_text("exported by a PACS")
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (folder / "._IM0001.dcm").write_bytes(b"\0\5\26\7")  # macOS resource fork
        (folder / ".thumbs").mkdir()
        Image.new("L", (4, 4)).save(folder / ".thumbs" / "IM0001.png")
    return root


def test_prepare_skips_files_that_are_not_images(dicom_export):
    skipped: list[Path] = []
    rows = read_manifest(prepare("imagefolder", dicom_export, skipped=skipped), dicom_export)
    assert sorted(Path(r.path).name for r in rows) == sorted(["1.2.826.0.1.3680043.8.498.1", "IM0001.dcm"] * 2)
    assert sorted(p.name for p in skipped) == sorted(["DICOMDIR", "notes.txt", ".DS_Store", "._IM0001.dcm"] * 2)


def test_prepare_cli_reports_skipped_and_evaluate_reads_the_manifest(medkt, dicom_export, tmp_path):
    r = medkt("data", "prepare", "imagefolder", "--root", str(dicom_export))
    assert r.returncode == 0, r.stderr
    assert "4 images" in r.stdout and "skipped 8 file(s) that are not images" in r.stdout and "DICOMDIR" in r.stdout
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"mass": "a chest x-ray with a mass", "no_finding": "a normal chest x-ray"}))
    r = medkt("evaluate", "--backend", TINY_CLIP, "--manifest", str(dicom_export / "imagefolder.csv"),
              "--classes", str(classes), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(4 images)" in r.stdout


@pytest.fixture
def bad_manifest(tmp_path):
    """moongate/gyroscope PNGs, plus one corrupt PNG and one missing file."""
    for i, label in enumerate(["moongate", "gyroscope"] * 2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [f"{i}.png,{lab}" for i, lab in enumerate(["moongate", "gyroscope"] * 2)]
    path = tmp_path / "m.csv"
    path.write_text("path,label\n" + "\n".join(rows + ["corrupt.png,moongate", "gone.png,gyroscope"]) + "\n")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"moongate": "a round opening in a garden wall",
                                   "gyroscope": "a spinning disc inside rings"}))
    return path, classes


def test_evaluate_skip_unreadable_is_opt_in_and_lists_them(medkt, bad_manifest, tmp_path):
    manifest, classes = bad_manifest
    args = ["evaluate", "--backend", TINY_CLIP, "--manifest", str(manifest), "--classes", str(classes),
            "--device", "cpu"]
    assert "gone.png" in error_line(medkt(*args))  # default: an error
    (tmp_path / "m.csv").write_text((tmp_path / "m.csv").read_text().replace("gone.png,gyroscope\n", ""))
    assert "corrupt.png" in error_line(medkt(*args))
    (tmp_path / "m.csv").write_text((tmp_path / "m.csv").read_text() + "gone.png,gyroscope\n")
    out = tmp_path / "res" / "eval.json"
    r = medkt(*args, "--skip-unreadable", "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(4 images)" in r.stdout and "skipped 2 unreadable image(s)" in r.stderr
    listed = (tmp_path / "res" / "eval.skipped_images.txt").read_text().splitlines()
    assert len(listed) == 2 and "corrupt.png" in listed[0] and "gone.png" in listed[1]
    result = json.loads(out.read_text())
    assert result["n_images"] == 4 and result["skipped_images"] == 2


def test_transfer_skip_unreadable_lists_them_in_the_run_folder(medkt, bad_manifest, tmp_path):
    manifest, classes = bad_manifest
    ev = {"manifest": str(manifest), "classes": json.loads(classes.read_text())}
    args = ["transfer", "--bundle", "quickstart_tiny", *TINY, "--set", f"evaluations#files={json.dumps(ev)}"]
    line = error_line(medkt(*args, "--output", str(tmp_path / "strict")))
    assert "gone.png" in line or "corrupt.png" in line
    out = tmp_path / "run"
    r = medkt(*args, "--output", str(out), "--skip-unreadable")
    assert r.returncode == 0, r.stderr[-2000:]
    listed = (out / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 2 and "corrupt.png" in listed[0] and "gone.png" in listed[1]
    results = json.loads((out / "results.json").read_text())
    assert results["evaluations"]["files"]["info"]["n_images"] == 4
    assert results["evaluations"]["files"]["info"]["skipped_rows"] == 2


def test_transfer_skip_unreadable_on_a_bundle_without_manifests(medkt, tmp_path):
    line = error_line(medkt("transfer", "--bundle", "phantom_nodules", "--output", str(tmp_path / "r"),
                            "--skip-unreadable"))
    assert "--skip-unreadable" in line and "phantom_nodules" in line and "--set" not in line
