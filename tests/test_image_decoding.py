"""Fast decoding paths give the same pixels: 8-bit files skip the float round trip, and open_clip's
transform is built once per preprocessing config (issue 19, evaluation speed)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medkt.data.images import _open_clip_transform, open_clip_pixels, upstream_input
from medkt.data.readers import read_image


def _write(path, arr, mode=None):
    Image.fromarray(arr, mode=mode).save(path)
    return path


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    return {
        "grey": _write(tmp_path / "grey.png", rng.integers(0, 256, (20, 30), dtype=np.uint8)),
        "rgb": _write(tmp_path / "rgb.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)),
        "grey16": _write(tmp_path / "grey16.png", rng.integers(0, 65536, (20, 30), dtype=np.uint16)),
        "rgba": _write(tmp_path / "rgba.png", np.dstack([rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
                                                         np.full((20, 30), 255, np.uint8)])),
    }


@pytest.mark.parametrize("name", ["grey", "rgb"])
def test_8bit_files_come_back_as_stored(files, name):
    raw = read_image(files[name], keep_uint8=True)
    assert raw.dtype == np.uint8 and np.array_equal(raw, np.asarray(Image.open(files[name])))
    assert np.array_equal(raw.astype(np.float32) / 255.0, read_image(files[name]))  # the float path's source


@pytest.mark.parametrize("name", ["grey16", "rgba"])
def test_other_files_stay_float(files, name):
    out = read_image(files[name], keep_uint8=True)
    assert out.dtype == np.float32 and np.array_equal(out, read_image(files[name]))


@pytest.mark.parametrize("name", ["grey", "rgb", "grey16", "rgba"])
@pytest.mark.parametrize("grey", [False, True])
def test_upstream_input_of_a_path_equals_that_of_its_pixels(files, name, grey):
    fast = upstream_input(files[name], grey=grey)
    slow = upstream_input(read_image(files[name]), grey=grey)  # float array: exact_uint8 recovers 8-bit
    assert type(fast) is type(slow)
    if isinstance(fast, Image.Image):
        assert fast.mode == slow.mode and np.array_equal(np.asarray(fast), np.asarray(slow))
    else:
        assert np.array_equal(fast, slow)


def test_open_clip_transform_is_built_once_per_config(files):
    cfg = {"size": [16, 16], "mode": "RGB", "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    _open_clip_transform.cache_clear()
    a = open_clip_pixels(files["grey"], cfg)
    b = open_clip_pixels(files["grey"], dict(cfg, size=(16, 16)))  # a tuple and a list are the same size
    info = _open_clip_transform.cache_info()
    assert (info.misses, info.hits) == (1, 1) and a.shape == (3, 16, 16) and bool((a == b).all())
