from __future__ import annotations

import numpy as np
import torch

from medkt.evaluation import ZeroShotEvaluator, auroc, summarize
from medkt.finetune import FinetuneConfig, finetune, load_finetuned, save_finetuned

PROMPTS = {"moongate": ["a round archway", "a circular gate"], "gyroscope": ["a disc spinning in rings"]}


def test_embeddings_cached_per_model_state(tiny_clip, monkeypatch, tmp_path):
    imgs = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ev = ZeroShotEvaluator(tiny_clip, imgs, ["moongate", "gyroscope"] * 2, PROMPTS)
    calls = {"img": 0, "txt": 0}
    enc_px, enc_tx = tiny_clip.encode_pixels, tiny_clip.encode_text
    monkeypatch.setattr(tiny_clip, "encode_pixels", lambda x: (calls.__setitem__("img", calls["img"] + 1), enc_px(x))[1])
    monkeypatch.setattr(tiny_clip, "encode_text", lambda t: (calls.__setitem__("txt", calls["txt"] + 1), enc_tx(t))[1])
    first = ev.evaluate()
    ev.evaluate()
    assert calls == {"img": 1, "txt": 2}  # one image batch; one text batch per class, both cached
    path = save_finetuned(tiny_clip, tmp_path / "w.safetensors")
    finetune(tiny_clip, imgs, ["moongate", "gyroscope"] * 2, {"moongate": "a round archway", "gyroscope": "a disc"},
             [], FinetuneConfig(lr=1e-2), progress=False)
    after = ev.evaluate()  # weights changed in place -> images re-embedded, text still cached
    assert calls["img"] >= 2 and calls["txt"] == 2 + 1  # finetune embeds its captions once
    assert not np.allclose(first.scores, after.scores)
    load_finetuned(tiny_clip, path)  # back to the original weights: a new state, recomputed and equal
    n = calls["img"]
    restored = ev.evaluate()
    assert calls["img"] == n + 1 and np.allclose(restored.scores, first.scores, atol=1e-6)


def test_summary_and_auroc():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    res = summarize(["a", "b"], [0, 1, 1], scores)
    assert res.accuracy == 2 / 3 and res.per_class == {"a": 1.0, "b": 0.5}
    assert res.confusion.tolist() == [[1, 0], [1, 1]]
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0 and auroc([1, 1], [1, 1]) == 0.5
