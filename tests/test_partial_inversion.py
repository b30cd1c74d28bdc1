"""Partial-layer inversion (paper Eq. 4): optimise the representation entering the top k blocks."""
from __future__ import annotations

import pytest
import torch

from medkt.backends import create_backend
from medkt.errors import ConfigError
from medkt.finetune import finetune
from medkt.partial_inversion import (FeatureBackend, PartialInversionConfig, invert_features, split_top,
                                     statistics_loss, feature_statistics)

TEXT = "a tiny bright speck"
DESCRIPTIONS = {"speck": TEXT, "band": "a thin dark band"}


def _backend(spec: str = "phantom:tiny@random"):
    torch.manual_seed(0)
    return create_backend(spec)


def _images(be, n: int = 3) -> torch.Tensor:
    return torch.rand(n, be.image_channels, be.image_size, be.image_size, generator=torch.Generator().manual_seed(1))


def test_split_finds_exactly_the_top_blocks_parameters():
    be = _backend()
    sp = split_top(be, 2)
    vis = be.model.visual
    expected = {id(p) for p in [*vis.blocks[-2:].parameters(), *vis.proj.parameters()]}
    assert {id(p) for p in sp.top_parameters} == expected
    x = _images(be)
    with torch.no_grad():  # bottom + top is the whole encoder
        torch.testing.assert_close(sp.top(sp.bottom(x)), be.encode_pixels(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="top_blocks"):
        split_top(be, 6)


@pytest.mark.parametrize("spec", ["phantom:tiny@random", "clip:medkt-tiny-ViT@random"])
def test_similarity_rises_and_statistics_stay_close(spec):
    be = _backend(spec)
    sp = split_top(be, 1)
    x = _images(be)
    cfg = {"top_blocks": 1, "steps": 40, "lr": 0.1, "stat_weight": 0.0}
    free = invert_features(be, sp, TEXT, x, cfg)
    assert free.features.shape == free.start_features.shape
    assert min(b - a for a, b in zip(free.start_similarities, free.similarities)) > 0.05
    tied = invert_features(be, sp, TEXT, x, {**cfg, "stat_weight": 10.0})
    ref = tuple(s.mean(0) for s in feature_statistics(free.start_features))
    # the regulariser keeps the representation's statistics near the real ones
    assert statistics_loss(tied.features, ref).mean() < statistics_loss(free.features, ref).mean()
    assert sum(tied.similarities) > sum(tied.start_similarities)


def test_finetune_on_features_changes_only_the_top_blocks():
    be = _backend()
    sp = split_top(be, 2)
    x = _images(be, 4)
    res = invert_features(be, sp, TEXT, x, {"top_blocks": 2, "steps": 5})
    start = {k: v.clone() for k, v in be.state_dict().items()}
    fb = FeatureBackend(be, sp)
    finetune(fb, res.features, ["speck"] * 4, DESCRIPTIONS, progress=False,
             config={"lr": 1e-2, "epochs": 2, "batch_size": 2, "controls": [{"name": "replay", "per_batch": 1}]},
             replay_images=sp.features(be, _images(be, 2)), replay_concepts=["band", "band"])
    top_names = {n for n, p in be.named_parameters() if any(p is q for q in sp.top_parameters)}
    changed = {k for k, v in be.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and changed <= top_names, sorted(changed - top_names)
    # LoRA on the top blocks through the same engine: still only top-block weights change
    start = {k: v.clone() for k, v in be.state_dict().items()}
    finetune(fb, res.features, ["speck"] * 4, DESCRIPTIONS, progress=False,
             config={"lr": 1e-2, "epochs": 1, "controls": [{"name": "lora", "rank": 2}]})
    changed = {k for k, v in be.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and changed <= top_names


def test_config_is_validated():
    for bad in ({"top_blocks": 0}, {"steps": 1.5}, {"lr": 0}, {"stat": "moments"}, {"stat_weight": -1}, {"topk": 2}):
        with pytest.raises(ConfigError):
            PartialInversionConfig.from_dict(bad)


def test_phantom_recipe_with_partial_inversion_trains_only_the_top_blocks():
    from medkt.phantom.backend import DEFAULT_CHECKPOINT
    from medkt.phantom.experiment import Recipe

    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip("shipped phantom checkpoint missing")
    from helpers_phantom import tiny_phantom_experiment

    exp, ds, r = tiny_phantom_experiment()
    r["partial"] = {"top_blocks": 2, "steps": 3}
    arm = exp.run_arm(Recipe.from_dict({"name": "partial", **r}), 0, ds, keep_images=True)
    assert arm.extra["partial"] and arm.extra["inversion_similarity"] > arm.extra["partial_start_similarity"]
    start, end = exp.new_backend().state_dict(), arm.extra["backend"].state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all(k.startswith(("model.visual.blocks.4.", "model.visual.blocks.5.", "model.visual.proj"))
                           for k in changed), sorted(changed)
    with pytest.raises(ConfigError):
        Recipe.from_dict({"name": "bad", **{**r, "partial": {"top_blocks": 0}}})
