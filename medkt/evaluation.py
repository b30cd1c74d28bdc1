"""Zero-shot classification: the one scoring path of medkt.

`ZeroShotEvaluator` classifies a fixed image set among class prompts, before and after
knowledge transfer, with either of the two scorers a backend can offer:

* **embedding** (CLIP, MedCLIP, CoCa, phantom: `Backend` embeddings):
  cosine similarity between image and prompt embeddings, aggregated per class by ``"mean"``
  (CLIP's ensemble: mean of normalised prompt embeddings, renormalised), ``"mean_similarity"``
  (MedCLIP's PromptClassifier with ``ensemble=True``) or ``"max"`` (best prompt). Each class's
  prompts are tokenised as one batch, as MedCLIP does (its pooling averages padding tokens too).
* **itm** (ViLT: `ImageTextMatcher`): the "match" logit of every
  (image, prompt) pair, mean or max over a class's prompts; each image's tokens are computed
  once and reused for all prompt batches.

One temperature rule: `ClassificationResult.logit_scale` turns scores into probabilities
(the backend's learned CLIP temperature for cosine scores; 1 for ITM logits, already logits).

Images stream: an in-memory ``(N, C, S, S)`` tensor (inverted or synthetic images) is cut into
batches; paths are decoded by a `torch.utils.data.DataLoader` (``num_workers`` processes)
with the backend's own preprocessing, moved to the model's device batch by batch, and only the
embeddings are kept, so memory does not grow with the number of images. Embeddings are cached per
model state (any in-place change of a weight invalidates them; text embeddings follow the text
parameters, so fine-tuning the text tower changes the "after" scores) and, with ``cache_dir``, on
disk keyed by weights, images and preprocessing. Under torchrun the images are sharded across the
ranks and the scores gathered, so every rank returns the full result.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medkt.backends.base import Backend, ImageTextEmbedder, ImageTextMatcher
from medkt.errors import ConfigError, DataError

log = logging.getLogger("medkt")

AGGREGATES = ("mean", "mean_similarity", "max")
SCORINGS = ("auto", "embedding", "itm")


@dataclass
class ClassificationResult:
    """Zero-shot classification of N images among K classes.

    ``scores`` are cosine similarities (embedding scoring) or match logits (ITM), ``(N, K)``;
    ``logit_scale`` turns them into logits for `probabilities` (the model's temperature).
    """

    classes: list[str]
    labels: list[int]  # true class index per image
    predictions: list[int]
    scores: np.ndarray  # (N, K)
    accuracy: float = 0.0
    per_class: dict[str, float] = field(default_factory=dict)
    confusion: np.ndarray | None = None  # (K, K) rows = true, cols = predicted
    logit_scale: float = 1.0

    def to_dict(self, max_confusion_classes: int = 100) -> dict[str, Any]:
        """JSON-ready summary; the confusion matrix is left out above ``max_confusion_classes``."""
        small = self.confusion is not None and len(self.classes) <= max_confusion_classes
        return {"accuracy": self.accuracy, "per_class": self.per_class, "classes": self.classes,
                "confusion": self.confusion.tolist() if small else None,
                "n_images": len(self.labels)}

    def probabilities(self) -> np.ndarray:
        """Softmax over classes of ``logit_scale * scores`` -> ``(N, K)``."""
        z = self.logit_scale * np.asarray(self.scores, np.float64)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def auroc(self, cls: str) -> float:
        """AUROC of P(``cls``) for images of ``cls`` vs all other images (a bias shift of one
        class's logit leaves it unchanged, unlike accuracy)."""
        k = self.classes.index(cls)
        p = self.probabilities()[:, k]
        y = np.asarray(self.labels)
        return auroc(p[y == k], p[y != k])

    def mean_accuracy(self, exclude: Sequence[str] = ()) -> float:
        """Mean per-class accuracy over the classes with images, except ``exclude``."""
        vals = [v for c, v in self.per_class.items() if c not in set(exclude)]
        return float(np.mean(vals)) if vals else float("nan")


def summarize(classes: Sequence[str], labels: Sequence[int], scores: np.ndarray,
              logit_scale: float = 1.0) -> ClassificationResult:
    """Accuracy overall / per class and the confusion matrix of ``scores`` ``(N, K)``."""
    labels = list(map(int, labels))
    scores = np.asarray(scores)
    pred = scores.argmax(1).tolist() if len(scores) else []
    from sklearn.metrics import confusion_matrix

    k = len(classes)
    # labels= fixes the (K, K) shape and order even when a class has no image or no prediction
    conf = confusion_matrix(labels, pred, labels=list(range(k))).astype(np.int64) if labels else np.zeros((k, k), np.int64)
    per = {}
    for i, c in enumerate(classes):
        n = conf[i].sum()
        if n:
            per[c] = float(conf[i, i] / n)
    acc = float(np.mean([t == p for t, p in zip(labels, pred)])) if labels else float("nan")
    return ClassificationResult(list(classes), labels, pred, scores, acc, per, conf, float(logit_scale))


def auroc(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float:
    """Area under the ROC curve of positives vs negatives (ties count 1/2); NaN when either is empty."""
    from sklearn.metrics import roc_auc_score

    pos, neg = np.asarray(scores_pos, float), np.asarray(scores_neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")  # sklearn raises on a single class; callers report NaN (no images of the class)
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    return float(roc_auc_score(y, np.concatenate([pos, neg])))


def label_indices(labels: Sequence[str], classes: Sequence[str]) -> list[int]:
    """Class index of each label; a label outside ``classes`` is a `DataError`."""
    index = {c: i for i, c in enumerate(classes)}
    bad = sorted({lab for lab in labels if lab not in index})
    if bad:
        shown = list(classes) if len(classes) <= 20 else f"{len(classes)} classes"
        raise DataError(f"label(s) {bad[:5]} not among the classes {shown}")
    return [index[lab] for lab in labels]


def check_aggregate(aggregate: str, allowed: Sequence[str] = AGGREGATES) -> str:
    """``aggregate`` if allowed, else a `DataError` listing the allowed ones."""
    if aggregate not in allowed:
        raise DataError(f"aggregate must be one of {tuple(allowed)}, got {aggregate!r}")
    return aggregate


def class_text_embeddings(backend: Backend, class_prompts: dict[str, Sequence[str]], batch_size: int = 256) -> list[torch.Tensor]:
    """Normalised prompt embeddings ``(P_k, D)`` per class (fp32, on the model's device); each
    class tokenised as one batch (split only beyond ``batch_size`` prompts)."""
    out = []
    with torch.no_grad(), backend.autocast():
        for c, prompts in class_prompts.items():
            if not prompts:
                raise DataError(f"class {c!r} has no prompts")
            prompts = list(prompts)
            parts = [backend.encode_text(backend.tokenize(prompts[i : i + batch_size])).float()
                     for i in range(0, len(prompts), batch_size)]
            out.append(F.normalize(torch.cat(parts), dim=-1))
    return out


def aggregate_scores(image_emb: torch.Tensor, text: torch.Tensor | list[torch.Tensor], aggregate: str) -> torch.Tensor:
    """Class scores ``(B, K)`` from normalised image embeddings ``(B, D)`` and the class text
    embeddings: ``(K, D)`` for ``"mean"``, a list of ``(P_k, D)`` otherwise."""
    if aggregate == "mean":
        return image_emb @ text.t()
    if aggregate == "mean_similarity":
        return torch.stack([(image_emb @ e.t()).mean(1) for e in text], 1)
    return torch.stack([(image_emb @ e.t()).max(1).values for e in text], 1)


# --- image sources -------------------------------------------------------------------------------
class _DecodedImages(torch.utils.data.Dataset):
    """Paths/arrays decoded on access by ``loader`` (the backend's preprocessing). DataLoader
    workers are forked (Linux default), so the loader's model is not pickled into them."""

    def __init__(self, items: Sequence[Any], loader: Callable[[Any], torch.Tensor], names: Sequence[str] | None = None):
        self.items, self.loader, self.names = list(items), loader, names

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        try:
            return i, self.loader(self.items[i])
        except DataError as exc:  # name the manifest row / file that failed
            raise DataError(f"{self.names[i] if self.names else self.items[i]}: {exc}") from None


def _collate(batch: list[tuple[int, torch.Tensor]]) -> tuple[list[int], list[torch.Tensor]]:
    return [i for i, _ in batch], [x for _, x in batch]


def _model_state(backend: Backend, params: Any) -> tuple:
    """Changes whenever one of ``params`` is modified in place (optimiser steps,
    ``load_state_dict``, ``copy_``) or the train/eval mode flips."""
    return (backend.training, tuple((id(t), t._version) for t in params))


class ZeroShotEvaluator:
    """Zero-shot classifier over a fixed image set and class-prompt set (module docstring).

    Args:
        backend: any backend; ``scoring="auto"`` uses embeddings when it has them, else ITM.
        images: ``(N, C, S, S)`` [0,1] tensor, or a list of paths/arrays (decoded by the
            backend's preprocessing in a DataLoader, batch by batch, on every model state).
        labels: class name per image; classes may have no images (distractors, e.g. the 1000
            ImageNet classes around a few RareConcepts images).
        class_prompts: class -> list of prompts (all classes, in output order).
        aggregate: ``"mean"``, ``"mean_similarity"`` (embedding only) or ``"max"``.
        batch_size: images per forward pass; ``text_batch_size``: prompts per ITM pass.
        num_workers: DataLoader processes decoding image files (0 = in this process).
        cache_dir: keep image embeddings of each model state on disk here (reruns and ablation
            configs skip re-encoding unchanged models); None = memory only.
        progress: show a progress bar / periodic progress lines.
        image_names: how errors name each image (e.g. its manifest row); default the item.
    """

    def __init__(self, backend: Backend, images: Any, labels: Sequence[str], class_prompts: dict[str, Sequence[str]],
                 aggregate: str = "mean", batch_size: int = 64, scoring: str = "auto", num_workers: int = 0,
                 text_batch_size: int = 128, cache_dir: str | Path | None = None, progress: bool = False,
                 image_names: Sequence[str] | None = None):
        if scoring not in SCORINGS:
            raise ConfigError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        if scoring == "auto":
            scoring = "embedding" if isinstance(backend, ImageTextEmbedder) or not isinstance(backend, ImageTextMatcher) else "itm"
        if scoring == "itm" and not isinstance(backend, ImageTextMatcher):
            raise ConfigError(f"backend {backend.spec or backend.family!r} has no image-text matching head; "
                              "use scoring='embedding'")
        if scoring == "embedding" and not isinstance(backend, ImageTextEmbedder):
            raise ConfigError(f"backend {backend.spec or backend.family!r} has no image/text embeddings; "
                              "use scoring='itm'")
        check_aggregate(aggregate, AGGREGATES if scoring == "embedding" else ("mean", "max"))
        empty = [c for c, p in class_prompts.items() if not p]
        if empty:
            raise DataError(f"class(es) {empty} have no prompts")
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.backend = backend
        self.scoring = scoring
        self.classes = list(class_prompts)
        self.labels = label_indices(labels, self.classes)
        self.class_prompts = {c: list(p) for c, p in class_prompts.items()}
        self.aggregate = aggregate
        self.batch_size, self.text_batch_size, self.num_workers = int(batch_size), int(text_batch_size), int(num_workers)
        self.progress = progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.images = images if isinstance(images, torch.Tensor) else list(images)
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.image_names = list(image_names) if image_names is not None else None
        self._text: tuple[tuple, Any] | None = None
        self._img: tuple[tuple, torch.Tensor] | None = None

    # -- text side ------------------------------------------------------------------------
    def text_embeddings(self) -> torch.Tensor | list[torch.Tensor]:
        """``(K, D)`` class embeddings ("mean") or a list of ``(P_k, D)``, recomputed whenever a
        text parameter changed (fine-tuning the text tower must change the "after" scores)."""
        state = _model_state(self.backend, list(self.backend.text_parameters()))
        if self._text is None or self._text[0] != state:
            per_class = class_text_embeddings(self.backend, self.class_prompts)
            emb = (torch.stack([F.normalize(e.mean(0), dim=-1) for e in per_class])
                   if self.aggregate == "mean" else per_class)
            self._text = (state, emb)
        return self._text[1]

    # -- image side -----------------------------------------------------------------------
    def _batches(self, indices: Sequence[int]):
        """(indices, list of [0,1] images) batches of this rank's images."""
        if isinstance(self.images, torch.Tensor):
            for i in range(0, len(indices), self.batch_size):
                idx = list(indices[i : i + self.batch_size])
                yield idx, list(self.images[idx])
            return
        loader = self.backend.load_image
        if self.scoring == "itm":  # ViLT keeps each image's native (variable) size, as its processor does
            loader = self.backend.load_image_native
        data = torch.utils.data.Subset(_DecodedImages(self.images, loader, self.image_names), list(indices))
        batch = 1 if self.scoring == "itm" else self.batch_size
        yield from torch.utils.data.DataLoader(data, batch_size=batch, num_workers=self.num_workers,
                                               collate_fn=_collate, shuffle=False)

    def _progress(self, total: int, desc: str):
        from medkt.progress import Progress

        return Progress(total, desc, unit="img", enabled=self.progress)

    def _rank_indices(self) -> list[int]:
        from medkt import distributed as mdist

        n = len(self.images)
        return list(range(n))[mdist.local_share(n)] if mdist.world_size() > 1 else list(range(n))

    @staticmethod
    def _gather(indices: list[int], rows: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's ``rows`` (one per index) -> ``(n, ...)`` in image order, on every rank."""
        from medkt import distributed as mdist

        if mdist.world_size() <= 1:
            return rows
        import torch.distributed as dist

        parts: list[Any] = [None] * mdist.world_size()
        dist.all_gather_object(parts, (indices, rows.cpu()))
        out = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype)
        for idx, r in parts:
            out[idx] = r
        return out.to(rows.device)

    def images_key(self) -> str:
        """SHA-256 (hex) of what the image embeddings depend on: the weights, each image file's
        path, size and mtime (an edited file gets a new key) and the preprocessing. The key of the
        on-disk embedding cache and of unlabeled-pool statistics (`medkt.pool.pool_statistic`)."""
        from medkt.checkpoints import weights_fingerprint

        h = hashlib.sha256(weights_fingerprint(self.backend).encode())
        for item in self.images:  # path, size and mtime: an edited file is re-encoded
            p = Path(item) if isinstance(item, (str, Path)) else None
            st = p.stat() if p is not None and p.exists() else None
            h.update(json.dumps([str(item) if p else repr(type(item)), st.st_size if st else None,
                                 st.st_mtime_ns if st else None]).encode())
        h.update(json.dumps([self.backend.spec, type(self.backend).__qualname__, self.backend.image_size,
                             self.backend.image_channels, list(self.backend.mean), list(self.backend.std)]).encode())
        return h.hexdigest()

    def _cache_file(self) -> Path | None:
        if self.cache_dir is None or isinstance(self.images, torch.Tensor):
            return None
        return self.cache_dir / f"image_embeddings_{self.images_key()[:24]}.pt"

    def _map_images(self, fn: Callable[[list[torch.Tensor]], torch.Tensor], desc: str) -> torch.Tensor:
        """``fn`` (a batch of [0,1] images, CPU, -> one row per image on the model's device) over
        this rank's images in eval mode, without gradients, in the backend's precision, with
        progress; the rows of every rank gathered in image order -> ``(N, ...)``."""
        backend = self.backend
        indices = self._rank_indices()
        rows = []
        was_training = backend.training
        backend.eval()
        bar = self._progress(len(indices), desc)
        try:
            with torch.no_grad(), backend.autocast():
                for _, imgs in self._batches(indices):
                    rows.append(fn(imgs))
                    bar.update(len(imgs))
        finally:
            bar.close()
            backend.train(was_training)
        out = torch.cat(rows) if rows else torch.empty(0, device=backend.device)
        return self._gather(indices, out, len(self.images))

    def image_embeddings(self) -> torch.Tensor:
        """Normalised image embeddings ``(N, D)`` (fp32, model device), once per model state."""
        from medkt.checkpoints import load_checkpoint, save_checkpoint

        backend = self.backend
        state = _model_state(backend, [*backend.parameters(), *backend.buffers()])
        if self._img is not None and self._img[0] == state:
            return self._img[1]
        cache = self._cache_file()
        if cache is not None and cache.is_file():
            emb = load_checkpoint(cache).to(backend.device)
            log.info("image embeddings read from %s", cache)
        else:
            emb = self._map_images(lambda imgs: F.normalize(backend.encode_pixels(
                torch.stack(imgs).to(backend.device, non_blocking=True)).float(), dim=-1), "zero-shot")
            if cache is not None:
                save_checkpoint(emb.cpu(), cache)
        self._img = (state, emb)
        return emb

    # -- scores ---------------------------------------------------------------------------
    def _itm_scores(self) -> torch.Tensor:
        """``(N, K)`` mean/max match logits over each class's prompts; each image's tokens are
        computed once and reused for every prompt batch."""
        backend = self.backend
        flat = [p for c in self.classes for p in self.class_prompts[c]]
        tokens = [backend.tokenize(flat[i : i + self.text_batch_size]) for i in range(0, len(flat), self.text_batch_size)]
        k = len(self.classes)
        counts = torch.tensor([len(self.class_prompts[c]) for c in self.classes])
        owner = torch.repeat_interleave(torch.arange(k), counts).to(backend.device)
        counts = counts.to(backend.device, torch.float32)

        def rows(imgs: list[torch.Tensor]) -> torch.Tensor:
            out = []
            for img in imgs:  # native, variable-size images: one at a time
                emb, mask = backend.embed_image(img[None].to(backend.device))
                s = torch.cat([backend.itm_logits_from_embeds(emb, mask, t)[:, 1].float() for t in tokens])
                if self.aggregate == "mean":
                    out.append(torch.zeros(k, device=s.device).index_add_(0, owner, s) / counts)
                else:
                    out.append(torch.full((k,), -torch.inf, device=s.device).scatter_reduce(0, owner, s, "amax"))
            return torch.stack(out)

        out = self._map_images(rows, "ITM zero-shot")
        return out if len(out) else torch.zeros(0, k, device=backend.device)

    def scores(self) -> np.ndarray:
        """``(N, K)`` class scores: cosine similarities (embedding) or mean/max match logits (ITM)."""
        if self.scoring == "itm":
            return self._itm_scores().cpu().numpy()
        s = aggregate_scores(self.image_embeddings(), self.text_embeddings(), self.aggregate)
        return s.cpu().numpy()

    def logit_scale(self) -> float:
        """The temperature that turns `scores` into logits (ITM scores already are logits)."""
        return 1.0 if self.scoring == "itm" else float(self.backend.logit_scale.detach().float().cpu())

    def evaluate(self) -> ClassificationResult:
        """Score the images with the model's current weights and classify."""
        return summarize(self.classes, self.labels, self.scores(), self.logit_scale())


def zero_shot_classify(backend: Backend, images: Any, labels: Sequence[str], class_prompts: dict[str, Sequence[str]],
                       aggregate: str = "mean", batch_size: int = 64, **kw: Any) -> ClassificationResult:
    """One-shot convenience wrapper around `ZeroShotEvaluator`."""
    return ZeroShotEvaluator(backend, images, labels, class_prompts, aggregate, batch_size, **kw).evaluate()


def before_after_table(before: ClassificationResult, after: ClassificationResult, title: str = "") -> str:
    """Markdown table: per-class and overall accuracy before/after, with the change in points."""
    lines = []
    if title:
        lines.append(f"**{title}**\n")
    from medkt.utils import markdown_table

    pairs = [(c, before.per_class[c], after.per_class.get(c, float("nan"))) for c in before.classes if c in before.per_class]
    pairs.append(("**top-1 (all)**", before.accuracy, after.accuracy))
    lines += markdown_table(["class", "before", "after", "change"],
                            [[c, f"{100 * b:.1f}", f"{100 * a:.1f}", f"{100 * (a - b):+.1f}"] for c, b, a in pairs], "lrrr")
    return "\n".join(lines) + "\n"


#: a known class whose accuracy falls by more than this many points is warned about in every report
FORGETTING_WARNING_POINTS = 10.0


def forgetting_warnings(before: Mapping[str, float], after: Mapping[str, float], new: Iterable[str] = (),
                        where: str = "", threshold: float = FORGETTING_WARNING_POINTS) -> list[str]:
    """One line per known class whose accuracy fell by more than ``threshold`` points.

    Args:
        before / after: class -> accuracy as a fraction (``ClassificationResult.per_class``).
        new: the transferred classes (not known, never warned about).
        where: the evaluation set or run, named in the line when given.
        threshold: the drop in points (percent) that triggers a warning (strictly more than it).
    Returns:
        e.g. ``["WARNING: known class 'atelectasis' fell 69.0 -> 0.0 % (-69.0 points)"]``, largest drop first.
    """
    skip = set(new)
    drops = [(c, 100 * float(b), 100 * float(after[c])) for c, b in before.items()
             if c not in skip and c in after and np.isfinite(b) and np.isfinite(after[c])]
    # compared at the printed precision, so "-10.0 points" is never reported as more than 10
    drops = [(c, b, a) for c, b, a in drops if round(b - a, 1) > threshold]
    drops.sort(key=lambda d: d[2] - d[1])
    at = f" ({where})" if where else ""
    return [f"WARNING: known class {c!r}{at} fell {b:.1f} -> {a:.1f} % ({a - b:+.1f} points)" for c, b, a in drops]


def transfer_warnings(before: Mapping[str, ClassificationResult], after: Mapping[str, ClassificationResult],
                      new: Iterable[str] = (), where: str = "") -> list[str]:
    """`forgetting_warnings` of every evaluation set evaluated before and after (the set named when
    there are several; ``where`` prefixes it, e.g. a sweep's run)."""
    new = set(new)
    names = [n for n in before if n in after]
    out: list[str] = []
    for n in names:
        label = " / ".join(x for x in (where, n if len(names) > 1 else "") if x)
        out += forgetting_warnings(before[n].per_class, after[n].per_class, new, label)
    return out


def warnings_block(warnings: Sequence[str]) -> list[str]:
    """Report lines for the top of a markdown report: one bold line per warning, then a blank line."""
    return [*(f"**{w}**  " for w in warnings), ""] if warnings else []
