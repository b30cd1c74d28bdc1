"""Loss functions of the natural-image experiments (engine-independent, pure torch).

* `coca_loss` - ``clip_weight * L_CLIP + caption_weight * L_cap`` (paper Eq. 6, weights 1
  and 0.1), equal to open_clip's ``CoCaLoss`` when the contrastive texts and the caption targets
  are the same tokens (tested). In knowledge transfer they differ: the contrastive text is the
  concept caption ("A moongate is ...") and the caption target a template ("a photo of a
  moongate.", §8.8).
* `itm_loss` - 2-way ITM cross-entropy on positive and negative pairs (ViLT).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medkt.infonce import info_nce


def coca_loss(backend: Any, x: torch.Tensor, clip_tokens: torch.Tensor, caption_tokens: torch.Tensor | None = None,
              clip_weight: float = 1.0, caption_weight: float = 0.1,
              clip_term: torch.Tensor | None = None, image_embs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """CoCa fine-tuning loss on [0,1] pixels ``x`` (B, 3, S, S).

    Args:
        backend: a `CocaBackend`.
        clip_tokens: texts of the contrastive term (B, T), row-aligned with ``x``.
        caption_tokens: targets of the captioning term (default: ``clip_tokens``).
        clip_term: an already computed contrastive loss (e.g. the engine's InfoNCE against all
            concept captions) to use instead of the in-batch symmetric InfoNCE
            (`medkt.infonce.info_nce`, open_clip's ``ClipLoss`` on one process).
        image_embs: the decoder's image tokens if already computed (saves a visual forward).
    Returns:
        (total loss, {"clip": float, "caption": float}) - the parts are unweighted.
    """
    caption_tokens = clip_tokens if caption_tokens is None else caption_tokens
    need_clip = clip_term is None and bool(clip_weight)
    if image_embs is None or need_clip:
        latent, image_embs = backend.image_tokens(x)  # latent is L2-normalised
    if need_clip:
        txt = F.normalize(backend.encode_text(clip_tokens).float(), dim=-1)
        clip_term = info_nce(latent.float(), txt, backend.logit_scale, symmetric=True)
    if clip_term is None:
        clip_term = torch.zeros((), device=x.device)
    logits, labels = backend.caption_logits(None, caption_tokens, image_embs=image_embs)
    cap = F.cross_entropy(logits.permute(0, 2, 1).float(), labels, ignore_index=backend.pad_id)
    total = clip_weight * clip_term + caption_weight * cap
    return total, {"clip": float(clip_term.detach()), "caption": float(cap.detach())}


def itm_loss(backend: Any, x: torch.Tensor, pos_tokens: dict[str, torch.Tensor], neg_tokens: dict[str, torch.Tensor] | None = None,
             neg_x: torch.Tensor | None = None) -> torch.Tensor:
    """Mean 2-way cross-entropy: (x, pos) labelled "match" (1) and (neg_x or x, neg) "no match" (0)."""
    logits = backend.itm_logits(x, pos_tokens)
    labels = torch.ones(logits.shape[0], dtype=torch.long, device=logits.device)
    if neg_tokens is not None:
        nl = backend.itm_logits(x if neg_x is None else neg_x, neg_tokens)
        logits = torch.cat([logits, nl])
        labels = torch.cat([labels, torch.zeros(nl.shape[0], dtype=torch.long, device=nl.device)])
    return F.cross_entropy(logits.float(), labels)


__all__ = ["coca_loss", "itm_loss"]
