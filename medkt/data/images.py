"""Image -> model pixels: the default preprocessing shared by backends.

Kept dependency-light (PIL + numpy + torch; open_clip imported lazily); format-specific readers
(DICOM, NIfTI, JSRT raw) live in `medkt.data.readers` and return arrays this module accepts.

Model families with their own preprocessing (open_clip, ``CLIPImageProcessor``, MedCLIP, ViLT)
get their input from `upstream_input`, so their upstream transform runs on the same pixels
it would get from ``PIL.Image.open(path)``.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medkt.errors import DataError


def to_float_array(image: Any) -> np.ndarray:
    """Path / PIL / ndarray / tensor -> float32 array in [0, 1], shape ``(H, W)`` or ``(H, W, 3)``."""
    if isinstance(image, (str, Path)):
        # every file goes through the format-aware reader (PNG/JPEG 8/16-bit, RGBA checks,
        # DICOM windowing, NIfTI, JSRT raw), which returns [0, 1] float32
        from medkt.data.readers import read_image

        return to_float_array(read_image(Path(image)))
    elif isinstance(image, Image.Image):
        image = _pil_to_array(image)
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = np.transpose(image, (1, 2, 0))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise DataError(f"expected a 2-D image (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    else:
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:  # unknown range: min-max to [0, 1]
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return arr


def _pil_to_array(im: Image.Image) -> np.ndarray:
    """A PIL image in memory -> float32 [0, 1], by the same rules as an image file (one reader:
    palette / CMYK / YCbCr / LAB / HSV converted by PIL, transparency refused, 16-bit / 65535,
    32-bit int and float min-max)."""
    from medkt.data.readers import _model_mode, _scale_pil

    where = Path(getattr(im, "filename", "") or "<PIL image>")
    try:
        im = _model_mode(im)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    return _scale_pil(np.asarray(im), im.mode, where)


def to_model_pixels(image: Any, size: int, channels: int = 3, pad_to_square: bool = True) -> torch.Tensor:
    """Any image -> ``(channels, size, size)`` float tensor in [0, 1].

    Grey images are repeated to 3 channels for RGB models; RGB images are averaged for grey
    models. The image is zero-padded to a square (as MedCLIP does) and bicubic-resized.
    """
    arr = to_float_array(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
    if channels == 1 and t.shape[0] == 3:
        t = t.mean(0, keepdim=True)
    elif channels == 3 and t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if pad_to_square:
        h, w = t.shape[-2:]
        s = max(h, w)
        if h != w:
            top, left = (s - h) // 2, (s - w) // 2
            t = F.pad(t, (left, s - w - left, top, s - h - top))
    if t.shape[-1] != size:
        t = F.interpolate(t[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    return t.clamp(0, 1).contiguous()


#: a float pixel is 8-bit when ``x * 255`` is this close to an integer; 16-bit values that are not
#: multiples of 257 lie at least 1/257 = 0.0039 away, so the test cannot mistake them
_UINT8_TOL = 1e-3


def exact_uint8(arr: np.ndarray) -> np.ndarray | None:
    """``arr`` (float in [0, 1]) as uint8 when that is lossless (an 8-bit source), else None."""
    scaled = np.asarray(arr, dtype=np.float64) * 255.0
    rounded = np.rint(scaled)
    if scaled.size and float(np.abs(scaled - rounded).max()) > _UINT8_TOL:
        return None
    return rounded.clip(0, 255).astype(np.uint8)


def upstream_input(image: Any, grey: bool = False) -> Image.Image | np.ndarray:
    """Any image -> the input a model family's own (PIL-based) preprocessing takes.

    A PIL image (mode ``"L"`` for grey, ``"RGB"``) when the pixels are exactly 8-bit (8-bit
    PNG/JPEG...): upstream transforms then run bit-exactly as on ``Image.open(path)``. Otherwise
    (16-bit PNG, DICOM, NIfTI, float arrays) the float32 ``(H, W)`` / ``(H, W, 3)`` array in [0, 1]
    from `to_float_array`: PIL would clip or truncate such images, so they are resampled in
    float instead (upstream transforms that accept tensors/arrays do so without quantising).

    Args:
        grey: convert RGB to one grey channel with PIL's ``"L"`` weights (ITU-R 601-2 luma).
    """
    as8 = None
    if isinstance(image, (str, Path)):
        from medkt.data.readers import read_image

        # an 8-bit grey/RGB file comes back as stored: no float round trip (~2 ms per 512-px
        # image, as much as decoding it); the same uint8 pixels exact_uint8 would recover
        image = read_image(Path(image), keep_uint8=True)
        if image.dtype == np.uint8:
            as8 = image
    if as8 is None:
        arr = to_float_array(image)
        as8 = exact_uint8(arr)
    if as8 is not None:
        im = Image.fromarray(as8)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
        return im.convert("L") if grey and im.mode != "L" else im
    if grey and arr.ndim == 3:  # PIL's "L" conversion weights, in float
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    return np.ascontiguousarray(arr, dtype=np.float32)


def open_clip_pixels(image: Any, preprocess_cfg: dict[str, Any]) -> torch.Tensor:
    """open_clip's own eval transform, built from a model's ``visual.preprocess_cfg`` (size,
    interpolation, resize mode, fill), with mean 0 / std 1 -> ``(3, S, S)`` in [0, 1].

    ``backend.normalize(open_clip_pixels(x, cfg)[None])`` equals open_clip's
    ``preprocess(Image.open(x))`` (bit-exactly for 8-bit images). Images that are not 8-bit go
    through the same transform as a float tensor (torchvision's antialiased resize), clamped to [0, 1].
    """
    transform = _open_clip_transform(_freeze(preprocess_cfg))
    src = upstream_input(image)
    if isinstance(src, Image.Image):  # ToTensor of 8-bit pixels is k / 255: already in [0, 1]
        return transform(src).contiguous()
    t = torch.from_numpy(src)
    src = (t[None].expand(3, -1, -1) if t.dim() == 2 else t.permute(2, 0, 1)).contiguous()
    return transform(src).clamp(0, 1).contiguous()  # bicubic resampling of floats overshoots


def _freeze(value: Any) -> Any:
    """A hashable copy of a preprocess config (dicts and lists as tuples), for the transform cache."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@functools.lru_cache(maxsize=16)
def _open_clip_transform(frozen_cfg: tuple) -> Any:
    """open_clip's eval transform for one preprocess config, built once (not once per image)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    from torchvision.transforms import Compose, Normalize

    cfg = merge_preprocess_dict({}, dict(frozen_cfg))
    cfg.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # normalisation happens in Backend.normalize
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    # (x - 0) / 1 is x exactly: drop the identity Normalize (two passes over every image for nothing)
    return Compose([t for t in transform.transforms if not isinstance(t, Normalize)])
