"""Format-aware image readers: PNG/JPEG (8/16-bit), DICOM, NIfTI (2-D) and JSRT raw ``.IMG``.

`read_image` returns a 2-D ``(H, W)`` or ``(H, W, 3)`` array in **[0, 1] float32** (grey images
stay 2-D), oriented as a viewer shows the image (row 0 at the top). Every failure is a
`DataError` naming the file and what was wrong, so the CLI can print one line.

Which library reads what, and why:

* PNG / JPEG / BMP / TIFF: MONAI's ``PILReader``; MONAI returns ``(W, H[, C])``
  (first axis = x) and float values, so we transpose back and scale by the PIL mode in the
  metadata (``I;16`` -> 65535, ``L``/``RGB`` -> 255).
* NIfTI: MONAI ``LoadImage`` with ``NibabelReader`` (a 2-D slice or a ``(X, Y, 1)`` volume), min-max.
* DICOM: pydicom directly. MONAI's ``PydicomReader`` applies the rescale slope/intercept but
  neither the VOI LUT / window (radiographs are meant to be displayed through it) nor the
  ``MONOCHROME1`` inversion, and its pruned metadata drops the tags needed to do it afterwards.
* JSRT ``.IMG``: no library reads it (headerless raw): 2048 x 2048, 12 bits stored in big-endian
  unsigned 16-bit words; see `read_jsrt_raw`.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medkt.errors import DataError
from medkt.utils import log_once

# every MONAI LoadImage registers its readers and logs this once per call, i.e. per image read
log_once("monai.data.nvimgcodec_pydicom_plugin")

#: JSRT database geometry (http://db.jsrt.or.jp/eng.php): 2048 x 2048 pixels, 12-bit, 0.175 mm.
JSRT_SHAPE = (2048, 2048)
JSRT_BITS = 12
JSRT_BYTES = JSRT_SHAPE[0] * JSRT_SHAPE[1] * 2

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
JSRT_SUFFIXES = (".img",)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def sniff_format(path: str | Path) -> str:
    """Guess the format of ``path``: ``"pil"``, ``"dicom"``, ``"nifti"`` or ``"jsrt"``.

    The suffix decides when it is known; extensionless files are sniffed (DICOM preamble
    ``DICM`` at byte 128, the exact JSRT byte size, otherwise whatever PIL recognises).
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix in PIL_SUFFIXES:
        return "pil"
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in JSRT_SUFFIXES:
        return "jsrt"
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    if path.stat().st_size == JSRT_BYTES:
        return "jsrt"
    return "pil"


#: SOP class of a DICOMDIR (PS3.4 "Media Storage Directory Storage"): an index, not an image
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


def is_image_file(path: str | Path) -> bool:
    """Whether a file in a dataset folder is an image medkt reads (not a sidecar file).

    Known image suffixes are images; hidden files (``.DS_Store``, macOS ``._x.png`` resource
    forks) and DICOM indexes (``DICOMDIR``) are not. Files without a known suffix are sniffed,
    since DICOM exports name files by UID (``1.2.840....``) or not at all: a DICOM preamble that
    is not a DICOMDIR, and for extensionless files also the JSRT size or a format PIL opens.
    """
    from PIL import Image

    path = Path(path)
    name = path.name
    if name.startswith(".") or name.upper() == "DICOMDIR":
        return False
    suffix = _suffix(path)
    if suffix in PIL_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES + JSRT_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        from pydicom.filereader import read_file_meta_info

        try:
            return str(read_file_meta_info(path).get("MediaStorageSOPClassUID", "")) != DICOMDIR_SOP_CLASS
        except Exception:  # a damaged header: let the reader report it
            return True
    if "." in name:
        return False  # another suffix: a sidecar (.txt, .csv, .json, .xml ...)
    if path.stat().st_size == JSRT_BYTES:
        return True
    try:
        with Image.open(path):
            return True
    except Exception:
        return False


