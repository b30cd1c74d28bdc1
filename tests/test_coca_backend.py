"""CoCa backend: tiny random open_clip CoCa, CoCaLoss oracle, generation on transformers 4.57."""
from __future__ import annotations

import pytest
import torch

from medkt.backends.base import Captioner, ImageTextMatcher

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def coca():
    from medkt.backends import create_backend

    torch.manual_seed(0)
    return create_backend("coca:tiny@random")


def test_tiny_coca_protocol(coca):
    from open_clip.coca_model import CoCa

    assert isinstance(coca.model, CoCa) and isinstance(coca, Captioner) and not isinstance(coca, ImageTextMatcher)
    x = torch.rand(2, 3, coca.image_size, coca.image_size)
    tok = coca.tokenize(["a photo of a moongate.", "a gyroscope"])
    assert tok.shape == (2, 76) and tok[0, 0].item() == 49406
    assert coca.encode_pixels(x).shape == (2, 32) and coca.encode_text(tok).shape == (2, 32)
    loss = coca.caption_loss(x, tok)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in coca.visual_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    coca.zero_grad(set_to_none=True)
    ids = {id(p) for p in coca.visual_parameters()}
    assert not ids & {id(p) for p in coca.text_parameters()}
    assert not ids & {id(p) for p in coca.decoder_parameters()}


