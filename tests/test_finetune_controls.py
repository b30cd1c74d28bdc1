"""Fine-tuning controls (medkt.finetune_controls): config checks, composition, the docs example."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from medkt.backends import create_backend
from medkt.errors import ConfigError
from medkt.finetune import FinetuneConfig, finetune
from medkt.finetune_controls import FINETUNE_CONTROLS, build_controls

REPO = Path(__file__).resolve().parents[1]
DESCS = {"moongate": "a round archway", "gyroscope": "a disc in rings"}


@pytest.fixture(scope="module")
def tiny_clip():
    return create_backend("clip:medkt-tiny-ViT@random", device="cpu")


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("controls, message", [
    ([{"name": "wies"}], r"finetune#controls#0#name: unknown fine-tuning control 'wies'\. Did you mean 'wise'\?"),
    ([{"name": "wise", "alpah": 0.5}], r"unknown wise option 'alpah' \(finetune#controls#0#alpah\)\. Did you mean 'alpha'\?"),
    ([{"name": "wise", "alpha": 2}], r"finetune#controls#0#alpha = 2: expected number in \[0, 1\]"),
    ([{"name": "replay", "per_batch": "4"}], r"finetune#controls#0#per_batch = \"4\""),
    ([{"name": "lora", "rank": 0}], r"finetune#controls#0#rank = 0"),
    ([{"name": "lora", "target_modules": ["("]}], r"finetune#controls#0#target_modules#0"),
    ([{"alpha": 0.5}], r"finetune#controls#0 = .*expected an object with a \"name\""),
    (["wise"], r"finetune#controls#0 = \"wise\""),
    ([{"name": "wise"}, {"name": "wise", "alpha": 0.2}], r"finetune#controls#1: control 'wise' is listed twice"),
    ([{"name": "concept_tokens"}], r"switched on by finetune.train = 'concept_tokens'"),
])
def test_bad_controls_are_one_line_errors(controls, message):
    with pytest.raises(ConfigError, match=message) as exc:
        FinetuneConfig.from_dict({"controls": controls})
    assert "\n" not in str(exc.value)


def test_controls_compose_in_their_order():
    ctl = build_controls([{"name": "select"}, {"name": "wise"}, {"name": "lora"}, {"name": "train_only", "patterns": ["x"]},
                          {"name": "distill"}, {"name": "replay"}])
    # trainable: train_only -> wise (remembers the base weights) -> lora; finish runs backwards
    assert [c.name for c in ctl] == ["train_only", "wise", "lora", "replay", "distill", "select"]
    assert max(c.replay_draw for c in ctl) == 4  # replay's per_batch; distillation alone draws 1
    assert [c.replay_draw for c in build_controls([{"name": "distill"}])] == [1]


def test_select_needs_a_score(tiny_clip, images):
    with pytest.raises(ConfigError, match="select_fn"):
        finetune(tiny_clip, images, ["moongate"] * 4, DESCS, progress=False,
                 config={"controls": [{"name": "select", "keep_best": True}]})


def test_select_fn_alone_records_scores(tiny_clip, images):
    scores = iter([0.3, 0.1])
    hist = finetune(tiny_clip, images, ["moongate"] * 4, DESCS, progress=False, select_fn=lambda: next(scores),
                    config={"lr": 1e-4, "epochs": 2})
    assert hist["select"] == [0.3, 0.1] and "best_epoch" not in hist


def test_docs_control_example_runs(tiny_clip, images):
    """The control in docs/bundles.md ("A fine-tuning control") registers and stops training."""
    page = (REPO / "docs" / "bundles.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "FINETUNE_CONTROLS.register(" in b)
    try:
        exec(compile(code, "docs/bundles.md", "exec", dont_inherit=True), {})  # no inherited future import
        cfg = {"lr": 1e-4, "epochs": 3, "batch_size": 2}
        stop = finetune(tiny_clip, images, ["moongate"] * 4, DESCS, progress=False,
                        config={**cfg, "controls": [{"name": "stop_below", "loss": 1e9}]})
        assert stop["steps"] == 2  # stopped after the first epoch (2 batches)
        full = finetune(tiny_clip, images, ["moongate"] * 4, DESCS, progress=False,
                        config={**cfg, "controls": [{"name": "stop_below", "loss": 1e-12}]})
        assert full["steps"] == 6
        with pytest.raises(ConfigError, match=r"finetune#controls#0#loss = -1"):
            FinetuneConfig.from_dict({"controls": [{"name": "stop_below", "loss": -1}]})
    finally:
        FINETUNE_CONTROLS.unregister("stop_below")
