"""ITM / MLM / CLIP+caption plug-ins of the engine, on tiny random ViLT and CoCa."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medkt.errors import ConfigError


@pytest.fixture(scope="module")
def vilt():
    from medkt.backends import create_backend

    return create_backend("vilt:tiny@random")


@pytest.fixture(scope="module")
def coca():
    from medkt.backends import create_backend

    return create_backend("coca:tiny@random")


def test_plugins_registered_by_backends(vilt, coca):
    from medkt.finetune import get_finetune_loss
    from medkt.inversion import get_objective

    assert get_objective("itm") and get_finetune_loss("itm") and get_finetune_loss("mlm") and get_finetune_loss("clip+caption")


def test_itm_objective_is_ce_toward_match(vilt):
    from medkt.inversion import ObjectiveContext, get_objective

    x = torch.rand(2, 3, vilt.image_size, vilt.image_size, requires_grad=True)
    texts = ["a moongate is a round archway", "a gyroscope is a spinning disc"]
    loss, sim = get_objective("itm")(vilt, x, ObjectiveContext(texts))
    logits = vilt.itm_logits(x, vilt.tokenize(texts))
    torch.testing.assert_close(loss, -F.log_softmax(logits, -1)[:, 1])
    torch.testing.assert_close(sim, logits.softmax(-1)[:, 1].detach())
    loss.sum().backward()
    assert x.grad.abs().sum() > 0


def test_itm_inversion_through_engine_raises_match_probability(vilt):
    from medkt.inversion import InversionConfig, InversionTarget, invert

    cfg = InversionConfig(steps=6, lr=0.1, objective="itm", augmentations=[], priors=[{"name": "init", "kind": "normal"}])
    targets = [InversionTarget("moongate", "a moongate is a round archway", 2)]
    cosine = InversionConfig(steps=2, objective="cosine", augmentations=[])
    with pytest.raises(ConfigError, match="single-stream"):  # no silent cosine on ViLT
        invert(vilt, targets, cosine, progress=False)
    res = invert(vilt, targets, cfg, progress=False)  # "itm" never asks ViLT for embeddings
    end = vilt.match_probability(res.images, res.texts)
    # the reported similarity is the objective's own (the ITM match probability)
    assert torch.allclose(torch.tensor(res.similarities), end, atol=1e-5)
    # the match probability (the objective's similarity) rose during the optimisation
    assert res.images.shape == (2, 3, 64, 64) and res.history[0][-1] > res.history[0][0]
    assert ((end > 0) & (end < 1)).all()


def test_itm_finetune_loss_uses_other_captions_as_negatives(vilt, monkeypatch):
    from medkt.finetune import FinetuneConfig, get_finetune_loss
    from medkt.natural import losses

    seen = {}

    def spy(backend, x, pos, neg=None, neg_x=None):
        seen["pos"], seen["neg"] = pos["input_ids"], neg["input_ids"]
        return torch.tensor(0.0)

    monkeypatch.setattr("medkt.natural.objectives.itm_loss", spy)
    captions = ["a dog", "a red car", "a cat", "two people"]
    targets = torch.tensor([0, 1, 2, 0, 3])
    torch.manual_seed(0)
    get_finetune_loss("itm")(vilt, torch.rand(5, 3, 64, 64), targets, captions, None, FinetuneConfig())
    dec = lambda ids: vilt.tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
    pos, neg = dec(seen["pos"]), dec(seen["neg"])
    assert pos == ["a dog", "a red car", "a cat", "a dog", "two people"]
    assert all(p != n and n in captions for p, n in zip(pos, neg))  # negatives: other captions of the run
    x = torch.rand(2, 3, 64, 64)
    pos, neg = vilt.tokenize(["a dog", "a cat"]), vilt.tokenize(["a cat", "a dog"])
    val = losses.itm_loss(vilt, x, pos, neg)
    lp, ln = vilt.itm_logits(x, pos), vilt.itm_logits(x, neg)
    ref = F.cross_entropy(torch.cat([lp, ln]), torch.tensor([1, 1, 0, 0]))
    torch.testing.assert_close(val, ref)


def test_itm_finetuning_separates_pairs(vilt):
    """A few ITM steps make matched pairs score higher than mismatched ones (learning signal)."""
    import copy

    from medkt.finetune import FinetuneConfig, finetune

    model = copy.deepcopy(vilt)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 64, 64, generator=g)
    concepts = ["dog", "dog", "car", "car"]
    desc = {"dog": "a furry pet with a tail", "car": "a red road vehicle"}
    cfg = FinetuneConfig(lr=1e-3, batch_size=4, epochs=15, loss="itm",
                         optimizer={"name": "adamw", "weight_decay": 0.01})
    torch.manual_seed(0)
    hist = finetune(model, images, concepts, desc, ["a photo of a cat"], cfg, progress=False)
    assert hist["loss"][-1] < hist["loss"][0]
    caps = {c: f"A {c} is {d}" for c, d in desc.items()}
    pos = model.match_probability(images, [caps[c] for c in concepts])
    neg = model.match_probability(images, [caps["car" if c == "dog" else "dog"] for c in concepts])
    assert pos.mean() > neg.mean()


def test_whole_word_masking(vilt):
    from medkt.natural.mlm import whole_word_mask, word_groups

    tok = vilt.tokenizer
    toks = ["[CLS]", "a", "moon", "##gate", "is", "round", "[SEP]"]
    assert word_groups(toks, set(tok.all_special_tokens)) == [[1], [2, 3], [4], [5]]
    enc = vilt.tokenize(["a xyzq is a circular stone archway in a garden wall", "a cat"])
    ids, labels = enc["input_ids"], None
    g = torch.Generator().manual_seed(0)
    masked, labels = whole_word_mask(tok, ids, enc["attention_mask"], 0.15, generator=g)
    for b in range(2):
        n = int(enc["attention_mask"][b].sum())
        chosen = (labels[b] != -100).nonzero().flatten().tolist()
        assert chosen, "at least one word is masked"
        assert 0 not in chosen and n - 1 not in chosen and all(p < n for p in chosen)
        assert torch.equal(labels[b][chosen], ids[b][chosen])
        pieces = tok.convert_ids_to_tokens(ids[b, :n].tolist())
        for p in chosen:  # whole words: a chosen '##' piece implies its word start is chosen too
            if pieces[p].startswith("##"):
                assert p - 1 in chosen
        unchanged = [p for p in range(ids.shape[1]) if p not in chosen]
        assert torch.equal(masked[b][unchanged], ids[b][unchanged])
    again, labels2 = whole_word_mask(tok, ids, enc["attention_mask"], 0.15, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, masked) and torch.equal(labels2, labels)
    # over many draws about 80 % of the chosen tokens become [MASK]
    big = ids[:1].repeat(400, 1)
    m, lab = whole_word_mask(tok, big, None, 0.15, generator=torch.Generator().manual_seed(1))
    sel = lab != -100
    frac = (m[sel] == tok.mask_token_id).float().mean().item()
    assert 0.72 < frac < 0.88


def test_mlm_loss_plugin(vilt):
    from medkt.finetune import FinetuneConfig, get_finetune_loss

    torch.manual_seed(0)
    loss = get_finetune_loss("mlm")(vilt, torch.rand(2, 3, 64, 64), torch.tensor([0, 1]),
                                    ["A moongate is a round archway", "A gyroscope is a spinning disc"], None, FinetuneConfig())
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert vilt.model.mlm.mlm_score.decoder.weight.grad is not None
    vilt.zero_grad(set_to_none=True)


def test_clip_caption_loss_matches_its_definition(coca):
    from medkt.errors import ConfigError
    from medkt.finetune import FinetuneConfig, get_finetune_loss
    from medkt.natural.classnames import COCA_TARGET_TEMPLATES
    from medkt.natural.objectives import CaptionTargets

    loss_fn = get_finetune_loss("clip+caption")
    captions = ["A cup is a small vessel", "A bowl is a deep dish", "a photo of a cat."]
    x = torch.rand(2, 3, coca.image_size, coca.image_size)
    targets = torch.tensor([0, 1])
    cfg = FinetuneConfig()
    with pytest.raises(ConfigError, match="loss_context"):
        loss_fn(coca, x, targets, captions, None, cfg)
    spec = CaptionTargets({captions[0]: "cup", captions[1]: "bowl"}, clip_weight=1.0, caption_weight=0.1)
    emb = coca.encode_texts(captions)
    with torch.no_grad():
        torch.manual_seed(5)
        val = loss_fn(coca, x, targets, captions, emb, cfg, context=spec)
        torch.manual_seed(5)
        drawn = spec.draw(["cup", "bowl"])
        assert all(any(t.format(c) == d for t in COCA_TARGET_TEMPLATES) for c, d in zip(["cup", "bowl"], drawn))
        img = F.normalize(coca.encode_pixels(x), dim=-1)
        clip = F.cross_entropy(coca.logit_scale * img @ emb.t(), targets)
        cap = coca.caption_loss(x, coca.tokenize(drawn))
    assert val.item() == pytest.approx((clip + 0.1 * cap).item(), rel=1e-4)
    assert spec.last_parts["caption"] == pytest.approx(cap.item(), rel=1e-4)


def test_coca_decoder_is_a_declared_parameter_group(coca):
    from medkt.finetune import _trainable

    dec = {id(p) for p in coca.decoder_parameters()}
    assert not dec & {id(p) for p in coca.visual_parameters()}
    assert not dec & {id(p) for p in _trainable(coca, "visual")}
    assert dec <= {id(p) for p in _trainable(coca, "visual+decoder")}
