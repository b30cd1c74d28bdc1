"""End to end: dataset preparers on synthetic data in the real formats, volumes, and every
segmentation bundle (baseline + knowledge transfer + after) on tiny random models and a tiny SAM."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from helpers_segmentation import blob_image, brats_case, write_dicom, write_mask_png, write_png
from medkt.data.manifest import read_manifest
from medkt.data.prepare import prepare
from medkt.errors import DataError

TINY = {"inversion": {"steps": 2, "lr": 0.1, "priors": [{"name": "tv", "weight": 0.005}]},
        "m2ib": {"steps": 3, "beta": 1.0, "batch_size": 4},
        "concepts_n": 2}


# -- synthetic datasets in their download layouts --------------------------------------------------


def make_udiat(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        img, mask = blob_image((48, 64), (20 + 3 * i, 30), 8, rng)
        write_png(root / "BUS_Dataset_B" / "original" / f"{i + 1:06d}.png", img)
        write_mask_png(root / "BUS_Dataset_B" / "GT" / f"{i + 1:06d}.png", mask)
    return root


def make_brats(root: Path, n: int = 2) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        brats_case(root / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData", f"BraTS-GLI-{i:05d}-000", rng)
    return root


def make_unitochest(root: Path) -> Path:
    rng = np.random.default_rng(2)
    for p in ("P001", "P002"):
        for k in (10, 11):
            img, mask = blob_image((40, 40), (15, 22), 4, rng, bright=True)
            write_dicom(root / p / "CT" / f"slice_{k:03d}.dcm", img)
            write_mask_png(root / p / "masks" / f"slice_{k:03d}_mask.png", mask if k == 10 else np.zeros_like(mask))
    return root


def make_siim(root: Path) -> Path:
    from medkt.segmentation.datasets import rle_encode_siim

    rng = np.random.default_rng(3)
    lines = ["ImageId, EncodedPixels"]
    for i in range(3):
        uid = f"1.2.276.0.7230010.3.1.4.{i}"
        img, mask = blob_image((48, 48), (16, 12 + 6 * i), 6, rng)
        write_dicom(root / "dicom-images-train" / f"1.2.{i}" / f"1.2.{i}.1" / f"{uid}.dcm", img, spacing=(0.17, 0.17))
        lines.append(f"{uid}, {rle_encode_siim(mask) if i < 2 else '-1'}")
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    return root


# -- preparers, readers, volumes ---------------------------------------------------------------------


def test_udiat_preparer_pairs_by_name(tmp_path):
    root = make_udiat(tmp_path / "udiat")
    rows = read_manifest(prepare("udiat", root), root)
    assert [r.path for r in rows] == [f"BUS_Dataset_B/original/{i:06d}.png" for i in (1, 2, 3)]
    assert all(r.mask == r.path.replace("original", "GT") for r in rows)
    (root / "BUS_Dataset_B" / "original" / "000002.png").unlink()
    with pytest.raises(DataError, match="no image"):
        prepare("udiat", root)


def test_brats_preparer_and_axial_tumour_slices(tmp_path):
    from medkt.segmentation.volumes import axial_tumour_slices

    root = make_brats(tmp_path / "brats")
    rows = read_manifest(prepare("brats2023_glioma", root), root)
    assert len(rows) == 2 and rows[0].path.endswith("-t2f.nii.gz") and rows[0].mask.endswith("-seg.nii.gz")
    slices = list(axial_tumour_slices(root / rows[0].path, root / rows[0].mask))
    assert [s.index for s in slices] == list(range(4, 9))  # sphere |z-6|*3 <= 7
    assert all(s.mask.any() and s.image.shape == (40, 40) and 0 <= s.image.min() and s.image.max() <= 1 for s in slices)
    # tumour voxels are bright in the image where the mask is
    s = slices[2]
    assert s.image[s.mask].mean() > s.image[~s.mask].mean() + 0.3
    assert len(list(axial_tumour_slices(root / rows[0].path, root / rows[0].mask, max_slices=2))) == 2


def test_unitochest_preparer_keeps_slices_with_nodules(tmp_path):
    root = make_unitochest(tmp_path / "unito")
    rows = read_manifest(prepare("unitochest", root), root)
    assert sorted(r.path for r in rows) == ["P001/CT/slice_010.dcm", "P002/CT/slice_010.dcm"]


def test_siim_rle_roundtrip_and_preparer(tmp_path):
    from medkt.segmentation.datasets import rle_decode_siim, rle_encode_siim

    m = np.zeros((7, 5), bool)
    m[1:3, 2] = m[5, 0:4] = True
    assert np.array_equal(rle_decode_siim(rle_encode_siim(m), 7, 5), m)
    root = make_siim(tmp_path / "siim")
    rows = read_manifest(prepare("siim_pneumothorax", root), root)
    assert [r.label for r in rows] == ["pneumothorax", "pneumothorax", "no pneumothorax"]
    assert all(r.mask.startswith("medkt_masks/") for r in rows)


def test_load_samples_reads_dicom_spacing_and_pairs_folders(tmp_path):
    from medkt.segmentation.pipeline import load_samples

    root = make_siim(tmp_path / "siim")
    prepare("siim_pneumothorax", root)
    s = load_samples({"manifest": str(root / "siim_pneumothorax.csv"), "labels": ["pneumothorax"]})
    assert len(s) == 2 and s[0].spacing == pytest.approx((0.17, 0.17)) and s[0].mask.any()
    # JPEG images + PNG masks paired by sorted stem
    rng = np.random.default_rng(0)
    img, mask = blob_image((30, 40), (12, 20), 6, rng)
    write_png(tmp_path / "jpg" / "x1.jpg", img)
    write_mask_png(tmp_path / "jm" / "x1.png", mask)
    s = load_samples({"images": str(tmp_path / "jpg"), "masks": str(tmp_path / "jm")})
    assert s[0].name == "x1" and s[0].image.shape == (30, 40) and np.array_equal(s[0].mask, mask)
    assert abs(float(s[0].image[~mask].mean()) - 0.55) < 0.05
    (tmp_path / "im").mkdir()
    (tmp_path / "ma").mkdir()
    write_png(tmp_path / "im" / "a.png", np.zeros((8, 8)))
    write_mask_png(tmp_path / "ma" / "b.png", np.zeros((8, 8), bool))
    with pytest.raises(DataError, match="do not match"):
        load_samples({"images": str(tmp_path / "im"), "masks": str(tmp_path / "ma")})


# -- bundles end to end ------------------------------------------------------------------------------

BUNDLES = {
    # bundle: (dataset maker, preparer, tiny backend, SAM spec or None for saliency-only; "vit_b-file": the path
    # alone of a tiny-width SAM with the vit_b release layout, its type read from the file)
    "seg_breast_ultrasound": (make_udiat, "udiat", "medclip:tiny@random", "tiny@random"),
    "seg_brain_glioma": (make_brats, "brats2023_glioma", "hf_clip:tiny@random", "tiny@random"),
    "seg_lung_nodules_ct": (make_unitochest, "unitochest", "open_clip:medkt-tiny-ViT@random", "vit_b-file"),
    "seg_pneumothorax": (make_siim, "siim_pneumothorax", "medclip:tiny@random", None),
}


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_bundle_end_to_end(bundle, tmp_path, monkeypatch):
    from medkt.bundles import run_bundle

    monkeypatch.delenv("MEDKT_SAM_CHECKPOINT", raising=False)
    maker, dataset, backend, sam = BUNDLES[bundle]
    if sam == "vit_b-file":
        from helpers_segmentation import save_release_like_sam

        sam = str(save_release_like_sam(tmp_path / "sam_vit_b_tiny.pth", "vit_b"))
    root = maker(tmp_path / dataset)
    prepare(dataset, root)
    cfg = json.loads((Path(__file__).parent.parent / "bundles" / bundle / "configs" / "transfer.json").read_text())
    concepts = [{**c, "n_images": TINY["concepts_n"]} for c in cfg["concepts"]]
    data = {**cfg["data"], "max_images": 3}
    out = tmp_path / "run"
    results = run_bundle(bundle, {"data_root": str(root), "data": data, "backend": backend, "sam": sam,
                                  "inversion": TINY["inversion"], "m2ib": {**cfg["m2ib"], **TINY["m2ib"], "layer": None},
                                  "concepts": concepts}, output=out)
    assert results["mode"] == ("sam" if sam else "saliency-only")
    assert set(results["stages"]) == {"baseline", "transfer"}
    assert results["transfer"]["finetune_lr"] == cfg["finetune_lr"]
    n = results["n_images"]
    assert 1 <= n <= 3
    for stage in ("baseline", "transfer"):
        rows = list(csv.DictReader((out / f"metrics_{stage}.csv").open()))
        assert len(rows) == n and list(rows[0]) == ["name", "dsc", "nsd", "iou"]
        assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in ("dsc", "nsd", "iou"))
        mean = results["stages"][stage]["mean"]
        assert mean["dsc"] == pytest.approx(np.mean([float(r["dsc"]) for r in rows]), abs=1e-5)
        assert len(list((out / "masks" / stage).glob("*.png"))) == n
    assert {"best", "worst"} <= set(results["overlays"])
    assert all((out / v["file"]).is_file() for v in results["overlays"].values())
    report = (out / "report.md").read_text()
    assert ("SALIENCY ONLY" in report) == (sam is None)
    if sam is not None:
        want = "vit_b" if sam.endswith(".pth") else "tiny"
        assert results["sam_model_type"] == want and f"SAM ({want}, box prompts)" in report
    assert "| baseline |" in (out / "metrics.md").read_text() and "| change |" in (out / "metrics.md").read_text()
    # the written masks score the same with the `medkt metrics` code path
    from medkt.segmentation.metrics import score_folders

    table = score_folders(out / "masks" / "transfer", out / "masks" / "gt")
    assert table.means()["dsc"] == pytest.approx(results["stages"]["transfer"]["mean"]["dsc"], abs=1e-6)


def test_pipeline_saliency_only_finds_obvious_lesion(tmp_path):
    """With the toy planted backend the whole chain (saliency -> k-means -> metrics) recovers the lesion."""
    from medkt.backends import register_backend
    from medkt.segmentation.pipeline import load_samples, segment_samples

    from helpers_segmentation import PlantedToyBackend

    register_backend("toy")(lambda arch, weights, **kw: PlantedToyBackend())
    img = np.full((64, 64), 0.2, np.float32)
    img[16:32, 32:48] = 0.9
    mask = img > 0.5
    write_png(tmp_path / "im" / "a.png", img)
    write_mask_png(tmp_path / "ma" / "a.png", mask)
    samples = load_samples({"images": str(tmp_path / "im"), "masks": str(tmp_path / "ma")})
    from medkt.backends import create_backend

    r = segment_samples(create_backend("toy:planted"), samples, "lesion", {}, {}, None, {"nsd_tolerance": 2}, seed=0,
                        progress=False)
    # a 4x4 token grid upsampled bilinearly blurs the edges: DSC ~0.76, the centre is right
    assert r["table"].rows[0]["dsc"] > 0.6
    ys, xs = np.nonzero(r["per"]["a"]["pred"])
    assert 16 <= ys.mean() < 32 and 32 <= xs.mean() < 48


def test_saliency_geometry_of_non_square_images():
    """Saliency is computed on the zero-padded square and cropped back to the image."""
    import torch

    from helpers_segmentation import PlantedToyBackend
    from medkt.segmentation.m2ib import M2IB
    from medkt.segmentation.pipeline import saliency_for_image

    img = np.full((48, 96), 0.2, np.float32)  # padded to 96 x 96 with 24 rows on top -> token rows of 24 px
    img[0:24, 48:72] = 0.9  # padded rows 24:48 -> token (1, 2)
    torch.manual_seed(0)
    sal = saliency_for_image(M2IB(PlantedToyBackend()), img, "lesion", seed=0)
    assert sal.shape == (48, 96)
    inside = sal[0:24, 48:72].mean()
    assert inside > 3 * sal[24:, :].mean() and inside > 3 * sal[:, :36].mean()


def test_pool_reaches_the_segmentation_transfer(tmp_path, monkeypatch):
    """``--set unlabeled=PATH`` on a segmentation bundle: the transfer's fine-tuning gets the pool."""
    import medkt.spine as spine
    from medkt.bundles import run_bundle
    from medkt.errors import ConfigError
    from medkt.pool import UnlabeledPool
    from medkt.segmentation.pipeline import SegmentationTransferPipeline

    monkeypatch.delenv("MEDKT_SAM_CHECKPOINT", raising=False)
    seen: dict = {}
    real = spine.finetune
    monkeypatch.setattr(spine, "finetune", lambda *a, **kw: seen.update(pool=kw.get("pool")) or real(*a, **kw))
    root = make_udiat(tmp_path / "udiat")
    prepare("udiat", root)
    pool_dir = root / "BUS_Dataset_B" / "original"  # the images without their masks: an unlabeled pool
    cfg = json.loads((Path(__file__).parent.parent / "bundles" / "seg_breast_ultrasound" / "configs" / "transfer.json").read_text())
    run_bundle("seg_breast_ultrasound", {"data_root": str(root), "data": {**cfg["data"], "max_images": 2},
                                         "backend": "open_clip:medkt-tiny-ViT@random", "sam": None,
                                         "inversion": TINY["inversion"], "unlabeled": str(pool_dir),
                                         "m2ib": {**cfg["m2ib"], **TINY["m2ib"], "layer": None},
                                         "concepts": [{**c, "n_images": 2} for c in cfg["concepts"]]},
               output=tmp_path / "run")
    assert isinstance(seen["pool"], UnlabeledPool) and len(seen["pool"]) == 3
    with pytest.raises(ConfigError, match="transfer stage"):
        SegmentationTransferPipeline(backend="x", data={**cfg["data"], "root": str(root)}, prompt="a lesion",
                                     stages=["baseline"], unlabeled=str(pool_dir))
