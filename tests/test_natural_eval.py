"""The one zero-shot scorer: streamed embeddings (paths, DataLoader workers) and ITM scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_natural import write_rare_concepts


def test_streamed_paths_match_in_memory_pixels_and_workers(tmp_path):
    from medkt.backends import create_backend
    from medkt.evaluation import ZeroShotEvaluator

    torch.manual_seed(0)
    clip = create_backend("clip:medkt-tiny-ViT@random")
    write_rare_concepts(tmp_path, per_concept=3)
    paths = sorted(tmp_path.rglob("*.jpg"))
    labels = [p.parent.name for p in paths]
    prompts = {c: [f"a photo of a {c}.", f"itap of a {c}."] for c in ["moongate", "tonometer", "gyroscope", "tench"]}
    pixels = torch.stack([clip.load_image(p) for p in paths])
    ref = ZeroShotEvaluator(clip, pixels, labels, prompts).scores()
    ev = ZeroShotEvaluator(clip, paths, labels, prompts, batch_size=4)
    np.testing.assert_allclose(ev.scores(), ref, rtol=1e-5, atol=1e-6)
    two = ZeroShotEvaluator(clip, paths, labels, prompts, batch_size=2, num_workers=2).scores()
    np.testing.assert_allclose(two, ref, rtol=1e-5, atol=1e-6)
    res = ev.evaluate()
    assert res.scores.shape == (9, 4) and "tench" not in res.per_class  # a class without images is a distractor
    assert res.logit_scale == pytest.approx(float(clip.logit_scale.detach()))


def test_text_embeddings_follow_the_text_tower(tmp_path):
    """Regression: fine-tuning the text encoder (Fig. 4 ablation) must change the "after" scores."""
    from medkt.backends import create_backend
    from medkt.evaluation import ZeroShotEvaluator
    from medkt.finetune import FinetuneConfig, finetune

    torch.manual_seed(0)
    clip = create_backend("clip:medkt-tiny-ViT@random")
    imgs = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = {"moongate": ["a round archway"], "gyroscope": ["a disc spinning in rings"]}
    ev = ZeroShotEvaluator(clip, imgs, ["moongate", "gyroscope"] * 2, prompts)
    before = ev.evaluate().scores
    finetune(clip, imgs, ["moongate", "gyroscope"] * 2, {"moongate": "a round archway", "gyroscope": "a disc"},
             [], FinetuneConfig(lr=1e-2, train="text"), progress=False)
    after = ev.evaluate().scores  # the same evaluator object, as the pipelines use it
    fresh = ZeroShotEvaluator(clip, imgs, ["moongate", "gyroscope"] * 2, prompts).scores()
    np.testing.assert_allclose(after, fresh, rtol=1e-5, atol=1e-6)
    assert np.abs(after - before).max() > 1e-3


def test_itm_scores_brute_force(tmp_path):
    from medkt.backends import create_backend
    from medkt.errors import ConfigError, DataError
    from medkt.evaluation import ZeroShotEvaluator

    vilt = create_backend("vilt:tiny@random")
    write_rare_concepts(tmp_path, concepts=("moongate", "gyroscope"), per_concept=2)
    paths = sorted(tmp_path.rglob("*.jpg"))
    labels = [p.parent.name for p in paths]
    prompts = {"moongate": ["a photo of a moongate.", "a moongate"], "gyroscope": ["a photo of a gyroscope."],
               "dog": ["a photo of a dog."]}
    ev = ZeroShotEvaluator(vilt, paths, labels, prompts, text_batch_size=2)
    assert ev.scoring == "itm"  # ViLT has no embeddings: ITM is chosen, not probed
    s = ev.scores()
    with torch.no_grad():
        for i, p in enumerate(paths):
            x = vilt.load_image_native(p)[None]
            m = [vilt.itm_logits(x, vilt.tokenize([t]))[0, 1].item() for t in prompts["moongate"]]
            assert s[i, 0] == pytest.approx(np.mean(m), rel=1e-4, abs=1e-5)
            assert s[i, 2] == pytest.approx(vilt.itm_logits(x, vilt.tokenize(["a photo of a dog."]))[0, 1].item(), rel=1e-4, abs=1e-5)
    mx = ZeroShotEvaluator(vilt, paths, labels, prompts, aggregate="max").scores()
    assert (mx[:, 0] >= s[:, 0] - 1e-6).all()
    res = ev.evaluate()
    assert res.logit_scale == 1.0  # ITM scores are logits already: one temperature rule
    assert res.accuracy == pytest.approx(np.mean(s.argmax(1) == np.array([0 if lab == "moongate" else 1 for lab in labels]) * 1.0))
    with pytest.raises(DataError, match="not among"):
        ZeroShotEvaluator(vilt, paths, labels, {"dog": ["a dog"]})
    with pytest.raises(ConfigError, match="no image/text embeddings"):
        ZeroShotEvaluator(vilt, paths, labels, prompts, scoring="embedding")


def test_disk_cache_skips_reencoding_unchanged_model(tmp_path, monkeypatch):
    from medkt.backends import create_backend
    from medkt.evaluation import ZeroShotEvaluator

    torch.manual_seed(0)
    clip = create_backend("clip:medkt-tiny-ViT@random")
    write_rare_concepts(tmp_path / "data", concepts=("moongate", "gyroscope"), per_concept=2)
    paths = sorted((tmp_path / "data").rglob("*.jpg"))
    labels = [p.parent.name for p in paths]
    prompts = {"moongate": ["a moongate"], "gyroscope": ["a gyroscope"]}
    first = ZeroShotEvaluator(clip, paths, labels, prompts, cache_dir=tmp_path / "cache").scores()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    calls = []
    orig = clip.encode_pixels
    monkeypatch.setattr(clip, "encode_pixels", lambda x: (calls.append(len(x)), orig(x))[1])
    again = ZeroShotEvaluator(clip, paths, labels, prompts, cache_dir=tmp_path / "cache").scores()
    assert calls == [] and np.allclose(again, first)
    with torch.no_grad():  # a changed model is a new key: encoded again
        next(iter(clip.visual_parameters())).add_(0.1)
    ZeroShotEvaluator(clip, paths, labels, prompts, cache_dir=tmp_path / "cache").scores()
    assert calls and len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_bad_file_is_named(tmp_path):
    from medkt.backends import create_backend
    from medkt.errors import DataError
    from medkt.evaluation import ZeroShotEvaluator

    clip = create_backend("clip:medkt-tiny-ViT@random")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="row 7"):
        ZeroShotEvaluator(clip, [bad], ["a"], {"a": ["a"]}, image_names=["manifest.csv row 7"]).scores()
