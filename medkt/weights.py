"""Resolving local weights: a file, a folder, or a repo in the local Hugging Face cache.

medkt never downloads: a missing file raises :class:`WeightsNotFoundError` naming the file and
how to get it (README, section "Getting weights").
"""
from __future__ import annotations

import os
from pathlib import Path

from medkt.errors import WeightsNotFoundError

WEIGHTS_ENV = "MEDKT_WEIGHTS"
README_HINT = "see README.md, section 'Getting weights'"


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """Path of the newest snapshot of ``repo_id`` in the local HF cache, or None (no network)."""
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    cache = Path(os.environ.get("HF_HUB_CACHE", HF_HUB_CACHE))
    folder = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if not folder.is_dir():
        return None
    snaps = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None


def resolve_weights(weights: str | None, *, what: str, how_to_get: str, filenames: tuple[str, ...] = ()) -> Path:
    """Find local weights.

    Args:
        weights: a path (file or folder), an HF repo id present in the local cache, or None to use
            ``$MEDKT_WEIGHTS``.
        what: human name of the model, for the error message.
        how_to_get: one sentence on where to download the file and where to put it.
        filenames: when ``weights`` is a folder, the first of these that exists inside is returned
            (the folder itself when empty).
    """
    if weights is None:
        weights = os.environ.get(WEIGHTS_ENV)
        if not weights:
            raise WeightsNotFoundError(
                f"no weights given for {what}; pass '@/path/to/weights' in the backend spec "
                f"(or --set backend=...) or set {WEIGHTS_ENV}. {how_to_get} ({README_HINT})"
            )
    path = Path(weights).expanduser()
    if not path.exists() and "/" in weights and not weights.startswith((".", "/", "~")):
        snap = hf_cache_snapshot(weights)
        if snap is not None:
            path = snap
    if not path.exists():
        raise WeightsNotFoundError(
            f"weights not found for {what}: {weights}. {how_to_get} ({README_HINT})"
        )
    if path.is_dir() and filenames:
        for name in filenames:
            if (path / name).exists():
                return path / name
        raise WeightsNotFoundError(
            f"weights folder {path} for {what} holds none of {', '.join(filenames)}. {how_to_get} ({README_HINT})"
        )
    return path
