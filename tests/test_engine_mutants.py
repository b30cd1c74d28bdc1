"""Engine options and formulas that the rest of the suite let break silently.

Each test was written against a mutation of ``benchmarks/mutation/mutations.py`` that survived the
default suite (named in the test's docstring): it fails on the mutation and passes on the code.
Tiny random models only; every test runs in about a second.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medkt.augment import AffineAugment, total_variation
from medkt.evaluation import aggregate_scores, before_after_table, summarize
from medkt.finetune import FinetuneConfig, OptimizerSettings, finetune, get_finetune_loss
from medkt.inversion import (ContrastiveSettings, InversionConfig, InversionTarget, ObjectiveContext, _clip_per_image, contrastive_objective, invert,
                             l2_objective)

DESCS = {"moongate": "a round archway", "gyroscope": "a disc spinning in rings"}
TARGET = [InversionTarget("moongate", "a round archway", 2)]


@pytest.fixture
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class _LrLog:
    """Records the learning rate of every optimiser step of the run (any Adam the loop creates)."""

    def __init__(self, monkeypatch):
        self.lrs: list[float] = []
        log = self.lrs

        class Adam(torch.optim.Adam):
            def step(self, closure=None):
                log.append(self.param_groups[0]["lr"])
                return super().step(closure)

        monkeypatch.setattr(torch.optim, "Adam", Adam)


# --- inversion: learning-rate schedule --------------------------------------------------------
@pytest.mark.parametrize("resolutions", [None, [16, 32]])
def test_inversion_lr_is_cosine_from_lr_to_lr_min(tiny_clip, monkeypatch, resolutions):
    """Mutations inv_cosine_schedule_constant, inv_lr_min_ignored; with progressive resolution the
    new Adam of the second stage continues the schedule."""
    log = _LrLog(monkeypatch)
    kw = {"priors": [{"name": "progressive", "sizes": resolutions, "steps": [4]}]} if resolutions else {}
    invert(tiny_clip, TARGET, InversionConfig(steps=8, lr=0.1, lr_min=0.01, augmentations=[], **kw), progress=False)
    want = [0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert log.lrs == pytest.approx(want, rel=1e-9)


def test_inversion_constant_lr_schedule(tiny_clip, monkeypatch):
    """Mutation inv_lr_schedule_ignored."""
    log = _LrLog(monkeypatch)
    invert(tiny_clip, TARGET, InversionConfig(steps=5, lr=0.05, lr_min=0.01, lr_schedule="constant", augmentations=[]),
           progress=False)
    assert log.lrs == [0.05] * 5


# --- inversion: regularisers, objectives, clipping, augmentation ------------------------------
def test_total_variation_by_hand():
    """Mutations inv_tv_diagonals_ignored, inv_tv_vertical_only: x[i, j] = i + 2 j has vertical
    steps 1, horizontal 2, diagonal 3 and anti-diagonal 1 (mean absolute differences)."""
    i, j = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")
    x = (i + 2 * j)[None, None].repeat(2, 1, 1, 1)
    assert total_variation(x).tolist() == [3.0, 3.0]
    assert total_variation(x, diagonals=True).tolist() == [7.0, 7.0]


def test_tv_weight_and_diagonals_reach_the_loss(tiny_clip, monkeypatch):
    """Mutation inv_tv_weight_ignored (and the prior's diagonals passed through)."""
    import medkt.inversion_priors as inv

    calls = []
    real = inv.total_variation
    monkeypatch.setattr(inv, "total_variation", lambda x, d=False: (calls.append(d), real(x, d))[1])
    invert(tiny_clip, TARGET, InversionConfig(steps=2, priors=[{"name": "tv", "weight": 0.0}], augmentations=[]), progress=False)
    assert calls == []
    invert(tiny_clip, TARGET, InversionConfig(steps=2, priors=[{"name": "tv", "weight": 0.5, "diagonals": True}],
                                                    augmentations=[]), progress=False)
    assert calls == [True, True]


def test_l2_objective_is_squared_distance_of_unit_embeddings(tiny_clip, images):
    """Mutation inv_l2_objective_is_l1: on unit vectors |a - b|^2 = 2 - 2 cos."""
    text = tiny_clip.encode_texts(["a round archway"] * 4)
    loss, sim = l2_objective(tiny_clip, images, ObjectiveContext([], text))
    assert torch.allclose(loss, 2 - 2 * sim, atol=1e-5)


def test_contrastive_objective_uses_contrastive_scale(tiny_clip, images):
    """Mutation inv_contrastive_scale_ignored."""
    text = tiny_clip.encode_texts(["a round archway"] * 4)
    neg = tiny_clip.encode_texts(["a disc", "a spoon"])
    emb = F.normalize(tiny_clip.encode_pixels(images).float(), dim=-1)
    for scale in (3.0, 40.0):
        loss, _ = contrastive_objective(tiny_clip, images, ObjectiveContext(
            [], text, neg, ContrastiveSettings(["a disc", "a spoon"], scale)))
        logits = scale * torch.cat([(emb * text).sum(-1, keepdim=True), emb @ neg.T], 1)
        assert torch.allclose(loss, F.cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="none"), atol=1e-5)


