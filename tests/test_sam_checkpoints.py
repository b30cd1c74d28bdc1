"""SAM checkpoints by path: the model type read from the weights' shapes, contradictions and bad
files as one-line errors, the cheap torch-free file check, and SAM checked before the backend."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_segmentation import blob_image, save_release_like_sam, tiny_release_sam, write_mask_png, write_png
from medkt.errors import ConfigError, UnknownNameError, WeightsNotFoundError
from medkt.segmentation.sam import (
    RELEASE_LAYOUTS,
    SAM_CHECKPOINT_ENV,
    build_sam,
    check_sam_checkpoint,
    inspect_sam,
    load_sam,
    parse_sam_spec,
    resolve_sam_spec,
    sam_layout,
    sam_type_of,
)

TYPES = ("vit_b", "vit_l", "vit_h")


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """Tiny-width SAMs with each release's block layout, saved like the official .pth files."""
    root = tmp_path_factory.mktemp("sam")
    return {t: save_release_like_sam(root / f"sam_{t}_tiny.pth", t, seed=i) for i, t in enumerate(TYPES)}


@pytest.fixture(autouse=True)
def _no_env_checkpoint(monkeypatch):
    monkeypatch.delenv(SAM_CHECKPOINT_ENV, raising=False)


# -- the type from the file -----------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
def test_path_alone_loads_the_right_type_with_the_files_weights(release_files, model_type):
    path = release_files[model_type]
    sam = load_sam(str(path))
    assert sam_type_of(sam) == model_type and inspect_sam(str(path)).model_type == model_type
    ref = tiny_release_sam(model_type, seed=TYPES.index(model_type))
    got, want = sam.state_dict(), ref.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    # same sizes everywhere the weights do not show them (decoder heads, windows): same logits
    from segment_anything import SamPredictor

    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    outs = []
    for model in (sam, ref):
        pred = SamPredictor(model)
        pred.set_image(img)
        outs.append(pred.predict(box=np.array([4, 4, 30, 20]), multimask_output=True, return_logits=True)[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    # an explicit type that agrees, and "auto", load the same model
    assert sam_type_of(load_sam(f"{model_type}@{path}")) == model_type
    assert sam_type_of(load_sam(f"auto@{path}", model_type="auto")) == model_type


def test_explicit_type_that_contradicts_the_file_names_the_fix(release_files):
    b = release_files["vit_b"]
    with pytest.raises(ConfigError, match=r"is vit_b \(12 image-encoder blocks, width 32\), not vit_h: pass sam=.*alone"):
        load_sam(f"vit_h@{b}")
    with pytest.raises(ConfigError, match="not vit_l"):
        inspect_sam(str(b), model_type="vit_l")
    with pytest.raises(ConfigError, match="sam_model_type=null"):
        resolve_sam_spec(f"vit_b@{b}", "vit_h")
    with pytest.raises(UnknownNameError, match="vit_h"):
        resolve_sam_spec(str(b), "vit_hh")


def test_spec_parsing(tmp_path):
    odd = tmp_path / "sam@2.pth"
    odd.write_bytes(b"")
    assert parse_sam_spec(str(odd)) == (None, str(odd))  # an existing file is a path whatever its name
    assert parse_sam_spec("/m/sam_vit_b_01ec64.pth") == (None, "/m/sam_vit_b_01ec64.pth")
    assert parse_sam_spec("vit_l@/m/x.pth") == ("vit_l", "/m/x.pth")
    assert parse_sam_spec("vit_h") == ("vit_h", "")
    assert parse_sam_spec("/data/run@2/sam.pth") == (None, "/data/run@2/sam.pth")  # '@' inside a path
    assert parse_sam_spec("auto@x.pth") == (None, "x.pth")
    with pytest.raises(UnknownNameError, match="vit_b"):
        parse_sam_spec("vit_x@/x")


@pytest.mark.parametrize("model_type", TYPES)
def test_release_shapes_give_the_release_layout(model_type):
    """The real release sizes, from segment-anything's own builders on the meta device (no weights)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ref = sam_model_registry[model_type]()
    state = ref.state_dict()
    layout = sam_layout(state)
    rel = RELEASE_LAYOUTS[model_type]
    assert layout.model_type == model_type
    assert (layout.depth, layout.embed_dim, layout.num_heads) == (rel["depth"], rel["embed_dim"], rel["num_heads"])
    assert layout.global_attn_indexes == rel["global_attn_indexes"]
    assert (layout.img_size, layout.patch_size, layout.window_size, layout.mlp_ratio) == (1024, 16, 14, 4.0)
    assert (layout.out_chans, layout.mask_in_chans, layout.decoder_depth, layout.decoder_mlp_dim) == (256, 16, 2, 2048)
    assert (layout.iou_head_depth, layout.iou_head_hidden_dim, layout.num_multimask_outputs) == (3, 256, 3)
    built = build_sam(layout).state_dict()  # meta: shapes only
    assert {k: tuple(v.shape) for k, v in built.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_the_rule_is_the_block_count():
    """Depth names the type whatever the width; a depth of no release is refused."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        state = dict(sam_model_registry["vit_b"]().state_dict())
    wide = {**state, "image_encoder.patch_embed.proj.weight": torch.empty(1280, 3, 16, 16, device="meta")}
    assert sam_layout(wide).model_type == "vit_b"  # 12 blocks at vit_h's width: still the vit_b layout
    cut = {k: v for k, v in state.items() if not k.startswith("image_encoder.blocks.11.")}
    with pytest.raises(ConfigError, match="11 blocks .*12 \\(vit_b\\), 24 \\(vit_l\\) or 32 \\(vit_h\\)"):
        sam_layout(cut, source="SAM checkpoint x.pth")
    with pytest.raises(ConfigError, match="not a Segment Anything checkpoint"):
        sam_layout({"visual.proj": torch.empty(3, 3, device="meta")})


# -- bad files --------------------------------------------------------------------------------------


def test_check_sam_checkpoint_problems(tmp_path, release_files, monkeypatch):
    good = release_files["vit_b"]
    assert check_sam_checkpoint(good) == [] and check_sam_checkpoint(f"vit_b@{good}") == []
    assert check_sam_checkpoint("tiny@random") == []
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    html = tmp_path / "sam_vit_b_01ec64.pth"
    html.write_text("<!DOCTYPE html><html>Access denied</html>")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    wrong_ext = tmp_path / "sam.safetensors"
    wrong_ext.write_bytes(good.read_bytes())
    cases = {cut: "truncated", html: "not a PyTorch file", empty: "is empty", wrong_ext: "not a .pth file",
             tmp_path: "is a folder", tmp_path / "missing.pth": "not found"}
    for path, words in cases.items():
        problems = check_sam_checkpoint(path)
        assert len(problems) == 1 and words in problems[0] and str(path) in problems[0], (path, problems)
        assert "\n" not in problems[0]
    assert "no SAM checkpoint given" in check_sam_checkpoint(None)[0]
    monkeypatch.setenv(SAM_CHECKPOINT_ENV, str(good))
    assert check_sam_checkpoint(None) == []  # the environment's checkpoint
    assert "unknown SAM model type" in check_sam_checkpoint("vit_x@/x.pth")[0]


def test_loading_bad_files_is_one_line_naming_the_file(tmp_path, release_files):
    good = release_files["vit_l"]
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    not_sam = tmp_path / "clip.pth"
    torch.save({"visual.proj": torch.zeros(2, 2)}, not_sam)
    damaged = tmp_path / "damaged.pth"
    state = torch.load(good, weights_only=True)
    state["mask_decoder.output_upscaling.0.weight"] = torch.zeros(3, 3, 2, 2)  # a size the layout does not read
    torch.save(state, damaged)
    for path, exc, words in [(cut, ConfigError, "truncated"), (not_sam, ConfigError, "not a Segment Anything"),
                             (damaged, ConfigError, "do not fit that model"),
                             (tmp_path / "nope.pth", WeightsNotFoundError, "not found")]:
        with pytest.raises(exc, match=words) as info:
            load_sam(str(path))
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_check_sam_checkpoint_does_not_import_torch(release_files):
    code = ("import sys; from medkt.segmentation.sam import check_sam_checkpoint; "
            f"assert check_sam_checkpoint({str(release_files['vit_h'])!r}) == []; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# -- MEDKT_SAM_CHECKPOINT, --set sam=PATH, SAM before the backend --------------------------------------


def _pipeline(tmp_path, **kw):
    from medkt.segmentation.pipeline import SegmentationTransferPipeline

    rng = np.random.default_rng(0)
    for i in range(2):
        img, mask = blob_image((48, 48), (24, 24), 8, rng)
        write_png(tmp_path / "im" / f"c{i}.png", img)
        write_mask_png(tmp_path / "ma" / f"c{i}.png", mask)
    return SegmentationTransferPipeline(backend="medclip:tiny@random", output_dir=tmp_path / "run", progress=False,
                                        data={"images": str(tmp_path / "im"), "masks": str(tmp_path / "ma")},
                                        prompt="a dark round lesion", stages=["baseline"], device="cpu", **kw)


def test_environment_checkpoint_type_read_from_the_file(tmp_path, monkeypatch, release_files):
    monkeypatch.setenv(SAM_CHECKPOINT_ENV, str(release_files["vit_b"]))
    assert sam_type_of(load_sam("vit_b")) == "vit_b"
    with pytest.raises(ConfigError, match="is vit_b .* not vit_h"):
        load_sam("vit_h")
    pipe = _pipeline(tmp_path)
    assert pipe.sam_spec == str(release_files["vit_b"]) and pipe.mode == "sam"
    pipe.validate()  # no type given: read from the file


def test_sam_error_comes_before_the_backend_and_any_folder(tmp_path, monkeypatch, release_files):
    import medkt.pipelines.base as base

    def no_backend(*a, **k):
        raise AssertionError("the backend was loaded before SAM was checked")

    def no_run(*a, **k):
        raise AssertionError("the run started before SAM was checked")

    monkeypatch.setattr(base.Pipeline, "create_backend", no_backend)
    pipe = _pipeline(tmp_path, sam=str(release_files["vit_b"]), sam_model_type="vit_h")
    monkeypatch.setattr(pipe, "_run", no_run)  # the check belongs to the pre-flight (validate)
    with pytest.raises(ConfigError, match="not vit_h"):
        pipe.run()
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_run_loads_sam_before_the_backend(tmp_path, monkeypatch, release_files):
    import medkt.pipelines.base as base
    import medkt.segmentation.sam as sam_mod

    class Stop(Exception):
        pass

    calls = []
    real_load = sam_mod.load_sam

    def load(*a, **k):
        calls.append("sam")
        return real_load(*a, **k)

    def backend(*a, **k):
        calls.append("backend")
        raise Stop  # only the order matters

    monkeypatch.setattr(sam_mod, "load_sam", load)
    monkeypatch.setattr(base.Pipeline, "create_backend", backend)
    with pytest.raises(Stop):
        _pipeline(tmp_path, sam=str(release_files["vit_b"])).run()
    assert calls == ["sam", "backend"]


def test_cli_set_sam_path(tmp_path, medkt, release_files):
    """``--set sam=PATH`` with a contradicting ``sam_model_type``: exit 2, one line, in seconds (before the backend)."""
    out = tmp_path / "run"
    _pipeline(tmp_path)  # writes the images and masks of a tiny folder pair (the bundle's own data is not here)
    data = json.dumps({"images": str(tmp_path / "im"), "masks": str(tmp_path / "ma")})
    r = medkt("transfer", "--bundle", "seg_breast_ultrasound", "--output", str(out), "--set", f"data={data}",
              "--set", "backend=medclip:tiny@random",  # the default BiomedCLIP is not in this machine's cache
              "--set", f"sam={release_files['vit_b']}", "--set", "sam_model_type=vit_l")
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "is vit_b" in err[0] and f"sam={release_files['vit_b']}" in err[0]
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_path_loaded_sam_runs_on_the_requested_device(release_files):
    """Built on meta, filled from the file, moved to the device: every weight and buffer there (meta = a GPU stand-in)."""
    from meta_device import MetaHostSyncs

    from medkt.segmentation.sam import SamSegmenter

    seg = SamSegmenter.from_spec(str(release_files["vit_b"]), device="meta")
    assert {t.device.type for t in [*seg.sam.parameters(), *seg.sam.buffers()]} == {"meta"}
    with MetaHostSyncs():
        mask = seg.segment(np.random.default_rng(0).random((40, 50)).astype(np.float32), np.array([[5, 5, 20, 20]]))
    assert mask.shape == (40, 50) and mask.dtype == bool
    cpu = load_sam(str(release_files["vit_b"]), device="cpu")
    assert {t.device.type for t in [*cpu.parameters(), *cpu.buffers()]} == {"cpu"}
