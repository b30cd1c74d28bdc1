"""Zero-shot classifiers for the natural-image experiments.

:class:`ITMZeroShotEvaluator` - with an image-text matching head (ViLT; paper Tab. 1 and 11).
:class:`StreamingZeroShotEvaluator` - with embeddings, streaming images from disk (ImageNet).

ITM:
A cross-encoder scores every (image, class prompt) pair; the predicted class is the one whose
prompts get the highest "match" logit (mean over a class's prompts, or max). The image tokens
are computed once per image and reused for all prompts. Same interface as
:class:`medkt.evaluation.ZeroShotEvaluator`, so pipelines treat both alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medkt.errors import DataError
from medkt.evaluation import ClassificationResult, check_aggregate, label_indices, summarize


class ITMZeroShotEvaluator:
    """Args:
        backend: an ITM backend (``supports_itm``) with ``embed_image``/``itm_logits_from_embeds``.
        images: ``(N, 3, S, S)`` [0,1] tensor, or paths/arrays (loaded with ViLT's native resize).
        labels: class per image; class_prompts: class -> prompts (output order = dict order).
        aggregate: ``"mean"`` or ``"max"`` of the match logits over a class's prompts.
    """

    def __init__(self, backend: Any, images: Any, labels: Sequence[str], class_prompts: dict[str, Sequence[str]],
                 aggregate: str = "mean", text_batch_size: int = 64, progress: bool = False):
        if not getattr(backend, "supports_itm", False):
            raise DataError(f"backend {getattr(backend, 'spec', '')!r} has no image-text matching head")
        check_aggregate(aggregate, ("mean", "max"))
        self.classes = list(class_prompts)
        self.labels = label_indices(labels, self.classes)
        self.backend = backend
        self.class_prompts = {c: list(p) for c, p in class_prompts.items()}
        self.aggregate = aggregate
        self.text_batch_size = text_batch_size
        self.progress = progress
        if isinstance(images, torch.Tensor):
            self.images: list[torch.Tensor] = list(images)
        else:
            loader = getattr(backend, "load_image_native", backend.load_image)
            self.images = [loader(im) for im in images]
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        flat = [p for c in self.classes for p in self.class_prompts[c]]
        self._owner = np.repeat(np.arange(len(self.classes)), [len(self.class_prompts[c]) for c in self.classes])
        self._tokens = [backend.tokenize(flat[i : i + text_batch_size]) for i in range(0, len(flat), text_batch_size)]

    @torch.no_grad()
    def scores(self) -> np.ndarray:
        """``(N, K)`` class scores (aggregated match logits)."""
        was_training = self.backend.training
        self.backend.eval()
        rows = []
        it = self.images
        if self.progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="ITM zero-shot", unit="img", leave=False, disable=None)
        try:
            for img in it:
                emb, mask = self.backend.embed_image(img[None])
                s = torch.cat([self.backend.itm_logits_from_embeds(emb, mask, t)[:, 1].float() for t in self._tokens])
                s = s.cpu().numpy()
                if self.aggregate == "mean":
                    rows.append(np.bincount(self._owner, weights=s) / np.bincount(self._owner))
                else:
                    out = np.full(len(self.classes), -np.inf)
                    np.maximum.at(out, self._owner, s)
                    rows.append(out)
        finally:
            self.backend.train(was_training)
        return np.stack(rows) if rows else np.zeros((0, len(self.classes)))

    def evaluate(self) -> ClassificationResult:
        return summarize(self.classes, self.labels, self.scores())




class StreamingZeroShotEvaluator:
    """Embedding-based zero-shot classification that reads images in batches (ImageNet-sized sets).

    :class:`medkt.evaluation.ZeroShotEvaluator` keeps every image as pixels in memory (50,000
    ImageNet validation images at 224 px would need ~30 GB); this one keeps the paths and loads
    ``batch_size`` images at a time with ``backend.load_image``, on every evaluation. Class
    embeddings are the normalised mean of the prompt embeddings ("mean", CLIP's ensemble) or the
    best prompt ("max"). Classes may have no images (distractors, e.g. the 1000 ImageNet classes
    around the RareConcepts images).
    """

    def __init__(self, backend: Any, images: Sequence[Any], labels: Sequence[str], class_prompts: dict[str, Sequence[str]],
                 aggregate: str = "mean", batch_size: int = 64, progress: bool = False):
        check_aggregate(aggregate, ("mean", "max"))
        self.classes = list(class_prompts)
        self.labels = label_indices(labels, self.classes)
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.backend, self.images, self.aggregate = backend, list(images), aggregate
        self.class_prompts = {c: list(p) for c, p in class_prompts.items()}
        self.batch_size, self.progress = int(batch_size), progress

    @torch.no_grad()
    def scores(self) -> np.ndarray:
        import torch.nn.functional as F

        flat = [p for c in self.classes for p in self.class_prompts[c]]
        # class embeddings are reused while the text encoder is untouched (in-place optimiser
        # updates bump the tensors' version counters, which invalidates the cache)
        key = tuple(p._version for p in self.backend.text_parameters())
        if getattr(self, "_text_key", None) != key:
            self._text_emb = self.backend.encode_texts(flat, batch_size=self.batch_size)
            self._text_key = key
        emb = self._text_emb
        sizes = [len(self.class_prompts[c]) for c in self.classes]
        per_class = torch.split(emb, sizes)
        text = torch.stack([F.normalize(e.mean(0), dim=-1) for e in per_class]) if self.aggregate == "mean" else None
        out = []
        it = range(0, len(self.images), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="zero-shot", unit="batch", leave=False, disable=None)
        for i in it:
            x = torch.stack([self.backend.load_image(p) for p in self.images[i : i + self.batch_size]])
            img = F.normalize(self.backend.encode_pixels(x).float(), dim=-1)
            if text is not None:
                out.append((img @ text.t()).cpu())
            else:
                out.append(torch.stack([(img @ e.t()).max(1).values for e in per_class], 1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)))

    def evaluate(self) -> ClassificationResult:
        return summarize(self.classes, self.labels, self.scores())


__all__ = ["ITMZeroShotEvaluator", "StreamingZeroShotEvaluator"]
