"""``medkt.segment`` and examples/segment_folder.py on unlabelled images and file lists: every
image is segmented (masks, saliency maps, overlays written), only those with ground truth are
scored, and a list of files gives what its folder gives."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import medkt
from helpers_segmentation import PlantedToyBackend, save_release_like_sam, write_mask_png, write_nifti, write_png
from medkt.errors import ConfigError, DataError

PROMPT = "a bright square lesion"
FAST = {"steps": 2}


def _lesion(top: int, left: int, size: int = 16, shape=(64, 64)) -> tuple[np.ndarray, np.ndarray]:
    img = np.full(shape, 0.2, np.float32)
    img[top : top + size, left : left + size] = 0.9
    return img, img > 0.5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``im/`` 3 PNGs, ``ma/`` the mask of ``a`` only (b and c are unlabelled)."""
    root = tmp_path_factory.mktemp("seg")
    for name, (top, left) in {"a": (16, 32), "b": (32, 8), "c": (0, 40)}.items():
        img, mask = _lesion(top, left)
        write_png(root / "im" / f"{name}.png", img)
        if name == "a":
            write_mask_png(root / "ma" / f"{name}.png", mask)
    return root


@pytest.fixture(scope="module")
def backend():
    return PlantedToyBackend()


def test_mixed_folder_segments_all_scores_the_labelled(backend, folder, tmp_path):
    res = medkt.segment(backend, folder / "im", PROMPT, masks=folder / "ma", saliency_config=FAST, progress=False)
    assert res.n_images == 3 and res.n_scored == 1 and res.scores.names == ["a"]
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["n_images"] == 3 and d["n_scored"] == 1 and d["unscored"] == ["b", "c"] and set(d["per_image"]) == {"a"}
    # the labelled image's numbers are those of segmenting it alone (the unlabelled ones change nothing)
    alone = medkt.segment(backend, [folder / "im" / "a.png"], PROMPT, masks=folder / "ma", saliency_config=FAST,
                          progress=False)
    assert alone.scores.rows == res.scores.rows and res.scores.rows[0]["dsc"] > 0.6  # the planted lesion is found
    # every image predicted where its lesion is
    for name, (top, left) in {"b": (32, 8), "c": (0, 40)}.items():
        ys, xs = np.nonzero(res.masks[name])
        assert top <= ys.mean() < top + 16 and left <= xs.mean() < left + 16, name
    out = res.save(tmp_path / "out")
    for sub in ("masks", "saliency", "overlays"):
        assert sorted(p.name for p in (out / sub).iterdir()) == ["a.png", "b.png", "c.png"], sub
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["name"] for r in rows] == ["a"]
    assert json.loads((out / "results.json").read_text())["n_scored"] == 1


def test_overlay_draws_prediction_truth_and_boxes(backend, folder):
    from medkt.segmentation.overlays import BOX_COLOUR, PRED_COLOUR, TRUTH_COLOUR, overlay_rgb

    img, mask = _lesion(16, 32)
    pred = np.zeros_like(mask)
    pred[20:28, 36:44] = True
    o = overlay_rgb(img, np.zeros_like(img), pred, np.array([[4, 4, 12, 12]]), truth=mask)
    assert o.shape == (64, 64, 3) and o.dtype == np.uint8
    assert tuple(o[16, 40]) == TRUTH_COLOUR and tuple(o[20, 40]) == PRED_COLOUR and tuple(o[4, 8]) == BOX_COLOUR
    assert tuple(o[24, 40]) not in (TRUTH_COLOUR, PRED_COLOUR)  # inside: no outline
    no_truth = overlay_rgb(img, np.zeros_like(img), pred, np.zeros((0, 4)))
    assert not (no_truth == np.array(TRUTH_COLOUR)).all(-1).any()


def test_list_of_files_equals_the_folder(backend, folder):
    files = sorted((folder / "im").glob("*.png"))
    by_folder = medkt.segment(backend, folder / "im", PROMPT, masks=folder / "ma", saliency_config=FAST, progress=False)
    by_list = medkt.segment(backend, files, PROMPT, masks=folder / "ma", saliency_config=FAST, progress=False)
    parallel = medkt.segment(backend, [str(f) for f in files], PROMPT, masks=[folder / "ma" / "a.png", None, None],
                             saliency_config=FAST, progress=False)
    for other in (by_list, parallel):
        assert list(other.masks) == list(by_folder.masks)
        assert all(np.array_equal(other.masks[n], by_folder.masks[n]) for n in by_folder.masks)
        assert other.scores.rows == by_folder.scores.rows and other.n_scored == 1
    one = medkt.segment(backend, files[1], PROMPT, saliency_config=FAST, progress=False)  # one image file
    assert list(one.masks) == ["b"] and np.array_equal(one.masks["b"], by_folder.masks["b"])


