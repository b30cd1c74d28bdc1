"""Segmentation metrics: DSC, NSD (normalised surface Dice) and IoU per image, with the empty cases defined.

MONAI computes the non-empty cases (``compute_dice``, ``compute_surface_dice`` with
``use_subvoxels=True``, i.e. the surfel-weighted definition of DeepMind's ``surface-distance``
package that MedCLIP-SAMv2 uses, and ``compute_iou``). MONAI returns NaN when a class is absent
from both masks (and NaN or 0 for one-sided emptiness depending on the metric), so the empty
cases are decided here, identically for the three metrics:

* ground truth and prediction both empty -> 1.0 (nothing to find, nothing found);
* exactly one of them empty -> 0.0.

Upstream MedCLIP-SAMv2 asserts on an empty pair and pairs files by unsorted ``os.listdir``; here
files are matched by name and any mismatch is an error.

Mask encodings (`binarize`): 0/1 and 0/255 masks as they are; a label map needs the
foreground ``label``, a grey probability map an explicit ``threshold``; any other value set is
an error naming the file, never a silent guess.
"""
from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medkt.errors import DataError

METRIC_NAMES = ("dsc", "nsd", "iou")
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def binarize(mask: np.ndarray | torch.Tensor, threshold: float | None = None, label: int | None = None,
             name: str = "mask") -> np.ndarray:
    """A mask array -> boolean ``(H, W)``. Accepted encodings (anything else is a DataError):

    * boolean, or only the values 0/1 or 0/255 (65535 for 16-bit): foreground = non-zero;
    * a label map (any integer values) with ``label``: foreground = pixels equal to ``label``;
    * a probability map with ``threshold`` in [0, 1]: floats must lie in [0, 1]; 8-/16-bit
      integers are divided by 255 / 65535 first; foreground = value > ``threshold``.

    Without ``label``/``threshold`` other values (a label map with value 2, a grey JPEG-compressed
    mask) are ambiguous and refused: silently picking a cut gave DSC 0 for correct label maps.
    RGB(A) masks use the maximum over the colour channels (alpha dropped). ``name`` (the file)
    is named in errors.
    """
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # RGB(A) mask images: any colour channel
        arr = arr[..., :3].max(-1)
    if arr.ndim != 2:
        raise DataError(f"{name}: expected a 2-D mask (H, W), got shape {arr.shape}")
    if label is not None and threshold is not None:
        raise DataError(f"{name}: give either a label (label map) or a threshold (probability map), not both")
    if arr.dtype == bool:
        return arr
    if label is not None:
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.mod(arr, 1) == 0):
            raise DataError(f"{name}: --label {label} needs an integer label map, but the mask holds fractional "
                            f"values (a probability map? use --threshold instead)")
        return arr == label
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise DataError(f"{name}: threshold {threshold} must be in [0, 1] (probability scale)")
        if arr.dtype == np.uint8:
            return arr.astype(np.float32) / 255.0 > threshold
        if arr.dtype == np.uint16:
            return arr.astype(np.float32) / 65535.0 > threshold
        vals = arr.astype(np.float64)
        if not np.isfinite(vals).all() or vals.min() < 0 or vals.max() > 1:
            raise DataError(f"{name}: a probability map must hold values in [0, 1] (or 8/16-bit 0..255/0..65535), "
                            f"got {vals.min():g}..{vals.max():g}; for a label map use --label")
        return vals > threshold
    values = np.unique(arr)
    full = 65535 if arr.dtype == np.uint16 else 255
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, full}:
        return arr > 0
    shown = ", ".join(f"{v:g}" for v in values[:8].tolist()) + (", ..." if len(values) > 8 else "")
    raise DataError(f"{name}: ambiguous mask values {{{shown}}} (not 0/1 or 0/{full}): for a label map pass "
                    f"--label N (the foreground value; bundles: data#mask_label), for a grey/probability mask "
                    f"--threshold T (e.g. 0.5; bundles: data#mask_threshold)")


def _nsd_monai(pred: np.ndarray, gt: np.ndarray, tolerance: float, spacing: Sequence[float] | None) -> float:
    from monai.metrics import compute_surface_dice

    p = torch.from_numpy(pred.astype(np.float32))[None, None]
    g = torch.from_numpy(gt.astype(np.float32))[None, None]
    with warnings.catch_warnings():  # deprecation chatter inside MONAI 1.5+ get_mask_edges
        warnings.simplefilter("ignore")
        value = compute_surface_dice(
            p,
            g,
            class_thresholds=[float(tolerance)],
            include_background=True,
            spacing=None if spacing is None else [float(s) for s in spacing],
            use_subvoxels=True,
        )
    return float(value[0, 0])


def segmentation_scores(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    *,
    nsd_tolerance: float = 2.0,
    spacing: Sequence[float] | None = None,
) -> dict[str, float]:
    """DSC, NSD and IoU of one binary prediction against its ground truth (fractions in [0, 1]).

    Args:
        pred, gt: masks of the same ``(H, W)`` shape (see `binarize` for accepted values).
        nsd_tolerance: boundary tolerance; pixels when ``spacing`` is None (MedCLIP-SAMv2: 2 px),
            otherwise millimetres.
        spacing: pixel size ``(row_mm, col_mm)`` when known.
    """
    from monai.metrics import compute_dice, compute_iou

    p, g = binarize(pred), binarize(gt)
    if p.shape != g.shape:
        raise DataError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}; resize the prediction first")
    if nsd_tolerance < 0 or not math.isfinite(nsd_tolerance):
        raise DataError(f"NSD tolerance must be finite and >= 0, got {nsd_tolerance}")
    p_empty, g_empty = not p.any(), not g.any()
    if p_empty and g_empty:
        return {"dsc": 1.0, "nsd": 1.0, "iou": 1.0}
    if p_empty or g_empty:
        return {"dsc": 0.0, "nsd": 0.0, "iou": 0.0}
    pt = torch.from_numpy(p.astype(np.float32))[None, None]
    gtt = torch.from_numpy(g.astype(np.float32))[None, None]
    return {
        "dsc": float(compute_dice(pt, gtt, include_background=True)[0, 0]),
        "nsd": _nsd_monai(p, g, nsd_tolerance, spacing),
        "iou": float(compute_iou(pt, gtt, include_background=True)[0, 0]),
    }


