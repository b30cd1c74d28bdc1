"""Export phantoms to disk as PNG or DICOM images with PNG masks and a medkt manifest.

Layout under ``root``:

    images/<finding_slug>/<finding_slug>_00000.png|.dcm
    masks/<finding_slug>/<finding_slug>_00000.png      (0/255 uint8; empty for global findings)
    manifest.csv                                       (path,label,mask,split,sha256)

so the phantom world exercises the real data path (readers, manifests, segmentation metrics).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from medkt.errors import ConfigError, OutputExistsError
from medkt.phantom.world import make_phantom

FORMATS = ("png", "dicom")


def slug(name: str) -> str:
    """A finding name as a folder/file name: ``"pleural effusion"`` -> ``"pleural_effusion"``."""
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_png(image: np.ndarray, path: Path, bits: int = 8) -> None:
    """``(H, W)`` [0, 1] float -> 8- or 16-bit grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        Image.fromarray((np.clip(image, 0, 1) * 65535 + 0.5).astype(np.uint16)).save(path)
    else:
        Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)


def write_dicom(image: np.ndarray, path: Path, *, patient_id: str, finding: str, seed: int, index: int) -> None:
    """``(H, W)`` [0, 1] float -> a 12-bit MONOCHROME2 DX DICOM file (pydicom), deterministic UIDs."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"medkt-phantom-{seed}-{finding}-{index}"
    sop_uid = generate_uid(entropy_srcs=[key, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[key, "series"])
    ds.PatientID = patient_id
    ds.PatientName = "Phantom^" + patient_id
    ds.Modality = "DX"
    ds.StudyDate = "20260101"
    ds.ContentDate = "20260101"
    ds.StudyDescription = "medkt phantom chest x-ray"
    ds.ImageComments = f"finding={finding}; seed={seed}; index={index}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{350.0 / image.shape[0]:.4f}", f"{350.0 / image.shape[1]:.4f}"]  # ~35 cm chest
    # LINEAR_EXACT maps stored value v to v / 4095 exactly: the [0, 1] image round-trips
    ds.WindowCenter = "2047.5"
    ds.WindowWidth = "4095"
    ds.VOILUTFunction = "LINEAR_EXACT"
    ds.PixelData = (np.clip(image, 0, 1) * 4095 + 0.5).astype(np.uint16).tobytes()
    if int(pydicom.__version__.split(".")[0]) < 3:  # pydicom 3 takes these from the transfer syntax
        ds.is_little_endian = True
        ds.is_implicit_VR = False
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.save_as(path, write_like_original=False)


def export_dataset(
    root: str | Path,
    findings: Sequence[str],
    n_per_class: int,
    seed: int,
    *,
    size: int = 64,
    fmt: str = "png",
    split: str | None = None,
    overwrite: bool = False,
    with_sha256: bool = True,
) -> Path:
    """Write ``n_per_class`` phantoms of each finding under ``root``; returns the manifest path.

    ``fmt`` is ``png`` (8-bit) or ``dicom`` (12-bit DX). Masks are always PNG. Manifest paths are
    relative to ``root``.
    """
    from medkt.data.manifest import ManifestRow, write_manifest

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    root = Path(root)
    manifest = root / "manifest.csv"
    if manifest.exists() and not overwrite:
        raise OutputExistsError(f"{manifest} exists; pass overwrite=True (or --overwrite) to replace it")
    rows = []
    for f in findings:
        s = slug(f)
        for i in range(n_per_class):
            p = make_phantom(f, seed, i, size)
            name = f"{s}_{i:05d}"
            rel_img = Path("images") / s / (name + (".png" if fmt == "png" else ".dcm"))
            if fmt == "png":
                write_png(p.image, root / rel_img)
            else:
                write_dicom(p.image, root / rel_img, patient_id=f"P{seed}-{s}-{i:05d}", finding=f, seed=seed, index=i)
            rel_mask = Path("masks") / s / (name + ".png")
            write_png(p.mask.astype(np.float32), root / rel_mask)
            rows.append(ManifestRow(rel_img.as_posix(), f, rel_mask.as_posix(), split,
                                    _sha256(root / rel_img) if with_sha256 else None))
    write_manifest(rows, manifest)
    return manifest
