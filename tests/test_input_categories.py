"""Input and environment categories (issue 18, item 11): each case a user can hand medkt either
gives the right numbers or a one-line error; none gives a wrong number or a traceback.

* every Pillow colour mode reads as PIL's own conversion of the same image (what upstream
  preprocessing does with ``.convert("RGB")``);
* duplicates in manifests and class files are refused, never silently counted;
* a read-only or full output disk is one line and exit 2, with earlier files intact;
* a run folder is locked while a process works in it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medkt.data.images import to_float_array, to_model_pixels
from medkt.data.readers import read_image
from medkt.errors import DataError

# -- colour modes ------------------------------------------------------------------------------
_RGB = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8), "RGB")


def _mode_image(mode: str) -> Image.Image:
    """A small image in ``mode`` made from the same random RGB picture (16/32-bit and float
    images from random values: no RGB conversion gives them)."""
    rng = np.random.default_rng(1)
    if mode == "PA":
        return _RGB.convert("P").convert("PA")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (7, 5)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5, 100_000, (7, 5)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(size=(7, 5)).astype(np.float32))
    return _RGB.convert(mode)


def _reference(im: Image.Image) -> np.ndarray:
    """What the model should get: PIL's own RGB (or grey) conversion, / 255; 16-bit / 65535;
    32-bit int and float (no fixed range) min-max scaled."""
    if im.mode.startswith("I;16"):
        return np.asarray(im, dtype=np.float64) / 65535
    if im.mode in ("I", "F"):
        x = np.asarray(im, dtype=np.float64)
        return (x - x.min()) / (x.max() - x.min())
    if im.mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        im = im.convert("LA")
    rgb = np.asarray(im.convert("RGB"), dtype=np.float64) / 255
    return rgb[..., 0] if im.mode in ("1", "L", "LA") else rgb


# (mode, file format): each mode in a format Pillow can write it to (None: in memory only)
MODES = [("1", "png"), ("L", "png"), ("P", "png"), ("P", "bmp"), ("LA", "png"), ("PA", "tiff"), ("RGB", "png"),
         ("RGB", "jpeg"), ("RGBA", "png"), ("CMYK", "tiff"), ("CMYK", "jpeg"), ("YCbCr", "tiff"), ("LAB", "tiff"),
         ("HSV", None), ("RGBX", None), ("RGBa", None), ("La", None), ("I", "tiff"), ("I;16", "png"),
         ("I;16", "tiff"), ("F", "tiff")]


@pytest.mark.parametrize("mode,fmt", MODES, ids=[f"{m}-{f or 'memory'}" for m, f in MODES])
def test_colour_mode_reads_as_pil_conversion(tmp_path, mode, fmt):
    im = _mode_image(mode)
    if fmt is None:
        got, back = to_float_array(im), im
    else:
        path = tmp_path / f"image.{fmt}"
        im.save(path)
        back = Image.open(path)
        assert back.mode == mode  # the file really holds the mode under test
        got = read_image(path)
        # a PIL image in memory goes through the same rules as its file
        np.testing.assert_array_equal(to_float_array(back), got)
    want = _reference(back)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    for channels in (1, 3):  # the model's pixels equal those of the reference image
        torch.testing.assert_close(to_model_pixels(got, 8, channels), to_model_pixels(want.astype(np.float32), 8, channels))


@pytest.mark.parametrize("mode", ["PA", "P"])
def test_transparent_palette_image_is_refused(tmp_path, mode):
    """A palette image with transparency is refused like an RGBA one (what lies under a
    transparent pixel is undefined), not read as its palette indices."""
    if mode == "P":  # the first pixel's palette entry transparent (a PNG tRNS chunk)
        im = _RGB.convert("P")
        path = tmp_path / "image.png"
        im.save(path, transparency=im.getpixel((0, 0)))
    else:
        im = _mode_image("PA")
        im.putalpha(Image.new("L", im.size, 7))
        path = tmp_path / "image.tiff"
        im.save(path)
    with pytest.raises(DataError, match="transparent"):
        read_image(path)
