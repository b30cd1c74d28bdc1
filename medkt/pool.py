"""An unlabeled pool of scans: many images of the task's modality, without labels.

`UnlabeledPool.from_path` reads a folder (its image files, `medkt.data.prepare.image_files`) or a
manifest (its ``path`` column only: a ``label`` column, if present, is never read), optionally
subsampled (``max_images``, ``seed``). `pool_embeddings` gives the frozen model's image embeddings
of the pool through the zero-shot evaluator's embedding cache (keyed by weights, files and
preprocessing), so they are computed once. The pool feeds the ``pool_distill`` fine-tuning control
(`medkt.finetune_controls`) through ``finetune(..., pool=)`` / ``transfer(..., unlabeled=)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

    def images(self, backend: Any) -> torch.Tensor:
        """``(N, C, S, S)`` [0, 1] pool images on the CPU, decoded by ``backend``'s preprocessing."""
        return torch.stack([backend.load_image(f) for f in self.files])


def pool_embeddings(backend: Any, pool: UnlabeledPool, batch_size: int = 64, num_workers: int = 0) -> torch.Tensor:
    """Normalised image embeddings ``(N, D)`` of ``pool`` by ``backend`` (model device, fp32), through
    the `medkt.evaluation.ZeroShotEvaluator` embedding cache: with ``pool.cache_dir`` a second call
    on the same weights, files and preprocessing reads them back instead of re-encoding."""
    from medkt.evaluation import ZeroShotEvaluator

    # the evaluator needs a class per image; a single placeholder class that is never scored
    ev = ZeroShotEvaluator(backend, [str(f) for f in pool.files], ["pool"] * len(pool), {"pool": ["pool"]},
                           batch_size=batch_size, num_workers=num_workers, cache_dir=pool.cache_dir,
                           scoring="embedding")
    return ev.image_embeddings()


__all__ = ["UnlabeledPool", "pool_embeddings"]
