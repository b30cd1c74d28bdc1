"""Saliency post-processing (k-means / threshold / Otsu, components, boxes) and the box-prompted SAM wrapper."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_segmentation import save_tiny_sam
from medkt.errors import ConfigError, UnknownNameError, WeightsNotFoundError
from medkt.segmentation.postprocess import (
    EmptySaliencyWarning,
    keep_largest_components,
    kmeans_threshold,
    postprocess_saliency,
)
from medkt.segmentation.sam import SamSegmenter, build_tiny_sam, load_sam, to_rgb_uint8


def two_blobs(h=64, w=80, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.random((h, w)) * noise
    s[10:30, 10:40] += 1.0  # 600 px
    s[40:50, 55:65] += 0.9  # 100 px
    return s


@pytest.mark.parametrize("method", ["kmeans", "threshold", "otsu"])
def test_methods_find_the_largest_blob(method):
    r = postprocess_saliency(two_blobs(), method)
    assert r.mask.sum() == 600
    np.testing.assert_array_equal(r.boxes, [[10, 10, 40, 30]])


def test_keep_k_components_one_box_each_or_union():
    r = postprocess_saliency(two_blobs(), n_components=2)
    assert r.mask.sum() == 700
    np.testing.assert_array_equal(r.boxes, [[10, 10, 40, 30], [55, 40, 65, 50]])
    u = postprocess_saliency(two_blobs(), n_components=2, box_mode="union")
    np.testing.assert_array_equal(u.boxes, [[10, 10, 65, 50]])


def test_kmeans_threshold_is_the_two_cluster_cut():
    v = np.array([0.0, 0.1, 0.2, 0.8, 0.9, 1.0])
    assert kmeans_threshold(v) == pytest.approx(0.5)
    skew = np.concatenate([np.zeros(90), np.full(10, 1.0)])
    assert kmeans_threshold(skew) == pytest.approx(0.5)


def test_components_are_8_connected_and_ties_keep_exactly_k():
    m = np.zeros((6, 6), bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours: one component
    m[4, 4] = True
    out, comps = keep_largest_components(m, 1)
    assert out.sum() == 2 and len(comps) == 1
    ties = np.zeros((5, 5), bool)
    ties[0, 0] = ties[0, 4] = ties[4, 0] = True
    assert keep_largest_components(ties, 2)[0].sum() == 2


@pytest.mark.parametrize("sal", [np.zeros((16, 16)), np.full((16, 16), np.nan), np.full((16, 16), 0.3)])
def test_empty_saliency_gives_empty_mask_and_warning(sal):
    with pytest.warns(EmptySaliencyWarning):
        r = postprocess_saliency(sal)
    assert r.empty and r.mask.shape == (16, 16) and r.boxes.shape == (0, 4)


def test_output_size_and_bad_method():
    r = postprocess_saliency(two_blobs(32, 40), output_size=(64, 80))
    assert r.mask.shape == (64, 80)
    with pytest.raises(UnknownNameError, match="otsu"):
        postprocess_saliency(two_blobs(), "otsuu")
    with pytest.raises(ConfigError):
        postprocess_saliency(np.zeros((2, 3, 4)))


# -- SAM ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sam():
    return build_tiny_sam(seed=0)


def test_sam_segments_inside_one_mask_per_box(tiny_sam):
    seg = SamSegmenter(tiny_sam, top_k=2)
    img = np.random.default_rng(0).random((60, 90)).astype(np.float32)
    out = seg.segment(img, np.array([[10, 10, 40, 30], [50, 35, 80, 55]], np.float32))
    assert out.shape == (60, 90) and out.dtype == bool
    # the wrapper reproduces SamPredictor.predict box by box (threshold 0, multimask off), united
    from segment_anything import SamPredictor

    from medkt.segmentation.postprocess import keep_largest_components

    pred = SamPredictor(tiny_sam)
    pred.set_image(to_rgb_uint8(img))
    ref = np.zeros((60, 90), bool)
    for box in ([10, 10, 40, 30], [50, 35, 80, 55]):
        m, _, _ = pred.predict(box=np.array(box), multimask_output=False)
        ref |= m[0]
    np.testing.assert_array_equal(out, keep_largest_components(ref, 2)[0])


def test_sam_multimask_and_no_box(tiny_sam):
    seg = SamSegmenter(tiny_sam, multimask_output=True)
    img = np.zeros((32, 32, 3), np.uint8)
    assert seg.segment(img, np.zeros((0, 4))).sum() == 0
    assert seg.segment(img, [[4, 4, 20, 20]]).shape == (32, 32)


def test_load_sam_specs(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDKT_SAM_CHECKPOINT", raising=False)
    ckpt = save_tiny_sam(tmp_path / "tiny.pth", seed=3)
    sam = load_sam(f"tiny@{ckpt}")
    ref = build_tiny_sam(seed=3)
    for (k, v), (_, w) in zip(sam.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(v, w), k
    with pytest.raises(WeightsNotFoundError, match="Segment Anything checkpoint"):
        load_sam("vit_b")
    with pytest.raises(WeightsNotFoundError, match="not found"):
        load_sam(f"vit_b@{tmp_path / 'missing.pth'}")
    with pytest.raises(ConfigError, match="2 blocks .*12 \\(vit_b\\)"):
        load_sam(f"vit_b@{ckpt}")  # the tiny test model is no release layout
    with pytest.raises(UnknownNameError, match="vit_h"):
        load_sam("vit_x@/x")
