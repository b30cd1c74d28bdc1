"""The one InfoNCE loss of medkt (fine-tuning's ``"infonce"``, CoCa's contrastive terms).

Pure torch, so every loss module can import it without the engine.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float,
             targets: torch.Tensor | None = None, symmetric: bool = False) -> torch.Tensor:
    """Cross-entropy of the logits ``scale * image_emb @ text_emb.T`` ``(B, K)``.

    Args:
        image_emb: L2-normalised image embeddings ``(B, D)``.
        text_emb: L2-normalised text embeddings ``(K, D)``.
        scale: the logit multiplier (``1 / temperature``, or a CLIP model's ``logit_scale.exp()``).
        targets: the text index of each image ``(B,)``; None = row ``i`` matches text ``i``
            (in-batch pairs, ``K == B``).
        symmetric: also the text -> image direction, averaged with the image -> text one
            (open_clip's ``ClipLoss`` on one process); needs in-batch pairs.
    Returns:
        the mean loss (a scalar tensor).
    """
    logits = scale * image_emb @ text_emb.t()
    if targets is None:
        targets = torch.arange(image_emb.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, targets)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.t(), targets))
    return loss


def infonce_scale(backend: Any, temperature: float | None) -> torch.Tensor | float:
    """``1 / temperature`` when set, else the model's own (detached) logit scale."""
    return (1.0 / temperature) if temperature else backend.logit_scale.detach().float()


__all__ = ["info_nce", "infonce_scale"]
