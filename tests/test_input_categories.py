"""Input and environment categories (issue 18, item 11): each case a user can hand medkt either
gives the right numbers or a one-line error; none gives a wrong number or a traceback.

* every Pillow colour mode reads as PIL's own conversion of the same image (what upstream
  preprocessing does with ``.convert("RGB")``);
* duplicates in manifests and class files are refused, never silently counted;
* a read-only or full output disk is one line and exit 2, with earlier files intact;
* a run folder is locked while a process works in it.
"""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medkt.data.images import to_float_array, to_model_pixels
from medkt.data.readers import read_image
from medkt.errors import DataError, RunLockedError
from medkt.run_folder import LOCK_NAME, folder_lock
from test_kill_resume import TINY
from test_resume_safety import error_line

REPO = Path(__file__).resolve().parents[1]

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


# -- environment: read-only / full output disk --------------------------------------------------
@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC], ids=["EROFS", "ENOSPC"])
def test_atomic_write_on_a_bad_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, err):
    from medkt.errors import OutputDiskError
    from medkt.utils import atomic_write_text

    path = atomic_write_text(tmp_path / "results.json", "old")

    def refuse(src, dst, *a, **k):
        raise OSError(err, os.strerror(err), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputDiskError) as info:
        atomic_write_text(path, "new")
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and errno.errorcode[err] in msg
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp left


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC], ids=["EROFS", "ENOSPC"])
def test_bad_disk_during_a_run_exits_2_and_keeps_checkpoints(medkt, monkeypatch, tmp_path, err):
    """The disk fails when the fine-tuned weights are written, after the inversion checkpoints:
    one line, exit 2, the checkpoints survive and ``--resume`` finishes the run."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == "finetuned.safetensors":
            raise OSError(err, os.strerror(err), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    r = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY)
    line = error_line(r)
    assert "finetuned.safetensors" in line and errno.errorcode[err] in line and "intact" in line
    partial = out.with_name("run.partial")
    saved = {p: p.read_bytes() for p in partial.rglob("*.pt")}
    assert saved and not list(partial.rglob("*.tmp"))
    monkeypatch.setattr(os, "replace", real)  # space freed
    r = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "results.json").is_file() and (out / "finetuned.safetensors").is_file()


def test_cli_turns_a_raw_disk_oserror_into_one_line(medkt, monkeypatch, tmp_path):
    """A write outside the atomic writers (here the run folder's mkdir) on a read-only disk."""
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name == "run.partial":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    r = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(tmp_path / "run"), *TINY)
    assert "read-only" in error_line(r) and "run.partial" in error_line(r)


# -- environment: two processes on one run folder -------------------------------------------------
_HOLDER = ("import sys\nfrom medkt.run_folder import folder_lock\n"
           "with folder_lock(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()\n")


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A second process that holds ``folder``'s lock until its stdin is closed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_live_lock_refuses_a_second_command_resume_included(medkt, tmp_path):
    out = tmp_path / "run"
    partial = out.with_name("run.partial")
    partial.mkdir()
    (partial / "checkpoint.pt").write_bytes(b"the first run's work")
    proc = _hold_lock(partial)
    try:
        for flags in ([], ["--resume"], ["--restart"]):
            r = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY, *flags)
            line = error_line(r)
            assert f"process {proc.pid}" in line and "in use" in line, line
            assert (partial / "checkpoint.pt").read_bytes() == b"the first run's work"
        with pytest.raises(RunLockedError, match=str(proc.pid)):  # the library call, too
            with folder_lock(partial):
                pass
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert not (partial / LOCK_NAME).exists()  # the holder released it on exit


def test_stale_lock_of_a_dead_process_is_taken_over(medkt, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    out = tmp_path / "run"
    partial = out.with_name("run.partial")
    partial.mkdir()
    (partial / LOCK_NAME).write_text(f"pid={dead.pid}\nhost={socket.gethostname()}\n")
    with folder_lock(partial):
        assert f"pid={os.getpid()}" in (partial / LOCK_NAME).read_text()
    assert not (partial / LOCK_NAME).exists()
    (partial / LOCK_NAME).write_text(f"pid={dead.pid}\nhost={socket.gethostname()}\n")
    r = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "results.json").is_file() and not (out / LOCK_NAME).exists() and not partial.exists()


