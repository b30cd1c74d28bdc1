from __future__ import annotations

import pytest
import torch

from medkt.errors import ConfigError
from medkt.finetune import FinetuneConfig, finetune, load_finetuned, make_caption, save_finetuned
from medkt.inversion import InversionTarget, invert, similarity

DESCS = {"moongate": "a round stone archway in a garden wall", "gyroscope": "a spinning disc held in nested rings"}


@pytest.fixture
def inverted(tiny_backend):
    targets = [InversionTarget(c, d, 4) for c, d in DESCS.items()]
    return tiny_backend, invert(tiny_backend, targets, {"steps": 20, "seed": 0}, progress=False)


def test_caption_template():
    cfg = FinetuneConfig()
    assert make_caption("moongate", "A round archway", cfg) == "A moongate is a round archway"
    assert make_caption("moongate", "a round archway", FinetuneConfig(prepend_name=False)) == "A round archway"


def test_visual_finetune_moves_images_to_captions_and_keeps_text_bit_identical(inverted):
    b, inv = inverted
    cfg = FinetuneConfig(lr=1e-3, epochs=3, batch_size=4, seed=0)
    caps = [make_caption(c, DESCS[c], cfg) for c in inv.concepts]
    other = {"moongate": "gyroscope", "gyroscope": "moongate"}
    cap_emb = b.encode_texts(caps)
    other_emb = b.encode_texts([make_caption(other[c], DESCS[other[c]], cfg) for c in inv.concepts])
    text_before = {k: v.clone() for k, v in b.state_dict().items()}
    vis_ids = {id(p) for p in b.visual_parameters()}
    # the margin own caption - other concept's caption (what InfoNCE optimises)
    sim0 = (similarity(b, inv.images, cap_emb) - similarity(b, inv.images, other_emb)).mean()
    hist = finetune(b, inv.images, inv.concepts, DESCS, ["A dog is an animal"], cfg, progress=False)
    sim1 = (similarity(b, inv.images, cap_emb) - similarity(b, inv.images, other_emb)).mean()
    assert hist["steps"] == 6 and hist["loss"][-1] < hist["loss"][0]
    assert sim1 > sim0 + 0.01, (float(sim0), float(sim1))
    changed = False
    for name, p in b.state_dict(keep_vars=True).items():
        if id(p) in vis_ids:
            changed |= not torch.equal(p, text_before[name])
        else:
            assert torch.equal(p, text_before[name]), f"non-visual tensor {name} changed"
    assert changed


def test_text_only_training_keeps_visual_identical(inverted):
    b, inv = inverted
    vis = {k: v.clone() for k, v in b.visual_state_dict().items()}
    finetune(b, inv.images, inv.concepts, DESCS, [], FinetuneConfig(lr=1e-3, train="text"), progress=False)
    assert all(torch.equal(vis[k], v) for k, v in b.visual_state_dict().items())


def test_single_concept_needs_negatives(inverted):
    b, inv = inverted
    one = [c for c in inv.concepts if c == "moongate"]
    imgs = inv.images[: len(one)]
    with pytest.raises(ConfigError, match="negative"):
        finetune(b, imgs, one, {"moongate": DESCS["moongate"]}, [], FinetuneConfig(), progress=False)
    hist = finetune(b, imgs, one, {"moongate": DESCS["moongate"]}, ["a photo of a dog"], FinetuneConfig(), progress=False)
    assert hist["steps"] == 1 and len(hist["captions"]) == 2


def test_save_load_safetensors_roundtrip(inverted, tmp_path):
    b, inv = inverted
    finetune(b, inv.images, inv.concepts, DESCS, [], FinetuneConfig(lr=1e-3), progress=False)
    path = save_finetuned(b, tmp_path / "ft.safetensors")
    from medkt.backends import create_backend

    fresh = create_backend(b.spec)
    x = inv.images[:2]
    assert not torch.allclose(fresh.encode_pixels(x), b.encode_pixels(x))
    load_finetuned(fresh, path)
    assert torch.allclose(fresh.encode_pixels(x), b.encode_pixels(x), atol=1e-6)


def test_bad_finetune_config():
    with pytest.raises(ConfigError, match=r"finetune#train = \"all\": expected one of"):
        FinetuneConfig.from_dict({"train": "all"})
    with pytest.raises(ConfigError, match="unknown finetune option"):
        FinetuneConfig.from_dict({"learning_rate": 1e-5})
