"""Saliency map -> binary mask -> bounding boxes (MedCLIP-SAMv2's post-processing, without OpenCV).

Steps: pick a threshold on the saliency intensities (k-means with k=2 by default, as upstream;
or a fixed threshold, or Otsu), keep the ``n_components`` largest 8-connected components, and
return one box per kept component for SAM.

Upstream crashes on an empty saliency map (a bad unpack when no contour exists); here a constant
or non-finite map, or one whose foreground is empty, yields an empty mask, no boxes and a
`EmptySaliencyWarning`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from medkt.errors import ConfigError, unknown_name

METHODS = ("kmeans", "threshold", "otsu")


class EmptySaliencyWarning(UserWarning):
    """The saliency map gave no foreground; the mask is empty."""


@dataclass
class PostprocessResult:
    """``mask``: bool ``(H, W)``; ``boxes``: float ``(K, 4)`` as ``[x0, y0, x1, y1]`` pixel edges
    (x1/y1 exclusive), one per kept component, largest first; ``threshold``: intensity cut used."""

    mask: np.ndarray
    boxes: np.ndarray
    threshold: float

    @property
    def empty(self) -> bool:
        """True when no pixel survived the cut (no box for SAM)."""
        return not bool(self.mask.any())


def kmeans_threshold(values: np.ndarray, max_iter: int = 100) -> float:
    """1-D k-means with k=2 (Lloyd, centroids started at min and max): the cut between the clusters.

    A pixel is foreground when its value is above the returned threshold (the midpoint of the
    two centroids), i.e. when it is closer to the higher centroid, as upstream labels it.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return hi
    c0, c1 = lo, hi
    for _ in range(max_iter):
        t = 0.5 * (c0 + c1)
        fg = v > t
        n0, n1 = c0, c1
        if fg.any() and (~fg).any():
            n0, n1 = float(v[~fg].mean()), float(v[fg].mean())
        if n0 == c0 and n1 == c1:
            break
        c0, c1 = n0, n1
    return 0.5 * (c0 + c1)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's cut of the intensities (scikit-image ``threshold_otsu``)."""
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(np.asarray(values, dtype=np.float64)))


def keep_largest_components(mask: np.ndarray, k: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """Keep the ``k`` largest 8-connected components of a boolean mask.

    Returns the filtered mask and the kept components' boolean masks (largest first; ties are
    broken by position, so exactly ``k`` components are kept when at least ``k`` exist).
    """
    from scipy import ndimage

    if k < 1:
        raise ConfigError(f"n_components must be >= 1, got {k}")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(mask, dtype=bool), []
    sizes = np.bincount(labels.ravel())[1:]
    order = sorted(range(n), key=lambda i: (-int(sizes[i]), i))[:k]
    comps = [labels == (i + 1) for i in order]
    out = np.zeros_like(mask, dtype=bool)
    for c in comps:
        out |= c
    return out, comps


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Bounding box ``[x0, y0, x1, y1]`` (pixel edges, x1/y1 exclusive) of a non-empty boolean mask."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def _resize_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="nearest")[0, 0].numpy()


def postprocess_saliency(
    saliency: np.ndarray | torch.Tensor,
    method: str = "kmeans",
    *,
    threshold: float = 0.3,
    n_components: int = 1,
    box_mode: str = "per_component",
    kmeans_size: int | None = 256,
    output_size: tuple[int, int] | None = None,
) -> PostprocessResult:
    """Binarise a saliency map and derive SAM box prompts.

    Args:
        saliency: ``(H, W)`` map (any range; min-max normalised here).
        method: ``"kmeans"`` (k=2 on intensities, upstream default), ``"threshold"`` (fixed cut
            ``threshold`` on the normalised map; upstream 0.3) or ``"otsu"``.
        n_components: connected components kept (upstream: 1; 2 for lungs).
        box_mode: ``"per_component"`` (one box per kept component) or ``"union"`` (one box around
            all of them, upstream's default).
        kmeans_size: k-means is fitted on the map resized (nearest) to this side, as upstream (256);
            None fits on the full map.
        output_size: ``(H, W)`` of the returned mask (nearest resize; default the saliency's size).
    """
    if method not in METHODS:
        raise unknown_name("post-processing method", method, METHODS)
    if box_mode not in ("per_component", "union"):
        raise unknown_name("box mode", box_mode, ("per_component", "union"))
    sal = saliency.detach().float().cpu().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency, dtype=np.float32)
    sal = np.squeeze(sal)
    if sal.ndim != 2:
        raise ConfigError(f"expected a 2-D saliency map (H, W), got shape {sal.shape}")
    if output_size is not None and tuple(output_size) != sal.shape:
        sal = _resize_nearest(np.nan_to_num(sal, nan=0.0), tuple(output_size))
    h, w = sal.shape
    empty = PostprocessResult(np.zeros((h, w), dtype=bool), np.zeros((0, 4), dtype=np.float32), float("nan"))
    finite = np.isfinite(sal)
    if not finite.any():
        warnings.warn("saliency map has no finite values; returning an empty mask", EmptySaliencyWarning, stacklevel=2)
        return empty
    sal = np.where(finite, sal, np.nanmin(np.where(finite, sal, np.nan)))
    lo, hi = float(sal.min()), float(sal.max())
    if not hi > lo:
        warnings.warn("saliency map is constant; returning an empty mask", EmptySaliencyWarning, stacklevel=2)
        return empty
    norm = (sal - lo) / (hi - lo)
    if method == "kmeans":
        fit = norm if kmeans_size is None else _resize_nearest(norm, (kmeans_size, kmeans_size))
        cut = kmeans_threshold(fit)
    elif method == "otsu":
        cut = otsu_threshold(norm)
    else:
        cut = float(threshold)
    fg = norm > cut
    mask, comps = keep_largest_components(fg, n_components)
    if not comps:
        warnings.warn(f"no saliency above the {method} cut {cut:.3g}; returning an empty mask", EmptySaliencyWarning, stacklevel=2)
        return PostprocessResult(mask, empty.boxes, float(cut))
    boxes = [mask_box(c) for c in comps] if box_mode == "per_component" else [mask_box(mask)]
    return PostprocessResult(mask, np.stack(boxes).astype(np.float32), float(cut))
