"""Per-image pictures of a zero-shot segmentation: a coloured saliency map and an overlay of the
image with the saliency, the SAM box prompts, the predicted outline and (when known) the true one.

Plain arrays (no matplotlib figure per image, which costs ~0.2 s each): matplotlib's colour map,
scikit-image's boundaries and PIL's rectangle drawing. The best/worst panels of the bundles'
reports are `medkt.segmentation.pipeline.write_overlays`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PRED_COLOUR = (0, 255, 0)  # green: predicted outline
TRUTH_COLOUR = (255, 0, 0)  # red: ground-truth outline
BOX_COLOUR = (255, 255, 0)  # yellow: SAM box prompts


def saliency_rgb(saliency: np.ndarray) -> np.ndarray:
    """``(H, W)`` saliency in [0, 1] -> ``(H, W, 3)`` uint8 in the ``jet`` colour map."""
    import matplotlib

    s = np.nan_to_num(np.clip(np.asarray(saliency, dtype=np.float32), 0.0, 1.0))
    return (matplotlib.colormaps["jet"](s)[..., :3] * 255 + 0.5).astype(np.uint8)


def overlay_rgb(image: np.ndarray, saliency: np.ndarray, pred: np.ndarray, boxes: np.ndarray,
                truth: np.ndarray | None = None, alpha: float = 0.35) -> np.ndarray:
    """The image (grey or RGB, [0, 1] or uint8) with the saliency blended in (``alpha``), the
    boxes ``(K, 4)`` ``[x0, y0, x1, y1]`` in yellow, the predicted mask's outline in green and the
    true mask's outline in red. Returns ``(H, W, 3)`` uint8."""
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    from medkt.segmentation.sam import to_rgb_uint8

    base = to_rgb_uint8(image).astype(np.float32)
    out = (1 - alpha) * base + alpha * saliency_rgb(saliency).astype(np.float32)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    for mask, colour in ((truth, TRUTH_COLOUR), (pred, PRED_COLOUR)):
        if mask is not None:
            out[find_boundaries(np.asarray(mask, bool), mode="inner")] = colour
    pic = Image.fromarray(out)
    draw = ImageDraw.Draw(pic)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        draw.rectangle([float(x0), float(y0), float(x1) - 1, float(y1) - 1], outline=BOX_COLOUR)
    return np.asarray(pic)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an ``(H, W[, 3])`` uint8 array as PNG (folders made as needed); returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)
    return path
