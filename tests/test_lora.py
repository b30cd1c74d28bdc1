"""LoRA through peft (medkt.lora, the "lora" fine-tuning control): only adapters train, merge round-trip, save/load."""
from __future__ import annotations

import pytest
import torch

from helpers_phantom import tiny_backend, tiny_images
from medkt.errors import ConfigError
from medkt.finetune import FinetuneConfig, finetune, load_finetuned, save_finetuned
from medkt.lora import LoraAdapter, LoraSettings, lora_targets

SPECS = ["phantom:tiny@random", "clip:medkt-tiny-ViT@random"]
DESCRIPTIONS = {"speck": "a tiny bright speck", "band": "a thin dark band", "haze": "a diffuse haze"}


def _train_adapters(backend, adapter: LoraAdapter, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(adapter.parameters(), lr=0.5)
    target = torch.randn(len(x), backend.encode_pixels(x[:1]).shape[-1], generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        loss = (backend.encode_pixels(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("spec", SPECS)
def test_only_adapters_get_gradients_and_base_weights_stay_until_merge(spec):
    be = tiny_backend(spec)
    x = tiny_images(be)
    base = {k: v.detach().clone() for k, v in be.state_dict().items()}
    ad = LoraAdapter(be, LoraSettings(rank=2, alpha=4), be.visual_parameters())
    assert ad.targets and ad.num_parameters() > 0
    for p in be.parameters():  # what finetune does: only the adapters require gradients
        p.requires_grad_(any(p is q for q in ad.parameters()))
    _train_adapters(be, ad, x)
    lora_ids = {id(p) for p in ad.parameters()}
    for n, p in be.named_parameters():
        if id(p) in lora_ids:
            continue
        assert p.grad is None, n
    # the adapters moved, the base weights did not (peft keeps them under "base_layer")
    assert any(("lora_B" in n) and v.abs().sum() > 0 for n, v in be.state_dict().items())
    for k, v in be.state_dict().items():
        if "lora_" in k:
            continue
        torch.testing.assert_close(v, base[k.replace(".base_layer", "")], rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_merge_round_trip_and_saved_weights_load_like_any_other(spec, tmp_path):
    be = tiny_backend(spec)
    x = tiny_images(be)
    before = be.encode_pixels(x).detach()
    keys = set(be.state_dict())
    ad = LoraAdapter(be, LoraSettings(rank=4, alpha=8), be.visual_parameters())
    _train_adapters(be, ad, x)
    be.eval()
    with torch.no_grad():
        adapted = be.encode_pixels(x)
        assert (adapted - before).abs().max() > 1e-3  # the adapters changed the model
        ad.merge()
        merged = be.encode_pixels(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert set(be.state_dict()) == keys  # the plain module tree is back
    path = save_finetuned(be, tmp_path / "visual.safetensors")
    fresh = load_finetuned(tiny_backend(spec), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_pixels(x), merged, rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_finetune_with_lora_changes_only_adapted_layers(spec):
    be = tiny_backend(spec)
    x = tiny_images(be)
    start = {k: v.detach().clone() for k, v in be.state_dict().items()}
    probe = tiny_backend(spec)
    targets = set(LoraAdapter(probe, LoraSettings(), probe.visual_parameters()).targets)
    cfg = FinetuneConfig.from_dict({"lr": 1e-2, "epochs": 2, "batch_size": 2,
                                     "controls": [{"name": "lora", "rank": 2, "alpha": 4}]})
    finetune(be, x, ["speck", "band", "speck", "haze"], DESCRIPTIONS, config=cfg, progress=False)
    end = be.state_dict()
    assert set(end) == set(start) and all(p.requires_grad for p in be.parameters())
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed, "LoRA fine-tuning changed nothing"
    # every changed tensor is the weight of an adapted layer; norms, biases, text tower are untouched
    assert all(k.endswith(".weight") and k[: -len(".weight")] in targets for k in changed), sorted(changed)


def test_lora_with_wise_alpha_zero_is_the_start_model():
    be = tiny_backend("phantom:tiny@random")
    x = tiny_images(be)
    start = {k: v.detach().clone() for k, v in be.state_dict().items()}
    finetune(be, x, ["speck", "band", "speck", "haze"], DESCRIPTIONS, progress=False,
             config={"lr": 1e-2, "epochs": 1, "controls": [{"name": "lora", "rank": 2}, {"name": "wise", "alpha": 0.0}]})
    for k, v in be.state_dict().items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=1e-7)


def test_lora_settings_are_validated():
    for bad in ({"rank": 0}, {"rank": 2.5}, {"alpha": -1}, {"dropout": 1.0}, {"rnak": 4},
                {"target_modules": "conv"}, {"target_modules": ["("]}):
        with pytest.raises(ConfigError):
            FinetuneConfig.from_dict({"controls": [{"name": "lora", **bad}]})
    with pytest.raises(ConfigError, match="controls#1"):
        FinetuneConfig.from_dict({"controls": [{"name": "lora", "rank": 2}, 8]})
    assert FinetuneConfig.from_dict({}).controls == []  # off by default (paper-faithful)
    be = tiny_backend("phantom:tiny@random")
    with pytest.raises(ConfigError, match="match no"):
        LoraAdapter(be, LoraSettings(target_modules=["no_such_layer"]), be.visual_parameters())
    # a target regex narrows the layers; MultiheadAttention's inner Linear layers are never chosen
    assert all(t.endswith("conv2") for t in lora_targets(be, be.visual_parameters(), ["conv2$"]))
    vit = tiny_backend("clip:medkt-tiny-ViT@random")
    assert not any(t.endswith("attn.out_proj") for t in lora_targets(vit, vit.visual_parameters()))
