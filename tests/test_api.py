"""The public API of ``import medkt`` (medkt/api.py): light import, the one-call steps, result objects."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import medkt
from medkt.errors import ConfigError, DataError

CLASSES = {"mass": ["a chest x-ray with mass"], "no_finding": ["a chest x-ray with no finding"],
           "nodule": ["a chest x-ray with nodule"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from medkt.phantom.export import export_dataset

    root = tmp_path_factory.mktemp("api")
    manifest = export_dataset(root, ["no finding", "mass", "nodule"], 2, seed=5, size=64, fmt="png")
    return root, manifest


@pytest.fixture(scope="module")
def backend():
    return medkt.create_backend("phantom:base")


def test_import_medkt_is_light_and_names_resolve():
    code = ("import sys, medkt; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert not [m for m in sys.modules if m.startswith('medkt.')]; print(len(medkt.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in medkt.__all__:
        assert getattr(medkt, name) is getattr(medkt.api, name)
    assert callable(medkt.fine_tune) and medkt.Concept.__module__ == "medkt.spine"
    with pytest.raises(AttributeError):
        medkt.no_such_name


def test_evaluate_zero_shot_folder_manifest_and_tensor_agree(backend, data):
    root, manifest = data
    by_folder = medkt.evaluate_zero_shot(backend, root / "images", CLASSES)
    by_manifest = medkt.evaluate_zero_shot(backend, manifest, {
        "mass": CLASSES["mass"], "no finding": CLASSES["no_finding"], "nodule": CLASSES["nodule"]})
    paths = sorted((root / "images").rglob("*.png"))
    labels = [p.parent.name for p in paths]
    pixels = torch.stack([backend.load_image(p) for p in paths])
    by_tensor = medkt.evaluate_zero_shot(backend, pixels, CLASSES, labels=labels)
    assert by_folder.to_dict()["n_images"] == 6
    np.testing.assert_allclose(np.sort(by_folder.scores, 0), np.sort(by_tensor.scores, 0), atol=1e-5)
    assert by_folder.accuracy == by_manifest.accuracy == by_tensor.accuracy
    names = medkt.evaluate_zero_shot(backend, root / "images", ["mass", "no_finding", "nodule"],
                                     templates=["a chest x-ray with {}"])
    same = medkt.evaluate_zero_shot(backend, root / "images",
                                    {**CLASSES, "no_finding": ["a chest x-ray with no_finding"]})
    assert names.classes == list(CLASSES) and np.array_equal(names.scores, same.scores)


def test_evaluate_zero_shot_errors_name_the_problem(backend, data):
    root, _ = data
    with pytest.raises(DataError, match="nodule"):  # a sub-folder outside the classes
        medkt.evaluate_zero_shot(backend, root / "images", {"mass": ["m"], "no_finding": ["n"]})
    with pytest.raises(ConfigError, match="labels come from"):
        medkt.evaluate_zero_shot(backend, root / "images", CLASSES, labels=["mass"])
    with pytest.raises(ConfigError, match="manifest only"):
        medkt.evaluate_zero_shot(backend, root / "images", CLASSES, split="test")
    with pytest.raises(ConfigError, match="labels are required"):
        medkt.evaluate_zero_shot(backend, torch.zeros(1, 1, 64, 64), CLASSES)
    with pytest.raises(DataError, match="neither"):
        medkt.evaluate_zero_shot(backend, root / "missing", CLASSES)


def test_invert_fine_tune_save_load(backend, data, tmp_path):
    concept = medkt.Concept("nodule", ["small round bright opacities in the lungs"], n_images=2)
    inv = medkt.invert(backend, [concept], {"steps": 2}, out_dir=tmp_path, progress=False)
    assert inv.images.shape == (2, backend.image_channels, backend.image_size, backend.image_size)
    assert set(json.loads(json.dumps(inv.to_dict()))["per_concept_similarity"]) == {"nodule"}
    assert (tmp_path / "manifest.csv").is_file()
    start = {k: v.clone() for k, v in backend.state_dict().items()}
    ft = medkt.fine_tune(backend, inv, [concept], medkt.FinetuneConfig(lr=1e-2, epochs=2),
                         negatives=["a chest x-ray with no finding"], progress=False)
    d = json.loads(json.dumps(ft.to_dict()))
    assert d["steps"] == 2 == len(ft.loss) and d["trainable"] == "visual"
    changed = {k for k, v in backend.state_dict().items() if not torch.equal(v, start[k])}
    assert changed, "fine-tuning changed no weight"
    path = medkt.save_finetuned(backend, tmp_path / "w.safetensors")
    backend.load_state_dict(start)
    medkt.load_finetuned(backend, path)
    assert {k for k, v in backend.state_dict().items() if not torch.equal(v, start[k])} == changed
    backend.load_state_dict(start)  # leave the module-scoped model as it was


def test_score_masks_arrays_dicts_and_folders_agree(tmp_path):
    from PIL import Image

    gt = np.zeros((16, 16), bool)
    gt[4:10, 4:10] = True
    pred = np.zeros((16, 16), bool)
    pred[5:11, 4:10] = True
    for folder, m in (("p", pred), ("g", gt)):
        (tmp_path / folder).mkdir()
        Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / folder / "a.png")
    one = medkt.score_masks(pred, gt)
    assert one.names == ["mask"] and one.rows[0]["dsc"] == pytest.approx(2 * 30 / 72)
    assert medkt.score_masks({"a": pred}, {"a": gt}).rows == one.rows
    assert medkt.score_masks(tmp_path / "p", tmp_path / "g").rows == one.rows
    assert medkt.score_masks(pred, gt).to_dict()["mean"]["iou"] == pytest.approx(30 / 42)
    with pytest.raises(ConfigError, match="same kind"):
        medkt.score_masks(tmp_path / "p", gt)
    with pytest.raises(DataError, match="differ"):
        medkt.score_masks({"a": pred}, {"b": gt})


def test_saliency_and_segment(backend, data):
    root, manifest = data
    image = root / "images" / "mass" / "mass_00000.png"
    sal = medkt.saliency(backend, image, "a chest x-ray with mass", config={"steps": 2})
    assert sal.shape == (64, 64) and 0 <= sal.min() and sal.max() <= 1
    from medkt.data.readers import read_image

    np.testing.assert_array_equal(sal, medkt.saliency(backend, read_image(image), "a chest x-ray with mass",
                                                      config={"steps": 2}))
    res = medkt.segment(backend, root / "images" / "mass", "a chest x-ray with mass", masks=root / "masks" / "mass",
                        saliency_config={"steps": 2}, progress=False)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["mode"] == "saliency-only" and d["n_images"] == 2 and set(d["per_image"]) == set(res.masks)
    assert all(m.shape == (64, 64) and m.dtype == bool for m in res.masks.values())
    by_manifest = medkt.segment(backend, manifest, "a chest x-ray with mass", saliency_config={"steps": 2},
                                max_images=1, progress=False)
    assert len(by_manifest.masks) == 1 and by_manifest.n_scored == 1
    # unlabelled images and file lists: tests/test_segment_unlabelled.py


def test_type_checking_imports_match_all():
    """``medkt/__init__.py`` lists the names twice (``__all__`` and the IDE import block): in sync."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(medkt.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    names = {a.name for stmt in block.body for a in stmt.names}
    assert names == set(medkt.__all__) == set(medkt.api.__all__)
