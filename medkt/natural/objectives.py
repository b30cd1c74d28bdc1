"""Engine plug-ins of the natural-image experiments (imported by the ViLT and CoCa backends).

Inversion objective (``InversionConfig(objective=...)``):

* ``"itm"`` - ViLT (paper §8.2): cross-entropy of the 2-way ITM logits toward "match", i.e.
  maximise the match logit while minimising the no-match logit. Similarity = match probability.

Fine-tuning losses (``FinetuneConfig(loss=...)``):

* ``"itm"`` - ViLT (§4.4.2): each image with its own caption labelled "match" and with one
  caption drawn at random among the other captions of the run (other concepts, negatives)
  labelled "no match"; mean 2-way cross-entropy.
* ``"mlm"`` - ViLT masked-language modelling (§8.9): the image's caption with whole-word
  masking (15 %); images are noise (implicit transfer) or inverted images (explicit baseline).
* ``"clip+caption"`` - CoCa (§8.8, Eq. 6): ``clip_weight * InfoNCE(image, all captions) +
  caption_weight * L_cap(image, target caption)`` where the target caption is one of the 26
  "a photo of a {}" templates filled with the image's concept, drawn per sample and step. It
  needs to know each caption's concept: ``finetune(..., loss_context=CaptionTargets({caption:
  concept}))`` (the captioning pipeline passes it).

Random draws use torch's global generator, which the pipelines seed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from medkt.backends.base import Captioner, ImageTextMatcher
from medkt.errors import ConfigError
from medkt.finetune import register_finetune_loss
from medkt.infonce import info_nce, infonce_scale
from medkt.inversion import ObjectiveContext, register_inversion_objective
from medkt.natural.classnames import COCA_TARGET_TEMPLATES
from medkt.natural.losses import coca_loss, itm_loss
from medkt.natural.mlm import whole_word_mask


def _require_itm(backend: Any, what: str) -> None:
    if not isinstance(backend, ImageTextMatcher):
        raise ConfigError(f"{what} 'itm' needs a backend with an image-text matching head (ViLT), got "
                          f"{backend.family!r}")


@register_inversion_objective("itm", uses_text_embeddings=False)
def itm_objective(backend: Any, x: torch.Tensor, ctx: ObjectiveContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image CE toward "match" and the match probability (B,)."""
    _require_itm(backend, "inversion objective")
    logits = backend.itm_logits(x, backend.tokenize(ctx.texts)).float()
    target = torch.ones(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none"), logits.softmax(-1)[:, 1].detach()


@register_finetune_loss("itm", uses_caption_embeddings=False)
def itm_finetune_loss(backend: Any, images: torch.Tensor, targets: torch.Tensor, captions: Sequence[str],
                      caption_emb: torch.Tensor | None, config: Any) -> torch.Tensor:
    """Fine-tuning loss ``"itm"`` (ViLT): image-text matching, each image with its caption as the
    positive and a different caption, drawn uniformly, as the negative."""
    _require_itm(backend, "fine-tuning loss")
    if len(captions) < 2:
        raise ConfigError("the 'itm' loss needs at least two captions (negatives come from the other ones)")
    t = targets.tolist()
    # a different caption for each image: uniform over the K-1 others
    offset = torch.randint(1, len(captions), (len(t),)).tolist()
    neg = [(ti + o) % len(captions) for ti, o in zip(t, offset)]
    pos_tok = backend.tokenize([captions[i] for i in t])
    neg_tok = backend.tokenize([captions[i] for i in neg])
    return itm_loss(backend, images, pos_tok, neg_tok)


@register_finetune_loss("mlm", uses_caption_embeddings=False)
def mlm_finetune_loss(backend: Any, images: torch.Tensor, targets: torch.Tensor, captions: Sequence[str],
                      caption_emb: torch.Tensor | None, config: Any) -> torch.Tensor:
    """Fine-tuning loss ``"mlm"`` (ViLT): masked-language-model loss of each image's caption, whole
    words masked with the backend's ``mlm_probability``."""
    from medkt.backends.base import MaskedLanguageModel

    if not isinstance(backend, MaskedLanguageModel):
        raise ConfigError(f"the 'mlm' loss needs a backend with a masked-language-model head (ViLT), got {backend.family!r}")
    tok = backend.tokenize([captions[i] for i in targets.tolist()])
    ids, labels = whole_word_mask(backend.tokenizer, tok["input_ids"].cpu(), tok.get("attention_mask").cpu(),
                                  probability=backend.mlm_probability)
    tok = {**tok, "input_ids": ids.to(tok["input_ids"].device)}
    return backend.mlm_loss(images, tok, labels)


@dataclass
class CaptionTargets:
    """What the ``"clip+caption"`` loss needs besides the engine's arguments.

    Args:
        concept_of_caption: fine-tuning caption -> concept name (to fill the target template).
        templates: target-caption templates (default: the paper's 26).
        clip_weight / caption_weight: lambda_1 and lambda_2 of Eq. 6 (paper: 1 and 0.1).
    """

    concept_of_caption: dict[str, str]
    templates: Sequence[str] = field(default_factory=lambda: list(COCA_TARGET_TEMPLATES))
    clip_weight: float = 1.0
    caption_weight: float = 0.1
    last_parts: dict[str, float] = field(default_factory=dict)

    def draw(self, concepts: Sequence[str]) -> list[str]:
        """One target caption per concept, each from a template drawn at random."""
        idx = torch.randint(len(self.templates), (len(concepts),)).tolist()
        return [self.templates[i].format(c) for i, c in zip(idx, concepts)]


@register_finetune_loss("clip+caption", uses_context=True)
def clip_caption_loss(backend: Any, images: torch.Tensor, targets: torch.Tensor, captions: Sequence[str],
                      caption_emb: torch.Tensor | None, config: Any, context: CaptionTargets | None = None) -> torch.Tensor:
    """Fine-tuning loss ``"clip+caption"`` (CoCa, paper Eq. 6): ``clip_weight`` x InfoNCE +
    ``caption_weight`` x captioning loss on target captions drawn from ``context`` (`CaptionTargets`)."""
    spec = context
    if not isinstance(backend, Captioner):
        raise ConfigError(f"the 'clip+caption' loss needs a captioning backend (CoCa), got {backend.family!r}")
    if not isinstance(spec, CaptionTargets):
        raise ConfigError("the 'clip+caption' loss needs finetune(..., loss_context=CaptionTargets({caption: concept})) "
                          "(given by medkt.pipelines.natural.CaptioningTransferPipeline)")
    t = targets.tolist()
    try:
        concepts = [spec.concept_of_caption[captions[i]] for i in t]
    except KeyError as exc:
        raise ConfigError(f"no concept known for fine-tuning caption {exc.args[0]!r}") from None
    target_tok = backend.tokenize(spec.draw(concepts))
    # InfoNCE against every caption of the run, as the engine's 'infonce' loss does
    txt = caption_emb if caption_emb is not None else F.normalize(backend.encode_text(backend.tokenize(list(captions))).float(), dim=-1)
    latent, image_embs = backend.image_tokens(images)  # L2-normalised image embedding + decoder tokens
    clip_term = info_nce(latent.float(), txt, infonce_scale(backend, config.temperature),
                         targets.to(latent.device))
    total, parts = coca_loss(backend, images, target_tok, target_tok, clip_weight=spec.clip_weight,
                             caption_weight=spec.caption_weight, clip_term=clip_term, image_embs=image_embs)
    spec.last_parts = parts
    return total


__all__ = ["itm_objective", "itm_finetune_loss", "mlm_finetune_loss", "clip_caption_loss", "CaptionTargets"]
