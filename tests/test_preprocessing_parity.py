"""Each backend's ``load_image`` against its model family's own preprocessing.

medkt's convention: ``load_image`` returns [0, 1] pixels and normalisation happens inside
``encode_pixels``, so parity means ``backend.normalize(load_image(x)[None])[0]`` equals the
upstream transform's output (``open_clip``'s preprocess, ``CLIPImageProcessor``, MedCLIP's
feature extractor steps, ``ViltImageProcessor``).

Images are PNG files written with PIL: RGB 100x200 and 300x120 (non-square both ways), 8-bit
grey and 16-bit grey. Random pixels, so any difference in geometry or filter shows.

Tolerances (on normalised values, i.e. in units of the model input):
* 8-bit images: ``ATOL_EXACT = 1e-5`` - the same PIL operations on the same bytes; what is left
  is float rounding of ``x/255`` vs ``x*(1/255)`` and of the mean/std division (~1e-7).
* 16-bit grey: upstream PIL paths cannot read it (``convert("RGB")``/``"L"`` clip I;16 to 255),
  so the reference is the upstream transform given the float image (open_clip's transform takes
  tensors, the HF processors float arrays) -> also ``ATOL_EXACT``. For MedCLIP the reference is
  upstream on the 8-bit rendering while medkt keeps 16-bit precision -> ``ATOL_MEDCLIP_16 =
  1.5/255/std`` (8-bit quantisation, 0.5/255, amplified by bicubic overshoot and PIL's rounding).

The previous behaviour (zero-pad to a square for ``clip``/``hf_clip``, torch bicubic without
antialiasing for ViLT, float-only resampling for MedCLIP) is off by far more than these (black
bars: ~1.5-2 in normalised units; aliasing: ~0.5; MedCLIP: ~2e-2).
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from medkt.backends import create_backend

ATOL_EXACT = 1e-5
MEDCLIP_STD = 0.27950088968644304
ATOL_MEDCLIP_16 = 1.5 / 255 / MEDCLIP_STD

KINDS = ["rgb_100x200", "rgb_300x120", "grey8_100x200", "grey16_300x120"]


def _write(tmp_path, kind: str):
    """Write a random PNG of ``kind``; return (path, float array in [0, 1] of what it holds)."""
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    name, size = kind.split("_")
    h, w = (int(v) for v in size.split("x"))
    path = tmp_path / f"{kind}.png"
    if name == "rgb":
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)
        return path, arr.astype(np.float32) / 255
    if name == "grey8":
        arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
        Image.fromarray(arr).save(path)
        return path, arr.astype(np.float32) / 255
    arr = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    Image.fromarray(arr).save(path)  # mode I;16
    assert np.array_equal(np.asarray(Image.open(path)), arr)
    return path, arr.astype(np.float32) / 65535


def _rgb_float(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr[..., None].repeat(3, -1) if arr.ndim == 2 else arr, dtype=np.float32)


def _check(ours: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    assert tuple(ours.shape) == tuple(ref.shape), (tuple(ours.shape), tuple(ref.shape))
    diff = float((ours.float() - ref.float()).abs().max())
    assert diff <= atol, f"max |difference| {diff:.3g} > {atol:.3g}"


# -- open_clip (clip, coca) ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec,arch", [("clip:medkt-tiny-ViT@random", "medkt-tiny-ViT"), ("coca:tiny@random", "coca_tiny")])
def test_open_clip_family_matches_open_clip_preprocess(tmp_path, kind, spec, arch):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    torch.manual_seed(0)
    backend = create_backend(spec)
    # open_clip's own eval transform from the model's preprocess config (what
    # create_model_and_transforms returns as `preprocess`)
    preprocess = image_transform_v2(PreprocessCfg(**backend.model.visual.preprocess_cfg), is_train=False)
    path, arr = _write(tmp_path, kind)
    ours = backend.normalize(backend.load_image(path)[None])[0]
    if kind.startswith("grey16"):  # PIL would clip I;16 to 8 bits: give the transform the float image
        x = torch.from_numpy(_rgb_float(arr)).permute(2, 0, 1)
        ref = preprocess(x.contiguous())
        lo = backend.normalize(torch.zeros(1, 3, 1, 1))[0]
        hi = backend.normalize(torch.ones(1, 3, 1, 1))[0]
        ref = torch.maximum(torch.minimum(ref, hi), lo)  # medkt keeps pixels in [0, 1]
    else:
        ref = preprocess(Image.open(path))
    _check(ours, ref, ATOL_EXACT)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_open_clip_pixels_follows_every_preprocess_cfg(tmp_path, resize_mode, interpolation):
    """Tags carry their own interpolation / resize mode (e.g. squash for some SigLIP tags)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from medkt.data.images import open_clip_pixels

    cfg = dict(size=48, resize_mode=resize_mode, interpolation=interpolation, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    path, _ = _write(tmp_path, "rgb_100x200")
    ref = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(Image.open(path))
    x = open_clip_pixels(path, cfg)
    ours = (x - torch.tensor(cfg["mean"]).view(3, 1, 1)) / torch.tensor(cfg["std"]).view(3, 1, 1)
    _check(ours, ref, ATOL_EXACT)


# -- Hugging Face CLIP -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_hf_clip_matches_clip_image_processor(tmp_path, kind):
    from transformers import CLIPImageProcessor

    backend = create_backend("hf_clip:tiny@random")
    s = backend.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    path, arr = _write(tmp_path, kind)
    ours = backend.normalize(backend.load_image(path)[None])[0]
    if kind.startswith("grey16"):
        ref = processor(images=_rgb_float(arr), do_rescale=False, input_data_format="channels_last",
                        return_tensors="pt")["pixel_values"][0]
    else:
        ref = processor(images=Image.open(path), return_tensors="pt")["pixel_values"][0]
    _check(ours, ref, ATOL_EXACT)


# -- MedCLIP ---------------------------------------------------------------------------------------
def _medclip_upstream(image: Image.Image, size: int) -> torch.Tensor:
    """medclip 0.0.3's ``MedCLIPFeatureExtractor`` steps: its own ``pad_img`` and constants; the
    resize / crop / normalise of the transformers feature-extractor API it was written for (its
    ``__call__`` fails on transformers 4.5x): PIL bicubic to (size, size), x/255, (x-mean)/std."""
    try:
        from medclip import constants
        from medclip.dataset import MedCLIPFeatureExtractor
    except ImportError as exc:
        if os.environ.get("MEDKT_REQUIRE_MEDCLIP"):
            raise
        pytest.skip(f"upstream medclip not importable: {exc}")
    padded = MedCLIPFeatureExtractor.pad_img(None, image, min_size=size)  # uses no state of self
    resized = padded.resize((size, size), Image.BICUBIC)
    x = np.asarray(resized).astype(np.float32) * (1 / 255.0)
    return torch.from_numpy((x - constants.IMG_MEAN) / constants.IMG_STD)[None].float()


@pytest.mark.parametrize("kind", KINDS)
def test_medclip_matches_upstream_feature_extractor(tmp_path, kind):
    backend = create_backend("medclip:tiny@random")
    s = backend.image_size
    path, arr = _write(tmp_path, kind)
    x = backend.load_image(path)
    assert x.shape == (1, s, s)
    ours = backend.normalize(x[None])[0, :1]  # normalize repeats grey to 3 identical channels
    if kind.startswith("grey16"):  # upstream can only take the 8-bit rendering
        ref = _medclip_upstream(Image.fromarray(np.rint(arr * 255).astype(np.uint8)), s)
        _check(ours, ref, ATOL_MEDCLIP_16)
    else:  # MedCLIP's datasets open the file and pad into an "L" canvas (RGB converted by paste)
        ref = _medclip_upstream(Image.open(path), s)
        _check(ours, ref, ATOL_EXACT)


# -- ViLT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_vilt_native_matches_vilt_image_processor(tmp_path, kind):
    from transformers import ViltImageProcessor

    backend = create_backend("vilt:tiny@random")
    processor = ViltImageProcessor(size={"shortest_edge": backend.image_size}, size_divisor=backend.patch_size)
    path, arr = _write(tmp_path, kind)
    ours = backend.normalize(backend.load_image_native(path)[None])[0]
    if kind.startswith("grey16"):
        ref = processor(images=_rgb_float(arr), do_rescale=False, do_pad=False, input_data_format="channels_last",
                        return_tensors="pt")["pixel_values"][0]
    else:
        ref = processor(images=Image.open(path).convert("RGB"), do_pad=False, return_tensors="pt")["pixel_values"][0]
    _check(ours, ref, ATOL_EXACT)


@pytest.mark.parametrize("kind", ["rgb_100x200", "rgb_300x120", "grey8_100x200"])
def test_vilt_square_is_short_side_resize_and_centre_crop(tmp_path, kind):
    """The one intended difference to the processor: a square for batched inversion/fine-tuning,
    with the processor's PIL bicubic filter (torchvision Resize + CenterCrop on the PIL image)."""
    from torchvision import transforms as T

    backend = create_backend("vilt:tiny@random")
    s = backend.image_size
    path, _ = _write(tmp_path, kind)
    pil = Image.open(path).convert("RGB")
    ref = T.ToTensor()(T.CenterCrop(s)(T.Resize(s, interpolation=T.InterpolationMode.BICUBIC)(pil)))
    _check(backend.load_image(path), ref, ATOL_EXACT)


def test_upstream_input_keeps_16_bit_precision(tmp_path):
    """8-bit pixels go to upstream as PIL images (bit-exact path); 16-bit ones stay float."""
    from medkt.data.images import upstream_input

    p8, a8 = _write(tmp_path, "grey8_100x200")
    p16, a16 = _write(tmp_path, "grey16_300x120")
    im = upstream_input(p8)
    assert isinstance(im, Image.Image) and im.mode == "L"
    assert np.array_equal(np.asarray(im), np.rint(a8 * 255).astype(np.uint8))
    f = upstream_input(p16)
    assert isinstance(f, np.ndarray) and f.dtype == np.float32
    np.testing.assert_allclose(f, a16, atol=1e-7)
