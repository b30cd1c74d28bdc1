from __future__ import annotations

import pytest
import torch

from medkt.backends import BackendSpec, create_backend, list_backends, register_backend
from medkt.backends.base import Backend
from medkt.errors import ConfigError, UnknownNameError, WeightsNotFoundError


def test_spec_parsing():
    s = BackendSpec.parse("clip:ViT-B-32@/models/x.pt")
    assert (s.family, s.architecture, s.weights) == ("clip", "ViT-B-32", "/models/x.pt")
    assert BackendSpec.parse("hf_clip:tiny").weights is None
    with pytest.raises(ConfigError, match="family:architecture"):
        BackendSpec.parse("ViT-B-32")


def test_protocol_shapes(tiny_backend):
    b = tiny_backend
    x = torch.rand(3, b.image_channels, b.image_size, b.image_size)
    img = b.encode_pixels(x)
    txt = b.encode_texts(["a moongate", "a gyroscope spinning in rings", "anything at all: ünïcode"])
    assert img.shape[0] == 3 and txt.shape == (3, img.shape[1])
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    vis, text = {id(p) for p in b.visual_parameters()}, {id(p) for p in b.text_parameters()}
    assert vis and text and not (vis & text)
    assert float(b.logit_scale.detach()) > 1


def test_missing_weights_are_immediate_clear_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDKT_WEIGHTS", raising=False)
    with pytest.raises(WeightsNotFoundError, match="MEDKT_WEIGHTS"):
        create_backend("clip:ViT-B-32")
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "nope.pt")):
        create_backend(f"clip:ViT-B-32@{tmp_path / 'nope.pt'}")
    with pytest.raises(WeightsNotFoundError, match="Getting weights"):
        create_backend(f"hf_clip:openai/clip-vit-base-patch32@{tmp_path / 'missing'}")


def test_unknown_family_and_architecture():
    with pytest.raises(UnknownNameError, match="Known: .*clip"):
        create_backend("nosuch:thing")
    with pytest.raises(UnknownNameError, match="Did you mean 'ViT-B-32'"):
        create_backend("clip:ViT-B-33@random")


def test_register_new_family(tiny_clip):
    @register_backend("mine")
    def _create(architecture, weights, **kw) -> Backend:
        return tiny_clip

    assert "mine" in list_backends()
    assert create_backend("mine:x@random") is tiny_clip


def test_open_clip_checkpoint_roundtrip(tmp_path, tiny_clip):
    """A local checkpoint file loads into the same architecture (the real-weights path)."""
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    b2 = create_backend(f"clip:medkt-tiny-ViT@{path}")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(b2.encode_pixels(x), tiny_clip.encode_pixels(x), atol=1e-6)
