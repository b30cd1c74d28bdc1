"""Configs through pydantic (`medkt.config_model`): direct construction is checked like a
bundle file, the JSON allowances (integral float -> int, list -> tuple) and refusals (quoted
numbers, bools as numbers, fractional ints), and plain ``@dataclass`` plug-in components."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Annotated

import pytest

from medkt.augment import AffineAugment
from medkt.config_model import Range, build, check
from medkt.errors import ConfigError
from medkt.finetune import FinetuneConfig, OptimizerSettings
from medkt.finetune_controls import Wise
from medkt.inversion import ContrastiveSettings, InversionConfig
from medkt.inversion_priors import INVERSION_PRIORS, Prior, TotalVariation


def _message(make) -> str:
    with pytest.raises(ConfigError) as exc:
        make()
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("make, expected", [
    (lambda: InversionConfig(steps="500"), 'inversion#steps = "500": expected integer >= 1. "500" is a string: '
                                           "write 500 without quotes"),
    (lambda: InversionConfig(stepz=3), "unknown inversion option 'stepz' (inversion#stepz). Did you mean 'steps'?"),
    (lambda: InversionConfig(priors=[{"name": "tvv"}]), 'inversion#priors#0#name = "tvv": unknown inversion prior'),
    (lambda: InversionConfig(lr_schedule="cosin"), "expected one of \"cosine\", \"constant\". Did you mean 'cosine'?"),
    (lambda: FinetuneConfig(lr=2), "finetune#lr = 2: expected number in (0, 1)"),
    (lambda: FinetuneConfig(optimizer={"betas": [0.9, 1.5]}), "finetune#optimizer#betas#1 = 1.5: expected number in [0, 1)"),
    (lambda: FinetuneConfig(controls=[{"name": "wisee"}]), "Did you mean 'wise'?"),
    (lambda: OptimizerSettings(eps=0), "eps = 0: expected number > 0"),
])
def test_direct_construction_of_the_configs_is_checked(make, expected):
    assert expected in _message(make)


@pytest.mark.parametrize("make, expected", [
    (lambda: TotalVariation(weight=-1), "weight = -1: expected number >= 0"),  # inversion prior
    (lambda: AffineAugment(p=7), "p = 7: expected number in [0, 1]"),  # inversion augmentation
    (lambda: Wise(alpha="0.5"), 'alpha = "0.5": expected number in [0, 1]'),  # fine-tuning control
    (lambda: ContrastiveSettings(negative_texts="a caption"), "expected list of strings"),  # objective settings
    (lambda: TotalVariation(wieght=1), "option 'wieght'"),
])
def test_direct_construction_of_components_is_checked(make, expected):
    assert expected in _message(make)


def test_json_allowances_and_refusals():
    assert InversionConfig.from_dict({"steps": 1e3}).steps == 1000 and InversionConfig(steps=500.0).steps == 500
    assert AffineAugment(scale=[0.5, 1]).scale == (0.5, 1.0)  # a JSON list for a tuple, ints as floats
    assert isinstance(InversionConfig(lr=1).lr, float)
    assert "expected integer >= 1" in _message(lambda: InversionConfig.from_dict({"steps": 500.5}))
    assert "inversion#steps = true" in _message(lambda: InversionConfig.from_dict({"steps": True}))  # not 1
    assert "inversion#lr = true" in _message(lambda: InversionConfig.from_dict({"lr": True}))
    assert 'finetune#shuffle = 1: expected true or false' in _message(lambda: FinetuneConfig.from_dict({"shuffle": 1}))
    assert "= \"x\": expected null or integer >= 1" in _message(lambda: check("x", Annotated[int, Range(ge=1)] | None, "k"))


def test_replace_and_code_set_fields_are_checked():
    cfg = InversionConfig(steps=3)
    assert "inversion#steps = 0" in _message(lambda: dataclasses.replace(cfg, steps=0))
    cfg.steps = "x"  # set by code after construction: caught by validate()
    assert 'inversion#steps = "x"' in _message(cfg.validate)
    assert 'run#steps = "x"' in _message(lambda: cfg.validate("run"))


def test_dumps_are_plain_json():
    # resume records and checkpoint digests are JSON dumps of these objects: same keys, plain types
    cfg = FinetuneConfig.from_dict({"optimizer": {"betas": [0.8, 0.9]}, "controls": [{"name": "wise", "alpha": 0.5}]})
    dumped = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert dumped["optimizer"] == {"name": "adam", "weight_decay": 0.2, "betas": [0.8, 0.9], "eps": 1e-6,
                                   "grad_clip": None}
    assert FinetuneConfig.from_dict(dumped) == cfg


def test_plain_dataclass_component_is_checked_when_built():
    @dataclass
    class Brightness(Prior):  # written as a plug-in would: stdlib dataclass + Range
        weight: Annotated[float, Range(ge=0)] = 1.0

    INVERSION_PRIORS.register("brightness_test", Brightness)
    try:
        assert "inversion#priors#0#weight = -1: expected number >= 0" in _message(
            lambda: InversionConfig.from_dict({"priors": [{"name": "brightness_test", "weight": -1}]}))
        prior = InversionConfig(priors=[{"name": "brightness_test", "weight": 2}]).build_priors()[0]
        assert isinstance(prior, Brightness) and prior.weight == 2.0
    finally:
        INVERSION_PRIORS.unregister("brightness_test")


def test_nested_cross_field_rule_names_its_entry():
    from medkt.pipelines.transfer import EvaluationSpec, TransferPipeline

    msg = _message(lambda: TransferPipeline("clip:medkt-tiny-ViT@random", [{"name": "x", "description": "a thing"}],
                                            evaluations={"novel": {"classes": ["a"]}}))
    assert msg.startswith("pipeline#evaluations#novel: an evaluation set needs a 'manifest'")
    assert "evaluation-set option 'manifst'" in _message(lambda: build(EvaluationSpec, {"manifst": "m.csv"}, "e"))
