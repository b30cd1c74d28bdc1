"""Zero-shot classification metrics used by the phantom experiments (backend-agnostic).

Works with any object exposing ``encode_images`` and ``encode_texts`` (the medkt ``Backend``
protocol) or a raw `PhantomCLIP` wrapped by the phantom backend.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medkt.evaluation import aggregate_scores, auroc, class_text_embeddings, label_indices, summarize  # noqa: F401  (auroc re-exported)


def class_embeddings(backend, class_prompts: dict[str, list[str]]) -> torch.Tensor:
    """Mean of the normalised prompt embeddings per class, renormalised -> ``(K, D)``."""
    return torch.stack([F.normalize(e.mean(0), dim=-1) for e in class_text_embeddings(backend, class_prompts)])


def image_embeddings(backend, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``(N, C, S, S)`` [0,1] pixels -> normalised ``(N, D)``."""
    return backend.encode_images(images, batch_size)


@dataclass
class ZeroShotResult:
    """Zero-shot classification of a phantom set: accuracies, confusion and softmax probabilities."""

    classes: list[str]
    accuracy: float
    per_class: dict[str, float]
    confusion: np.ndarray  # (K, K) rows = true class, cols = predicted
    probs: np.ndarray  # (N, K) softmax at the model's temperature
    labels: np.ndarray  # (N,) true class indices
    extra: dict = field(default_factory=dict)

    def known_mean(self, novel: Sequence[str]) -> float:
        """Mean per-class accuracy over the classes not in ``novel``."""
        ks = [c for c in self.classes if c not in novel]
        return float(np.mean([self.per_class[c] for c in ks]))

    def novel_mean(self, novel: Sequence[str]) -> float:
        """Mean per-class accuracy over the ``novel`` classes."""
        return float(np.mean([self.per_class[c] for c in novel]))

    def novel_auroc(self, novel: str) -> float:
        """AUROC of P(novel) for images of the novel class vs images of all other classes.

        A uniform shift of the novel logit (a bias) leaves it unchanged, unlike accuracy.
        """
        k = self.classes.index(novel)
        s = self.probs[:, k]
        # the log-odds of the novel class vs the rest is shift-invariant in the other logits
        return auroc(s[self.labels == k], s[self.labels != k])

    def to_dict(self) -> dict:
        """Accuracy, per-class accuracy, confusion and classes as JSON-ready values."""
        return {"accuracy": self.accuracy, "per_class": self.per_class, "confusion": self.confusion.tolist(),
                "classes": self.classes}


@torch.no_grad()
def zero_shot(backend, images: torch.Tensor, labels: Sequence[str], class_prompts: dict[str, list[str]],
              image_emb: torch.Tensor | None = None, text_emb: torch.Tensor | None = None) -> ZeroShotResult:
    """Classify ``images`` among ``class_prompts`` keys with medkt's zero-shot scorer (CLIP's
    prompt-embedding ensemble, the model's temperature); ``image_emb`` / ``text_emb`` reuse
    embeddings already computed for the same model state."""
    classes = list(class_prompts)
    t = class_embeddings(backend, class_prompts) if text_emb is None else text_emb
    v = image_embeddings(backend, images) if image_emb is None else image_emb
    res = summarize(classes, label_indices(labels, classes), aggregate_scores(v, t, "mean").cpu().numpy(),
                    float(backend.logit_scale.detach().float().cpu()))
    return ZeroShotResult(classes, res.accuracy, res.per_class, res.confusion, res.probabilities(), np.asarray(res.labels))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval (0 for one value)."""
    v = np.asarray([x for x in values if x == x], float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), 0.0
    from scipy import stats

    h = stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(h)
