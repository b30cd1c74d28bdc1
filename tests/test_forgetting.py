"""Data-free replay (medkt.forgetting): known classes inverted from their text replace real replay images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medkt.backends import create_backend
from medkt.errors import ConfigError
from medkt.forgetting import data_free_replay

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = json.loads((ROOT / "bundles" / "phantom_nodules" / "configs" / "transfer.json").read_text())
KNOWN = {"speck": "a tiny bright speck", "band": "a thin dark band"}


def test_inverts_each_known_class_toward_its_caption_without_changing_the_model():
    from medkt.inversion import similarity

    torch.manual_seed(0)
    be = create_backend("phantom:tiny@random")
    start = {k: v.clone() for k, v in be.state_dict().items()}
    cfg = {"steps": 30, "lr": 0.1, "augmentations": [], "seed": 3}
    rs = data_free_replay(be, KNOWN, 2, cfg)
    assert rs.images.shape == (4, 1, 64, 64) and rs.concepts == ["speck", "speck", "band", "band"]
    assert 0 <= rs.images.min() and rs.images.max() <= 1
    texts = [f"A {c} is {d}" for c, d in KNOWN.items() for _ in range(2)]
    emb = be.encode_texts(texts)
    g = torch.Generator().manual_seed(3)
    noise = torch.rand(4, 1, 64, 64, generator=g)
    # the optimisation moved the images toward their own class's caption
    assert (similarity(be, rs.images, emb) > similarity(be, noise, emb) + 0.05).all()
    assert all(torch.equal(v, start[k]) for k, v in be.state_dict().items())
    for bad in (0, -1, True):
        with pytest.raises(ConfigError):
            data_free_replay(be, KNOWN, bad, cfg)
    with pytest.raises(ConfigError):
        data_free_replay(be, {}, 1, cfg)


@pytest.mark.skipif(not (ROOT / "medkt" / "assets" / "phantom" / "phantom_clip.safetensors").is_file(),
                    reason="shipped phantom checkpoint missing")
def test_recipe_replays_inverted_known_classes_in_both_arms(monkeypatch):
    import medkt.finetune
    import medkt.spine
    from medkt.phantom.experiment import PhantomTransferExperiment, Recipe

    seen = []
    real_finetune = medkt.finetune.finetune

    def spy(*a, **k):
        seen.append((k.get("replay_images"), list(k.get("replay_concepts") or [])))
        return real_finetune(*a, **k)

    monkeypatch.setattr(medkt.spine, "finetune", spy)  # the transfer step's fine-tuning call
    exp = PhantomTransferExperiment("phantom:base", BUNDLE["novel"], BUNDLE["description"], BUNDLE["known_descriptions"],
                                    eval_per_class=2, split="val", cupl_prompts=2)
    ds = exp.eval_set(0)
    r = json.loads(json.dumps(BUNDLE["recipe"]))
    r.update(n_images=2, data_free_replay=1, replay_inversion={"priors": {"residual": {"sign": "any"}}})
    r["inversion"]["steps"] = 2
    r["finetune"] = {**r["finetune"], "epochs": 1, "controls": [{"name": "replay", "per_batch": 2}]}
    recipe = Recipe.from_dict({"name": "dfr", **r})
    arm = exp.run_arm(recipe, 0, ds)
    exp.run_arm(recipe, 0, ds, placebo=True)
    (imgs_t, conc_t), (imgs_p, conc_p) = seen
    assert conc_t == conc_p == exp.known  # one inverted image per known class, no real one
    torch.testing.assert_close(imgs_t, imgs_p)
    real_known = exp.train_images("normal", len(exp.known), 0, 4)
    assert not torch.equal(imgs_t, real_known)  # edited by the inversion, not the start images
    assert arm.seconds_inversion > 0
    # replay images without a replay or distillation weight would be ignored: refused instead
    r["finetune"] = {**r["finetune"], "controls": []}
    with pytest.raises(ConfigError, match="'replay' or 'distill' control"):
        Recipe.from_dict({"name": "bad", **r})