def test_combined_loss_equals_open_clip_cocaloss(coca):
    """Oracle: 1*L_CLIP + 0.1*L_cap from medkt == open_clip's CoCaLoss on the same model and batch."""
    from open_clip.loss import CoCaLoss

    from medkt.natural.losses import coca_loss

    torch.manual_seed(1)
    x = torch.rand(3, 3, coca.image_size, coca.image_size)
    tok = coca.tokenize(["a photo of a moongate.", "itap of a gyroscope.", "a bad photo of the tonometer."])
    with torch.no_grad():
        out = coca.model(coca.normalize(x), tok)
        ref_clip, ref_cap = CoCaLoss(caption_loss_weight=0.1, clip_loss_weight=1.0, pad_id=0)(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
        total, parts = coca_loss(coca, x, tok, tok, clip_weight=1.0, caption_weight=0.1)
    assert total.item() == pytest.approx((ref_clip + ref_cap).item(), rel=1e-5, abs=1e-6)
    assert parts["clip"] == pytest.approx(ref_clip.item(), rel=1e-5)
    assert 0.1 * parts["caption"] == pytest.approx(ref_cap.item(), rel=1e-5)
    # weights are configurable and the caption term alone matches caption_loss()
    with torch.no_grad():
        cap_only, _ = coca_loss(coca, x, tok, tok, clip_weight=0.0, caption_weight=1.0)
        assert cap_only.item() == pytest.approx(coca.caption_loss(x, tok).item(), rel=1e-5)


def _patched_open_clip_generate(monkeypatch):
    """open_clip 3.3.0's generate with the BeamSearchScorer import it fails to find on 4.57."""
    import open_clip.coca_model as cm
    from transformers import TopKLogitsWarper, TopPLogitsWarper
    from transformers.generation.beam_search import BeamSearchScorer

    monkeypatch.setattr(cm, "BeamSearchScorer", BeamSearchScorer, raising=False)
    monkeypatch.setattr(cm, "_has_transformers", True)
    monkeypatch.setattr(cm, "GENERATION_TYPES", {"top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper,
                                                 "beam_search": "beam_search"})
    return cm


@pytest.mark.parametrize("kw", [dict(seq_len=12, min_seq_len=3), dict(num_beams=3, num_beam_groups=1, seq_len=10)])
def test_beam_search_matches_open_clip_with_transformers_scorer(coca, monkeypatch, kw):
    _patched_open_clip_generate(monkeypatch)
    torch.manual_seed(2)
    x = torch.rand(2, 3, coca.image_size, coca.image_size)
    mine = coca.generate(x, **kw)
    ref = coca.model.generate(coca.normalize(x), **kw)
    assert torch.equal(mine, ref)
    caps = coca.decode(mine)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


def test_beam_search_finished_hypotheses_match_scorer(monkeypatch):
    """EOS paths (finished pool, early stop, padding) against open_clip's loop + BeamSearchScorer,
    on a stub decoder whose logits depend on the prefix and make EOS likely."""
    from transformers import LogitsProcessorList, MaxLengthCriteria, MinLengthLogitsProcessor, \
        RepetitionPenaltyLogitsProcessor, StoppingCriteriaList

    from medkt.backends.coca import beam_search

    cm = _patched_open_clip_generate(monkeypatch)
    V, SOT, EOS, PAD = 40, 38, 39, 0
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(V, 7, V, generator=gen)
    table[:, 2:, EOS] += 2.5
    per_image = torch.randn(3, V, generator=gen)  # makes the three images decode differently

    def logits_of(tokens, image_index):
        pos = min(tokens.shape[1] - 1, 6)
        return table[tokens[:, -1], pos] + per_image[image_index]

    class Stub:
        def _encode_image(self, images):
            return images, images

        def __call__(self, images, text, image_latent=None, image_embs=None, output_labels=False):
            return {"logits": logits_of(text, image_embs[:, 0].long())[:, None, :]}

    for groups, beams, rp, seq_len in [(3, 6, 1.0, 9), (1, 4, 1.3, 8), (2, 4, 1.0, 12)]:
        B = 3
        ref = cm.CoCa._generate_beamsearch(
            Stub(), torch.arange(B, dtype=torch.float32)[:, None], pad_token_id=PAD, eos_token_id=torch.tensor([EOS]), sot_token_id=SOT,
            num_beams=beams, num_beam_groups=groups, min_seq_len=3,
            stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(max_length=seq_len)]),
            logit_processor=LogitsProcessorList([MinLengthLogitsProcessor(3, torch.tensor([EOS])),
                                                 RepetitionPenaltyLogitsProcessor(rp)]))
        width = beams // groups
        mine = beam_search(lambda rows, toks: logits_of(toks, rows // width), B, num_beams=beams, num_beam_groups=groups,
                           seq_len=seq_len, min_seq_len=3, repetition_penalty=rp, sot_id=SOT, eos_id=EOS, pad_id=PAD)
        assert torch.equal(mine, ref), (groups, beams, mine, ref)
        assert (mine == EOS).any()  # the finished-hypothesis path was exercised
        assert len({tuple(r) for r in mine.tolist()}) > 1


def test_sampling_matches_open_clip(coca, monkeypatch):
    _patched_open_clip_generate(monkeypatch)
    torch.manual_seed(4)
    x = torch.rand(3, 3, coca.image_size, coca.image_size)
    greedy = coca.generate(x, method="top_k", top_k=1, seq_len=9)
    ref = coca.model.generate(coca.normalize(x), generation_type="top_k", top_k=1, seq_len=9)
    assert torch.equal(greedy, ref)
    # greedy == argmax of the teacher-forced logits of its own output
    with torch.no_grad():
        logits, _ = coca.caption_logits(x, greedy)
    live = greedy[:, 1:-1] != 0
    assert torch.equal(logits[:, :-1].argmax(-1)[live], greedy[:, 1:-1][live])
    # top-p: seeded sampling is reproducible and differs from greedy with a wide nucleus
    g1 = coca.generate(x, method="top_p", top_p=0.99, seq_len=9, generator=torch.Generator().manual_seed(0))
    g2 = coca.generate(x, method="top_p", top_p=0.99, seq_len=9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g1, g2) and g1.shape[1] <= 9 and (g1[:, -1] == 49407).all()


def test_top_p_filter_keeps_smallest_nucleus():
    from medkt.backends.coca import _top_k_filter, _top_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(_top_p_filter(logits, 0.01)).sum() == 1
    assert torch.isfinite(_top_k_filter(logits, 3)).tolist() == [[True, True, True, False]]


def test_unknown_architecture_and_missing_weights():
    from medkt.backends import create_backend
    from medkt.errors import UnknownNameError, WeightsNotFoundError

    with pytest.raises(UnknownNameError, match="coca_ViT-B-32"):
        create_backend("coca:coca_ViT-B-33@random")
    with pytest.raises(WeightsNotFoundError, match="Hugging Face cache"):
        create_backend("coca:coca_ViT-B-32@laion2b_s13b_b90k")


def test_checkpoint_file_and_hf_cache_tag(coca, tmp_path, monkeypatch):
    from medkt.backends import create_backend
    from medkt.backends.coca import _resolve_checkpoint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"state_dict": {"module." + k: v for k, v in coca.model.state_dict().items()}},
               folder / "open_clip_pytorch_model.bin")  # open_clip's training-checkpoint layout
    loaded = create_backend(f"coca:tiny@{folder}", seed=123)
    x = torch.rand(1, 3, coca.image_size, coca.image_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_pixels(x), coca.encode_pixels(x))
        torch.testing.assert_close(loaded.model.text_decoder.text_projection, coca.model.text_decoder.text_projection)
    # pretrained tags resolve to the local HF cache only (the snapshot refs/main points to)
    repo = tmp_path / "hub" / "models--laion--CoCa-ViT-B-32-laion2B-s13B-b90k"
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert _resolve_checkpoint("coca_ViT-B-32", "laion2b_s13b_b90k") == snap / "open_clip_pytorch_model.bin"
