"""Test helpers of the segmentation area: tiny backends, a toy encoder with a known answer,
tiny SAM checkpoints and synthetic images/volumes written in real formats."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.common import blob_image, write_mask_png, write_png  # noqa: F401  (shared with benchmarks.gpu_smoke)
from medkt.backends.base import Backend, VisionSplitProvider


class _HashTokenizer:
    """Words -> ids by a stable hash (no vocabulary files needed)."""

    def __init__(self, vocab: int = 101, length: int = 12):
        self.vocab, self.length = vocab, length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        import zlib

        out = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1 + zlib.crc32(w.encode()) % (self.vocab - 1) for w in t.lower().split()][: self.length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class _MedCLIPLikeVision(nn.Module):
    """Same module names as MedCLIP's ``MedCLIPVisionModelViT``: ``model`` (Swin) + ``projection_head``."""

    def __init__(self, swin: nn.Module, dim: int):
        super().__init__()
        self.model = swin
        self.projection_head = nn.Linear(swin.num_features, dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.model(pixel_values=pixel_values).pooler_output)


class TinySwinBackend(Backend):
    """A MedCLIP-shaped backend: HF ``SwinModel`` (tiny config) + projection, bag-of-words text."""

    family = "test_swin"
    image_channels = 1
    mean = (0.5862785803043838,) * 3
    std = (0.27950088968644304,) * 3

    def __init__(self, seed: int = 0, image_size: int = 64, dim: int = 16):
        super().__init__()
        from transformers import SwinConfig, SwinModel

        torch.manual_seed(seed)
        cfg = SwinConfig(image_size=image_size, patch_size=4, num_channels=3, embed_dim=8, depths=[1, 2, 2, 1],
                         num_heads=[1, 1, 2, 2], window_size=2, mlp_ratio=2.0)
        self.image_size = image_size
        self.vision_model = _MedCLIPLikeVision(SwinModel(cfg), dim)
        self.text_embed = nn.EmbeddingBag(101, dim, mode="mean")
        self._tok = _HashTokenizer()
        self.spec = "test_swin:tiny@random"
        self.eval()  # Swin's default drop_path_rate 0.1 is active in train mode

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)

    def tokenize(self, texts):
        return self._tok(texts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_embed(tokens, per_sample_weights=None) if tokens.ndim == 1 else self.text_embed(tokens)

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        return self.vision_model.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        return self.text_embed.parameters()


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PlantedToyBackend(Backend, VisionSplitProvider):
    """A toy CLIP whose answer is known.

    Image: 8x8 patches of a 32x32 grey image -> 16 tokens of width 16; a patch brighter than 0.5
    becomes ``l`` (the "lesion" direction: ones on channels 0-7), any other patch ``b`` (ones on
    channels 8-15) — every token has the same norm, so the KL does not favour bright tokens by
    itself. Embedding = mean of the tokens. Text: every prompt embeds to ``l``. Removing background tokens raises the cosine, removing
    lesion tokens lowers it, so M2IB must keep (high KL) exactly the planted patches.
    """

    family = "toy"
    image_channels = 1
    image_size = 32
    mean = (0.0,)
    std = (1.0,)
    model_channels = 1

    def __init__(self):
        super().__init__()
        self.block = _Identity()  # the bottlenecked "layer"
        self.dummy = nn.Parameter(torch.zeros(1))  # M2IB reads the device from the parameters
        self.spec = "toy:planted"

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.nn.functional.avg_pool2d(x[:, :1], 8).flatten(1)  # (B, 16)
        lesion = (p > 0.5).float()[..., None]
        return torch.cat([lesion.expand(-1, -1, 8), (1 - lesion).expand(-1, -1, 8)], -1) + 0 * self.dummy

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.block(self._embed(pixel_values)).mean(1)

    def tokenize(self, texts):
        return torch.zeros(len(texts), 1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[1.0] * 8 + [0.0] * 8]).expand(len(tokens), -1) + 0 * self.dummy

    def visual_parameters(self):
        return iter([self.dummy])

    def text_parameters(self):
        return iter([])

    def vision_split(self, layer):
        from medkt.backends.vision_split import VisionSplit

        return VisionSplit(prefix=lambda x: self.block(self._embed(x)), suffix=lambda t: t.mean(1), grid=(4, 4),
                           n_extra_tokens=0, hook_module=self.block, layer=0, num_layers=1, description="toy")


def save_tiny_sam(path: Path, seed: int = 0) -> Path:
    from medkt.segmentation.sam import build_tiny_sam

    torch.save(build_tiny_sam(seed=seed).state_dict(), path)
    return path


def write_dicom(path: Path, arr: np.ndarray, spacing: tuple[float, float] = (0.7, 0.7)) -> Path:
    """A minimal valid CT-like DICOM file (16-bit, MONOCHROME2) via pydicom."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "SYNTH"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [str(spacing[0]), str(spacing[1])]
    ds.PixelData = (np.clip(arr, 0, 1) * 4000).astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_nifti(path: Path, vol: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, np.diag([*spacing, 1.0])), str(path))
    return path


def brats_case(root: Path, case: str, rng: np.random.Generator, shape=(40, 40, 12)) -> tuple[Path, Path]:
    """A BraTS-2023-style case folder: 4 modalities + seg (labels 1/2/3 inside a sphere on some slices)."""
    x, y, z = shape
    xx, yy, zz = np.mgrid[:x, :y, :z]
    tumour = (xx - 22) ** 2 + (yy - 18) ** 2 + ((zz - 6) * 3) ** 2 <= 49
    seg = np.zeros(shape, np.uint8)
    seg[tumour] = 2
    seg[tumour & ((xx - 22) ** 2 + (yy - 18) ** 2 <= 9)] = 1
    folder = root / case
    for mod in ("t1n", "t1c", "t2w", "t2f"):
        vol = 300 + 40 * rng.standard_normal(shape)
        vol[tumour] += 500
        write_nifti(folder / f"{case}-{mod}.nii.gz", vol.astype(np.float32))
    write_nifti(folder / f"{case}-seg.nii.gz", seg)
    return folder / f"{case}-t2f.nii.gz", folder / f"{case}-seg.nii.gz"


def tiny_release_sam(model_type: str, width: int = 32, img_size: int = 128, seed: int = 0):
    """A SAM with the block count and global-attention blocks of the ``model_type`` release
    (vit_b 12, vit_l 24, vit_h 32 blocks) at a tiny width, built from segment-anything's classes
    (16-pixel patches, 4-token windows on an 8x8 grid, so windowed and global blocks differ)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    depth, global_idx = {"vit_b": (12, (2, 5, 8, 11)), "vit_l": (24, (5, 11, 17, 23)),
                         "vit_h": (32, (7, 15, 23, 31))}[model_type]
    torch.manual_seed(seed)
    grid = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=width, depth=depth, num_heads=2,
                                      mlp_ratio=2.0, out_chans=16, qkv_bias=True,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=4,
                                      global_attn_indexes=global_idx),
        prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=8),
        # 8 decoder heads as in every SAM release (the heads are not visible in the weights' shapes)
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=16, mlp_dim=32, num_heads=8),
                                 transformer_dim=16, iou_head_depth=2, iou_head_hidden_dim=16),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def save_release_like_sam(path: Path, model_type: str, **kw) -> Path:
    """:func:`tiny_release_sam` saved as the official files are: a bare state dict, ``torch.save``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_release_sam(model_type, **kw).state_dict(), path)
    return path