def test_gradient_clip_is_per_image():
    """Mutations inv_grad_clip_ignored, inv_grad_clip_global: an image above the norm is scaled to
    it, one below is left alone."""
    g = torch.zeros(2, 1, 2, 2)
    g[0, 0, 0, 0], g[1, 0, 0, 0] = 3.0, 0.5
    out = _clip_per_image(g, 1.0)
    assert out.flatten(1).norm(dim=1).tolist() == pytest.approx([1.0, 0.5])


def test_affine_probability_and_translation_range():
    """Mutations inv_augment_p_ignored, inv_translate_halved: about ``p`` of the samples are
    transformed, and a shift reaches ``translate`` of the side (2 * translate in [-1, 1] coords)."""
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mats = AffineAugment(p=0.3).sample_matrices(2000, torch.Generator().manual_seed(0))
    moved = (mats != eye).flatten(1).any(1).float().mean().item()
    assert abs(moved - 0.3) < 0.05
    shift = AffineAugment(p=1.0, rotate_deg=0.0, translate=0.1, scale=(1.0, 1.0)).sample_matrices(
        2000, torch.Generator().manual_seed(0))[:, :, 2]
    assert 0.19 < shift.abs().max().item() <= 0.2 + 1e-6


def test_early_stop_min_delta(tiny_clip):
    """Mutation inv_early_stop_min_delta_ignored: no step improves the similarity by 2 (a cosine
    spans at most 2), so the run stops after the first step plus ``patience``."""
    res = invert(tiny_clip, TARGET, InversionConfig(steps=30, lr=0.1, priors=[
        {"name": "tv"}, {"name": "early_stop", "patience": 2, "min_delta": 2.0}]),
                 progress=False)
    assert res.steps_run == [3]


# --- fine-tuning ------------------------------------------------------------------------------
def test_infonce_temperature_overrides_logit_scale(tiny_clip, images):
    """Mutation ft_infonce_temperature_ignored (and ft_infonce_wrong_targets)."""
    caps = ["A moongate is a round archway", "A gyroscope is a disc spinning in rings"]
    emb = tiny_clip.encode_texts(caps)
    targets = torch.tensor([0, 1, 1, 0])
    img = F.normalize(tiny_clip.encode_pixels(images).float(), dim=-1)
    loss_fn = get_finetune_loss("infonce")
    with torch.no_grad():
        got = loss_fn(tiny_clip, images, targets, caps, emb, FinetuneConfig(temperature=0.25))
        own = loss_fn(tiny_clip, images, targets, caps, emb, FinetuneConfig())
    assert got.item() == pytest.approx(F.cross_entropy(4.0 * img @ emb.T, targets).item(), rel=1e-5)
    scale = tiny_clip.logit_scale.float()
    assert own.item() == pytest.approx(F.cross_entropy(scale * img @ emb.T, targets).item(), rel=1e-5)


def test_optimizer_settings_reach_the_optimiser(tiny_clip, images, monkeypatch):
    """Mutations ft_weight_decay_ignored, ft_adamw_ignored (and betas / eps)."""
    made = []
    for name in ("Adam", "AdamW"):
        real = getattr(torch.optim, name)
        monkeypatch.setattr(torch.optim, name, type(name, (real,), {
            "__init__": lambda self, *a, _r=real, **k: (made.append(self), _r.__init__(self, *a, **k))[1]}))
    for opt in ("adam", "adamw"):
        finetune(tiny_clip, images[:2], ["moongate", "gyroscope"], DESCS, progress=False,
                 config=FinetuneConfig(optimizer=OptimizerSettings(name=opt, weight_decay=0.3, betas=(0.8, 0.9), eps=1e-7),
                                       epochs=1))
    assert [type(o).__name__ for o in made] == ["Adam", "AdamW"]
    assert all(o.defaults["weight_decay"] == 0.3 and o.defaults["betas"] == (0.8, 0.9) and o.defaults["eps"] == 1e-7
               for o in made)


