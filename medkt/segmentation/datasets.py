"""Manifest preparers of the segmentation datasets (``medkt data prepare NAME --root DIR``).

Each preparer walks a downloaded dataset folder, pairs every image with its mask and returns
manifest rows (``path``, ``label``, ``mask``, ``split``) relative to ``root``. Pairing is by name
with a hard error when a mask has no image (upstream MedCLIP-SAMv2 zips two unsorted listdirs).
See ``data_manifests/<name>.md`` for how to obtain each dataset and the layouts accepted.
"""
from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np

from medkt.data.manifest import ManifestRow
from medkt.data.prepare import register_preparer
from medkt.errors import DataError

log = logging.getLogger("medkt")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
MASK_WORDS = {"mask", "masks", "gt", "label", "labels", "seg", "segmentation", "groundtruth", "ground_truth"}
IMAGE_WORDS = {"image", "images", "img", "imgs", "original", "originals", "ct", "dicom", "png_images"}


def _rel(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def _find_dir(root: Path, names: set[str]) -> Path | None:
    """First folder under ``root`` (breadth-first, sorted) whose lower-case name is in ``names``."""
    for p in sorted(root.rglob("*"), key=lambda q: (len(q.parts), str(q))):
        if p.is_dir() and p.name.lower() in names:
            return p
    return None


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _strip_mask_tokens(stem: str) -> str:
    return re.sub(r"([_\-. ]?(mask|gt|seg|label))+$", "", stem, flags=re.IGNORECASE)


def pair_image_mask_dirs(images: Path, masks: Path, root: Path) -> list[tuple[Path, Path]]:
    """Pair files of two folders by relative path without suffix (mask suffixes like ``_mask`` ignored).

    A mask without image is an error; images without mask are reported and skipped.
    """
    def key(p: Path, base: Path, is_mask: bool) -> str:
        rel = p.relative_to(base).with_suffix("")
        stem = _strip_mask_tokens(rel.name) if is_mask else rel.name
        return (rel.parent / stem).as_posix().lower()

    im = {key(p, images, False): p for p in _files(images)}
    ma = {key(p, masks, True): p for p in _files(masks)}
    orphans = sorted(set(ma) - set(im))
    if orphans:
        raise DataError(f"{len(orphans)} mask(s) in {masks} have no image in {images} (e.g. {orphans[0]!r}); "
                        "check the download is complete")
    missing = sorted(set(im) - set(ma))
    if missing:
        log.warning("%d image(s) in %s have no mask and are skipped (e.g. %s)", len(missing), images, missing[0])
    return [(im[k], ma[k]) for k in sorted(ma)]


def _mask_nonempty(path: Path) -> bool:
    from medkt.segmentation.pipeline import read_mask_any

    return bool(read_mask_any(path).any())


# -- UDIAT (breast ultrasound, Dataset B) -----------------------------------------------------------


@register_preparer("udiat")
def prepare_udiat(root: Path) -> list[ManifestRow]:
    """UDIAT breast ultrasound Dataset B (163 images): original/ + GT/ PNGs -> lesion masks."""
    images = _find_dir(root, {"original", "originals", "images"})
    masks = _find_dir(root, {"gt", "masks", "mask", "groundtruth"})
    if images is None or masks is None:
        raise DataError(f"no original/ and GT/ folders under {root}; see data_manifests/udiat.md")
    return [ManifestRow(_rel(i, root), "breast lesion", _rel(m, root), "test")
            for i, m in pair_image_mask_dirs(images, masks, root)]


# -- BraTS 2023 glioma (NIfTI volumes) --------------------------------------------------------------

BRATS_MODALITIES = ("t2f", "t1c", "t1n", "t2w")
_LEGACY = {"t2f": "flair", "t1c": "t1ce", "t1n": "t1", "t2w": "t2"}  # BraTS 2020/2021 file names


@register_preparer("brats2023_glioma")
def prepare_brats(root: Path, modality: str = "t2f") -> list[ManifestRow]:
    """BraTS 2023 adult glioma: one row per case, image = one MRI modality volume (default FLAIR, t2f), mask = seg volume."""
    if modality not in BRATS_MODALITIES:
        raise DataError(f"unknown BraTS modality {modality!r}; one of {BRATS_MODALITIES}")
    rows = []
    segs = sorted(p for p in root.rglob("*") if p.is_file() and re.search(r"[-_]seg\.nii(\.gz)?$", p.name))
    for seg in segs:
        stem = re.sub(r"[-_]seg\.nii(\.gz)?$", "", seg.name)
        cands = [seg.parent / f"{stem}-{modality}.nii.gz", seg.parent / f"{stem}_{_LEGACY[modality]}.nii.gz",
                 seg.parent / f"{stem}-{modality}.nii", seg.parent / f"{stem}_{_LEGACY[modality]}.nii"]
        img = next((c for c in cands if c.is_file()), None)
        if img is None:
            raise DataError(f"case {stem}: segmentation {seg.name} has no {modality} volume next to it")
        rows.append(ManifestRow(_rel(img, root), "glioma", _rel(seg, root), "test"))
    if not rows:
        raise DataError(f"no BraTS '*-seg.nii.gz' files under {root}; see data_manifests/brats2023_glioma.md")
    return rows


# -- UnitoChest (lung nodules, CT slices) ------------------------------------------------------------


def _split_tree(root: Path) -> tuple[list[Path], list[Path]]:
    images, masks = [], []
    for p in _files(root):
        parts = {q.lower() for q in p.relative_to(root).parts[:-1]}
        is_mask = bool(parts & MASK_WORDS) or _strip_mask_tokens(p.stem) != p.stem
        (masks if is_mask else images).append(p)
    return images, masks


@register_preparer("unitochest")
def prepare_unitochest(root: Path, nonempty_only: bool = True) -> list[ManifestRow]:
    """UnitoChest CT lung nodules: 2-D slices (DICOM or PNG) + nodule masks, paired per patient by slice name."""
    images, masks = _split_tree(root)

    def key(p: Path, is_mask: bool) -> str:
        parts = [q for q in p.relative_to(root).parts[:-1] if q.lower() not in MASK_WORDS | IMAGE_WORDS]
        stem = _strip_mask_tokens(p.stem) if is_mask else p.stem
        return "/".join([*parts, stem]).lower()

    im = {key(p, False): p for p in images}
    rows = []
    for m in masks:
        k = key(m, True)
        if k not in im:
            raise DataError(f"mask {_rel(m, root)} has no CT slice with the same patient/slice name; "
                            "see data_manifests/unitochest.md")
        if nonempty_only and not _mask_nonempty(m):
            continue
        rows.append(ManifestRow(_rel(im[k], root), "lung nodule", _rel(m, root), "test"))
    if not rows:
        raise DataError(f"no (CT slice, nodule mask) pairs under {root}; see data_manifests/unitochest.md")
    return rows


# -- SIIM-ACR pneumothorax (chest X-ray) --------------------------------------------------------------


def rle_decode_siim(rle: str, height: int, width: int) -> np.ndarray:
    """SIIM-ACR run-length encoding (relative starts, column-major pixel order) -> bool ``(H, W)``."""
    mask = np.zeros(height * width, dtype=bool)
    vals = [int(v) for v in rle.split()]
    if len(vals) % 2:
        raise DataError(f"bad SIIM RLE string (odd number of values): {rle[:40]}...")
    pos = 0
    for start, length in zip(vals[0::2], vals[1::2]):
        pos += start
        mask[pos : pos + length] = True
        pos += length
    return mask.reshape(width, height).T


def rle_encode_siim(mask: np.ndarray) -> str:
    """Inverse of `rle_decode_siim` (used by tests and to write masks back)."""
    flat = np.asarray(mask, bool).T.ravel()
    out, pos, i = [], 0, 0
    while i < len(flat):
        if flat[i]:
            j = i
            while j < len(flat) and flat[j]:
                j += 1
            out += [i - pos, j - i]
            pos = j
            i = j
        else:
            i += 1
    return " ".join(map(str, out)) if out else "-1"


@register_preparer("siim_pneumothorax")
def prepare_siim(root: Path, positives_only: bool = False) -> list[ManifestRow]:
    """SIIM-ACR pneumothorax: DICOMs + train-rle.csv (masks decoded to medkt_masks/*.png), or png_images/ + png_masks/."""
    from PIL import Image

    rle_csv = next((p for p in sorted(root.rglob("*.csv")) if "rle" in p.name.lower()), None)
    rows: list[ManifestRow] = []
    if rle_csv is not None:
        import pydicom

        dicoms = {p.stem: p for p in sorted(root.rglob("*.dcm"))}
        encodings: dict[str, list[str]] = {}
        with rle_csv.open(newline="") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader)]
            if header[:2] != ["ImageId", "EncodedPixels"]:
                raise DataError(f"{rle_csv}: expected columns ImageId,EncodedPixels, got {header}")
            for rec in reader:
                if rec:
                    encodings.setdefault(rec[0].strip(), []).append(rec[1].strip())
        out_dir = root / "medkt_masks"
        out_dir.mkdir(exist_ok=True)
        for image_id, encs in sorted(encodings.items()):
            if image_id not in dicoms:
                raise DataError(f"{rle_csv.name}: ImageId {image_id} has no DICOM file under {root}")
            ds = pydicom.dcmread(str(dicoms[image_id]), stop_before_pixels=True)
            h, w = int(ds.Rows), int(ds.Columns)
            mask = np.zeros((h, w), bool)
            for e in encs:
                if e != "-1":
                    mask |= rle_decode_siim(e, h, w)
            if positives_only and not mask.any():
                continue
            mpath = out_dir / f"{image_id}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(mpath)
            rows.append(ManifestRow(_rel(dicoms[image_id], root), "pneumothorax" if mask.any() else "no pneumothorax",
                                    _rel(mpath, root), "test"))
        return rows
    images = _find_dir(root, {"png_images", "images"})
    masks = _find_dir(root, {"png_masks", "masks"})
    if images is None or masks is None:
        raise DataError(f"no train-rle.csv (+ DICOMs) and no png_images/ + png_masks/ under {root}; "
                        "see data_manifests/siim_pneumothorax.md")
    for i, m in pair_image_mask_dirs(images, masks, root):
        pos = _mask_nonempty(m)
        if positives_only and not pos:
            continue
        rows.append(ManifestRow(_rel(i, root), "pneumothorax" if pos else "no pneumothorax", _rel(m, root), "test"))
    return rows
