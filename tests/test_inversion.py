from __future__ import annotations

import csv

import pytest
import torch

from medkt.augment import AffineAugment, total_variation
from medkt.errors import ConfigError
from medkt.inversion import InversionConfig, InversionTarget, invert, load_inversion, save_inversion, similarity

TARGETS = [InversionTarget("moongate", "a round stone archway in a garden wall", 3),
           InversionTarget("gyroscope", "a spinning disc held in nested metal rings", 2)]


def test_inversion_raises_target_similarity(tiny_backend):
    b = tiny_backend
    cfg = InversionConfig(steps=40, lr=0.1, seed=0)
    res = invert(b, TARGETS, cfg, progress=False)
    assert res.images.shape == (5, 3, b.image_size, b.image_size)
    assert res.images.min() >= 0 and res.images.max() <= 1
    assert res.concepts == ["moongate"] * 3 + ["gyroscope"] * 2
    # similarity of the initial noise vs the final images, to the same texts
    emb = b.encode_texts([t.text for t in TARGETS for _ in range(t.n_images)])
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(res.images.shape, generator=g)
    before = similarity(b, noise, emb).mean()
    after = similarity(b, res.images, emb).mean()
    assert after > before + 0.1, (float(before), float(after))
    # and each image is closer to its own text than to the other concept's text
    cross = similarity(b, res.images, emb.flip(0)).mean()
    assert after > cross


def test_same_seed_same_images_and_different_seed_differs(tiny_clip):
    cfg = dict(steps=15, lr=0.1)
    a = invert(tiny_clip, TARGETS, {**cfg, "seed": 3}, progress=False)
    b = invert(tiny_clip, TARGETS, {**cfg, "seed": 3}, progress=False)
    c = invert(tiny_clip, TARGETS, {**cfg, "seed": 4}, progress=False)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_resume_after_interruption_matches_uninterrupted(tiny_clip, tmp_path, monkeypatch):
    cfg = InversionConfig(steps=30, lr=0.1, seed=1, checkpoint_every=10, views=2)
    full = invert(tiny_clip, TARGETS, cfg, progress=False)

    import medkt.inversion as inv

    calls = {"n": 0}
    real = inv.get_objective("cosine")

    def dying(backend, x, ctx):
        calls["n"] += 1
        if calls["n"] > 25:  # killed between checkpoints 20 and 30
            raise KeyboardInterrupt
        return real(backend, x, ctx)

    monkeypatch.setitem(inv.INVERSION_OBJECTIVES._entries, "cosine", dying)
    with pytest.raises(KeyboardInterrupt):
        invert(tiny_clip, TARGETS, cfg, out_dir=tmp_path, progress=False)
    assert (tmp_path / "checkpoints" / "chunk0000.pt").is_file()
    monkeypatch.setitem(inv.INVERSION_OBJECTIVES._entries, "cosine", real)
    resumed = invert(tiny_clip, TARGETS, cfg, out_dir=tmp_path, resume=True, progress=False)
    assert torch.equal(full.images, resumed.images)


def test_progressive_resolution_and_chunks(tiny_clip):
    cfg = InversionConfig(steps=12, chunk_size=2, seed=0,
                          priors=[{"name": "tv"}, {"name": "progressive", "sizes": [16, 32], "steps": [6]}])
    res = invert(tiny_clip, TARGETS, cfg, progress=False)
    assert res.images.shape[-1] == 32 and len(res.steps_run) == 3
    # chunks can be run separately (sharding) and give the same images
    part = invert(tiny_clip, TARGETS, cfg, progress=False, chunks=[1])
    assert torch.equal(part.images, res.images[2:4])


def test_weights_untouched_by_inversion(tiny_clip):
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    invert(tiny_clip, TARGETS, {"steps": 5}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_clip.state_dict().items())
    assert all(p.requires_grad for p in tiny_clip.parameters())


def test_save_and_load(tiny_clip, tmp_path):
    res = invert(tiny_clip, TARGETS, {"steps": 5}, progress=False)
    manifest = save_inversion(res, tmp_path)
    rows = list(csv.DictReader(manifest.open()))
    assert [r["concept"] for r in rows] == res.concepts
    assert (tmp_path / "grid.png").stat().st_size > 0
    back = load_inversion(manifest, tiny_clip)
    assert back.images.shape == res.images.shape
    assert (back.images - res.images).abs().max() <= 1 / 255 + 1e-6


def test_bad_config():
    with pytest.raises(ConfigError, match="unknown inversion option"):
        InversionConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match=r"inversion#priors#0#sizes \[64, 128, 224\] need 2 steps"):
        InversionConfig.from_dict({"priors": [{"name": "progressive", "sizes": [64, 128, 224], "steps": [10]}]})


def test_affine_is_differentiable_and_identity_when_off():
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(AffineAugment(p=0.0)(x, g), x)
    y = AffineAugment(p=1.0)(x, g)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert float(total_variation(flat)) == 0.0
