"""Figures a person looks at (kept out of the engine modules, which compute and return tensors)."""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch

from medkt.backends.base import as_numpy_image
from medkt.utils import atomic_write_bytes


def save_grid(images: torch.Tensor, path: str | Path, labels: Sequence[str] | None = None, ncol: int | None = None) -> Path:
    """Save a labelled grid of ``(N, C, S, S)`` [0, 1] images as PNG (one row per concept when labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    if labels is not None:
        groups: dict[str, list[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault(lab, []).append(i)
        rows = list(groups.values())
        names = list(groups)
    else:
        ncol = ncol or min(n, 10)
        rows = [list(range(i, min(i + ncol, n))) for i in range(0, n, ncol)]
        names = [""] * len(rows)
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.3 * ncols + 1.2, 1.4 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (idx, name) in enumerate(zip(rows, names)):
        for c, i in enumerate(idx):
            arr = as_numpy_image(images[i])
            axes[r, c].imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=255)
        if name:
            axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    buf_path = Path(path)
    buf_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(buf_path, buf.getvalue())


__all__ = ["save_grid"]
