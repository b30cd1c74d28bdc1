"""An unlabeled pool of scans: many images of the task's modality, without labels.

`UnlabeledPool.from_path` reads a folder (its image files, `medkt.data.prepare.image_files`) or a
manifest (its ``path`` column only: a ``label`` column, if present, is never read), optionally
subsampled (``max_images``, ``seed``). `pool_embeddings` gives the frozen model's image embeddings
of the pool through the zero-shot evaluator's embedding cache (keyed by weights, files and
preprocessing), so they are computed once. The pool feeds the ``pool_distill`` fine-tuning control
(`medkt.finetune_controls`) through ``finetune(..., pool=)`` / ``transfer(..., unlabeled=)``, and
the pool inversion priors (``feature_stats``, ``real_start``, ``spectrum`` in
`medkt.inversion_priors`) through ``invert(..., pool=)``; their statistics of the pool are kept by
`pool_statistic` under the same kind of key.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medkt.errors import ConfigError, DataError


@dataclass
class UnlabeledPool:
    """Image files of an unlabeled pool.

    Attributes:
        files: the image paths (sorted folder order or manifest order, then subsampled).
        source: the folder or manifest they came from (for messages).
        cache_dir: where `pool_embeddings` keeps the embeddings (None: memory only).
    """

    files: list[Path]
    source: str = ""
    cache_dir: Path | None = None

    @classmethod
    def from_path(cls, path: str | Path, *, max_images: int | None = None, seed: int = 0,
                  cache_dir: str | Path | None = None) -> "UnlabeledPool":
        """A folder (its image files) or a CSV/JSONL manifest (its ``path`` column, relative to the
        manifest's folder); ``max_images`` keeps a seeded random subset (in the original order)."""
        from medkt.data.manifest import read_records, safe_join
        from medkt.data.prepare import image_files

        path = Path(path)
        if path.is_dir():
            files = image_files(path)
        elif path.is_file():
            # only the path column: labels of a pool are never read (not even checked)
            files = [safe_join(path.parent, str(r.get("path", "")), where=f"{path}:{i}: ")
                     for i, r in enumerate(read_records(path, columns=("path",)), start=2)]
        else:
            raise DataError(f"unlabeled pool not found: {path}; give a folder of images or a manifest with a path column")
        if not files:
            raise DataError(f"unlabeled pool {path} holds no image files")
        if max_images is not None:
            if max_images < 1:
                raise ConfigError(f"max_images = {max_images}: must be >= 1 (or None for the whole pool)")
            if max_images < len(files):
                keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
                files = [files[i] for i in keep]
        return cls(files, str(path), Path(cache_dir) if cache_dir is not None else None)

    def __len__(self) -> int:
        return len(self.files)

    def images(self, backend: Any, indices: Sequence[int] | None = None) -> torch.Tensor:
        """``(N, C, S, S)`` [0, 1] pool images on the CPU, decoded by ``backend``'s preprocessing
        (only the files at ``indices``, in that order, when given)."""
        files = self.files if indices is None else [self.files[int(i)] for i in indices]
        return torch.stack([backend.load_image(f) for f in files])

    def batches(self, backend: Any, batch_size: int = 32) -> Iterator[torch.Tensor]:
        """The pool's images in file order, ``batch_size`` at a time (CPU, [0, 1]): statistics
        of a large pool never hold all of it in memory."""
        for i in range(0, len(self.files), batch_size):
            yield self.images(backend, range(i, min(i + batch_size, len(self.files))))


def pool_embeddings(backend: Any, pool: UnlabeledPool, batch_size: int = 64, num_workers: int = 0) -> torch.Tensor:
    """Normalised image embeddings ``(N, D)`` of ``pool`` by ``backend`` (model device, fp32), through
    the `medkt.evaluation.ZeroShotEvaluator` embedding cache: with ``pool.cache_dir`` a second call
    on the same weights, files and preprocessing reads them back instead of re-encoding."""
    return _evaluator(backend, pool, batch_size, num_workers).image_embeddings()


def _evaluator(backend: Any, pool: UnlabeledPool, batch_size: int = 64, num_workers: int = 0) -> Any:
    """A `medkt.evaluation.ZeroShotEvaluator` over the pool's files: its embedding cache and key."""
    from medkt.evaluation import ZeroShotEvaluator

    # the evaluator needs a class per image; a single placeholder class that is never scored
    return ZeroShotEvaluator(backend, [str(f) for f in pool.files], ["pool"] * len(pool), {"pool": ["pool"]},
                             batch_size=batch_size, num_workers=num_workers, cache_dir=pool.cache_dir,
                             scoring="embedding")


#: statistics computed this session, by key (a few small tensors each; the oldest dropped first)
_STATISTICS: OrderedDict[str, Any] = OrderedDict()
_MAX_IN_MEMORY = 8


def pool_statistic(backend: Any, pool: UnlabeledPool, name: str, settings: dict[str, Any],
                   compute: Callable[[], Any]) -> Any:
    """``compute()`` (a tensor or a dict/list of CPU tensors) of ``pool`` for ``backend``, once per
    weights, pool files and preprocessing (the embedding cache's key,
    `medkt.evaluation.ZeroShotEvaluator.images_key`), ``name`` and ``settings``: kept in memory
    for this session and, with ``pool.cache_dir``, on disk (``pool_<name>_<key>.pt``), so a
    second inversion on the same pool reads it back."""
    from medkt.checkpoints import load_checkpoint, save_checkpoint

    key = hashlib.sha256(json.dumps([_evaluator(backend, pool).images_key(), name, settings], sort_keys=True,
                                    default=str).encode()).hexdigest()[:24]
    if key in _STATISTICS:
        _STATISTICS.move_to_end(key)
        return _STATISTICS[key]
    path = pool.cache_dir / f"pool_{name}_{key}.pt" if pool.cache_dir is not None else None
    if path is not None and path.is_file():
        value = load_checkpoint(path)
    else:
        value = compute()
        if path is not None:
            save_checkpoint(value, path)
    _STATISTICS[key] = value
    while len(_STATISTICS) > _MAX_IN_MEMORY:
        _STATISTICS.popitem(last=False)
    return value


def caption_probabilities(backend: Any, image_emb: torch.Tensor, captions: Sequence[str],
                          scale: float | torch.Tensor) -> torch.Tensor:
    """``(P, K)`` zero-shot probabilities (CPU) of normalised image embeddings ``(P, D)`` over
    ``captions`` embedded by ``backend``'s current text tower, at logit ``scale``."""
    with torch.no_grad(), backend.autocast():
        txt = backend.encode_texts(list(captions)).float()
    txt = F.normalize(txt, dim=-1).to(image_emb.device)
    return F.softmax(float(scale) * image_emb.float() @ txt.t(), dim=-1).cpu()


def pick(probs: torch.Tensor, column: int, k: int, *, min_confidence: float = 0.0, rank_by: str = "probability",
         exclude: set[int] | frozenset[int] = frozenset()) -> list[tuple[int, float, float]]:
    """The ``k`` pool rows most confidently of caption ``column``: rows whose top caption it is, with
    probability >= ``min_confidence`` and not in ``exclude``, ranked by ``rank_by`` (ties: lower row).

    Returns:
        ``(row, probability, margin)`` best first (margin: the probability minus the next caption's).
    """
    if probs.shape[1] < 2:
        raise ConfigError("self-training scores the pool over at least two captions (the new concept and others)")
    p = probs[:, column]
    others = torch.cat([probs[:, :column], probs[:, column + 1:]], dim=1).max(dim=1).values
    margin = p - others
    ok = (margin >= 0) & (p >= min_confidence)
    rows = [i for i in torch.nonzero(ok).flatten().tolist() if i not in exclude]
    score = margin if rank_by == "margin" else p
    rows.sort(key=lambda i: (-float(score[i]), i))
    return [(i, float(p[i]), float(margin[i])) for i in rows[:k]]


__all__ = ["UnlabeledPool", "caption_probabilities", "pick", "pool_embeddings", "pool_statistic"]
