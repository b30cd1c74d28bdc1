"""Phantom world: determinism, masks that match the drawings, plugin registration, export."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medkt.errors import ConfigError, OutputExistsError, UnknownNameError
from medkt.phantom import (
    BUILTIN_FINDINGS,
    get_finding,
    list_findings,
    make_dataset,
    make_phantom,
    register_finding,
    unregister_finding,
)
from medkt.phantom.world import _finding_key, acquire, draw_anatomy

LOCAL = ["cardiomegaly", "pleural effusion", "consolidation", "atelectasis", "pneumothorax", "mass", "nodule"]


def test_builtins_registered():
    assert set(BUILTIN_FINDINGS) <= set(list_findings())
    assert "nodule" in list_findings()


def test_deterministic_by_seed():
    a = make_dataset(["mass", "nodule"], 3, seed=5)
    b = make_dataset(["mass", "nodule"], 3, seed=5)
    c = make_dataset(["mass", "nodule"], 3, seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.attributes == b.attributes
    assert not np.allclose(a.images, c.images)
    # an image depends on (seed, index, finding) only, not on what else is in the dataset
    np.testing.assert_array_equal(make_phantom("nodule", 5, 1).image, a.images[4])
    assert a.images.dtype == np.float32 and a.images.min() >= 0 and a.images.max() <= 1
    assert a.images.shape == (6, 64, 64)


@pytest.mark.parametrize("finding", LOCAL)
def test_mask_matches_drawing(finding):
    """The returned mask covers the pixels the finding changed, and almost nothing else changed."""
    f = get_finding(finding)
    for i in range(4):
        rng = np.random.default_rng([3, i, _finding_key(finding)])
        cv = draw_anatomy(rng, 64)
        before = cv.image.copy()
        mask, attrs = f.draw(cv, rng)
        changed = np.abs(cv.image - before) > 0.03
        assert mask.any(), f"{finding}: empty mask"
        near = ndimage.binary_dilation(mask, iterations=2)
        # changes outside the (slightly dilated) mask are rare
        assert (changed & ~near).sum() <= 0.05 * max(1, changed.sum()), finding
        # most mask pixels were really changed by the drawing (the enlarged heart's mask also
        # covers the normal heart it grew from)
        frac = 0.3 if finding == "cardiomegaly" else 0.5
        assert (changed & mask).sum() >= frac * mask.sum(), finding


def test_nodule_mask_components_match_count_and_size():
    for i in range(6):
        p = make_phantom("nodule", 11, i)
        n_comp = ndimage.label(p.mask)[1]
        assert n_comp == p.attributes["count"]
        assert p.mask.sum() <= 3 * 30  # each nodule is small (radius < 3 px)
        m = make_phantom("mass", 11, i)
        assert m.mask.sum() > 60  # masses are large


def test_no_finding_has_empty_mask_and_varied_description():
    p = make_phantom("no finding", 0, 0)
    assert not p.mask.any()
    descs = {p.describe(k) for k in range(12)}
    assert len(descs) > 3


def test_descriptions_vary_and_never_name_the_finding():
    for f in BUILTIN_FINDINGS:
        ds = make_dataset([f], 6, seed=2)
        rng = np.random.default_rng(0)
        descs = [get_finding(f).describe(a, rng) for a in ds.attributes for _ in range(2)]
        assert len(set(descs)) >= 4, f
        if f not in ("no finding",):
            assert all(f not in d for d in descs), f


def test_register_custom_finding_from_outside():
    def draw(cv, rng):
        cy, cx, side, zone = cv.lung_point(rng)
        m = (np.abs(cv.yy - cy) <= 2) & (np.abs(cv.xx - cx) <= 2)  # 5x5 px (cy, cx are pixel centres)
        cv.image[m] = 1.0
        return m, {"side": side, "zone": zone}

    def describe(attrs, rng):
        return f"a square metallic bright object in the {attrs['side']} {attrs['zone']} lung"

    register_finding("foreign body", draw, describe)
    try:
        assert "foreign body" in list_findings()
        ds = make_dataset(["no finding", "foreign body"], 2, seed=1)
        assert ds.labels == ["no finding", "no finding", "foreign body", "foreign body"]
        assert ds.masks[2].sum() == 25 and ds.images[2][ds.masks[2]].mean() > 0.75
        assert "metallic" in make_phantom("foreign body", 1, 0).describe()
        with pytest.raises(ConfigError, match="already registered"):
            register_finding("foreign body", draw, describe)
    finally:
        unregister_finding("foreign body")
    assert "foreign body" not in list_findings()


def test_unknown_finding_suggests_close_name():
    with pytest.raises(UnknownNameError, match="nodule"):
        make_phantom("nodul", 0)


def test_bad_mask_shape_is_reported():
    register_finding("broken", lambda cv, rng: (np.zeros((3, 3), bool), {}), lambda a, r: "x")
    try:
        with pytest.raises(ConfigError, match="shape"):
            make_phantom("broken", 0)
    finally:
        unregister_finding("broken")


def test_other_sizes():
    p = make_phantom("mass", 0, 0, size=96)
    assert p.image.shape == (96, 96) and p.mask.shape == (96, 96) and p.mask.any()


def test_tokenizer_accepts_any_english_text():
    torch = pytest.importorskip("torch")
    from medkt.backends import create_backend

    be = create_backend("phantom:tiny@random")
    texts = ["a zebra-striped pneumatocele near the hilum", "Ground-glass opacity, 2.5 cm!", "nodule"]
    tok = be.tokenize(texts)
    assert tok.shape[0] == 3 and (tok != 0).sum(1).min() >= 3
    emb = be.encode_texts(texts)
    assert emb.shape == (3, be.model.cfg.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("fmt", ["png", "dicom"])
def test_export_roundtrip(tmp_path, fmt):
    from PIL import Image

    from medkt.data.manifest import read_manifest
    from medkt.data.readers import read_image
    from medkt.phantom.export import export_dataset

    man = export_dataset(tmp_path, ["no finding", "nodule"], 2, seed=4, fmt=fmt)
    rows = read_manifest(man, tmp_path, classes=["no finding", "nodule"], verify_hashes=True)
    assert [r.label for r in rows] == ["no finding", "no finding", "nodule", "nodule"]
    tol = 1 / 255 + 1e-6 if fmt == "png" else 1 / 4095 + 1e-6
    for r in rows:
        idx = int(r.path.rsplit("_", 1)[1].split(".")[0])
        p = make_phantom(r.label, 4, idx)
        img = read_image(tmp_path / r.path)
        assert img.shape == (64, 64)
        assert np.abs(img - p.image).max() <= tol
        mask = np.asarray(Image.open(tmp_path / r.mask)) > 127
        np.testing.assert_array_equal(mask, p.mask)
    if fmt == "dicom":
        import pydicom

        ds = pydicom.dcmread(tmp_path / rows[2].path)
        assert ds.Modality == "DX" and "nodule" in ds.ImageComments
    with pytest.raises(OutputExistsError):
        export_dataset(tmp_path, ["no finding"], 1, seed=4, fmt=fmt)
    with pytest.raises(ConfigError, match="format"):
        export_dataset(tmp_path / "x", ["no finding"], 1, seed=4, fmt="jpeg2000")
