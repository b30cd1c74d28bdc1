"""Zero-shot classification: prompt ensembles, accuracy overall / per class, confusion matrix.

A class is scored by the cosine similarity between the image embedding and its prompts:
``"mean"`` (CLIP's ensemble: mean of normalised prompt embeddings, renormalised),
``"mean_similarity"`` (MedCLIP's PromptClassifier with ``ensemble=True``: mean of the per-prompt
similarities) or ``"max"`` (MedCLIP with ``ensemble=False``: best prompt). Each class's prompts
are tokenised as one batch, as MedCLIP does (its pooling averages padding tokens too, so the
batch's padding length matters). Text embeddings are cached per class set (they do not
change while only the visual encoder trains); image pixels are loaded once and their embeddings
computed once per model state — any in-place change of a weight invalidates them
(:class:`ZeroShotEvaluator`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medkt.backends.base import Backend
from medkt.errors import DataError


@dataclass
class ClassificationResult:
    classes: list[str]
    labels: list[int]  # true class index per image
    predictions: list[int]
    scores: np.ndarray  # (N, K) cosine similarities
    accuracy: float = 0.0
    per_class: dict[str, float] = field(default_factory=dict)
    confusion: np.ndarray | None = None  # (K, K) rows = true, cols = predicted

    def to_dict(self, max_confusion_classes: int = 100) -> dict[str, Any]:
        """JSON-ready summary; the confusion matrix is left out above ``max_confusion_classes``."""
        small = self.confusion is not None and len(self.classes) <= max_confusion_classes
        return {"accuracy": self.accuracy, "per_class": self.per_class, "classes": self.classes,
                "confusion": self.confusion.tolist() if small else None,
                "n_images": len(self.labels)}

    def class_probabilities(self, logit_scale: float = 100.0) -> np.ndarray:
        z = logit_scale * self.scores
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)


def summarize(classes: Sequence[str], labels: Sequence[int], scores: np.ndarray) -> ClassificationResult:
    labels = list(map(int, labels))
    pred = scores.argmax(1).tolist()
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(labels, pred):
        conf[t, p] += 1
    per = {}
    for i, c in enumerate(classes):
        n = conf[i].sum()
        if n:
            per[c] = float(conf[i, i] / n)
    acc = float(np.mean([t == p for t, p in zip(labels, pred)])) if labels else float("nan")
    return ClassificationResult(list(classes), labels, pred, scores, acc, per, conf)


def auroc(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted as 1/2)."""
    pos, neg = np.asarray(scores_pos, float), np.asarray(scores_neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


AGGREGATES = ("mean", "mean_similarity", "max")


def class_text_embeddings(backend: Backend, class_prompts: dict[str, Sequence[str]], batch_size: int = 256) -> list[torch.Tensor]:
    """Normalised prompt embeddings ``(P_k, D)`` per class; each class tokenised as one batch
    (split only beyond ``batch_size`` prompts)."""
    out = []
    with torch.no_grad():
        for c, prompts in class_prompts.items():
            if not prompts:
                raise DataError(f"class {c!r} has no prompts")
            prompts = list(prompts)
            parts = [backend.encode_text(backend.tokenize(prompts[i : i + batch_size])).float()
                     for i in range(0, len(prompts), batch_size)]
            out.append(F.normalize(torch.cat(parts), dim=-1))
    return out


def label_indices(labels: Sequence[str], classes: Sequence[str]) -> list[int]:
    """Class index of each label; a label outside ``classes`` is a :class:`DataError`."""
    index = {c: i for i, c in enumerate(classes)}
    bad = sorted({lab for lab in labels if lab not in index})
    if bad:
        shown = list(classes) if len(classes) <= 20 else f"{len(classes)} classes"
        raise DataError(f"label(s) {bad[:5]} not among the classes {shown}")
    return [index[lab] for lab in labels]


def check_aggregate(aggregate: str, allowed: Sequence[str] = AGGREGATES) -> str:
    if aggregate not in allowed:
        raise DataError(f"aggregate must be one of {tuple(allowed)}, got {aggregate!r}")
    return aggregate


class ZeroShotEvaluator:
    """Zero-shot classifier over a fixed image set and class-prompt set.

    Args:
        images: ``(N, C, S, S)`` [0,1] tensor, or a list of paths/arrays (loaded once with
            ``backend.load_image``).
        labels: class name per image.
        class_prompts: class -> list of prompts (all classes, in output order).
        aggregate: ``"mean"`` (embedding ensemble), ``"mean_similarity"`` (mean prompt
            similarity) or ``"max"`` (best prompt).
    """

    def __init__(self, backend: Backend, images: Any, labels: Sequence[str], class_prompts: dict[str, Sequence[str]],
                 aggregate: str = "mean", batch_size: int = 64):
        check_aggregate(aggregate)
        self.classes = list(class_prompts)
        self.labels = label_indices(labels, self.classes)
        empty = [c for c, p in class_prompts.items() if not p]
        if empty:
            raise DataError(f"class(es) {empty} have no prompts")
        self.backend = backend
        self.class_prompts = {c: list(p) for c, p in class_prompts.items()}
        self.aggregate = aggregate
        self.batch_size = batch_size
        if isinstance(images, torch.Tensor):
            self.pixels = images
        else:
            self.pixels = torch.stack([backend.load_image(im) for im in images]) if len(images) else torch.empty(0)
        if len(self.pixels) != len(self.labels):
            raise DataError(f"{len(self.pixels)} images but {len(self.labels)} labels")
        self._text: torch.Tensor | list[torch.Tensor] | None = None
        self._img: tuple[tuple, torch.Tensor] | None = None

    def text_embeddings(self) -> torch.Tensor | list[torch.Tensor]:
        """Cached: ``(K, D)`` class embeddings ("mean") or a list of ``(P_k, D)`` (otherwise)."""
        if self._text is None:
            per_class = class_text_embeddings(self.backend, {c: self.class_prompts[c] for c in self.classes})
            self._text = (torch.stack([F.normalize(e.mean(0), dim=-1) for e in per_class])
                          if self.aggregate == "mean" else per_class)
        return self._text

    def _model_state(self) -> tuple:
        """Changes whenever a parameter/buffer is modified in place (optimiser steps,
        ``load_state_dict``, ``copy_``) or the train/eval mode flips."""
        return (self.backend.training,
                tuple((id(t), t._version) for t in (*self.backend.parameters(), *self.backend.buffers())))

    def image_embeddings(self) -> torch.Tensor:
        """Normalised image embeddings ``(N, D)``, computed once per model state."""
        state = self._model_state()
        if self._img is not None and self._img[0] == state:
            return self._img[1]
        emb = self.backend.encode_images(self.pixels, self.batch_size)
        self._img = (state, emb)
        return emb

    def scores(self) -> np.ndarray:
        img = self.image_embeddings()
        txt = self.text_embeddings()
        if self.aggregate == "mean":
            s = img @ txt.t()
        elif self.aggregate == "mean_similarity":
            s = torch.stack([(img @ e.t()).mean(1) for e in txt], 1)
        else:
            s = torch.stack([(img @ e.t()).max(1).values for e in txt], 1)
        return s.cpu().numpy()

    def evaluate(self) -> ClassificationResult:
        """Embed the images with the model's current weights and classify."""
        return summarize(self.classes, self.labels, self.scores())


def zero_shot_classify(backend: Backend, images: Any, labels: Sequence[str], class_prompts: dict[str, Sequence[str]],
                       aggregate: str = "mean", batch_size: int = 64) -> ClassificationResult:
    """One-shot convenience wrapper around :class:`ZeroShotEvaluator`."""
    return ZeroShotEvaluator(backend, images, labels, class_prompts, aggregate, batch_size).evaluate()


def before_after_table(before: ClassificationResult, after: ClassificationResult, title: str = "") -> str:
    """Markdown table: per-class and overall accuracy before/after, with the change in points."""
    lines = []
    if title:
        lines.append(f"**{title}**\n")
    lines.append("| class | before | after | change |")
    lines.append("|---|---:|---:|---:|")
    for c in before.classes:
        if c in before.per_class:
            b, a = before.per_class[c], after.per_class.get(c, float("nan"))
            lines.append(f"| {c} | {100 * b:.1f} | {100 * a:.1f} | {100 * (a - b):+.1f} |")
    lines.append(f"| **top-1 (all)** | {100 * before.accuracy:.1f} | {100 * after.accuracy:.1f} | "
                 f"{100 * (after.accuracy - before.accuracy):+.1f} |")
    return "\n".join(lines) + "\n"
