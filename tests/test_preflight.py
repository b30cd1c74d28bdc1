"""Preflight of bundle runs (medkt.preflight): every problem at once, before torch and MONAI load."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medkt.bundles import list_bundles
from medkt.device import check_device_spec, check_precision_spec
from medkt.errors import ConfigError, DataError, MedktError, PreflightError, WeightsNotFoundError
from medkt.preflight import UNKNOWN, BundleConfig, load_config, preflight_bundle, raise_problems
from medkt.weights import backend_problems

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "bundles" / "quickstart_tiny"


def tiny_bundle(tmp_path: Path, edit) -> Path:
    dst = tmp_path / "bundles" / "quickstart_tiny"
    shutil.copytree(TINY, dst)
    cfg = dst / "configs" / "transfer.json"
    cfg.write_text(json.dumps(edit(json.loads(cfg.read_text())), indent=2))
    return dst


def three_problems(d: dict) -> dict:
    d["backend"] = "clip:medkt-tiny-ViT@/no/such/weights.pt"
    d["evaluations"]["real"] = {"manifest": "/no/such/manifest.csv", "classes": ["moongate", "gyroscope"]}
    return d


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_three_problems_three_lines_without_torch_or_monai(tmp_path):
    """Before: one problem per try, each after 10-30 s of importing torch and MONAI."""
    bundle = tiny_bundle(tmp_path, three_problems)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "medkt", "transfer", "--bundle", str(bundle),
                        "-o", str(out), "--set", "device=gpu0"], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 3, lines
    assert any("unknown device 'gpu0'" in ln and "from --set device=gpu0" in ln for ln in lines), lines
    assert any("weights not found: /no/such/weights.pt" in ln for ln in lines), lines
    assert any("evaluation 'real': manifest not found: /no/such/manifest.csv" in ln for ln in lines), lines
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "monai")}, sorted(imported)[:20]
    assert not out.exists() and not Path(str(out) + ".partial").exists()


@pytest.mark.slow
def test_monai_bundle_run_reports_every_problem(tmp_path):
    bundle = tiny_bundle(tmp_path, three_problems)
    cfg = bundle / "configs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg / "transfer.json"),
                        "--meta_file", str(cfg / "metadata.json"), "--output_dir", str(tmp_path / "run"),
                        "--device", "gpu0"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 3 and "from --device gpu0" in " ".join(lines), lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_shipped_bundles_preflight_without_crashing(tmp_path, monkeypatch):
    # the datasets and weights are absent here: every problem must be a user error, never a crash
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDKT_WEIGHTS", raising=False)
    for b in list_bundles():
        for name in b.configs:
            files = [str(b.path / "configs" / "transfer.json")]
            if name != "transfer.json":
                files.append(str(b.path / "configs" / name))
            problems = preflight_bundle(files, {}, bundle_name=b.name, output=tmp_path / "new")
            assert all(isinstance(p, MedktError) for p in problems), (b.name, problems)
            if b.name == "quickstart_tiny":
                assert problems == []
            if b.name == "jsrt_nodules":  # no MEDKT_WEIGHTS, no data: both manifests and the weights
                assert len(problems) == 3, problems


def test_run_folder_problems_are_reported_with_the_others(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run.partial").mkdir()
    files = [str(TINY / "configs" / "transfer.json")]
    problems = preflight_bundle(files, {"precision": "fp17"}, bundle_name="quickstart_tiny", output=tmp_path / "run")
    text = [str(p) for p in problems]
    assert len(text) == 3, text
    assert "unknown precision 'fp17'" in text[0] and "from --set precision=fp17" in text[0]
    assert "already exists" in text[1] and "--overwrite" in text[1]
    assert "interrupted run" in text[2]
    assert preflight_bundle(files, {}, output=tmp_path / "run", overwrite=True, restart=True) == []


def test_references_and_expressions_resolve_like_monai(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDKT_DATA", str(tmp_path))
    cfg = BundleConfig({
        "data_dir": "$os.environ.get('MEDKT_DATA', 'data')",
        "root": "$os.path.join(@data_dir, 'jsrt')",
        "evals": {"a": {"manifest": "$os.path.join(@root, 'x.csv')", "n": "@sizes#1"}},
        "sizes": [1, 2],
        "pipeline": {"evaluations": "@evals", "other": "$no_such_module.f()", "macro": "%other.json#x"},
    })
    assert cfg.get("pipeline#evaluations#a#manifest") == os.path.join(str(tmp_path), "jsrt", "x.csv")
    assert cfg.get("pipeline#evaluations#a#n") == 2
    assert cfg.get("pipeline#other") is UNKNOWN and cfg.get("pipeline#macro") is UNKNOWN
    assert cfg.get("pipeline#missing", default=None) is None


def test_config_files_merge_like_monai(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"inversion": {"steps": 5, "lr": 0.1}, "tags": [1], "x": 1}))
    b.write_text(json.dumps({"inversion": {"steps": 7}, "+tags": [2], "finetune#lr": 0.5}))
    merged = load_config([str(a), str(b)])
    assert merged == {"inversion": {"steps": 7}, "tags": [1, 2], "x": 1, "finetune": {"lr": 0.5}}


def test_manifest_columns_and_missing_images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    good = tmp_path / "m.csv"
    good.write_text("path,label\nimg/a.png,cat\nimg/b.png,cat\nimg/c.png,dog\n")
    nocol = tmp_path / "n.csv"
    nocol.write_text("file,label\nimg/a.png,cat\n")

    def problems(manifest: Path, skip_bad: bool = False) -> list[str]:
        doc = {"pipeline": {"evaluations": {"e": {"manifest": str(manifest), "skip_bad": skip_bad, "classes": ["cat"]}}}}
        path = tmp_path / f"cfg{manifest.stem}{skip_bad}.json"
        path.write_text(json.dumps(doc))
        return [str(p) for p in preflight_bundle([str(path)])]

    out = problems(good)
    assert len(out) == 1 and "2 file(s)" in out[0] and "img/b.png" in out[0], out
    assert problems(good, skip_bad=True) == []
    out = problems(nocol)
    assert len(out) == 1 and "columns path,label" in out[0], out


def test_segmentation_manifest_needs_masks(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,pneumothorax\n")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"pipeline": {"data": {"manifest": str(manifest)}}}))
    out = [str(p) for p in preflight_bundle([str(cfg)])]
    assert len(out) == 1 and "no mask" in out[0], out


def test_backend_weights_problems(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDKT_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert backend_problems("clip:medkt-tiny-ViT@random") == []
    assert backend_problems("phantom:base") == []  # the shipped checkpoint
    assert backend_problems("clip:ViT-B-32@openai") == []  # a tag: decided by open_clip later
    (p,) = backend_problems("clip:ViT-B-32@/no/w.pt")
    assert isinstance(p, WeightsNotFoundError) and "/no/w.pt" in str(p)
    (p,) = backend_problems("medclip:vit")
    assert "MEDKT_WEIGHTS" in str(p)
    monkeypatch.setenv("MEDKT_WEIGHTS", str(tmp_path))
    assert backend_problems("medclip:vit") == []
    (p,) = backend_problems("vilt:b32@dandelin/vilt-b32-mlm-itm")
    assert "local Hugging Face cache" in str(p)
    snap = tmp_path / "hub" / "models--dandelin--vilt-b32-mlm-itm" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    assert backend_problems("vilt:b32@dandelin/vilt-b32-mlm-itm") == []
    (p,) = backend_problems("medclip:vit", {"tokenizer": str(tmp_path / "no_tok")})
    assert "tokenizer" in str(p) and "no_tok" in str(p)
    (p,) = backend_problems("no-colon")
    assert isinstance(p, ConfigError)


def test_sam_checkpoint(tmp_path, monkeypatch):
    """The bundle-level SAM check (the file checks themselves: tests/test_sam_checkpoints.py)."""
    empty = tmp_path / "e.pth"
    empty.write_bytes(b"")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"sam": None, "pipeline": {"sam": "@sam"}}))
    monkeypatch.delenv("MEDKT_SAM_CHECKPOINT", raising=False)
    assert preflight_bundle([str(cfg)]) == []  # saliency-only mode
    monkeypatch.setenv("MEDKT_SAM_CHECKPOINT", str(tmp_path / "gone.pth"))
    (p,) = preflight_bundle([str(cfg)])
    assert str(p).startswith("MEDKT_SAM_CHECKPOINT: SAM checkpoint not found")
    (p,) = preflight_bundle([str(cfg)], {"sam": f"vit_b@{empty}"})
    assert "empty" in str(p)


@pytest.mark.parametrize("spec, ok", [("auto", True), ("CPU", True), ("cuda", True), ("cuda:3", True), ("mps", True),
                                      ("gpu", False), ("cuda:x", False), ("cpu:1", False), ("", False)])
def test_device_form(spec, ok):
    if ok:
        assert check_device_spec(spec) == spec.lower()
    else:
        with pytest.raises(ConfigError, match="unknown device"):
            check_device_spec(spec)


def test_precision_form():
    assert check_precision_spec("half", "cuda") == "fp16"
    with pytest.raises(ConfigError, match="only supported on CUDA"):
        check_precision_spec("fp16", "cpu")
    with pytest.raises(ConfigError, match="unknown precision"):
        check_precision_spec("fp8")


def test_one_problem_keeps_its_type_several_are_listed():
    raise_problems([])
    with pytest.raises(DataError):
        raise_problems([DataError("a")])
    with pytest.raises(PreflightError) as info:
        raise_problems([DataError("a"), ConfigError("b\nc")])
    assert str(info.value).splitlines() == ["a", "b c"]


def test_hub_backend_files_are_checked_in_the_local_cache(tmp_path, monkeypatch):
    """biomedclip:vit-b16 (the seg_* default) and clip:hf-hub:... read the local HF cache: the
    preflight names every missing file (model config + weights, text tower, tokenizer) and is quiet
    once they are cached, without torch."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    repo, bert = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "org/tiny-bert"
    (p,) = backend_problems("biomedclip:vit-b16")
    assert isinstance(p, WeightsNotFoundError) and repo in str(p) and "open_clip_config.json" in str(p)

    def cache(repo_id: str, files: dict[str, str]) -> None:
        folder = hub / ("models--" + repo_id.replace("/", "--"))
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("abc")
        snap = folder / "snapshots" / "abc"
        snap.mkdir(parents=True)
        for name, text in files.items():
            (snap / name).write_text(text)

    cfg = {"model_cfg": {"text_cfg": {"hf_model_name": bert, "hf_tokenizer_name": bert}}}
    cache(repo, {"open_clip_config.json": json.dumps(cfg), "open_clip_pytorch_model.bin": "w"})
    (p,) = backend_problems("biomedclip:vit-b16")  # the text tower's files (one line: one repo)
    assert bert in str(p) and "config.json" in str(p)
    cache(bert, {"config.json": "{}", "vocab.txt": "[PAD]"})
    assert backend_problems("biomedclip:vit-b16") == []
    assert backend_problems(f"clip:hf-hub:{repo}") == []
    assert backend_problems("biomedclip:vit-b16@random") == []
    (p,) = backend_problems("clip:hf-hub:org/other")
    assert "org/other" in str(p)
