"""Inversion priors learnt from an unlabeled pool of scans: feature_stats, real_start, spectrum.

Each test fails when its prior is silently ignored (same images with and without it, or the
property it promises missing); tiny random models of the real architecture classes (the phantom
CNN, open_clip ViT, timm trunk, MedCLIP Swin) and PNG scans written by the tests.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from medkt.backends import create_backend
from medkt.backends.base import FeatureBlocks, capture_features
from medkt.errors import ConfigError
from medkt.inversion import InversionConfig, InversionTarget, invert, resume_settings
from medkt.inversion_priors import PriorContext, RealStart, _block_stats
from medkt.pool import UnlabeledPool

TARGET = [InversionTarget("nodule", "a small round nodule in the lung", 3)]
PLAIN = {"steps": 12, "lr": 0.05, "augmentations": [], "chunk_size": 2}


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """Eight smooth grey 'scans' (a bright disc on a dark background, noise), 40 px PNGs."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    for i in range(8):
        disc = ((yy - 20 - rng.integers(-5, 5)) ** 2 + (xx - 20) ** 2 < rng.integers(60, 150)).astype(float)
        img = 0.2 + 0.5 * disc + 0.05 * rng.standard_normal((40, 40))
        Image.fromarray((255 * img.clip(0, 1)).astype(np.uint8)).save(root / f"scan{i}.png")
    return root


@pytest.fixture
def pool(pool_dir):
    return UnlabeledPool.from_path(pool_dir)


@pytest.fixture(scope="module")
def phantom():
    return create_backend("phantom:tiny@random")


def _timm_clip():
    """An open_clip CLIP with a timm ViT trunk (BiomedCLIP's tower classes), tiny and random."""
    import open_clip

    from medkt.backends.open_clip_backend import OpenClipBackend

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg={"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                                     "image_size": 32, "timm_pool": "", "timm_proj": "linear"},
                           text_cfg={"context_length": 16, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1})
    from open_clip.transform import PreprocessCfg

    model.visual.preprocess_cfg = dataclasses.asdict(PreprocessCfg(size=32))  # as open_clip's factory sets it
    tokenizer = lambda texts: open_clip.tokenize(texts, context_length=16) % 100  # noqa: E731 - the tiny vocabulary
    return OpenClipBackend(model.eval(), tokenizer, "timm-test", (0.5,) * 3, (0.5,) * 3)


def _run(backend, priors, pool, **kw):
    return invert(backend, TARGET, {**PLAIN, **kw, "priors": priors}, pool=pool, progress=False)


def _feature_gap(backend, images, pool, blocks):
    """Mean over images and blocks of the squared gap between per-image channel means/variances
    and the pool's (computed here, independently of the prior's code path)."""
    def stats(x):
        with torch.no_grad(), capture_features(backend, blocks) as f:
            backend.encode_pixels(x)
        return {b: _block_stats(f[b], gram=False) for b in blocks}

    ref = stats(pool.images(backend))
    got = stats(images)
    return sum(float((g - r.mean(0)).square().mean()) for b in blocks for g, r in zip(got[b], ref[b]))


# -- feature_stats ---------------------------------------------------------------------------------
def test_feature_stats_pulls_the_features_toward_the_pool(phantom, pool):
    blocks = list(range(len(phantom.feature_modules())))
    off = _run(phantom, [{"name": "feature_stats", "weight": 0.0}], pool, steps=25)
    on = _run(phantom, [{"name": "feature_stats", "weight": 5.0}], pool, steps=25)
    assert not torch.equal(off.images, on.images)
    assert _feature_gap(phantom, on.images, pool, blocks) < 0.5 * _feature_gap(phantom, off.images, pool, blocks)


@pytest.mark.parametrize("spec", ["clip:medkt-tiny-ViT@random", "medclip:tiny@random", "hf_clip:tiny@random",
                                  "coca:tiny@random", "timm"])
def test_feature_stats_on_transformer_towers(spec, pool):
    backend = _timm_clip() if spec == "timm" else create_backend(spec)
    assert isinstance(backend, FeatureBlocks)
    n = len(backend.feature_modules())
    with capture_features(backend, [0, n - 1]) as feats:
        backend.encode_pixels(torch.rand(2, backend.image_channels, backend.image_size, backend.image_size))
    assert set(feats) == {0, n - 1} and all(f.dim() == 3 and f.shape[0] == 2 for f in feats.values())  # tokens
    off = _run(backend, [{"name": "feature_stats", "weight": 0.0}], pool, steps=3)
    on = _run(backend, [{"name": "feature_stats", "weight": 10.0, "blocks": [-1]}], pool, steps=3)
    gram = _run(backend, [{"name": "feature_stats", "weight": 10.0, "blocks": [-1], "gram": True}], pool, steps=3)
    assert not torch.equal(off.images, on.images) and not torch.equal(on.images, gram.images)