def test_finetune_grad_clip_limits_the_update(tiny_clip, images):
    """Mutation ft_grad_clip_ignored: gradients clipped to a global norm of 1e-12 are far below
    Adam's eps (1e-6), so one step barely moves the weights; unclipped it moves them by ~lr (no
    weight decay: Adam adds its L2 term after the clip)."""
    before = {k: v.clone() for k, v in tiny_clip.visual_state_dict().items()}
    finetune(tiny_clip, images[:2], ["moongate", "gyroscope"], DESCS, progress=False,
             config=FinetuneConfig(lr=1e-2, batch_size=2, optimizer=OptimizerSettings(grad_clip=1e-12, weight_decay=0.0)))
    moved = max((tiny_clip.visual_state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved < 1e-4


def test_distillation_term_is_zero_at_the_start_model(tiny_clip, images):
    """Mutation ft_distill_sign: 1 - cos(f_V(x), f_V0(x)) is 0 before the first update, so the
    first loss equals the loss without distillation."""
    import copy

    first = []
    for w in (0.0, 1.0):
        model = copy.deepcopy(tiny_clip)
        hist = finetune(model, images[:2], ["moongate", "gyroscope"], DESCS, progress=False,
                        replay_images=images[2:], replay_concepts=["moongate", "gyroscope"],
                        config=FinetuneConfig(lr=1e-3, batch_size=2, controls=[{"name": "distill", "weight": w}] if w else [], shuffle=False))
        first.append(hist["loss"][0])
    assert first[1] == pytest.approx(first[0], abs=1e-4)


def test_select_patience_stops_training(tiny_clip, images):
    """Mutation ft_select_patience_ignored: two epochs without a better score stop the run."""
    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2])
    hist = finetune(tiny_clip, images[:2], ["moongate", "gyroscope"], DESCS, progress=False, select_fn=lambda: next(scores),
                    config=FinetuneConfig(lr=1e-3, epochs=5, controls=[{"name": "select", "patience": 2}]))
    assert hist["select"] == [0.9, 0.5, 0.4]


# --- evaluation -------------------------------------------------------------------------------
def test_per_class_accuracy_with_errors_both_ways():
    """Mutation eval_per_class_accuracy_off_diagonal (indistinguishable from recall unless a class
    has both misses and false alarms); the confusion matrix's rows are the true classes."""
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9], [0.6, 0.4]])
    res = summarize(["a", "b"], [0, 0, 1, 1, 1], scores)
    assert res.confusion.tolist() == [[1, 1], [2, 1]]
    assert res.per_class == pytest.approx({"a": 0.5, "b": 1 / 3}) and res.accuracy == pytest.approx(0.4)


def test_class_auroc_and_probabilities_use_the_logit_scale():
    """Mutations eval_auroc_classes_swapped, eval_probabilities_ignore_logit_scale."""
    scores = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    res = summarize(["a", "b"], [0, 0, 1, 1], scores, logit_scale=10.0)
    assert res.auroc("a") == 1.0 and res.auroc("b") == 1.0
    z = np.exp(10.0 * scores)
    assert np.allclose(res.probabilities(), z / z.sum(1, keepdims=True))


def test_prompt_aggregates_by_hand():
    """Mutation eval_mean_similarity_is_max: one image equal to the first of two orthogonal prompts."""
    img = torch.tensor([[1.0, 0.0]])
    prompts = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    assert aggregate_scores(img, prompts, "mean_similarity").tolist() == [[0.5]]
    assert aggregate_scores(img, prompts, "max").tolist() == [[1.0]]


def test_weights_fingerprint_follows_every_weight(tiny_clip):
    """Mutations eval_cache_ignores_weights, weights_digest_ignores_values: one changed value
    changes the fingerprint (the key of the embedding cache and of the retrieval score cache)."""
    import copy

    from medkt.checkpoints import weights_fingerprint

    other = copy.deepcopy(tiny_clip)
    assert weights_fingerprint(other) == weights_fingerprint(tiny_clip)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert weights_fingerprint(other) != weights_fingerprint(tiny_clip)


