"""NIfTI volumes (BraTS-style 3-D MRI + segmentation) -> 2-D axial slices that contain tumour.

The paper (like MedCLIP-SAMv2) evaluates brain-tumour segmentation slice by slice on the axial
slices whose ground truth is non-empty. Volumes are reoriented to the closest canonical (RAS+)
orientation with nibabel so that axis 2 is inferior->superior whatever the file's affine; a
slice is shown with anterior at the top (``rot90``). Intensities are normalised per volume:
clipped to the 0.5-99.5th percentiles of the non-zero (brain) voxels, then scaled to [0, 1].
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medkt.errors import DataError


@dataclass
class SliceSample:
    """One 2-D sample: ``image`` ``(H, W)`` float32 in [0, 1], ``mask`` bool ``(H, W)`` (None: no
    ground truth, not scored), ``spacing`` ``(row_mm, col_mm)`` or None, ``name`` unique within a run."""

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, float] | None = None
    source: str = ""
    index: int | None = None


def is_nifti(path: str | Path) -> bool:
    """The file name ends in ``.nii`` or ``.nii.gz``."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def load_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI file in canonical RAS+ orientation -> ``(array (X, Y, Z) float32, voxel size mm)``."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        arr = np.asanyarray(img.dataobj).astype(np.float32)
    except FileNotFoundError:
        raise DataError(f"volume not found: {path}") from None
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise DataError(f"unreadable NIfTI volume {path}: {exc}") from None
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {arr.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return arr, zooms  # type: ignore[return-value]


def normalize_volume(vol: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Percentile clip over the non-zero voxels (MRI background is 0), then scale to [0, 1]."""
    fg = vol[vol != 0]
    if fg.size == 0:
        return np.zeros_like(vol, dtype=np.float32)
    lo, hi = np.percentile(fg, [low, high])
    if not hi > lo:
        lo, hi = float(vol.min()), float(vol.max())
        if not hi > lo:
            return np.zeros_like(vol, dtype=np.float32)
    return np.clip((vol - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _axial(vol: np.ndarray, k: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(vol[:, :, k]))


def tumour_slices(seg: np.ndarray, min_pixels: int = 1) -> list[int]:
    """Indices along axis 2 whose segmentation has at least ``min_pixels`` non-zero voxels."""
    counts = (seg > 0).reshape(-1, seg.shape[2]).sum(0)
    return [int(k) for k in np.nonzero(counts >= min_pixels)[0]]


def axial_tumour_slices(
    image_path: str | Path,
    seg_path: str | Path | None,
    *,
    labels: tuple[int, ...] | None = None,
    min_pixels: int = 1,
    max_slices: int | None = None,
    name: str | None = None,
) -> Iterator[SliceSample]:
    """Yield the axial slices of a volume whose segmentation contains tumour.

    Without a segmentation (``seg_path`` None: an unlabelled study) every axial slice with at
    least ``min_pixels`` non-zero image voxels is yielded, with ``mask`` None.

    Args:
        labels: segmentation labels counted as foreground (None = any non-zero; BraTS whole
            tumour = labels 1, 2, 3).
        min_pixels: minimum tumour pixels for a slice to be used.
        max_slices: keep at most this many slices, evenly spaced over the tumour's extent
            (None = all, as the paper).
        name: sample name prefix (default: the image file name without ``.nii.gz``).
    """
    vol, zooms = load_volume(image_path)
    if seg_path is None:
        fg = None
        ks = tumour_slices(vol != 0, min_pixels)  # no ground truth: the slices with anatomy
    else:
        seg, _ = load_volume(seg_path)
        if vol.shape != seg.shape:
            raise DataError(f"volume {image_path} has shape {vol.shape} but its segmentation {seg_path} has {seg.shape}")
        fg = np.isin(seg, labels) if labels is not None else seg > 0
        ks = tumour_slices(fg, min_pixels)
    if max_slices is not None and len(ks) > max_slices:
        pick = np.linspace(0, len(ks) - 1, max_slices).round().astype(int)
        ks = [ks[i] for i in sorted(set(pick.tolist()))]
    norm = normalize_volume(vol)
    stem = name or Path(image_path).name.replace(".nii.gz", "").replace(".nii", "")
    for k in ks:
        yield SliceSample(
            name=f"{stem}_z{k:03d}",
            image=_axial(norm, k),
            mask=_axial(fg, k).astype(bool) if fg is not None else None,
            spacing=(zooms[1], zooms[0]),  # rows follow y, columns x after rot90
            source=str(image_path),
            index=k,
        )
