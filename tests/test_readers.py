"""Image readers: PNG/JPEG 8/16-bit, RGBA, DICOM (windowing, MONOCHROME1, corrupt), NIfTI, JSRT raw."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers_medclip import write_dicom
from medkt.data.images import to_model_pixels
from medkt.data.readers import JSRT_BYTES, read_image, sniff_format, window, write_jsrt_raw
from medkt.errors import DataError


@pytest.fixture
def gradient():
    """(12, 10) ramp with distinct rows and columns, so transposes are caught."""
    return (np.arange(120).reshape(12, 10) / 119.0).astype(np.float32)


def test_png_8_and_16_bit_keep_orientation_and_range(tmp_path, gradient):
    g8 = np.rint(gradient * 255).astype(np.uint8)
    g16 = np.rint(gradient * 65535).astype(np.uint16)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g16).save(tmp_path / "g16.png")
    a8, a16 = read_image(tmp_path / "g8.png"), read_image(tmp_path / "g16.png")
    assert a8.shape == a16.shape == (12, 10) and a8.dtype == np.float32
    np.testing.assert_allclose(a8, g8 / 255.0, atol=1e-6)
    # 16-bit keeps its precision (an 8-bit conversion would be off by up to 1/510)
    np.testing.assert_allclose(a16, g16 / 65535.0, atol=1e-6)
    assert np.abs(a16 - gradient).max() < 1e-4


def test_jpeg_and_rgb(tmp_path, gradient):
    rgb = np.stack([gradient, 1 - gradient, np.full_like(gradient, 0.5)], -1)
    Image.fromarray(np.rint(rgb * 255).astype(np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(np.rint(gradient * 255).astype(np.uint8)).save(tmp_path / "g.jpg", quality=98)
    c = read_image(tmp_path / "c.png")
    assert c.shape == (12, 10, 3)
    np.testing.assert_allclose(c, rgb, atol=1 / 255)
    assert np.abs(read_image(tmp_path / "g.jpg") - gradient).max() < 0.03


def test_rgba_opaque_is_accepted_transparent_is_refused(tmp_path, gradient):
    rgba = np.zeros((12, 10, 4), np.uint8)
    rgba[..., :3] = np.rint(gradient * 255)[..., None]
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert read_image(tmp_path / "opaque.png").shape == (12, 10, 3)
    rgba[2, 3, 3] = 10
    Image.fromarray(rgba).save(tmp_path / "transparent.png")
    with pytest.raises(DataError, match=r"transparent\.png.*transparent alpha"):
        read_image(tmp_path / "transparent.png")


def test_truncated_png_and_missing_file(tmp_path, gradient):
    Image.fromarray(np.rint(gradient * 65535).astype(np.uint16)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png") as err:
        read_image(tmp_path / "cut.png")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="image not found"):
        read_image(tmp_path / "nope.png")


def test_dicom_window_monochrome1_and_rescale(tmp_path, gradient):
    plain = write_dicom(tmp_path / "a.dcm", gradient, bits=12)
    np.testing.assert_allclose(read_image(plain), gradient, atol=1e-3)  # min-max of a full ramp
    # MONOCHROME1 stores inverted values; the reader displays it like MONOCHROME2
    inv = write_dicom(tmp_path / "b.dcm", gradient, bits=12, monochrome1=True)
    np.testing.assert_allclose(read_image(inv), gradient, atol=1e-3)
    # a window on the middle of the range: values below/above saturate, linear inside
    win = write_dicom(tmp_path / "c.dcm", gradient, bits=12, window=(2048, 1024))
    out = read_image(win)
    stored = np.rint(gradient * 4095)
    np.testing.assert_allclose(out, np.clip((stored - 2047.5) / 1023 + 0.5, 0, 1), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    # rescale slope/intercept (modality LUT) is applied before the window
    hu = write_dicom(tmp_path / "d.dcm", gradient, bits=12, slope=2.0, intercept=-1000.0, window=(3096, 2048))
    np.testing.assert_allclose(read_image(hu), np.clip((stored * 2 - 1000 - 3095.5) / 2047 + 0.5, 0, 1), atol=1e-6)
    # extensionless DICOM is sniffed by its preamble
    (tmp_path / "IM0001").write_bytes(plain.read_bytes())
    assert sniff_format(tmp_path / "IM0001") == "dicom"
    np.testing.assert_allclose(read_image(tmp_path / "IM0001"), gradient, atol=1e-3)


def test_corrupt_and_truncated_dicom(tmp_path, gradient):
    good = write_dicom(tmp_path / "good.dcm", gradient).read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(good[:-50])
    with pytest.raises(DataError, match=r"trunc\.dcm: cannot decode DICOM pixel data"):
        read_image(tmp_path / "trunc.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 64 + b"not a dicom at all")
    with pytest.raises(DataError, match=r"junk\.dcm"):
        read_image(tmp_path / "junk.dcm")
    (tmp_path / "head.dcm").write_bytes(good[:200])
    with pytest.raises(DataError, match=r"head\.dcm"):
        read_image(tmp_path / "head.dcm")


def test_window_functions():
    x = np.array([0.0, 50.0, 100.0])
    np.testing.assert_allclose(window(x, 50, 100, "LINEAR_EXACT"), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(window(x, 50, 100, "SIGMOID")[1], 0.5)
    with pytest.raises(DataError):
        window(x, 50, 0)


def test_jsrt_raw_roundtrip_and_checks(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.random((2048, 2048)).astype(np.float32)
    p = write_jsrt_raw(img, tmp_path / "JPCLN001.IMG")
    assert p.stat().st_size == JSRT_BYTES
    raw = np.fromfile(p, dtype=">u2").reshape(2048, 2048)
    assert raw.max() <= 4095
    # stored inverted: a bright (bone) pixel is a small raw value
    assert raw.flat[int(img.argmax())] == 0
    back = read_image(p)
    assert back.shape == (2048, 2048)
    assert np.abs(back - img).max() <= 0.5 / 4095 + 1e-6
    (tmp_path / "JPCLN002.IMG").write_bytes(p.read_bytes()[:-2])
    with pytest.raises(DataError, match="JPCLN002.IMG.*truncated"):
        read_image(tmp_path / "JPCLN002.IMG")
    # little-endian by mistake: values exceed 12 bits
    raw.astype("<u2").tofile(tmp_path / "JPCLN003.IMG")
    with pytest.raises(DataError, match="12-bit"):
        read_image(tmp_path / "JPCLN003.IMG")
    small = to_model_pixels(p, size=32, channels=1)
    assert small.shape == (1, 32, 32)


def test_nifti_2d(tmp_path):
    nib = pytest.importorskip("nibabel")
    arr = np.arange(120, dtype=np.float32).reshape(10, 12)  # (X, Y)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "s.nii.gz")
    out = read_image(tmp_path / "s.nii.gz")
    assert out.shape == (12, 10)
    np.testing.assert_allclose(out, arr.T / 119.0, atol=1e-6)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), tmp_path / "v.nii")
    with pytest.raises(DataError, match="2-D"):
        read_image(tmp_path / "v.nii")