@dataclass
class ScoreTable:
    """Per-image scores and their means."""

    names: list[str] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)

    def add(self, name: str, scores: dict[str, float]) -> None:
        """Append one image's scores (``{"dsc", "nsd", "iou"}``)."""
        self.names.append(name)
        self.rows.append(dict(scores))

    def __len__(self) -> int:
        return len(self.rows)

    def means(self) -> dict[str, float]:
        """Mean of each metric over the images (NaN when empty)."""
        if not self.rows:
            return {k: float("nan") for k in METRIC_NAMES}
        return {k: float(np.mean([r[k] for r in self.rows])) for k in METRIC_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``n_images``, ``mean`` (per metric) and ``per_image`` (name -> scores), fractions."""
        return {"n_images": len(self), "mean": self.means(), "per_image": dict(zip(self.names, self.rows))}

    def to_csv(self) -> str:
        """``name,dsc,nsd,iou`` rows (fractions)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["name", *METRIC_NAMES])
        for n, r in zip(self.names, self.rows):
            w.writerow([n, *(f"{r[k]:.6f}" for k in METRIC_NAMES)])
        return buf.getvalue()

    def write_csv(self, path: str | Path) -> Path:
        """Write `to_csv` atomically to ``path``; returns it."""
        from medkt.utils import atomic_write_text

        return atomic_write_text(path, self.to_csv())


def read_mask_array(path: str | Path) -> np.ndarray:
    """A mask image file as stored (palette images: their indices; RGB(A): max over colours)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "1", "I", "I;16", "F", "P"):
                arr = np.asarray(im)  # "P": the palette indices, i.e. the labels of a label map
            else:
                arr = np.asarray(im.convert("RGBA" if "A" in im.mode else "RGB"))[..., :3].max(-1)
    except FileNotFoundError:
        raise DataError(f"mask not found: {path}") from None
    except OSError as exc:
        raise DataError(f"unreadable mask {path}: {exc}") from None
    return arr


def read_mask(path: str | Path, label: int | None = None, threshold: float | None = None) -> np.ndarray:
    """A mask image file -> boolean ``(H, W)`` (encodings: `binarize`); unreadable files and
    ambiguous values raise `DataError` naming the file."""
    return binarize(read_mask_array(path), threshold=threshold, label=label, name=str(path))


def list_masks(folder: str | Path) -> dict[str, Path]:
    """Mask files of a folder by file name (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in MASK_SUFFIXES}


def pair_by_name(pred: dict[str, Path], gt: dict[str, Path]) -> list[tuple[str, Path, Path]]:
    """Match predictions and ground truths by file name; any unmatched name is an error."""
    only_pred = sorted(set(pred) - set(gt))
    only_gt = sorted(set(gt) - set(pred))
    if only_pred or only_gt:
        parts = []
        if only_pred:
            parts.append(f"{len(only_pred)} prediction(s) without ground truth (e.g. {only_pred[0]!r})")
        if only_gt:
            parts.append(f"{len(only_gt)} ground truth(s) without prediction (e.g. {only_gt[0]!r})")
        raise DataError("mask folders do not match by file name: " + "; ".join(parts))
    if not pred:
        raise DataError("no mask images (.png/.jpg/.bmp/.tif) found to score")
    return [(name, pred[name], gt[name]) for name in sorted(pred)]


def score_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    *,
    nsd_tolerance: float = 2.0,
    spacing: Sequence[float] | None = None,
    resize_pred: bool = False,
    label: int | None = None,
    threshold: float | None = None,
    gt_label: int | None = None,
) -> ScoreTable:
    """Score every prediction mask in ``pred_dir`` against the same-named mask in ``gt_dir``.

    ``label`` / ``threshold``: how the predictions are encoded (`binarize`); ``gt_label``:
    the foreground value of ground-truth label maps. A ``label`` found in no file is an error
    (a typo would otherwise score every image as empty). Shapes must match unless
    ``resize_pred`` (nearest-neighbour resize to the ground truth).
    """
    table = ScoreTable()
    seen = {"pred": label is None, "gt": gt_label is None}
    for name, p_path, g_path in pair_by_name(list_masks(pred_dir), list_masks(gt_dir)):
        p_arr, g_arr = read_mask_array(p_path), read_mask_array(g_path)
        p = binarize(p_arr, threshold=threshold, label=label, name=str(p_path))
        g = binarize(g_arr, label=gt_label, name=str(g_path))
        seen["pred"] = seen["pred"] or bool(p.any())
        seen["gt"] = seen["gt"] or bool(g.any())
        if p.shape != g.shape:
            if not resize_pred:
                raise DataError(f"{name}: prediction shape {p.shape} differs from ground truth {g.shape}")
            p = resize_mask(p, g.shape)
        table.add(name, segmentation_scores(p, g, nsd_tolerance=nsd_tolerance, spacing=spacing))
    for kind, folder, value in (("pred", pred_dir, label), ("gt", gt_dir, gt_label)):
        if not seen[kind]:
            raise DataError(f"label {value} occurs in no mask of {folder}; check the label value")
    return table


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to ``shape`` (H, W)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy() > 0.5