def test_feature_stats_settings_are_checked(phantom, pool):
    with pytest.raises(ConfigError, match="block 9 is out of range"):
        _run(phantom, [{"name": "feature_stats", "blocks": [9]}], pool, steps=1)
    with pytest.raises(ConfigError, match="Did you mean 'weight'"):
        InversionConfig.from_dict({"priors": [{"name": "feature_stats", "wieght": 1}]}).validate()


def test_pool_statistics_are_computed_once_and_cached(phantom, pool_dir, tmp_path, monkeypatch):
    import medkt.pool as mpool

    calls = []
    real = UnlabeledPool.batches
    monkeypatch.setattr(UnlabeledPool, "batches", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    monkeypatch.setattr(mpool, "_STATISTICS", type(mpool._STATISTICS)())
    pool = UnlabeledPool.from_path(pool_dir, cache_dir=tmp_path / "cache")
    priors = [{"name": "feature_stats", "blocks": [-1]}]
    first = _run(phantom, priors, pool, steps=2)
    assert calls and list((tmp_path / "cache").glob("pool_feature_stats_*.pt"))
    calls.clear()
    _run(phantom, priors, pool, steps=2)  # from memory
    mpool._STATISTICS.clear()
    again = _run(phantom, priors, pool, steps=2)  # from the disk cache
    assert not calls and torch.equal(first.images, again.images)
    _run(phantom, [{"name": "feature_stats", "blocks": [0]}], pool, steps=2)  # other blocks: computed
    assert calls


# -- real_start ------------------------------------------------------------------------------------
def test_real_start_starts_from_seeded_pool_scans(phantom, pool):
    scans = pool.images(phantom)
    res = _run(phantom, [{"name": "real_start", "weight": 0.0}], pool, steps=1, lr=1e-6)
    # every image is (up to the one tiny step) one of the pool's scans, three different ones
    nearest = torch.cdist(res.images.flatten(1), scans.flatten(1)).min(1)
    assert float(nearest.values.max()) < 1e-2 and len(set(nearest.indices.tolist())) == 3
    again = _run(phantom, [{"name": "real_start", "weight": 0.0}], pool, steps=1, lr=1e-6)
    assert torch.equal(res.images, again.images)  # the choice is seeded
    two = _run(phantom, [{"name": "real_start", "weight": 0.0, "scans": 2}], pool, steps=1, lr=1e-6)
    assert len({tuple(r.flatten()[:8].tolist()) for r in two.images}) == 2  # images cycle over 2 scans


def test_real_start_stays_close_to_its_start(phantom, pool):
    start = RealStart(weight=0.0)
    start.setup(PriorContext(phantom, pool, seed=0, n_images=3))
    x0 = start.images(phantom, range(3), phantom.image_size, 0)
    gap = lambda r: float((r.images - x0).square().mean())  # noqa: E731
    free = _run(phantom, [{"name": "real_start", "weight": 0.0}], pool, steps=20, lr=0.1)
    close = _run(phantom, [{"name": "real_start", "weight": 20.0}], pool, steps=20, lr=0.1)
    assert gap(close) < 0.5 * gap(free)
    feat = _run(phantom, [{"name": "real_start", "weight": 20.0, "space": "feature"}], pool, steps=5, lr=0.1)
    assert not torch.equal(feat.images, close.images)
    # with a residual: an edit of the scan, still pulled toward it
    res_free = _run(phantom, [{"name": "real_start", "weight": 0.0}, {"name": "residual", "size": 16}], pool,
                    steps=20, lr=0.1)
    res_close = _run(phantom, [{"name": "real_start", "weight": 20.0}, {"name": "residual", "size": 16}], pool,
                     steps=20, lr=0.1)
    assert gap(res_close) < 0.5 * gap(res_free)


# -- spectrum --------------------------------------------------------------------------------------
def test_spectrum_images_keep_the_pool_amplitude_spectrum(phantom, pool):
    amp = lambda x: torch.fft.rfft2(x.double()).abs()  # noqa: E731
    ref = amp(pool.images(phantom)).mean(0)
    err = lambda r: float(((amp(r.images) - ref).abs().sum() / (ref.sum() * len(r.images))))  # noqa: E731
    spec = _run(phantom, [{"name": "spectrum"}], pool, steps=15)
    plain = _run(phantom, [], pool, steps=15)
    assert err(spec) < 0.15 and err(spec) < 0.25 * err(plain)
    assert spec.history[0][-1] > spec.history[0][0]  # the phase is optimised toward the text
    # from real scans: starts as the scan's phase with the pool's amplitude
    real = _run(phantom, [{"name": "real_start", "weight": 0.0}, {"name": "spectrum"}], pool, steps=2)
    assert err(real) < 0.15 and not torch.equal(real.images, spec.images)


# -- errors and wiring -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["feature_stats", "real_start", "spectrum"])
def test_a_pool_prior_without_a_pool_is_one_line_error(phantom, name):
    with pytest.raises(ConfigError, match=f"'{name}' inversion prior needs an unlabeled pool") as exc:
        _run(phantom, [{"name": name}], None, steps=1)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("priors,match", [
    ([{"name": "init", "kind": "gray"}, {"name": "real_start"}], "'init' and 'real_start' each sets where"),
    ([{"name": "residual"}, {"name": "spectrum"}], "'residual' and 'spectrum' each sets what is optimised"),
    ([{"name": "spectrum"}, {"name": "progressive", "sizes": [16, 64], "steps": [2]}], "'spectrum' sets its own"),
])
def test_conflicting_priors_are_refused(priors, match):
    with pytest.raises(ConfigError, match=match):
        InversionConfig.from_dict({"priors": priors}).validate()


def test_real_start_refuses_init_images_too(phantom, pool):
    with pytest.raises(ConfigError, match="do not also pass init_images"):
        invert(phantom, TARGET, {**PLAIN, "steps": 1, "priors": [{"name": "real_start"}]}, pool=pool,
               init_images=torch.rand(2, 1, 64, 64), progress=False)


def test_the_pool_tags_the_checkpoints(phantom, pool):
    cfg = InversionConfig.from_dict({"priors": [{"name": "feature_stats"}]})
    assert resume_settings(phantom, cfg, TARGET, pool=pool)["pool"] == [pool.source, len(pool)]
    assert "pool" not in resume_settings(phantom, InversionConfig(), TARGET, pool=pool)  # not read: not recorded


def test_transfer_and_api_hand_the_pool_to_the_inversion(phantom, pool_dir, tmp_path):
    import medkt

    concepts = [{"name": "nodule", "description": "a small round nodule", "n_images": 2}]
    inv = {"steps": 2, "priors": [{"name": "feature_stats", "blocks": [-1]}], "augmentations": []}
    medkt.transfer(phantom, concepts, inversion_config=inv, finetune_config={"batch_size": 2, "epochs": 1},
                   negatives=["normal lung"], progress=False, evaluate_before=False, save_weights=False,
                   out_dir=tmp_path / "run", unlabeled=str(pool_dir))
    assert list((tmp_path / "run" / "pool_embeddings").glob("pool_feature_stats_*.pt"))  # the run's cache
    res = medkt.invert(phantom, concepts, inv, progress=False, unlabeled={"path": str(pool_dir), "max_images": 3})
    assert len(res.images) == 2
    with pytest.raises(ConfigError, match="needs an unlabeled pool"):
        medkt.invert(phantom, concepts, inv, progress=False)

    class Unreachable:
        def evaluate(self):
            raise AssertionError("the missing pool must be reported before the 'before' evaluation")

    with pytest.raises(ConfigError, match="'feature_stats' inversion prior needs an unlabeled pool"):
        medkt.transfer(phantom, concepts, inversion_config=inv, evaluators={"x": Unreachable()}, progress=False)


def test_cli_invert_unlabeled(pool_dir, tmp_path, medkt):
    priors = json.dumps([{"name": "tv"}, {"name": "real_start", "scans": 2}])
    args = ["invert", "--backend", "phantom:tiny@random", "--concept", "nodule=a round nodule", "--n-images", "2",
            "--steps", "2", "--set", f"priors={priors}", "--checkpoint-every", "0"]
    r = medkt(*args, "--output", str(tmp_path / "a"), "--unlabeled", str(pool_dir))
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == 2
    r = medkt(*args, "--output", str(tmp_path / "b"))
    assert r.returncode == 2 and "--unlabeled PATH" in r.stderr and "Traceback" not in r.stderr
