"""Zero-shot evaluators of the natural-image pipelines (streaming embeddings, ITM scores)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_natural import write_rare_concepts


def test_streaming_evaluator_matches_in_memory_one(tmp_path):
    from medkt.backends import create_backend
    from medkt.evaluation import ZeroShotEvaluator
    from medkt.natural.itm_eval import StreamingZeroShotEvaluator

    torch.manual_seed(0)
    clip = create_backend("clip:medkt-tiny-ViT@random")
    write_rare_concepts(tmp_path, per_concept=3)
    paths = sorted(tmp_path.rglob("*.jpg"))
    labels = [p.parent.name for p in paths]
    prompts = {c: [f"a photo of a {c}.", f"itap of a {c}."] for c in ["moongate", "tonometer", "gyroscope", "tench"]}
    ref = ZeroShotEvaluator(clip, paths, labels, prompts).scores()
    ev = StreamingZeroShotEvaluator(clip, paths, labels, prompts, batch_size=4)
    np.testing.assert_allclose(ev.scores(), ref, rtol=1e-5, atol=1e-6)
    res = ev.evaluate()
    assert res.scores.shape == (9, 4) and "tench" not in res.per_class  # a class without images is a distractor
    # cached class embeddings are refreshed when the text encoder changes
    with torch.no_grad():
        next(iter(clip.text_parameters())).add_(0.5)
    fresh = ZeroShotEvaluator(clip, paths, labels, prompts).scores()
    np.testing.assert_allclose(ev.scores(), fresh, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fresh, ref)


def test_itm_evaluator_brute_force(tmp_path):
    from medkt.backends import create_backend
    from medkt.errors import DataError
    from medkt.natural.itm_eval import ITMZeroShotEvaluator

    vilt = create_backend("vilt:tiny@random")
    write_rare_concepts(tmp_path, concepts=("moongate", "gyroscope"), per_concept=2)
    paths = sorted(tmp_path.rglob("*.jpg"))
    labels = [p.parent.name for p in paths]
    prompts = {"moongate": ["a photo of a moongate.", "a moongate"], "gyroscope": ["a photo of a gyroscope."],
               "dog": ["a photo of a dog."]}
    ev = ITMZeroShotEvaluator(vilt, paths, labels, prompts, text_batch_size=2)
    s = ev.scores()
    with torch.no_grad():
        for i, p in enumerate(paths):
            x = vilt.load_image_native(p)[None]
            m = [vilt.itm_logits(x, vilt.tokenize([t]))[0, 1].item() for t in prompts["moongate"]]
            assert s[i, 0] == pytest.approx(np.mean(m), rel=1e-4, abs=1e-5)
            assert s[i, 2] == pytest.approx(vilt.itm_logits(x, vilt.tokenize(["a photo of a dog."]))[0, 1].item(), rel=1e-4, abs=1e-5)
    mx = ITMZeroShotEvaluator(vilt, paths, labels, prompts, aggregate="max").scores()
    assert (mx[:, 0] >= s[:, 0] - 1e-6).all()
    assert ev.evaluate().accuracy == pytest.approx(np.mean(s.argmax(1) == np.array([0 if lab == "moongate" else 1 for lab in labels]) * 1.0))
    with pytest.raises(DataError, match="not among"):
        ITMZeroShotEvaluator(vilt, paths, labels, {"dog": ["a dog"]})
