"""Oracle: medkt's MedCLIP backend against the ``medclip`` package's own classes.

Both sides are built offline on the same random weights: upstream's ``MedCLIPModel`` with its hub
loaders replaced by config-built stand-ins; its ``state_dict`` is saved as a release-style
``pytorch_model.bin`` (plus the stale ``position_ids`` buffer old checkpoints carry) and loaded
by ``medkt`` through the normal weights path. Embeddings, logits and prompt-ensemble scores must
agree within 1e-5.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

try:
    import medclip
except ImportError as exc:  # optional: the oracle needs the upstream package
    if os.environ.get("MEDKT_REQUIRE_MEDCLIP"):  # CI sets this, so the oracle cannot silently skip there
        raise ImportError(f"MEDKT_REQUIRE_MEDCLIP is set but 'medclip' cannot be imported: {exc}") from exc
    pytest.skip("the 'medclip' package is not installed (pip install --no-deps medclip==0.0.3; "
                "pip install pandas nltk scikit-learn)", allow_module_level=True)

from helpers_medclip import chest_like, offline_upstream_medclip  # noqa: E402

from medkt.backends import create_backend  # noqa: E402
from medkt.backends import medclip as mk  # noqa: E402

# 768-wide (upstream hard-codes Linear(768, 512)) but shallow, so the test stays fast: BERT with 3
# layers (hidden states 1, 2 and last are distinct) and a 2-stage Swin reaching 768 channels.
SMALL = mk.MedCLIPArchitecture(
    bert=dict(vocab_size=28996, hidden_size=768, num_hidden_layers=3, num_attention_heads=12,
              intermediate_size=256, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0),
    swin=dict(image_size=64, patch_size=4, num_channels=3, embed_dim=384, depths=[1, 1],
              num_heads=[4, 8], window_size=4, mlp_ratio=1.0, drop_path_rate=0.1, layer_norm_eps=1e-5),
    proj_dim=512,
)

TEXTS = [
    "small left pleural effusion",
    "mild cardiomegaly which is unchanged",
    "a round, well defined benign nodule in the right upper lobe of the lung",
    "atelectasis",
]


def _compare(monkeypatch, tmp_path, arch_name: str):
    arch = SMALL if arch_name == "small" else mk.ARCHITECTURES["vit"]
    if arch_name == "small":
        monkeypatch.setitem(mk.ARCHITECTURES, "small", SMALL)
    tok_dir = mk.write_generated_vocab(tmp_path / "vocab", size=int(arch.bert["vocab_size"]))
    tokenizer = mk.load_tokenizer(tok_dir)
    with offline_upstream_medclip(monkeypatch, dict(arch.bert), dict(arch.swin), tokenizer) as mm:
        torch.manual_seed(1234)
        upstream = mm.MedCLIPModel(vision_cls=mm.MedCLIPVisionModelViT).eval()
        upstream.logit_scale.data.fill_(4.9)  # above MedCLIP's clamp: both sides must clamp to 4.6052
        state = upstream.state_dict()
        # release checkpoints were saved by an older transformers that persisted position_ids
        state["text_model.model.embeddings.position_ids"] = torch.arange(512)[None]
        wdir = tmp_path / "medclip-vit"
        wdir.mkdir()
        torch.save(state, wdir / "pytorch_model.bin")
        ours = create_backend(f"medclip:{arch_name}@{wdir}", tokenizer=str(tok_dir))
        assert ours.load_report["ignored_keys"] == ["text_model.model.embeddings.position_ids"]

        size = arch.image_size
        rng = np.random.default_rng(0)
        images = [chest_like(rng, size + 17, nodule=0.2, kind="benign"), chest_like(rng, size, kind="none")]
        x01 = torch.stack([ours.load_image(im) for im in images])  # (2, 1, S, S) in [0, 1]
        normalised = (x01 - mk.MEDCLIP_MEAN) / mk.MEDCLIP_STD  # MedCLIP's normalisation, 1 channel
        with torch.no_grad():
            up_img = upstream.encode_image(normalised)  # upstream repeats 1 -> 3 channels itself
            our_img = torch.nn.functional.normalize(ours.encode_pixels(x01), dim=-1)
            torch.testing.assert_close(our_img, up_img, atol=1e-5, rtol=0)

            # tokenisation exactly as upstream's process_class_prompts / MedCLIPProcessor
            up_tok = tokenizer(TEXTS, truncation=True, padding=True, return_tensors="pt")
            our_tok = ours.tokenize(TEXTS)
            assert torch.equal(our_tok["input_ids"], up_tok["input_ids"])
            up_txt = upstream.encode_text(up_tok["input_ids"], up_tok["attention_mask"])
            our_txt = torch.nn.functional.normalize(ours.encode_text(our_tok), dim=-1)
            torch.testing.assert_close(our_txt, up_txt, atol=1e-5, rtol=0)

            # logits with the clamped temperature
            up_out = upstream(input_ids=up_tok["input_ids"], attention_mask=up_tok["attention_mask"],
                              pixel_values=normalised)
            ours_logits = ours.logit_scale * our_img @ our_txt.T
            torch.testing.assert_close(ours_logits, up_out["logits"], atol=1e-4, rtol=1e-5)
            assert float(ours.logit_scale) == pytest.approx(float(np.exp(4.6052)), rel=1e-6)

            # prompt-ensemble scoring (PromptClassifier(ensemble=True): mean of per-prompt logits,
            # each class's prompts tokenised together) against medkt's class scores
            from medkt.chexpert import medclip_class_scores

            prompts = {"A": TEXTS[:2], "B": TEXTS[2:]}
            clf = mm.PromptClassifier(upstream, ensemble=True)
            inputs = {c: dict(tokenizer(p, truncation=True, padding=True, return_tensors="pt")) for c, p in prompts.items()}
            for v in inputs.values():
                v.pop("token_type_ids", None)
            up_scores = clf(pixel_values=normalised, prompt_inputs=inputs)["logits"]
            our_scores = medclip_class_scores(ours, x01, prompts, ensemble="mean")
            torch.testing.assert_close(our_scores, up_scores, atol=1e-4, rtol=1e-5)
            clf_max = mm.PromptClassifier(upstream, ensemble=False)
            torch.testing.assert_close(medclip_class_scores(ours, x01, prompts, ensemble="max"),
                                       clf_max(pixel_values=normalised, prompt_inputs=inputs)["logits"],
                                       atol=1e-4, rtol=1e-5)


def test_medclip_matches_upstream_small(monkeypatch, tmp_path):
    """768-wide shallow model: same module names, same embeddings, same scores (fast)."""
    _compare(monkeypatch, tmp_path, "small")


@pytest.mark.slow
def test_medclip_matches_upstream_full_shape(monkeypatch, tmp_path):
    """The real MedCLIP-ViT shape (Swin-T + 12-layer BERT, 137M parameters)."""
    t0 = time.time()
    _compare(monkeypatch, tmp_path, "vit")
    assert time.time() - t0 < 300


def test_chexpert_prompts_match_upstream_sampling():
    """Same phrase lists, same combination order, same sampling sequence as upstream under a seed."""
    import random

    from medclip.prompts import generate_chexpert_class_prompts

    from medkt.chexpert import all_chexpert_prompts, chexpert_class_prompts

    for cls, groups in medclip.constants.CHEXPERT_CLASS_PROMPTS.items():
        assert len(all_chexpert_prompts(cls)) == np.prod([len(v) for v in groups.values()])
    for seed in (0, 7):
        random.seed(seed)
        upstream = generate_chexpert_class_prompts(n=10)
        ours = chexpert_class_prompts(n=10, seed=seed)
        assert list(ours) == list(upstream)
        for cls in upstream:
            assert ours[cls] == [" ".join(p.split()) for p in upstream[cls]]
    assert chexpert_class_prompts(n=10, seed=1) != chexpert_class_prompts(n=10, seed=2)
