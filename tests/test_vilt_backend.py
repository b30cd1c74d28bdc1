"""ViLT backend: HF ViltForMaskedLM + 2-way ITM head, checkpoint loading, text limit, MLM."""
from __future__ import annotations

import logging

import pytest
import torch

from medkt.backends.base import ImageTextMatcher

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vilt():
    from medkt.backends import create_backend

    return create_backend("vilt:tiny@random")


def test_itm_head_is_linear_on_pooler(vilt):
    from transformers import ViltForMaskedLM

    assert isinstance(vilt.model.mlm, ViltForMaskedLM) and isinstance(vilt, ImageTextMatcher)
    assert tuple(vilt.model.itm_score.fc.weight.shape) == (2, vilt.model.config.hidden_size)
    x = torch.rand(2, 3, vilt.image_size, vilt.image_size)
    tok = vilt.tokenize(["a moongate is a circular archway", "a dog on the grass"])
    with torch.no_grad():
        logits = vilt.itm_logits(x, tok)
        pooled = vilt.model.mlm.vilt(**tok, pixel_values=(x - 0.5) / 0.5).pooler_output
        ref = pooled @ vilt.model.itm_score.fc.weight.t() + vilt.model.itm_score.fc.bias
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits, ref)
    # cached image tokens give the same logits; one image broadcasts over several texts
    with torch.no_grad():
        emb, mask = vilt.embed_image(x[:1])
        cached = vilt.itm_logits_from_embeds(emb, mask, tok)
        direct = vilt.itm_logits(x[:1], tok)
    torch.testing.assert_close(cached, direct)


def test_gradients_reach_pixels_and_parameter_groups(vilt):
    x = torch.rand(1, 3, vilt.image_size, vilt.image_size, requires_grad=True)
    tok = vilt.tokenize(["a gyroscope"])
    vilt.itm_logits(x, tok)[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    vis = {id(p) for p in vilt.visual_parameters()}
    txt = {id(p) for p in vilt.text_parameters()}
    assert not vis & txt and vis | txt == {id(p) for p in vilt.parameters()}
    assert id(vilt.model.itm_score.fc.weight) in vis
    assert id(vilt.model.vilt.embeddings.text_embeddings.word_embeddings.weight) in txt
    vilt.zero_grad(set_to_none=True)


def test_text_truncated_to_40_positions_with_warning(vilt, caplog):
    vilt._warned_truncation = False
    with caplog.at_level(logging.WARNING, logger="medkt.backends.vilt"):
        tok = vilt.tokenize(["stone " * 60, "a cat"])
    assert tok["input_ids"].shape[1] == 40
    assert tok["input_ids"][0, -1].item() == vilt.tokenizer.sep_token_id
    assert "truncated" in caplog.text
    with torch.no_grad():  # 40 positions run through the model
        assert vilt.itm_logits(torch.rand(2, 3, vilt.image_size, vilt.image_size), tok).shape == (2, 2)


def test_native_resize_rule(vilt):
    img = vilt.load_image_native(torch.rand(3, 50, 120))
    s = vilt.image_size
    assert img.shape[1] % vilt.patch_size == 0 and img.shape[2] % vilt.patch_size == 0
    assert img.shape[2] <= int(1333 / 800 * s) and img.shape[1] <= s
    with torch.no_grad():  # non-square images work (interpolated position embeddings)
        assert vilt.itm_logits(img[None], vilt.tokenize(["a cat"])).shape == (1, 2)


def test_load_checkpoint_with_itm_keys(vilt, tmp_path):
    from medkt.backends import create_backend
    from medkt.errors import WeightsNotFoundError

    folder = tmp_path / "vilt-b32-mlm-itm"
    vilt.model.config.save_pretrained(folder)
    sd = vilt.model.state_dict_checkpoint_names()
    assert "itm_score.fc.weight" in sd and any(k.startswith("vilt.encoder") for k in sd)
    torch.save(sd, folder / "pytorch_model.bin")
    tok_dir = tmp_path / "vilt-b32-mlm"
    vilt.tokenizer.save_pretrained(tok_dir)
    loaded = create_backend(f"vilt:b32@{folder}", tokenizer=str(tok_dir))
    x = torch.rand(1, 3, vilt.image_size, vilt.image_size)
    tok = vilt.tokenize(["a tonometer"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.itm_logits(x, loaded.tokenize(["a tonometer"])), vilt.itm_logits(x, tok))
    # a checkpoint without the ITM head (plain vilt-b32-mlm) is refused, not randomly initialised
    torch.save({k: v for k, v in sd.items() if "itm_score" not in k}, folder / "pytorch_model.bin")
    with pytest.raises(WeightsNotFoundError, match="itm_score"):
        create_backend(f"vilt:b32@{folder}", tokenizer=str(tok_dir))
    with pytest.raises(WeightsNotFoundError, match="vilt-b32-mlm-itm"):
        create_backend(f"vilt:b32@{tmp_path / 'nowhere'}")


def test_mlm_loss(vilt):
    tok = vilt.tokenize(["a moongate is a circular archway"])
    labels = torch.full_like(tok["input_ids"], -100)
    labels[0, 2] = tok["input_ids"][0, 2]
    masked = {k: v.clone() for k, v in tok.items()}
    masked["input_ids"][0, 2] = vilt.tokenizer.mask_token_id
    x = torch.rand(1, 3, vilt.image_size, vilt.image_size)
    loss = vilt.mlm_loss(x, masked, labels)
    logits = vilt.mlm_logits(x, masked)
    ref = torch.nn.functional.cross_entropy(logits[0, 2:3], labels[0, 2:3])
    torch.testing.assert_close(loss, ref)