def test_on_disk_embedding_cache_follows_the_weights(tiny_clip, tmp_path):
    """Mutation eval_cache_ignores_weights: new weights, same images -> re-encoded, not the stale file."""
    import copy

    from PIL import Image

    from medkt.evaluation import ZeroShotEvaluator

    paths = []
    for n in range(2):
        p = tmp_path / f"{n}.png"
        Image.fromarray((np.random.default_rng(n).random((32, 32, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    prompts = {"moongate": ["a round archway"], "gyroscope": ["a disc"]}
    first = ZeroShotEvaluator(tiny_clip, paths, ["moongate", "gyroscope"], prompts, cache_dir=tmp_path / "c").evaluate()
    other = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        for p in other.visual_parameters():
            p.add_(0.05 * torch.randn_like(p))
    second = ZeroShotEvaluator(other, paths, ["moongate", "gyroscope"], prompts, cache_dir=tmp_path / "c").evaluate()
    assert not np.allclose(first.scores, second.scores)
    assert len(list((tmp_path / "c").glob("image_embeddings_*.pt"))) == 2


def test_markdown_tables_have_their_header_separator():
    """Mutation eval_table_no_separator (one renderer: medkt.utils.markdown_table)."""
    from medkt.utils import markdown_table

    assert markdown_table(["a", "b"], [[1, "x"]], "lr") == ["| a | b |", "|---|---:|", "| 1 | x |"]
    res = summarize(["a", "b"], [0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]))
    assert before_after_table(res, res).splitlines()[:3] == [
        "| class | before | after | change |", "|---|---:|---:|---:|", "| a | 100.0 | 100.0 | +0.0 |"]


# --- natural-image plug-ins -------------------------------------------------------------------
def test_mlm_loss_scores_only_the_labelled_tokens():
    """Mutation mlm_loss_ignores_labels: the loss is the cross-entropy at the labelled positions
    toward the labels, whatever the (masked) inputs hold."""
    from medkt.backends import create_backend

    vilt = create_backend("vilt:tiny@random")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tok = vilt.tokenize(["a round archway"])
    labels = torch.full_like(tok["input_ids"], -100)
    labels[0, 2] = 7
    with torch.no_grad():
        logits = vilt.mlm_logits(x, tok)
        loss = vilt.mlm_loss(x, tok, labels)
    assert loss.item() == pytest.approx(-logits[0, 2].float().log_softmax(-1)[7].item(), rel=1e-4)


def test_mlm_plugin_targets_the_original_tokens(monkeypatch):
    """Mutation mlm_plugin_labels_are_inputs: the "mlm" fine-tuning loss asks the model for the
    original ids at the masked positions, not for what the masked input holds there."""
    from medkt.backends import create_backend

    vilt = create_backend("vilt:tiny@random")
    seen = {}
    monkeypatch.setattr(vilt, "mlm_loss", lambda x, tok, labels: (seen.update(tok=tok, labels=labels), torch.zeros(()))[1])
    caption = "A moongate is a circular archway in a garden wall of a traditional chinese house"
    torch.manual_seed(0)
    get_finetune_loss("mlm")(vilt, torch.rand(1, 3, 64, 64), torch.tensor([0]), [caption], None, FinetuneConfig())
    orig = vilt.tokenize([caption])["input_ids"].cpu()
    labels, ids = seen["labels"].cpu(), seen["tok"]["input_ids"].cpu()
    masked = labels != -100
    assert masked.any() and torch.equal(labels[masked], orig[masked])
    assert torch.equal(ids[~masked], orig[~masked]) and not torch.equal(ids[masked], orig[masked])


def test_clip_caption_contrastive_term_uses_the_temperature():
    """Mutation clip_caption_temperature_ignored."""
    from medkt.backends import create_backend
    from medkt.natural.objectives import CaptionTargets

    coca = create_backend("coca:tiny@random")
    captions = ["A cup is a small vessel", "A bowl is a deep dish"]
    x = torch.rand(2, 3, coca.image_size, coca.image_size, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1])
    emb = coca.encode_texts(captions)
    spec = CaptionTargets({captions[0]: "cup", captions[1]: "bowl"})
    with torch.no_grad():
        get_finetune_loss("clip+caption")(coca, x, targets, captions, emb, FinetuneConfig(temperature=0.5), context=spec)
        img = F.normalize(coca.encode_pixels(x), dim=-1)
    assert spec.last_parts["clip"] == pytest.approx(F.cross_entropy(2.0 * img @ emb.T, targets).item(), rel=1e-4)


def test_itm_score_cache_key_follows_the_model_identity():
    """Mutation retrieval_cache_key_ignores_identity: scores cached for one model (its weights
    fingerprint in ``identity``) are not those of another."""
    from medkt.backends import create_backend
    from medkt.natural.retrieval import PairwiseITMScorer

    vilt = create_backend("vilt:tiny@random")

    def scorer(identity):
        return PairwiseITMScorer(vilt, ["a cup", "a bowl"], lambda i: torch.rand(3, 64, 64), 2, identity=identity,
                                 progress=False)

    assert scorer(["before:abc"]).fingerprint == scorer(["before:abc"]).fingerprint
    assert scorer(["before:abc"]).fingerprint != scorer(["after:def"]).fingerprint