def test_unlabelled_only_no_nan_anywhere(backend, folder, tmp_path):
    res = medkt.segment(backend, folder / "im", PROMPT, saliency_config=FAST, progress=False)
    d = res.to_dict()
    assert d["n_images"] == 3 and d["n_scored"] == 0 and d["mean"] is None and d["per_image"] == {}
    json.dumps(d, allow_nan=False)
    out = res.save(tmp_path / "u")
    assert not (out / "metrics.csv").exists() and len(list((out / "overlays").iterdir())) == 3


def test_input_mistakes(backend, folder, tmp_path):
    stray = tmp_path / "ma"
    write_mask_png(stray / "zz.png", np.zeros((64, 64), bool))  # a mask named like no image: a naming mistake
    with pytest.raises(DataError, match="mask\\(s\\) without image"):
        medkt.segment(backend, folder / "im", PROMPT, masks=stray, saliency_config=FAST, progress=False)
    with pytest.raises(DataError, match="not found"):
        medkt.segment(backend, [folder / "im" / "a.png", tmp_path / "nope.png"], PROMPT, progress=False)
    with pytest.raises(ConfigError, match="parallel"):
        medkt.segment(backend, [folder / "im" / "a.png"], PROMPT, masks=[None, None], progress=False)
    with pytest.raises(DataError, match="listed twice"):
        medkt.segment(backend, [folder / "im" / "a.png"] * 2, PROMPT, progress=False)


def test_same_stem_in_two_folders_gets_distinct_names(backend, folder, tmp_path):
    for sub in ("s1", "s2"):
        write_png(tmp_path / sub / "x.png", _lesion(8, 8)[0])
    res = medkt.segment(backend, [tmp_path / "s1" / "x.png", tmp_path / "s2" / "x.png"], PROMPT,
                        saliency_config=FAST, progress=False)
    assert list(res.masks) == ["s1__x", "s2__x"]


def test_unlabelled_volume_gives_its_slices_with_anatomy(backend, tmp_path):
    vol = np.zeros((32, 32, 6), np.float32)
    vol[4:28, 4:28, 1:5] = 1.0
    vol[10:18, 10:18, 1:5] = 3.0
    write_nifti(tmp_path / "case.nii.gz", vol)
    res = medkt.segment(backend, [tmp_path / "case.nii.gz"], PROMPT, saliency_config=FAST, progress=False)
    assert list(res.masks) == [f"case_z{k:03d}" for k in (1, 2, 3, 4)] and res.n_scored == 0


def test_sam_object_and_path_only_spec(backend, folder, tmp_path):
    from medkt.segmentation.sam import SamSegmenter

    ckpt = save_release_like_sam(tmp_path / "sam_vit_b_tiny.pth", "vit_b")
    res = medkt.segment(backend, folder / "im", PROMPT, masks=folder / "ma", sam=str(ckpt), saliency_config=FAST,
                        progress=False)
    seg = SamSegmenter.from_spec(str(ckpt))
    again = medkt.segment(backend, folder / "im", PROMPT, masks=folder / "ma", sam=seg, saliency_config=FAST,
                          progress=False)
    assert res.mode == again.mode == "sam" and seg.model_type == "vit_b"
    assert all(np.array_equal(res.masks[n], again.masks[n]) for n in res.masks)


# -- examples/segment_folder.py ---------------------------------------------------------------------


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "segment_folder.py"
    spec = importlib.util.spec_from_file_location("medkt_example_segment_unlabelled", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from medkt.phantom.export import export_dataset

    root = tmp_path_factory.mktemp("ph")
    export_dataset(root, ["mass"], 3, seed=3, size=64, fmt="png")
    return root


def test_example_unlabelled_files_and_sam_path(phantoms, tmp_path, capsys):
    files = sorted((phantoms / "images" / "mass").glob("*.png"))[:2]
    ckpt = save_release_like_sam(tmp_path / "sam_vit_l_tiny.pth", "vit_l")
    out = tmp_path / "out"
    summary = _example().main(["--images", *map(str, files), "--sam", str(ckpt), "--steps", "2", "--device", "cpu",
                               "--out", str(out)])
    assert summary["mode"] == "sam" and summary["n_images"] == 2 and summary["n_scored"] == 0
    assert "nothing scored" in capsys.readouterr().out
    names = sorted(f.name for f in files)
    for sub in ("masks", "saliency", "overlays"):
        assert sorted(p.name for p in (out / sub).iterdir()) == names
    assert not (out / "metrics.csv").exists()
    # the folder with its masks: scored; the same images listed: the same masks
    summary2 = _example().main(["--images", str(phantoms / "images" / "mass"), "--masks",
                                str(phantoms / "masks" / "mass"), "--steps", "2", "--device", "cpu", "--n-images", "2",
                                "--out", str(tmp_path / "f")])
    assert summary2["n_scored"] == 2 and "mean DSC" in capsys.readouterr().out
    listed = _example().main(["--images", *map(str, files), "--masks", str(phantoms / "masks" / "mass"),
                              "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "l")])
    assert listed["per_image"] == summary2["per_image"]
