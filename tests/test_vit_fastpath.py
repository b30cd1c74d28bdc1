"""The open_clip ViT fast paths (backends/vit_fastpath.py) are exact and resolution-agnostic."""
from __future__ import annotations

import copy

import pytest
import torch

from medkt.backends.vit_fastpath import disable_fast_paths, interpolate_position_embedding
from medkt.inversion import InversionTarget, invert


def _upstream(backend):
    ref = copy.deepcopy(backend)
    disable_fast_paths(ref.model)
    return ref


def test_fast_paths_are_patched_and_exact(tiny_clip):
    assert tiny_clip.fast_paths["embeds"] == 1 and tiny_clip.fast_paths["attention"] >= 2
    assert tiny_clip.accepts_any_size()
    ref = _upstream(tiny_clip)
    assert "_embeds" not in vars(ref.model.visual) and "_embeds" in vars(tiny_clip.model.visual)
    assert list(ref.state_dict()) == list(tiny_clip.state_dict())  # checkpoints unchanged
    torch.manual_seed(0)
    x = torch.rand(3, 3, tiny_clip.image_size, tiny_clip.image_size)
    outs = []
    for b in (tiny_clip, ref):
        xi = x.clone().requires_grad_(True)
        e = b.encode_pixels(xi)
        loss = (e * torch.linspace(-1, 1, e.shape[-1])).sum()
        params = list(b.visual_parameters())
        grads = torch.autograd.grad(loss, [xi, *params])
        outs.append((e.detach(), grads))
    (e1, g1), (e2, g2) = outs
    assert e1.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-4)
    for a, b in zip(g1, g2):  # input gradient (inversion) and weight gradients (fine-tuning)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    texts = ["a photo of a dog", "an unusually long description of a very round moon gate"]
    torch.testing.assert_close(tiny_clip.encode_texts(texts), ref.encode_texts(texts), atol=1e-5, rtol=1e-4)


def test_fast_paths_follow_deepcopy_and_can_be_switched_off(tiny_clip, monkeypatch):
    twin = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        twin.model.visual.class_embedding.add_(1.0)
    x = torch.rand(2, 3, tiny_clip.image_size, tiny_clip.image_size)
    # the copy's bound methods use the copy's weights, not the original's
    assert not torch.allclose(twin.encode_images(x), tiny_clip.encode_images(x))
    monkeypatch.setenv("MEDKT_FAST_PATHS", "0")
    from medkt.backends import create_backend

    plain = create_backend("clip:medkt-tiny-ViT@random")
    assert not plain.accepts_any_size() and "_embeds" not in vars(plain.model.visual)


def test_any_resolution_and_position_interpolation(tiny_clip):
    s = tiny_clip.image_size
    for size in (s // 2, 2 * s, s + 3):  # s + 3 is cropped to whole patches like the strided conv
        assert tiny_clip.encode_pixels(torch.rand(2, 3, size, size)).shape == (2, tiny_clip.encode_texts(["x"]).shape[-1])
    pos = torch.randn(1 + 4 * 4, 8)
    assert interpolate_position_embedding(pos, (4, 4), (4, 4)) is pos
    flat = torch.cat([torch.randn(1, 8), torch.ones(16, 8) * 3.0])
    up = interpolate_position_embedding(flat, (4, 4), (7, 7))
    assert up.shape == (50, 8)
    torch.testing.assert_close(up[0], flat[0])
    torch.testing.assert_close(up[1:], torch.full((49, 8), 3.0))
    with pytest.raises(RuntimeError):  # the upstream path cannot do this: the reason for the patch
        _upstream(tiny_clip).encode_pixels(torch.rand(1, 3, 2 * s, 2 * s))


def test_progressive_inversion_runs_the_model_at_stage_size(tiny_clip, monkeypatch):
    s = tiny_clip.image_size
    seen: list[int] = []
    orig = tiny_clip.encode_image

    def spy(px):
        seen.append(px.shape[-1])
        return orig(px)

    monkeypatch.setattr(tiny_clip, "encode_image", spy)
    cfg = {"steps": 6, "seed": 1, "priors": [{"name": "progressive", "sizes": [s // 2, s], "steps": [3]}]}
    res = invert(tiny_clip, [InversionTarget("moongate", "a round gate in a wall", 2)], cfg, progress=False)
    assert res.images.shape[-1] == s  # outputs always at the model size
    assert seen.count(s // 2) == 3 and seen.count(s) >= 3
    # a backend without the capability gets the stage upsampled to its size every step
    seen.clear()
    monkeypatch.setattr(tiny_clip, "accepts_any_size", lambda: False)
    invert(tiny_clip, [InversionTarget("moongate", "a round gate in a wall", 2)], cfg, progress=False)
    assert set(seen) == {s}


def test_coca_fast_paths_are_exact():
    """CoCa adds per-sample 3-D attention masks (text) and cross-attention (decoder fallback)."""
    from medkt.backends import create_backend

    torch.manual_seed(0)
    coca = create_backend("coca:tiny@random").eval()
    assert coca.fast_paths["embeds"] == 1
    ref = _upstream(coca)
    x = torch.rand(2, 3, coca.image_size, coca.image_size)
    texts = ["a dog on a bench", "two round gates"]
    torch.testing.assert_close(coca.encode_images(x), ref.encode_images(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(coca.encode_texts(texts), ref.encode_texts(texts), atol=1e-5, rtol=1e-4)
    tokens = coca.tokenize(texts)
    with torch.no_grad():
        torch.testing.assert_close(coca.caption_loss(x, tokens), ref.caption_loss(x, tokens), atol=1e-5, rtol=1e-4)
