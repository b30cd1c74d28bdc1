"""MedCLIP backend: tiny model behaviour, preprocessing, weights/tokenizer errors (no upstream needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medkt.backends import create_backend
from medkt.backends import medclip as mk
from medkt.errors import ConfigError, MedktError, WeightsNotFoundError


@pytest.fixture(scope="module")
def tiny():
    return create_backend("medclip:tiny@random")


def test_tiny_shapes_grads_and_parameter_groups(tiny):
    assert (tiny.image_size, tiny.image_channels, tiny.model_channels) == (32, 1, 3)
    x = torch.rand(3, 1, 32, 32, requires_grad=True)
    emb = tiny.encode_pixels(x)
    assert emb.shape == (3, 16)
    emb.sum().backward()  # inversion optimises pixels: gradients must reach them
    assert x.grad is not None and x.grad.abs().sum() > 0
    txt = tiny.encode_texts(["lung cancer", "a small benign nodule with smooth margins"])
    assert txt.shape == (2, 16) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    vis = {id(p) for p in tiny.visual_parameters()}
    text = {id(p) for p in tiny.text_parameters()}
    assert not vis & text
    assert vis | text | {id(tiny.model.logit_scale)} == {id(p) for p in tiny.parameters()}


def test_logit_scale_is_clamped_like_medclip(tiny):
    assert float(tiny.logit_scale.detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        tiny.model.logit_scale.fill_(9.0)
    try:
        assert float(tiny.logit_scale.detach()) == pytest.approx(np.exp(4.6052), rel=1e-6)
    finally:
        with torch.no_grad():
            tiny.model.logit_scale.fill_(mk.LOGIT_SCALE_INIT)


def test_random_init_is_seeded():
    a = create_backend("medclip:tiny@random")
    b = create_backend("medclip:tiny@random")
    c = create_backend("medclip:tiny@random", init_seed=1)
    pa, pb, pc = (next(m.visual_parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_text_pooling_upstream_vs_masked():
    up = create_backend("medclip:tiny@random")
    masked = create_backend("medclip:tiny@random", text_pooling="masked")
    short, long = "edema", "moderate pulmonary interstitial edema at the lung bases"
    with torch.no_grad():
        # MedCLIP averages padding positions too: a text's embedding depends on its batch
        alone = up.encode_text(up.tokenize([short]))[0]
        padded = up.encode_text(up.tokenize([short, long]))[0]
        assert not torch.allclose(alone, padded, atol=1e-4)
        alone_m = masked.encode_text(masked.tokenize([short]))[0]
        padded_m = masked.encode_text(masked.tokenize([short, long]))[0]
        torch.testing.assert_close(alone_m, padded_m, atol=1e-5, rtol=0)
    tokens = up.tokenize(["word " * 200])
    assert tokens["input_ids"].shape[1] == mk.MAX_TEXT_LENGTH


def _upstream_style_preprocess(arr_u8: np.ndarray, size: int) -> np.ndarray:
    """MedCLIPFeatureExtractor's steps (its class is broken on transformers 4.57): PIL 'L', pad to a
    centred square of side max(size, w, h) with 0, bicubic resize, centre crop, /255."""
    img = Image.fromarray(arr_u8).convert("L")
    w, h = img.size
    side = max(size, w, h)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(img, (int((side - w) / 2), int((side - h) / 2)))
    canvas = canvas.resize((size, size), Image.BICUBIC)
    return np.asarray(canvas, dtype=np.float32) / 255.0


@pytest.mark.parametrize("shape", [(300, 200), (120, 240), (20, 10), (64, 64, 3)])
def test_preprocessing_matches_medclip_steps(tmp_path, shape):
    rng = np.random.default_rng(0)
    arr = (rng.random(shape) * 255).astype(np.uint8)
    if len(shape) == 2:
        arr = np.clip(arr.astype(np.float32) * 0.2 + np.linspace(0, 200, shape[1])[None], 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    ours = mk.medclip_preprocess(tmp_path / "x.png", 64)
    assert ours.shape == (1, 64, 64)
    ref = _upstream_style_preprocess(arr, 64)
    # ours resizes float data, upstream 8-bit data: equal up to rounding
    assert np.abs(ours[0].numpy() - ref).mean() < 2 / 255
    assert np.abs(ours[0].numpy() - ref).max() < 8 / 255
    # small images are padded, not upscaled (upstream pads to at least the model size)
    if shape == (20, 10):
        assert float(ours[0, :20].sum()) == 0.0


def test_missing_weights_and_tokenizer_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDKT_WEIGHTS", raising=False)
    monkeypatch.delenv(mk.TOKENIZER_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(WeightsNotFoundError, match="Getting weights") as err:
        create_backend(f"medclip:vit@{tmp_path / 'nowhere'}")
    assert "medclip_vit_weight.txt" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="pytorch_model.bin"):
        create_backend(f"medclip:vit@{tmp_path / 'empty'}")
    with pytest.raises(WeightsNotFoundError, match="no weights given"):
        create_backend("medclip:vit")
    # weights present, tokenizer missing: says which file and where to put it
    torch.save({}, tmp_path / "empty" / "pytorch_model.bin")
    with pytest.raises(WeightsNotFoundError, match="Bio_ClinicalBERT.*vocab.txt"):
        create_backend(f"medclip:vit@{tmp_path / 'empty'}")
    with pytest.raises(WeightsNotFoundError, match="no vocab.txt"):
        create_backend(f"medclip:vit@{tmp_path / 'empty'}", tokenizer=str(tmp_path))


def test_bad_checkpoints_are_named(tmp_path):
    tok = mk.write_generated_vocab(tmp_path / "Bio_ClinicalBERT", size=28996)
    w = tmp_path / "w"
    w.mkdir()
    (w / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(WeightsNotFoundError, match="truncated"):
        create_backend(f"medclip:vit@{w}", tokenizer=str(tok))
    torch.save({"vision_model.model.conv1.weight": torch.zeros(1), "vision_model.model.layer1.0.conv1.weight": torch.zeros(1)},
               w / "pytorch_model.bin")
    with pytest.raises(MedktError, match="MedCLIP-ResNet"):
        create_backend(f"medclip:vit@{w}", tokenizer=str(tok))


def test_spec_errors():
    with pytest.raises(ConfigError, match="random"):
        create_backend("medclip:tiny@/some/path")
    with pytest.raises(ConfigError, match="ResNet50 is not supported"):
        create_backend("medclip:resnet@random")
    with pytest.raises(MedktError, match="Did you mean 'tiny'"):
        create_backend("medclip:tiny2@random")
    with pytest.raises(ConfigError, match="text_pooling"):
        create_backend("medclip:tiny@random", text_pooling="cls")
