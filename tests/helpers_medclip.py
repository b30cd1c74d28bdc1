"""Shared helpers for the MedCLIP / CXR tests: offline construction of upstream ``medclip``
classes and synthetic chest X-ray files in the real on-disk formats."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch


@contextlib.contextmanager
def offline_upstream_medclip(monkeypatch, bert_kwargs: dict, swin_kwargs: dict, tokenizer):
    """Make ``medclip``'s hub loaders build from configs, and ``.cuda()`` a no-op.

    ``AutoModel.from_pretrained(BERT_TYPE, output_hidden_states=True)`` -> ``BertModel(BertConfig(...))``,
    ``AutoModel.from_pretrained(VIT_TYPE)`` -> ``SwinModel(SwinConfig(...))``,
    ``AutoTokenizer.from_pretrained(...)`` -> ``tokenizer``.
    """
    import medclip.modeling_medclip as mm
    from medclip import constants
    from transformers import BertConfig, BertModel, SwinConfig, SwinModel

    class _AutoModel:
        @staticmethod
        def from_pretrained(name, **kw):
            if name == constants.BERT_TYPE:
                return BertModel(BertConfig(**bert_kwargs, **kw))
            if name == constants.VIT_TYPE:
                return SwinModel(SwinConfig(**swin_kwargs, **kw))
            raise AssertionError(f"unexpected hub model {name}")

    class _AutoTokenizer:
        @staticmethod
        def from_pretrained(name, **kw):
            return tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(mm, "AutoModel", _AutoModel)
    monkeypatch.setattr(mm, "AutoTokenizer", _AutoTokenizer)
    # upstream moves every input to CUDA; on this CPU-only machine .cuda() must be the identity
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    yield mm


def chest_like(rng: np.random.Generator, size: int, *, nodule: float = 0.0, kind: str = "none") -> np.ndarray:
    """A synthetic [0, 1] grey 'radiograph': bright mediastinum, two dark lung fields, and an
    optional round (``kind="benign"``) or spiky (``"cancer"``) blob of contrast ``nodule``."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.75 - 0.35 * (np.exp(-((xx - 0.3) ** 2 / 0.02 + (yy - 0.5) ** 2 / 0.08))
                         + np.exp(-((xx - 0.7) ** 2 / 0.02 + (yy - 0.5) ** 2 / 0.08)))
    if kind != "none":
        cy, cx = rng.uniform(0.35, 0.65), rng.choice([0.3, 0.7]) + rng.uniform(-0.05, 0.05)
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        theta = np.arctan2(yy - cy, xx - cx)
        radius = 0.05 * (1 + (0.5 * np.abs(np.sin(7 * theta)) if kind == "cancer" else 0.0))
        img = img + nodule * (r < radius)
    img = img + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def write_dicom(path: Path, image01: np.ndarray, *, monochrome1: bool = False, window: tuple[float, float] | None = None,
                bits: int = 12, slope: float = 1.0, intercept: float = 0.0) -> Path:
    """Write a [0, 1] array as a single-frame uncompressed DICOM (Explicit VR Little Endian)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    top = (1 << bits) - 1
    stored = np.rint(np.clip(image01, 0, 1) * top)
    if monochrome1:
        stored = top - stored
    stored = stored.astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
