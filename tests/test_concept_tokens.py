"""finetune(train="concept_tokens"): only the new name's own token embeddings change (medkt.concept_tokens)."""
from __future__ import annotations

import pytest
import torch

from helpers_phantom import tiny_backend, tiny_images
from medkt.concept_tokens import ConceptTokens, name_token_ids
from medkt.errors import ConfigError
from medkt.finetune import FinetuneConfig, finetune, load_finetuned, save_finetuned

SPECS = ["phantom:tiny@random", "clip:medkt-tiny-ViT@random", "hf_clip:tiny@random", "medclip:tiny@random",
         "coca:tiny@random"]
# "speckle" shares its first piece(s) with nothing here; "band" and "haze" are known concepts
DESCRIPTIONS = {"speckle": "a tiny bright speck", "band": "a thin dark band", "haze": "a diffuse haze"}
CFG = {"train": "concept_tokens", "lr": 0.5, "epochs": 3, "batch_size": 4, "optimizer": {"weight_decay": 0.0},
       "caption_template": "a photo of {name}"}


@pytest.mark.parametrize("spec", SPECS)
def test_only_the_new_names_token_rows_change_and_the_new_caption_moves(spec, tmp_path):
    be = tiny_backend(spec)
    x = tiny_images(be)
    before = {k: v.detach().clone() for k, v in be.state_dict().items()}
    with torch.no_grad():
        t0 = be.encode_texts(["a photo of speckle", "a photo of band", "a photo of haze"])
    hist = finetune(be, x, ["speckle"] * len(x), DESCRIPTIONS, config=CFG, progress=False)
    assert hist["steps"] == 3
    emb = be.token_embedding()
    ids = name_token_ids(be, "speckle")
    key = next(k for k, v in be.state_dict(keep_vars=True).items() if v is emb.weight)
    changed = [k for k, v in be.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [key]  # no other weight moved (visual tower, text layers, other rows)
    rows = (be.state_dict()[key] != before[key]).any(1).nonzero().flatten().tolist()
    assert rows and set(rows) <= set(ids)
    with torch.no_grad():
        t1 = be.encode_texts(["a photo of speckle", "a photo of band", "a photo of haze"])
    assert not torch.allclose(t0[0], t1[0])  # the new concept's prompt moved
    torch.testing.assert_close(t0[1:], t1[1:])  # the known concepts' prompts did not
    assert not any(h is not None for h in emb._forward_hooks.values())  # hook removed after merge
    # saved weights hold the embedding matrix and load like any other fine-tuned weights
    path = save_finetuned(be, tmp_path / "ft.safetensors", which="concept_tokens")
    fresh = tiny_backend(spec)
    load_finetuned(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_texts(["a photo of speckle"]), t1[:1])


def test_tokens_shared_with_a_known_name_are_left_alone_and_a_name_without_own_tokens_is_refused():
    be = tiny_backend("phantom:tiny@random")
    shared = set(name_token_ids(be, "pneumothorax"))
    ct = ConceptTokens(be, ["pneumoperitoneum"], ["pneumothorax", "mass"])
    try:
        assert ct.ids and not shared & set(ct.ids)
        assert shared & set(name_token_ids(be, "pneumoperitoneum"))  # the case the rule is for
    finally:
        ct.remove()
    with pytest.raises(ConfigError, match="distinct name"):
        ConceptTokens(be, ["mass"], ["mass effect"])


def test_wise_alpha_scales_the_learned_offsets():
    x = tiny_images(tiny_backend("phantom:tiny@random"))
    full, half = tiny_backend("phantom:tiny@random"), tiny_backend("phantom:tiny@random")
    start = full.token_embedding().weight.detach().clone()
    finetune(full, x, ["speckle"] * 4, DESCRIPTIONS, config=CFG, progress=False)
    finetune(half, x, ["speckle"] * 4, DESCRIPTIONS, config={**CFG, "controls": [{"name": "wise", "alpha": 0.5}]}, progress=False)
    d_full = full.token_embedding().weight.detach() - start
    d_half = half.token_embedding().weight.detach() - start
    torch.testing.assert_close(d_half, 0.5 * d_full, rtol=1e-4, atol=1e-6)


def test_concept_tokens_refuses_lora_and_train_only():
    with pytest.raises(ConfigError, match="concept_tokens"):
        FinetuneConfig.from_dict({**CFG, "controls": [{"name": "lora", "rank": 2}]})
    with pytest.raises(ConfigError, match="concept_tokens"):
        FinetuneConfig.from_dict({**CFG, "controls": [{"name": "train_only", "patterns": ["proj"]}]})


def test_backend_without_a_token_embedding_gets_a_clear_error():
    from medkt.backends.base import Backend

    class NoTokens(Backend):
        family = "no_tokens"

    with pytest.raises(ConfigError, match="concept_tokens"):
        NoTokens().token_embedding()
