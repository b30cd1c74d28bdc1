"""The shipped phantom model, a fast knowledge transfer on it, and the bundle pipeline's run folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medkt.backends import create_backend
from medkt.phantom.backend import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = json.loads((ROOT / "bundles" / "phantom_nodules" / "configs" / "transfer.json").read_text())

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="shipped phantom checkpoint missing")

REQUIRED = ("novel_accuracy_before", "novel_accuracy_after", "known_accuracy_before", "known_accuracy_after",
            "placebo_novel_accuracy_after", "placebo_known_accuracy_after", "novel_auroc_before",
            "novel_auroc_after", "seconds_transfer")


def fast_recipe(steps: int = 60, n: int = 8) -> dict:
    r = json.loads(json.dumps(BUNDLE["recipe"]))
    r["n_images"] = n
    r["inversion"]["steps"] = steps
    return r


def test_shipped_checkpoint_and_card():
    assert DEFAULT_CHECKPOINT.stat().st_size <= 20e6
    side = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    assert side["held_out"] == ["nodule"]
    assert "nodule" not in side["known_findings"]
    assert side["pretrain_config"]["seed"] is not None and side["pretrain_config"]["data_seed"] is not None
    card = (DEFAULT_CHECKPOINT.parent / "MODEL_CARD.md").read_text()
    assert "nodule" in card and "Zero-shot accuracy" in card
    be = create_backend("phantom:base")
    assert be.image_channels == 1 and be.image_size == 64
    # the shipped model knows the known findings (well above the 1/9 chance level)
    assert side["zero_shot"]["name"]["known_mean"] > 0.5


def _p_novel(backend, exp, images) -> torch.Tensor:
    from medkt.phantom.metrics import class_embeddings, image_embeddings

    t = class_embeddings(backend, exp.name_prompts)
    return (backend.logit_scale * image_embeddings(backend, images) @ t.T).softmax(-1)[:, exp.classes.index("nodule")]


def _fast_arm():
    """(experiment, known-class result before, the bundle recipe's arm with 60 inversion steps)."""
    from medkt.phantom.experiment import PhantomTransferExperiment, Recipe

    exp = PhantomTransferExperiment("phantom:base", BUNDLE["novel"], BUNDLE["description"], BUNDLE["known_descriptions"],
                                    eval_per_class=10, split="val", cupl_prompts=3)
    ds = exp.eval_set(0)
    before = exp.evaluate(exp.new_backend(), ds)[0]
    return exp, before, exp.run_arm(Recipe.from_dict({"name": "fast", **fast_recipe()}), 0, ds, keep_images=True)


def test_fast_transfer_fits_synthesised_images_and_keeps_known_classes():
    exp, before, arm = _fast_arm()
    imgs, init = arm.extra["images"], arm.extra["init_images"]
    assert imgs.shape == init.shape == (8, 1, 64, 64)
    # a sparse, bounded, one-signed edit of normal phantoms (the bundle's inversion prior)
    edit = imgs - init
    assert edit.min() > -0.05 and edit.max() <= 0.6 + 1e-4 and (edit.abs() > 0.05).float().mean() < 0.2
    # fine-tuning maps the synthesised images to the new caption ...
    assert _p_novel(arm.extra["backend"], exp, imgs).mean() > 0.5
    # ... while replay + distillation keep the known findings
    assert arm.name_prompts.known_mean(["nodule"]) >= before.known_mean(["nodule"]) - 0.15


@pytest.mark.slow  # a wall-clock bound: meaningful only on an idle machine, so not in the default suite
def test_fast_transfer_takes_under_two_minutes():
    _, _, arm = _fast_arm()
    assert arm.seconds_inversion + arm.seconds_finetune < 120


def test_real_nodules_raise_auroc_but_normal_placebo_does_not():
    """The metric check behind the placebo: fine-tuning on *real* nodules (an oracle) raises the
    novel AUROC; the same recipe on normal phantoms captioned as nodule does not."""
    from medkt.phantom.experiment import PhantomTransferExperiment, Recipe

    exp = PhantomTransferExperiment("phantom:base", BUNDLE["novel"], BUNDLE["description"], BUNDLE["known_descriptions"],
                                    eval_per_class=20, split="val", cupl_prompts=3)
    ds = exp.eval_set(1)
    before = exp.evaluate(exp.new_backend(), ds)[0].novel_auroc("nodule")
    r = fast_recipe(1, 16)
    # replay + distillation keep the known classes, so only image content can move the AUROC
    r["finetune"] = {"lr": 3e-4, "epochs": 10, "optimizer": {"name": "adamw", "weight_decay": 0.2},
                     "controls": [{"name": "replay", "per_batch": 4}, {"name": "distill", "weight": 1.0}]}
    r["replay_per_class"] = 4
    oracle = exp.run_arm(Recipe.from_dict({"name": "o", **r, "placebo": "oracle"}), 1, ds, placebo=True)
    placebo = exp.run_arm(Recipe.from_dict({"name": "p", **r, "placebo": "normal"}), 1, ds, placebo=True)
    assert oracle.name_prompts.novel_auroc("nodule") > before + 0.05
    assert placebo.name_prompts.novel_auroc("nodule") < before + 0.05


def test_pipeline_run_folder(tmp_path):
    from medkt.phantom.pipeline import PhantomTransferPipeline

    out = tmp_path / "run"
    pipe = PhantomTransferPipeline(backend="phantom:base", novel="nodule", description=BUNDLE["description"],
                                   known_descriptions=BUNDLE["known_descriptions"], recipe=fast_recipe(20, 4),
                                   seeds=1, eval_per_class=4, cupl_prompts=2, segmentation=True,
                                   segmentation_images=2, split="val", output_dir=out, progress=False)
    res = pipe.run()
    saved = json.loads((out / "results.json").read_text())
    for k in REQUIRED:
        assert k in saved and saved[k] == pytest.approx(res[k])
    assert all(0.0 <= saved[k] <= 1.0 for k in REQUIRED if k != "seconds_transfer")
    report = (out / "report.md").read_text()
    for fig in ("inverted_vs_real.png", "per_class_accuracy.png", "confusion.png"):
        assert (out / fig).is_file() and fig in report
    assert "placebo" in report and "## Settings" in report
    assert saved["segmentation"]["n_images"] == 2
    from medkt.evaluation import forgetting_warnings

    arms = saved["arms"]
    assert saved["warnings"] == forgetting_warnings(arms["before"]["per_class"], arms["transfer"]["per_class"], ["nodule"])
    assert all(w in report.split("Backend `")[0] for w in saved["warnings"])  # at the top
    # before -> after per class, printed by `medkt transfer` and in the report
    for c, b in arms["before"]["per_class"].items():
        a = arms["transfer"]["per_class"][c]
        row = f"| {c} (new) |" if c == "nodule" else f"| {c} |"
        line = next(ln for ln in saved["summary_table"].splitlines() if ln.startswith(row))
        assert f"| {100 * b:.1f} | {100 * a:.1f} | {100 * (a - b):+.1f} |" in line and line in report


def test_replay_init_replays_the_inversion_start_images_as_no_finding(monkeypatch):
    """``replay_init``: fine-tuning sees the unedited start images (captioned "no finding") next to
    the edited ones, in the transfer arm and (same normal phantoms) in its placebo."""
    import medkt.finetune
    import medkt.inversion
    from medkt.phantom.experiment import PhantomTransferExperiment, Recipe

    seen: dict = {"init": [], "replay": []}
    real_invert, real_finetune = medkt.inversion.invert, medkt.finetune.finetune

    def spy_invert(*a, **k):
        seen["init"].append(k.get("init_images"))
        return real_invert(*a, **k)

    def spy_finetune(*a, **k):
        seen["replay"].append((k.get("replay_images"), list(k.get("replay_concepts") or [])))
        return real_finetune(*a, **k)

    monkeypatch.setattr(medkt.inversion, "invert", spy_invert)
    monkeypatch.setattr(medkt.finetune, "finetune", spy_finetune)
    exp = PhantomTransferExperiment("phantom:base", BUNDLE["novel"], BUNDLE["description"], BUNDLE["known_descriptions"],
                                    eval_per_class=4, split="val", cupl_prompts=2)
    ds = exp.eval_set(0)
    r = fast_recipe(2, 4)
    r["finetune"] = {**r["finetune"], "epochs": 1, "controls": [{"name": "replay", "per_batch": 2}]}
    recipe = Recipe.from_dict({"name": "ri", **r, "replay_init": True})
    exp.run_arm(recipe, 0, ds)
    exp.run_arm(recipe, 0, ds, placebo=True)
    init = seen["init"][0]
    for images, concepts in seen["replay"]:
        assert concepts == ["no finding"] * 4
        torch.testing.assert_close(images, init)
