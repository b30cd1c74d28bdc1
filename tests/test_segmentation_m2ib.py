"""M2IB saliency: vision splits for open_clip ViT, HF CLIP and HF Swin; cached == naive; planted region."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_segmentation import PlantedToyBackend, TinySwinBackend
from medkt.errors import ConfigError
from medkt.segmentation.m2ib import M2IB, M2IBConfig, TokenBottleneck, default_layer, get_vision_split, upsample_normalize


def _timm_vit_backend(tmp_dir):
    """open_clip + timm ViT tower (BiomedCLIP's layout), shrunk to 32 px; None without timm."""
    import importlib.util
    import json

    if importlib.util.find_spec("timm") is None:
        return None

    import open_clip

    from medkt.backends import create_backend

    (tmp_dir / "medkt-test-timm-vit.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(tmp_dir)
    torch.manual_seed(0)
    b = create_backend("open_clip:medkt-test-timm-vit@random")
    b.model.visual.set_input_size(32)
    return b


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from medkt.backends import create_backend

    return {
        "open_clip": create_backend("open_clip:medkt-tiny-ViT@random"),
        "hf_clip": create_backend("hf_clip:tiny@random"),
        "swin": TinySwinBackend(),
        "medclip": create_backend("medclip:tiny@random"),
        "timm": _timm_vit_backend(tmp_path_factory.mktemp("oc_cfg")),
    }


@pytest.mark.parametrize("name,layer", [("open_clip", 0), ("open_clip", 1), ("hf_clip", 0), ("hf_clip", -1), ("swin", 2),
                                        ("swin", 4), ("medclip", 0), ("timm", 9)])
def test_split_reproduces_encode_image(backends, name, layer):
    b = backends[name]
    if b is None:
        pytest.skip("timm is not installed")
    split = get_vision_split(b, layer)
    x = b.normalize(torch.rand(2, b.image_channels, b.image_size, b.image_size))
    with torch.no_grad():
        ref = b.encode_image(x)
        mine = split.suffix(split.prefix(x))
        tokens = split.prefix(x)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    assert tokens.shape[1] == split.n_extra_tokens + split.grid[0] * split.grid[1]


@pytest.mark.parametrize("name", ["open_clip", "hf_clip", "swin", "medclip", "timm"])
def test_cached_prefix_gives_identical_map(backends, name):
    """The contract: caching the frozen prefix and the text embedding changes nothing (same seed)."""
    b = backends[name]
    if b is None:
        pytest.skip("timm is not installed")
    x = torch.rand(b.image_channels, b.image_size, b.image_size, generator=torch.Generator().manual_seed(1))
    prompt = "a round dark lesion with smooth margins"
    grads_before = [p.grad for p in b.parameters()]
    flags_before = [p.requires_grad for p in b.parameters()]
    cached = M2IB(b, M2IBConfig(cache_prefix=True, seed=7))
    naive = M2IB(b, M2IBConfig(cache_prefix=False, seed=7))
    rc, rn = cached.explain(x, prompt), naive.explain(x, prompt)
    assert np.array_equal(rc.token_kl, rn.token_kl)
    assert rc.losses == rn.losses
    assert np.array_equal(cached.saliency(x, prompt), naive.saliency(x, prompt))
    # a different seed draws different noise (on random tiny models Adam's +-lr steps are set by the
    # KL term's sign, so the map may coincide; the noisy fitting loss does not)
    assert cached.explain(x, prompt, seed=8).losses != rc.losses
    # neither path leaves gradients or changed requires_grad flags on the backend
    assert [p.grad for p in b.parameters()] == grads_before
    assert [p.requires_grad for p in b.parameters()] == flags_before


def test_saliency_shape_range_and_text_cache(backends):
    b = backends["hf_clip"]
    m = M2IB(b, M2IBConfig(steps=3))
    x = torch.rand(3, b.image_size, b.image_size)
    s = m.saliency(x, "lesion", output_size=(50, 70))
    assert s.shape == (50, 70) and s.min() == 0.0 and s.max() == 1.0
    m.saliency(x, "lesion")
    assert list(m._text_cache) == ["lesion"]


def test_planted_region_is_highlighted():
    """Toy CLIP with a known answer: only the bright patch carries the text direction."""
    b = PlantedToyBackend()
    img = np.full((32, 32), 0.2, np.float32)
    img[8:16, 16:24] = 0.9  # token (row 1, col 2)
    for seed in range(3):
        for beta in (0.1, 1.0):
            kl = M2IB(b, M2IBConfig(beta=beta, seed=seed)).explain(torch.from_numpy(img)[None], "lesion").token_kl
            others = np.delete(kl.ravel(), 1 * 4 + 2)
            assert kl[1, 2] > 3 * others.max(), (seed, beta, kl)
    sal = M2IB(b).saliency(torch.from_numpy(img)[None], "lesion")
    assert np.unravel_index(sal.argmax(), sal.shape)[0] in range(8, 16)
    assert sal[8:16, 16:24].mean() > 4 * np.delete(sal.ravel(), np.ravel_multi_index(np.mgrid[8:16, 16:24].reshape(2, -1), sal.shape)).mean()


def test_planted_region_without_optimisation_is_not_highlighted():
    """Guard on the toy: with 0 steps (alpha at its initial value) every token has the same KL."""
    b = PlantedToyBackend()
    img = np.full((32, 32), 0.2, np.float32)
    img[8:16, 16:24] = 0.9
    kl = M2IB(b, M2IBConfig(steps=1, lr=0.0)).explain(torch.from_numpy(img)[None], "lesion").token_kl
    assert np.allclose(kl, kl.flat[0])


def test_bottleneck_formulas():
    b = TokenBottleneck(3, 4, alpha_init=5.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 4)
    z = b(x)
    lam = torch.sigmoid(torch.tensor(5.0))
    assert float(lam) == pytest.approx(0.9933, abs=1e-4)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, lam * x + (1 - lam) * eps)
    kl = -0.5 * (1 + torch.log((1 - lam) ** 2) - (lam * x) ** 2 - (1 - lam) ** 2)
    torch.testing.assert_close(b.last_kl, kl)


def test_layer_defaults_and_errors(backends):
    assert default_layer(12) == 9 and default_layer(24) == 19 and default_layer(2) == 1
    with pytest.raises(ConfigError, match="out of range"):
        get_vision_split(backends["open_clip"], 5)
    with pytest.raises(ConfigError, match="no vision split"):
        get_vision_split(torch.nn.Linear(2, 2))


def test_upsample_constant_map_warns():
    with pytest.warns(RuntimeWarning, match="constant"):
        out = upsample_normalize(np.ones((2, 2)), (8, 8))
    assert out.shape == (8, 8) and not out.any()
