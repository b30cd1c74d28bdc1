"""Transfer recipes by backend family (issue 18, item 6): real models start from the paper's
recipe, the phantom model from its own named one, and the examples take theirs from it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import medkt
from medkt.errors import ConfigError, UnknownNameError
from medkt.finetune import FinetuneConfig
from medkt.inversion import InversionConfig

ROOT = Path(__file__).resolve().parents[1]


def _bundle(name: str) -> dict:
    return json.loads((ROOT / "bundles" / name / "configs" / "transfer.json").read_text())


@pytest.mark.parametrize("spec", ["medclip:vit@/models/medclip-vit", "clip:ViT-B-32@openai", "hf_clip:tiny@random",
                                  "myplugin:anything"])
def test_real_models_get_the_paper_recipe(spec):
    recipe = medkt.recipe_defaults(spec)
    assert recipe.name == "paper" and recipe.n_images == 10  # paper §4.2: 10 images per concept
    # the engine's own defaults are the paper's (InversionConfig / FinetuneConfig docstrings)
    assert recipe.inversion_config() == InversionConfig() and recipe.finetune_config() == FinetuneConfig()
    # and agree with the MedCLIP bundle's learning rate, not the phantom recipe's 30x larger one
    assert recipe.finetune_config().lr == _bundle("jsrt_nodules")["finetune"]["lr"]


def test_vilt_and_coca_get_their_paper_variants():
    vilt, coca = medkt.recipe_defaults("vilt:b32@/m"), medkt.recipe_defaults("coca:coca_ViT-B-32@/m")
    bv, bc = _bundle("rare_concepts_vilt"), _bundle("coco_captioning_coca")
    bundle_inv = InversionConfig.from_dict(bv["inversion"])
    for key in ("objective", "augmentations", "init_kind"):  # the bundle adds progressive resolution
        ours, theirs = getattr(vilt.inversion_config(), key), getattr(bundle_inv, key)
        assert (ours() == theirs()) if callable(ours) else ours == theirs
    assert vilt.finetune_config().loss == bv["finetune"]["loss"]
    for key in ("weight_decay", "name"):
        assert getattr(vilt.finetune_config().optimizer, key) == bv["finetune"]["optimizer"][key]
    assert coca.finetune_config().loss == bc["finetune"]["loss"]


def test_phantom_recipe_is_named_and_explicit():
    recipe = medkt.recipe_defaults("phantom:base")
    assert recipe.name == "phantom" and recipe is medkt.recipe_defaults("phantom")
    ft, inv = recipe.finetune_config(), recipe.inversion_config()
    assert ft.lr == 3e-4 and ft.epochs == 10 and inv.steps == 400 and recipe.n_images == 16
    assert ft.lr / medkt.recipe_defaults("medclip:vit").finetune_config().lr == pytest.approx(30)


def test_overrides_and_none():
    recipe = medkt.recipe_defaults("paper")
    assert recipe.inversion_config(steps=7, seed=None).steps == 7
    assert recipe.finetune_config(lr=None, epochs=2).lr == FinetuneConfig().lr
    with pytest.raises(ConfigError, match="lr"):
        recipe.finetune_config(lr=-1.0)
    with pytest.raises(UnknownNameError, match="paper"):
        medkt.recipe_defaults("papr")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("example", ["teach_concept", "compare_prompts"])
@pytest.mark.parametrize("spec", ["clip:medkt-tiny-ViT@random", "phantom:base"])
def test_examples_take_the_backend_recipe(tmp_path, monkeypatch, example, spec):
    """Without --steps/--lr/--epochs/--n-images the examples run the backend family's recipe
    (the transfer call is intercepted: only its arguments are checked)."""
    for label in ("nodule", "no_finding"):
        (tmp_path / "images" / label).mkdir(parents=True)
    seen = {}

    def fake_transfer(backend, concepts, **kw):
        seen.update(kw, concepts=concepts)
        raise _Stop

    monkeypatch.setattr(medkt, "transfer", fake_transfer)
    monkeypatch.setattr(medkt, "zero_shot_evaluator", lambda *a, **k: None)
    monkeypatch.setattr(medkt, "evaluate_zero_shot", lambda *a, **k: None)
    mod_spec = importlib.util.spec_from_file_location(f"ex_{example}", ROOT / "examples" / f"{example}.py")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    argv = ["--images", str(tmp_path / "images"), "--backend", spec, "--device", "cpu", "--out", str(tmp_path / "o")]
    if example == "compare_prompts":
        (tmp_path / "d.json").write_text(json.dumps({"nodule": "a small bright spot", "no_finding": "clear lungs"}))
        argv += ["--descriptions", str(tmp_path / "d.json")]
    with pytest.raises(_Stop):
        module.main(argv)
    recipe = medkt.recipe_defaults(spec)
    assert seen["inversion_config"] == recipe.inversion_config()
    assert seen["finetune_config"] == recipe.finetune_config()
    assert [c.n_images for c in seen["concepts"]] == [recipe.n_images]


def test_readme_api_script_takes_the_recipe():
    """The README's complete script gets its settings from recipe_defaults, not phantom numbers
    that a reader would carry over to a real model."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    script = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    compile(script, "README.md", "exec")
    assert "medkt.recipe_defaults(spec)" in script
    code = "\n".join(line.split("#")[0] for line in script.splitlines())  # comments may show overrides
    assert not re.search(r"\b(lr|epochs|steps|n_images)\s*=\s*[0-9]", code)
