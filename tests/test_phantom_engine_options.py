"""Engine options added for the phantom demo (usable with any backend): residual inversion from
init images, replay / distillation / last-blocks-only / WiSE-FT / model selection in fine-tuning."""
from __future__ import annotations

import pytest
import torch

from medkt.backends import create_backend
from medkt.errors import ConfigError
from medkt.finetune import FinetuneConfig, finetune
from medkt.inversion import InversionConfig, InversionTarget, invert
from medkt.phantom import make_dataset
from helpers_phantom import tiny_phantom_experiment


@pytest.fixture()
def tiny():
    return create_backend("phantom:tiny@random")


@pytest.fixture(scope="module")
def normals():
    return make_dataset(["no finding"], 3, seed=1).tensor()


def test_residual_inversion_stays_near_init_and_raises_similarity(tiny, normals):
    cfg = InversionConfig(steps=25, lr=0.05, augmentations=[],
                          priors=[{"name": "init", "kind": "images"}, {"name": "residual", "size": 16, "max": 0.2}])
    t = [InversionTarget("nodule", "small round bright spots in the lung", 3)]
    res = invert(tiny, t, cfg, progress=False, init_images=normals)
    assert res.images.shape == (3, 1, 64, 64)
    diff = (res.images - normals).abs()
    assert diff.max() <= 0.2 + 1e-5  # bounded residual
    assert diff.mean() > 1e-4  # it did change the image
    # the optimised images are closer to the text than their starting images
    emb = tiny.encode_texts(["small round bright spots in the lung"])
    with torch.no_grad():
        s0 = torch.nn.functional.normalize(tiny.encode_pixels(normals), dim=-1) @ emb.T
    assert torch.tensor(res.similarities).mean() > s0.mean()


def test_pixel_inversion_from_images_starts_at_them(tiny, normals):
    cfg = InversionConfig(steps=1, lr=1e-6, priors=[{"name": "init", "kind": "images"}], augmentations=[])
    res = invert(tiny, [InversionTarget("x", "a dark lung", 2)], cfg, progress=False, init_images=normals)
    assert torch.allclose(res.images, normals[:2], atol=1e-3)


def test_init_images_required(tiny):
    with pytest.raises(ConfigError, match="init_images"):
        invert(tiny, [InversionTarget("x", "y", 1)], InversionConfig(steps=1, priors=[{"name": "init", "kind": "images"}]), progress=False)
    with pytest.raises(ConfigError, match="unknown inversion prior"):
        InversionConfig.from_dict({"priors": [{"name": "wavelets"}]})
    with pytest.raises(ConfigError, match="'residual' sets its own resolution"):
        InversionConfig.from_dict({"priors": [{"name": "residual"}, {"name": "progressive", "sizes": [32, 64], "steps": [5]}]})


DESCS = {"nodule": "small round bright spots", "no finding": "clear lungs", "mass": "a large round opacity"}


def _visual_copy(backend):
    return {k: v.detach().clone() for k, v in backend.visual_state_dict().items()}


def test_wise_alpha_zero_restores_start(tiny, normals):
    before = _visual_copy(tiny)
    finetune(tiny, normals, ["nodule"] * 3, DESCS, config=FinetuneConfig(lr=1e-2, epochs=2, controls=[{"name": "wise", "alpha": 0.0}]),
             progress=False)
    after = tiny.visual_state_dict()
    assert all(torch.allclose(before[k], after[k]) for k in before)


def test_wise_alpha_half_is_midpoint(normals):
    a = create_backend("phantom:tiny@random")
    b = create_backend("phantom:tiny@random")
    start = _visual_copy(a)
    finetune(a, normals, ["nodule"] * 3, DESCS, config=FinetuneConfig(lr=1e-2, shuffle=False), progress=False)
    finetune(b, normals, ["nodule"] * 3, DESCS, config=FinetuneConfig(lr=1e-2, shuffle=False, controls=[{"name": "wise", "alpha": 0.5}]),
             progress=False)
    full, half = a.visual_state_dict(), b.visual_state_dict()
    k = "model.visual.proj.weight"
    assert not torch.allclose(full[k], start[k])
    assert torch.allclose(half[k], start[k] + 0.5 * (full[k] - start[k]), atol=1e-6)