def read_image(path: str | Path, *, jsrt_invert: bool = True, keep_uint8: bool = False) -> np.ndarray:
    """Read one 2-D image file -> float32 ``(H, W)`` or ``(H, W, 3)`` in [0, 1].

    Args:
        path: PNG/JPEG/BMP/TIFF, DICOM (``.dcm`` or extensionless with the ``DICM`` preamble),
            NIfTI (``.nii``/``.nii.gz``, 2-D) or JSRT raw ``.IMG``.
        jsrt_invert: JSRT raw files store larger values for darker film; invert so that bone is
            bright as on every other radiograph format (see `read_jsrt_raw`).
        keep_uint8: return an 8-bit grey or RGB PNG/JPEG as stored (``uint8``, same shape)
            instead of float; every other file is float as usual (see `read_pil`).

    Raises:
        DataError: missing, truncated or unsupported file (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    kind = sniff_format(path)
    if kind == "dicom":
        return read_dicom(path)
    if kind == "jsrt":
        return read_jsrt_raw(path, invert=jsrt_invert)
    if kind == "nifti":
        return read_nifti(path)
    return read_pil(path, keep_uint8=keep_uint8)


# -- PNG / JPEG -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _pil_reader() -> Any:
    """One MONAI ``PILReader`` for every read (it keeps no state between files). Called directly
    rather than through ``LoadImage``: building a ``LoadImage`` per file and wrapping every array
    in a ``MetaTensor`` cost 1-2 ms per image, as much as decoding a 512-px PNG; the array and the
    ``mode`` metadata are the same. Its converter puts every PIL colour mode into one whose stored
    values are the pixels (`_model_mode`)."""
    from monai.data import PILReader

    return PILReader(converter=_model_mode)


def read_pil(path: str | Path, *, keep_uint8: bool = False) -> np.ndarray:
    """PNG/JPEG/BMP/TIFF through MONAI's ``PILReader``.

    Palette (``P``, ``PA``), CMYK, YCbCr, LAB, HSV and ``RGBX`` images are first converted by PIL
    (``.convert("RGB")``, as upstream preprocessing does; reading their stored values would give
    palette indices or foreign colour components). 8-bit images are divided by 255, 16-bit
    (``I;16``) by 65535, 32-bit int (``I``) and float (``F``) min-max scaled; RGB stays 3 channels; an RGBA
    image whose alpha is fully opaque loses its alpha channel, while one with real transparency
    is refused (what lies under a transparent pixel of a radiograph is undefined).

    Args:
        path: the image file.
        keep_uint8: return 8-bit grey (``L``) or ``RGB`` images as stored, ``uint8`` — the exact
            pixels that ``x / 255`` came from, for preprocessing that starts from 8-bit PIL images
            (`medkt.data.images.upstream_input`) without a float round trip.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = _pil_reader()
            data, meta = reader.get_data(reader.read(str(path)))
    except DataError as exc:  # from the colour-mode converter, which does not know the file
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:  # PIL raises OSError/SyntaxError/ValueError on corrupt files
        raise DataError(f"unreadable image {path}: {_short(exc)}") from None
    mode = str(meta.get("mode", ""))
    arr = np.asarray(data)
    # MONAI's PILReader returns (W, H[, C]); put rows first again
    arr = np.swapaxes(arr, 0, 1) if arr.ndim >= 2 else arr
    if (keep_uint8 and arr.dtype == np.uint8
            and ((mode == "L" and arr.ndim == 2) or (mode == "RGB" and arr.ndim == 3 and arr.shape[-1] == 3))):
        return np.ascontiguousarray(arr)
    return _scale_pil(arr, mode, path)


#: PIL modes whose stored values are the pixels (grey, RGB, with alpha, 16/32-bit, float);
#: every other mode stores indices or another colour space and is converted by PIL first
_DIRECT_MODES = ("1", "L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F")


def _model_mode(im: Any) -> Any:
    """A PIL image in one of `_DIRECT_MODES`, converted by PIL itself (as upstream
    preprocessing does with ``.convert("RGB")``): palette images (``P``, ``PA``) would otherwise
    give palette indices as grey values, and CMYK / YCbCr / LAB / HSV / RGBX their raw components
    as RGB (a 4-channel CMYK even looked like RGBA)."""
    mode = im.mode
    if mode in _DIRECT_MODES:
        return im
    if mode in ("P", "PA"):  # keep transparency (a tRNS entry or the PA alpha) so it is checked
        return im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    if mode in ("RGBa", "RGBX", "RGBA"):
        return im.convert("RGBA" if mode == "RGBa" else "RGB")
    if mode == "La":  # premultiplied alpha: PIL converts it only to LA
        return im.convert("LA")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise DataError(f"PIL colour mode {mode!r} cannot be converted to RGB ({_short(exc)}); "
                        "save the image as grey or RGB") from None


def _scale_pil(arr: np.ndarray, mode: str, path: Path) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # LA / RGBA
        alpha = arr[..., -1]
        full = 65535 if mode.startswith("I;16") else 255
        if np.any(alpha < full):
            raise DataError(
                f"{path}: image has a transparent alpha channel (mode {mode}); "
                "save it without transparency (grey or RGB) before using it"
            )
        arr = arr[..., :-1]
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise DataError(f"{path}: expected a grey or RGB 2-D image, got array shape {arr.shape} (mode {mode})")
    arr = arr.astype(np.float32)
    if mode.startswith("I;16"):
        return arr / 65535.0
    if mode in ("1",):
        return (arr > 0).astype(np.float32)
    if mode in ("L", "RGB", "LA", "RGBA", ""):  # 8-bit (other 8-bit modes were converted by _model_mode)
        return np.clip(arr / 255.0, 0.0, 1.0)
    # "I" (32-bit int) and "F" (float) images: their range is not fixed, use min-max
    return _minmax(arr)


# -- NIfTI ------------------------------------------------------------------------------------
def read_nifti(path: str | Path) -> np.ndarray:
    """A 2-D NIfTI image (``(X, Y)`` or ``(X, Y, 1)``) via MONAI ``NibabelReader``, min-max scaled.

    NIfTI stores the first axis as x (columns), so the array is transposed to ``(H, W)``.
    """
    from monai.transforms import LoadImage

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)(str(path))
    except Exception as exc:
        raise DataError(f"unreadable NIfTI {path}: {_short(exc)}") from None
    arr = np.asarray(data, dtype=np.float32)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D NIfTI image, got shape {tuple(np.asarray(data).shape)}")
    return _minmax(arr.T)