def test_api_transfer_locks_its_output_folder(tmp_path):
    import medkt

    proc = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=str(proc.pid)):
            medkt.transfer(None, [medkt.Concept("nodule", ["a spot"], 1)], out_dir=tmp_path)  # before any model call
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_invert_command_refuses_a_folder_in_use(medkt, tmp_path):
    proc = _hold_lock(tmp_path)
    try:
        r = medkt("invert", "--backend", "clip:medkt-tiny-ViT@random", "--concept", "nodule=a small spot",
                  "--output", str(tmp_path), "--steps", "1", "--n-images", "1", "--resume", "--device", "cpu")
        assert f"process {proc.pid}" in error_line(r)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


# -- ambiguous inputs: duplicates ----------------------------------------------------------------
def _manifest(tmp_path: Path, lines: list[str]) -> Path:
    for name in ("a.png", "b.png"):
        Image.new("L", (4, 4), 9).save(tmp_path / name)
    (tmp_path / "sub").mkdir(exist_ok=True)
    path = tmp_path / "m.csv"
    path.write_text("path,label,mask\n" + "".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("second", ["a.png,x,", "sub/../a.png,x,", "a.png,y,"], ids=["same", "same-file", "relabelled"])
def test_manifest_lists_an_image_twice(tmp_path, second):
    from medkt.data.manifest import ManifestProblem, read_manifest

    m = _manifest(tmp_path, ["a.png,x,", "b.png,y,", second])
    with pytest.raises(DataError, match=r"m.csv:4: image .*a.png is listed twice \(first at .*m.csv:2"):
        read_manifest(m)
    problems: list[ManifestProblem] = []  # skip_bad: skipped and reported, not counted
    rows = read_manifest(m, skip_bad=True, problems=problems)
    assert [r.path for r in rows] == ["a.png", "b.png"] and len(problems) == 1 and "twice" in problems[0].message


def test_manifest_allows_one_image_with_two_masks(tmp_path):
    from medkt.data.manifest import read_manifest

    for name in ("m1.png", "m2.png"):
        Image.new("L", (4, 4), 0).save(tmp_path / name)
    m = _manifest(tmp_path, ["a.png,x,m1.png", "a.png,x,m2.png"])
    assert len(read_manifest(m)) == 2


@pytest.mark.parametrize("text,match", [
    ('{"mass": "a chest x-ray with mass", "mass": "a large opacity"}', "'mass' appears twice"),
    ('["mass", "nodule", "mass"]', r"\['mass'\] listed twice"),
    ('{"mass": "a chest x-ray with a lesion", "nodule": ["a chest x-ray with a  Lesion"]}',
     "'mass' and 'nodule' share the prompt"),
])
def test_class_file_ambiguities_are_refused(tmp_path, text, match):
    from medkt.cli import read_class_prompts
    from medkt.errors import ConfigError

    path = tmp_path / "classes.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        read_class_prompts(path, ["a chest x-ray with {}"])
    assert "\n" not in str(info.value)


def test_api_classes_sharing_a_prompt_are_refused():
    import medkt
    from medkt.errors import ConfigError

    with pytest.raises(ConfigError, match="share the prompt"):
        medkt.evaluate_zero_shot(None, torch.zeros(1, 3, 4, 4), {"a": ["same"], "b": ["same"]})


def test_a_published_name_list_with_a_name_twice_is_reported(caplog):
    """CLIP's ImageNet names hold "missile" twice: evaluated as published, with a warning."""
    import logging

    from medkt.errors import ConfigError
    from medkt.pipelines.transfer import class_prompts_of

    spec = {"classes": ["n1", "n2", "n3"], "class_names": {"n1": "missile", "n2": "missile", "n3": "dog"},
            "templates": ["a photo of a {}.", "a {}."]}
    with caplog.at_level(logging.WARNING, logger="medkt"):
        assert len(class_prompts_of(spec)) == 3
    assert [r.getMessage() for r in caplog.records if "share the prompt" in r.getMessage()] == [
        "classes 'n1' and 'n2' share the prompt 'a photo of a missile.' (the same class name): their scores tie"]
    with pytest.raises(ConfigError, match="share the prompt"):  # explicit prompts stay refused
        class_prompts_of({"classes": {"n1": "a missile", "n2": "a missile"}})
