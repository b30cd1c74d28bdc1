"""GPU smoke run: every pipeline's spine, tiny random models, tiny synthetic data, one device.

    python -m benchmarks.gpu_smoke --device cuda --json gpu_smoke.json
    python -m benchmarks.gpu_smoke --device cpu                      # the same on the CPU (minutes)
    python -m benchmarks.gpu_smoke --device cuda --only quickstart_tiny rare_concepts_clip

Each case runs a shipped bundle through `medkt.bundles.run_bundle` with the overrides that
make it tiny (the same the test suite uses: tests/test_*bundles*.py, tests/test_natural_pipelines.py)
plus ``device=`` / ``precision=``, and prints per-case wall seconds, the stage seconds the run
reports (``seconds_*``) and the peak memory: GPU memory allocated by torch
(``torch.cuda.max_memory_allocated``, reset before each case) on CUDA, the process's peak RSS on
the CPU. Synthetic data is written with the data writers of benchmarks/common.py (the test suite
uses the same) into a temporary folder. The numbers are for "does it run, where does the time go", not model quality.

A bundle without a top-level ``device`` key cannot take the override: the case then runs on the
bundle's default device and the output says ``"device_override": false``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    blob_image,
    bundle_config,
    chest_like,
    peak_rss_mb,
    write_coco_captions,
    write_imagenet,
    write_karpathy,
    write_mask_png,
    write_png,
    write_radiograph_dicom,
    write_rare_concepts,
)

TINY_INV = {"steps": 3, "checkpoint_every": 2, "priors": [{"name": "progressive", "sizes": [32, 64], "steps": [2]}]}
TWO = [{"name": "dog", "description": "a furry pet with a tail", "n_images": 2},
       {"name": "car", "description": "a red road vehicle with wheels", "n_images": 2}]


# --- synthetic data (same writers and layouts as the test suite) ----------------------------------
def natural_data(root: Path) -> dict[str, Any]:
    from medkt.data.manifest import read_manifest, write_manifest
    from medkt.data.prepare import prepare
    from medkt.natural.classnames import imagenet100_wnids

    write_rare_concepts(root / "rare", per_concept=2)
    write_imagenet(root / "imagenet", imagenet100_wnids(), per_class=1)
    in100 = prepare("imagenet100", root / "imagenet", out=root / "imagenet" / "imagenet100.csv")
    coco = write_karpathy(root / "coco", "coco", n_test=3, n_train=1)
    return {"rare": prepare("rare_concepts", root / "rare"),
            "imagenet20": write_manifest(read_manifest(in100)[:20], root / "imagenet" / "imagenet_subset.csv"),
            "f30k": write_karpathy(root / "f30k", "flickr30k", n_test=4, n_train=1),
            "coco": coco, "coco_captions": write_coco_captions(root / "coco", coco)}


def cxr_data(root: Path) -> Path:
    """``MEDKT_DATA`` with jsrt/ (raw .IMG + a DICOM copy) and chexpert/ (JPEG), as tests/test_cxr_bundles.py."""
    import numpy as np
    from PIL import Image

    from medkt.data.prepare import prepare
    from medkt.data.readers import write_jsrt_raw

    rng = np.random.default_rng(0)
    jsrt, clinical = root / "jsrt", []
    for i, kind in enumerate(["cancer", "benign", "cancer", "benign"], start=1):
        img, name = chest_like(rng, 2048, nodule=0.25, kind=kind), f"JPCLN{i:03d}"
        if i == 4:
            write_radiograph_dicom(jsrt / "images" / f"{name}.dcm", img[::8, ::8], window=(2048, 4096))
        else:
            write_jsrt_raw(img, jsrt / "images" / f"{name}.IMG")
        clinical.append(f"{name}.IMG\t3\t20\t60\tmale\t1000\t1000\t{'malignant' if kind == 'cancer' else 'benign'}"
                        "\tr.upper lobe\tx")
    (jsrt / "CLNDAT_EN.txt").write_text("\n".join(clinical) + "\n")
    prepare("jsrt", jsrt)
    five = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    findings = ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
                "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                "Support Devices"]
    chex = root / "chexpert"
    (chex / "CheXpert-v1.0-small").mkdir(parents=True)
    records = []
    for c in five:
        for k in range(2):
            rel = f"CheXpert-v1.0-small/train/patient{len(records):05d}/study1/view1_frontal.jpg"
            (chex / rel).parent.mkdir(parents=True, exist_ok=True)
            arr = np.rint(chest_like(rng, 48, nodule=0.1 * k, kind="benign") * 255).astype(np.uint8)
            Image.fromarray(arr).save(chex / rel)
            rec = {"Path": rel, "Frontal/Lateral": "Frontal", "AP/PA": "AP", "No Finding": "", **{f: "" for f in findings}}
            rec[c] = "1.0"
            records.append(rec)
    with open(chex / "CheXpert-v1.0-small" / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    prepare("chexpert_5x200c", chex, n_per_class=2, seed=0)
    return root


def udiat_data(root: Path) -> Path:
    """Breast-ultrasound layout (BUS_Dataset_B original/ + GT/), as tests/test_segmentation_bundles.py."""
    import numpy as np

    from medkt.data.prepare import prepare

    rng = np.random.default_rng(0)
    for i in range(3):
        img, mask = blob_image((48, 64), (20 + 3 * i, 30), 8, rng)
        write_png(root / "BUS_Dataset_B" / "original" / f"{i + 1:06d}.png", img)
        write_mask_png(root / "BUS_Dataset_B" / "GT" / f"{i + 1:06d}.png", mask)
    prepare("udiat", root)
    return root


# --- the cases ------------------------------------------------------------------------------------
Case = tuple[str, str, Callable[[Path, dict[str, Any]], dict[str, Any]]]  # (name, bundle, overrides(tmp, data))


def _phantom_recipe() -> dict[str, Any]:
    cfg = bundle_config("phantom_nodules")
    recipe = cfg["recipe"]
    recipe["n_images"] = 4
    recipe["inversion"]["steps"] = 10
    recipe["finetune"]["epochs"] = 1
    return recipe


def _vilt(d: dict[str, Any]) -> dict[str, Any]:
    return {"backend": "vilt:tiny@random", "rare_concepts_manifest": str(d["rare"]),
            "imagenet100_manifest": str(d["imagenet20"]), "inversion": TINY_INV, "finetune#lr": 1e-3,
            "separate_concepts": False, "concepts#0#n_images": 2, "concepts#1#n_images": 2, "concepts#2#n_images": 2}


CASES: list[Case] = [
    ("quickstart_tiny", "quickstart_tiny",
     lambda tmp, d: {"inversion#steps": 8, "evaluations#held_out_inversions#n_images": 2}),
    ("cxr_jsrt_medclip", "jsrt_nodules",
     lambda tmp, d: {"backend": "medclip:tiny@random", "multipliers": [1],
                     "inversion": {"steps": 3, "lr": 0.1, "checkpoint_every": 0}}),
    ("rare_concepts_clip", "rare_concepts_clip",
     lambda tmp, d: {"backend": "clip:medkt-tiny-ViT@random", "rare_concepts_manifest": str(d["rare"]),
                     "imagenet_manifest": str(d["imagenet20"]), "inversion": {**TINY_INV, "priors": [{"name": "progressive", "sizes": [16, 32], "steps": [2]}]},
                     "templates": ["a photo of a {}.", "itap of a {}."], "finetune#lr": 1e-3}),
    ("vilt_itm", "rare_concepts_vilt", lambda tmp, d: _vilt(d)),
    ("vilt_retrieval", "flickr30k_vilt",
     lambda tmp, d: {"backend": "vilt:tiny@random", "karpathy_json": str(d["f30k"]),
                     "image_root": str(d["f30k"].parent), "baseline_cache": str(tmp / "baseline"), "concepts": TWO,
                     "inversion": TINY_INV, "finetune#lr": 1e-2, "finetune#batch_size": 2, "scoring#block_size": 3}),
    ("coca_captioning", "coco_captioning_coca",
     lambda tmp, d: {"backend": "coca:tiny@random", "karpathy_json": str(d["coco"]),
                     "image_root": str(d["coco"].parent), "coco_captions_json": str(d["coco_captions"]),
                     "concepts": TWO, "inversion": {"steps": 3}, "metrics": ["BLEU", "ROUGE_L", "CIDEr"],
                     "generation": {"method": "beam_search", "seq_len": 8, "min_seq_len": 3},
                     "finetune#lr": 1e-3, "finetune#batch_size": 2}),
    ("segmentation_sam", "seg_breast_ultrasound",
     lambda tmp, d: {"data_root": str(d["udiat"]), "backend": "medclip:tiny@random", "sam": "tiny@random",
                     "data": {**bundle_config("seg_breast_ultrasound")["data"], "max_images": 3},
                     "inversion": {"steps": 2, "lr": 0.1},
                     "m2ib": {**bundle_config("seg_breast_ultrasound")["m2ib"], "steps": 3, "beta": 1.0,
                              "batch_size": 4, "layer": None},
                     "concepts": [{**c, "n_images": 2} for c in bundle_config("seg_breast_ultrasound")["concepts"]]}),
    ("phantom", "phantom_nodules",
     lambda tmp, d: {"seeds": 1, "eval_per_class": 4, "recipe": _phantom_recipe(), "segmentation": True,
                     "pipeline#segmentation_images": 2}),
]
#: data each case needs (built once, lazily)
NEEDS = {"cxr_jsrt_medclip": "cxr", "rare_concepts_clip": "natural", "vilt_itm": "natural",
         "vilt_retrieval": "natural", "coca_captioning": "natural", "segmentation_sam": "udiat"}


# --- measurement ----------------------------------------------------------------------------------
def _stage_seconds(results: Any, prefix: str = "", depth: int = 2) -> dict[str, float]:
    """Every ``seconds*`` number in the results, nested dicts flattened with '/' (``depth`` levels)."""
    out: dict[str, float] = {}
    if isinstance(results, dict):
        for k, v in results.items():
            key = f"{prefix}{k}"
            if isinstance(v, (int, float)) and not isinstance(v, bool) and str(k).startswith("seconds"):
                out[key] = float(v)
            elif isinstance(v, dict) and depth > 0:
                out.update(_stage_seconds(v, key + "/", depth - 1))
    return out


def run_case(name: str, bundle: str, overrides: dict[str, Any], out: Path, device: str, precision: str) -> dict[str, Any]:
    import torch

    from medkt.bundles import run_bundle

    cfg = bundle_config(bundle)
    applied = {}
    for key, value in (("device", device), ("precision", precision)):
        if key in cfg:  # the lead's bundles gain top-level device/precision keys; older ones lack them
            overrides[key] = value
            applied[key] = True
        else:
            applied[key] = False
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_mb()
    torch.manual_seed(0)
    t = time.perf_counter()
    rec: dict[str, Any] = {"bundle": bundle, "device_override": applied["device"],
                           "precision_override": applied["precision"]}
    try:
        results = run_bundle(bundle, overrides, output=out)
        if cuda:
            torch.cuda.synchronize()
        rec["ok"] = True
        rec["stages_s"] = _stage_seconds(results)
    except Exception as exc:  # report and go on with the next case
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        rec["traceback"] = traceback.format_exc(limit=8)
    rec["wall_s"] = time.perf_counter() - t
    if cuda:
        rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    rec["peak_rss_mb"] = peak_rss_mb()
    rec["peak_rss_growth_mb"] = rec["peak_rss_mb"] - rss0
    return rec


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu | mps | auto (default cuda)")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (default auto)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--only", nargs="*", default=None, help=f"case names: {[c[0] for c in CASES]}")
    p.add_argument("--keep", type=Path, default=None, help="keep data and run folders here (default: a temp dir)")
    a = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from medkt.device import resolve_device, resolve_precision

    dev = resolve_device(a.device)  # fails at once, naming the available devices, if there is no GPU
    prec = resolve_precision(a.precision, dev)
    cases = [c for c in CASES if a.only is None or c[0] in a.only]
    unknown = sorted(set(a.only or []) - {c[0] for c in CASES})
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {[c[0] for c in CASES]}")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="medkt_gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": str(dev), "precision": prec, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": {}}
    data: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        for name, bundle, make_overrides in cases:
            need = NEEDS.get(name)
            if need == "natural" and "natural" not in data:
                data.update(natural_data(work / "natural"))
                data["natural"] = True
            elif need == "cxr" and "cxr" not in data:
                data["cxr"] = cxr_data(work / "medkt_data")
                os.environ["MEDKT_DATA"] = str(data["cxr"])
            elif need == "udiat" and "udiat" not in data:
                data["udiat"] = udiat_data(work / "udiat")
            print(f"[gpu_smoke] {name} ({bundle}) on {dev}, {prec} ...", file=sys.stderr, flush=True)
            rec = run_case(name, bundle, make_overrides(work / name, data), work / name / "run", str(dev), prec)
            report["cases"][name] = rec
            mem = f"peak GPU {rec['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in rec else f"peak RSS {rec['peak_rss_mb']:.0f} MB"
            status = "ok" if rec["ok"] else f"FAILED {rec['error']}"
            print(f"[gpu_smoke] {name}: {status}, {rec['wall_s']:.1f} s, {mem}", file=sys.stderr, flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds_total"] = time.perf_counter() - t0
    report["all_ok"] = all(r["ok"] for r in report["cases"].values())
    print(table(report))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1))
    return report


def table(report: dict[str, Any]) -> str:
    """Markdown table: case, ok, wall seconds, main stage seconds, peak memory."""
    gpu = any("peak_gpu_mb" in r for r in report["cases"].values())
    lines = [f"device {report['device']} ({report['gpu'] or 'no GPU'}), precision {report['precision']}, "
             f"torch {report['torch']}", "",
             f"| case | ok | wall s | stage seconds | {'peak GPU MB' if gpu else 'peak RSS MB'} | device override |",
             "|---|---|---:|---|---:|---|"]
    for name, r in report["cases"].items():
        stages = ", ".join(f"{k.replace('seconds_', '')} {v:.1f}" for k, v in list(r.get("stages_s", {}).items())[:6])
        mem = r.get("peak_gpu_mb", r["peak_rss_mb"])
        lines.append(f"| {name} | {'yes' if r['ok'] else 'NO'} | {r['wall_s']:.1f} | {stages} | {mem:.0f} | "
                     f"{'yes' if r['device_override'] else 'no (bundle has no device key)'} |")
    return "\n".join(lines) + f"\n\ntotal {report['seconds_total']:.1f} s\n"