# -- JSRT raw ---------------------------------------------------------------------------------
def read_jsrt_raw(path: str | Path, *, invert: bool = True) -> np.ndarray:
    """Read a JSRT ``.IMG`` file: headerless 2048 x 2048 big-endian uint16 holding 12-bit values.

    Args:
        invert: JSRT values increase with film density (dark = large), the opposite of the
            usual display; ``True`` returns ``1 - v / 4095`` so lungs are dark and bone bright.

    Returns:
        float32 ``(2048, 2048)`` in [0, 1].
    """
    path = Path(path)
    size = path.stat().st_size
    if size != JSRT_BYTES:
        raise DataError(
            f"{path}: not a JSRT raw image: {size} bytes, expected {JSRT_BYTES} "
            f"({JSRT_SHAPE[0]}x{JSRT_SHAPE[1]} big-endian 16-bit words); the file may be truncated"
        )
    raw = np.fromfile(path, dtype=">u2").reshape(JSRT_SHAPE)
    top = (1 << JSRT_BITS) - 1
    if int(raw.max()) > top:
        raise DataError(
            f"{path}: values up to {int(raw.max())} exceed the {JSRT_BITS}-bit JSRT range; "
            "is it a little-endian or non-JSRT raw file?"
        )
    arr = raw.astype(np.float32) / float(top)
    return 1.0 - arr if invert else arr


def write_jsrt_raw(image: np.ndarray, path: str | Path, *, invert: bool = True) -> Path:
    """Write a [0, 1] ``(2048, 2048)`` array as a JSRT-format ``.IMG`` (the inverse of
    `read_jsrt_raw`; used to build synthetic test data)."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.shape != JSRT_SHAPE:
        raise DataError(f"a JSRT image must be {JSRT_SHAPE}, got {arr.shape}")
    if invert:
        arr = 1.0 - arr
    top = (1 << JSRT_BITS) - 1
    words = np.rint(np.clip(arr, 0, 1) * top).astype(">u2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    words.tofile(path)
    return path


# -- DICOM ------------------------------------------------------------------------------------
def read_dicom(path: str | Path) -> np.ndarray:
    """A single-frame DICOM radiograph -> ``(H, W)`` (or RGB ``(H, W, 3)``) in [0, 1].

    Steps: modality LUT (rescale slope/intercept), then the first VOI transform present
    (VOI LUT sequence, else window centre/width with its ``VOILUTFunction``) which maps to [0, 1];
    without a VOI transform the values are min-max scaled. ``MONOCHROME1`` (large = dark) is
    inverted so the result always displays like ``MONOCHROME2``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise DataError(f"{path}: not a DICOM file ({_short(exc)})") from None
    except Exception as exc:  # truncated headers raise EOFError/OSError/struct errors
        raise DataError(f"{path}: corrupt DICOM header ({_short(exc)})") from None
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:  # truncated pixel data, unsupported transfer syntax...
        raise DataError(f"{path}: cannot decode DICOM pixel data ({_short(exc)})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames); medkt expects one 2-D radiograph per file")
    if samples == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        bits = int(ds.get("BitsStored", 8) or 8)
        return np.clip(arr.astype(np.float32) / float((1 << bits) - 1), 0.0, 1.0)
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D grey DICOM image, got pixel array shape {arr.shape}")

    values = apply_modality_lut(arr, ds).astype(np.float64)
    out: np.ndarray | None = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        try:
            lut_bits = int(item.LUTDescriptor[2])
            out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
            out = out / float((1 << lut_bits) - 1)
        except Exception as exc:
            raise DataError(f"{path}: invalid VOI LUT sequence ({_short(exc)})") from None
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center = _first(ds.WindowCenter)
        width = _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        out = window(values, center, width, function, where=str(path))
    if out is None:
        out = _minmax(values)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR", where: str = "") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) -> [0, 1].

    ``LINEAR`` uses the standard's ``c - 0.5`` / ``w - 1`` form, ``LINEAR_EXACT`` the plain
    ``(x - c) / w + 0.5``, ``SIGMOID`` ``1 / (1 + exp(-4 (x - c) / w))``.
    """
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise DataError(f"{where}: invalid window width {width}")
    x = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width == 1:  # degenerate linear window: a threshold
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value: Any) -> float:
    """Window tags may be multi-valued (several presets); the first is the default one."""
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _minmax(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return (arr - lo) / (hi - lo)


def _short(exc: BaseException) -> str:
    """First line of an exception message, so CLI errors stay on one line."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


__all__ = [
    "read_image",
    "read_pil",
    "read_dicom",
    "read_nifti",
    "read_jsrt_raw",
    "write_jsrt_raw",
    "sniff_format",
    "is_image_file",
    "window",
]
