"""Inversion components: a user-written prior (docs/bundles.md "Adding a component"), component
overrides, and the readable resume diff of a component setting."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from medkt.checkpoints import describe_changes
from medkt.inversion import InversionConfig, InversionTarget, invert, resume_settings, with_overrides
from medkt.inversion_priors import INVERSION_PRIORS, Prior

TARGET = [InversionTarget("arch", "a round stone archway", 2)]


# the docs' example, verbatim apart from the registry cleanup below
@dataclass
class MeanIntensity(Prior):
    """Pull each image's mean intensity toward ``target`` (e.g. the mean of real scans)."""

    weight: float = 1.0
    target: float = 0.5

    def penalty(self, reg: torch.Tensor) -> torch.Tensor:
        return self.weight * (reg.mean(dim=(1, 2, 3)) - self.target) ** 2


@pytest.fixture
def mean_intensity():
    INVERSION_PRIORS.register("mean_intensity", MeanIntensity)
    yield
    INVERSION_PRIORS.unregister("mean_intensity")


def test_a_user_prior_is_listed_by_name_and_shapes_the_images(tiny_clip, mean_intensity):
    base = {"steps": 15, "lr": 0.1, "augmentations": []}
    plain = invert(tiny_clip, TARGET, base, progress=False)
    pulled = invert(tiny_clip, TARGET, {**base, "priors": [{"name": "tv"}, {"name": "mean_intensity", "weight": 50.0,
                                                                           "target": 0.1}]}, progress=False)
    # ignored, the images would be the same; used, their mean moves toward the target
    gap = lambda r: (r.images.mean(dim=(1, 2, 3)) - 0.1).abs().mean().item()  # noqa: E731
    assert gap(pulled) < 0.5 * gap(plain)
    with pytest.raises(Exception, match="Did you mean 'target'"):
        InversionConfig.from_dict({"priors": [{"name": "mean_intensity", "targt": 0.2}]})


def test_with_overrides_changes_one_component_setting():
    base = {"steps": 5, "priors": [{"name": "tv", "weight": 0.1}, {"name": "residual", "sign": "positive", "max": 0.6}]}
    out = with_overrides(base, {"steps": 7, "priors": {"residual": {"sign": "any"}}})
    assert out["steps"] == 7
    assert out["priors"] == [{"name": "tv", "weight": 0.1}, {"name": "residual", "sign": "any", "max": 0.6}]
    assert base["priors"][1]["sign"] == "positive"  # the input is not changed
    # a component not listed is added (after the defaults when the config has none)
    added = with_overrides({}, {"augmentations": {"blur": {"sigma": 1.0}}})["augmentations"]
    assert added == [{"name": "affine", "p": 0.5}, {"name": "blur", "sigma": 1.0}]
    assert with_overrides(base, {"priors": [{"name": "tv"}]})["priors"] == [{"name": "tv"}]  # a list replaces


def test_resume_diff_names_the_component_setting(tiny_clip):
    a = resume_settings(tiny_clip, InversionConfig(), TARGET)
    b = resume_settings(tiny_clip, InversionConfig(priors=[{"name": "tv", "weight": 0.01}],
                                                   augmentations=[{"name": "affine", "p": 0.5, "rotate_deg": 10}]), TARGET)
    diff = describe_changes(a, b)
    assert "inversion.priors.tv.weight: 0.005 -> 0.01" in diff
    assert "inversion.augmentations.affine.rotate_deg: 30.0 -> 10" in diff
    # defaults are spelled out, so the same settings written two ways are the same run
    c = resume_settings(tiny_clip, InversionConfig(priors=[{"name": "tv", "weight": 0.005, "diagonals": False}]), TARGET)
    assert describe_changes(a, c) == ""


def test_report_line_lists_components():
    cfg = InversionConfig(augmentations=[{"name": "affine", "p": 0.5}, {"name": "noise", "std": 0.02}])
    assert cfg.describe_components() == "tv (weight 0.005); affine (p 0.5); noise (std 0.02)"