def test_train_only_restricts_updates(tiny, normals):
    before = _visual_copy(tiny)
    finetune(tiny, normals, ["nodule"] * 3, DESCS, config=FinetuneConfig(lr=1e-2, controls=[{"name": "train_only", "patterns": ["visual.proj"]}]),
             progress=False)
    after = tiny.visual_state_dict()
    changed = {k for k in before if not torch.allclose(before[k], after[k])}
    assert changed and all("visual.proj" in k for k in changed)
    with pytest.raises(ConfigError, match="matches no"):
        finetune(tiny, normals, ["nodule"] * 3, DESCS, progress=False,
                 config=FinetuneConfig(controls=[{"name": "train_only", "patterns": ["nope"]}]))


def test_replay_and_distillation(tiny, normals):
    replay = make_dataset(["mass", "no finding"], 2, seed=3)
    hist = finetune(tiny, normals, ["nodule"] * 3, DESCS,
                    config=FinetuneConfig(lr=1e-3, batch_size=2, controls=[{"name": "replay", "per_batch": 2},
                                                                            {"name": "distill", "weight": 1.0}]),
                    progress=False, replay_images=replay.tensor(), replay_concepts=replay.labels)
    assert hist["steps"] == 2 and all(l == l for l in hist["loss"])
    with pytest.raises(ConfigError, match="replay"):
        finetune(tiny, normals, ["nodule"] * 3, DESCS, progress=False,
                 config=FinetuneConfig(controls=[{"name": "replay", "per_batch": 2}]))
    with pytest.raises(ConfigError, match="description"):
        finetune(tiny, normals, ["nodule"] * 3, DESCS, config=FinetuneConfig(controls=[{"name": "replay", "per_batch": 1}]),
                 progress=False,
                 replay_images=replay.tensor(), replay_concepts=["edema"] * len(replay))


def test_keep_best_restores_best_epoch(tiny, normals):
    scores = iter([0.9, 0.1, 0.2])
    snapshots = []

    def select():
        snapshots.append(_visual_copy(tiny))
        return next(scores)

    hist = finetune(tiny, normals, ["nodule"] * 3, DESCS, config=FinetuneConfig(lr=1e-2, epochs=3, controls=[{"name": "select", "keep_best": True}]),
                    progress=False, select_fn=select)
    assert hist["select"] == [0.9, 0.1, 0.2] and hist["best_epoch"] == 1
    now = tiny.visual_state_dict()
    assert all(torch.allclose(snapshots[0][k], now[k]) for k in now)


def test_run_arm_with_given_images_equals_inverting_them_itself(monkeypatch):
    """Q2's cross arm: fine-tuning on images inverted elsewhere; given the arm's own images back,
    the result is the arm's own (so a cross-model difference is the images', not the code path's)."""
    import medkt.spine
    from medkt.phantom.experiment import Recipe

    exp, ds, r = tiny_phantom_experiment()
    rec = Recipe.from_dict({"name": "t", **r})
    own = exp.run_arm(rec, 0, ds, keep_images=True)
    calls = []
    real = medkt.spine.invert_sharded
    monkeypatch.setattr(medkt.spine, "invert_sharded", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    given = exp.run_arm(rec, 0, ds, given_images=own.extra["images"])
    assert given.name_prompts.confusion.tolist() == own.name_prompts.confusion.tolist()
    assert calls == []  # given images: no inversion runs (was a wall-clock comparison)
    with pytest.raises(ConfigError, match="given_images"):
        exp.run_arm(rec, 0, ds, placebo=True, given_images=own.extra["images"])


def test_recipes_sharing_an_inversion_reuse_its_images(monkeypatch):
    """Recipes that differ only after the inversion (e.g. the fine-tuning) reuse the seed's inverted
    images instead of inverting again; a different inversion setting inverts anew."""
    import medkt.spine
    from medkt.phantom.experiment import Recipe

    exp, ds, r = tiny_phantom_experiment()
    calls = []
    real = medkt.spine.invert_sharded

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(medkt.spine, "invert_sharded", spy)
    a = exp.run_arm(Recipe.from_dict({"name": "a", **r}), 0, ds, keep_images=True)
    b = exp.run_arm(Recipe.from_dict({"name": "b", **r, "finetune": {**r["finetune"], "lr": 1e-4}}), 0, ds,
                    keep_images=True)
    assert len(calls) == 1
    torch.testing.assert_close(a.extra["images"], b.extra["images"])
    assert b.seconds_inversion > 0  # the reused inversion's time still counts
    exp.run_arm(Recipe.from_dict({"name": "c", **r, "inversion": {**r["inversion"], "steps": 3}}), 0, ds)
    assert len(calls) == 2
