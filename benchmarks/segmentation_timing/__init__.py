"""Per-image timings of the zero-shot segmentation chain on this CPU (not a test).

Measures, with real-size random-weight models (no downloads):

* M2IB saliency per image, naive (upstream: whole image encoder + prompt re-encoded at every
  step, gradients into all weights) vs cached (frozen prefix once per image, text once per
  prompt) -> ``m2ib_speedup``; the two maps are checked to be identical;
* SAM (``set_image`` + one box) per image for the requested model types;
* post-processing and metrics (DSC/NSD/IoU) per image.

    OMP_NUM_THREADS=1 python -m benchmarks.segmentation_timing --backend open_clip:ViT-B-16@random \
        --sam vit_b --images 2 --out runs/segmentation_timing.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def _time(fn, repeat: int = 1) -> tuple[float, float, object]:
    """Median wall and CPU seconds of ``fn()`` (CPU time is robust to other processes on a shared machine)."""
    out = None
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.median(wall)), float(np.median(cpu)), out


def bench_m2ib(spec: str, images: int, layer: int | None, naive_images: int) -> dict:
    from medkt.backends import create_backend
    from medkt.segmentation.m2ib import M2IB, M2IBConfig

    backend = create_backend(spec)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(backend.image_channels, backend.image_size, backend.image_size, generator=gen) for _ in range(images)]
    prompt = "A breast ultrasound image showing a dark, irregularly shaped mass with blurred margins."
    cached = M2IB(backend, M2IBConfig(layer=layer, cache_prefix=True))
    naive = M2IB(backend, M2IBConfig(layer=layer, cache_prefix=False))
    cached.explain(xs[0], prompt)  # warm-up: split verification + prompt embedding (once per prompt)
    rec = {"cached_wall": [], "cached_cpu": [], "naive_wall": [], "naive_cpu": []}
    identical = []
    for i, x in enumerate(xs):  # interleaved, so both paths see the same machine load
        w, c, rc = _time(lambda: cached.explain(x, prompt))
        rec["cached_wall"].append(w)
        rec["cached_cpu"].append(c)
        if i < naive_images:
            w, c, rn = _time(lambda: naive.explain(x, prompt))
            rec["naive_wall"].append(w)
            rec["naive_cpu"].append(c)
            identical.append(bool(np.array_equal(rn.token_kl, rc.token_kl)))
    k = len(rec["naive_cpu"])
    return {
        "backend": spec, "layer": cached.split.layer, "num_layers": cached.split.num_layers, "grid": list(cached.split.grid),
        "seconds_per_image_cached": float(np.mean(rec["cached_wall"])), "cpu_seconds_per_image_cached": float(np.mean(rec["cached_cpu"])),
        "seconds_per_image_naive": float(np.mean(rec["naive_wall"])), "cpu_seconds_per_image_naive": float(np.mean(rec["naive_cpu"])),
        "m2ib_speedup": float(np.sum(rec["naive_cpu"]) / np.sum(rec["cached_cpu"][:k])),
        "m2ib_speedup_wall": float(np.sum(rec["naive_wall"]) / np.sum(rec["cached_wall"][:k])),
        "identical_maps": all(identical), "images_cached": len(xs), "images_naive": k,
    }


def bench_sam(model_type: str, images: int, size: int) -> dict:
    from segment_anything import sam_model_registry

    from medkt.segmentation.sam import SamSegmenter, build_tiny_sam

    t0 = time.perf_counter()
    sam = build_tiny_sam() if model_type == "tiny" else sam_model_registry[model_type](checkpoint=None)
    build = time.perf_counter() - t0
    seg = SamSegmenter(sam.eval())
    rng = np.random.default_rng(0)
    times = []
    for _ in range(images):
        img = (rng.random((size, size)) * 255).astype(np.uint8)
        w, c, _ = _time(lambda: seg.segment(img, np.array([[size * 0.3, size * 0.3, size * 0.6, size * 0.6]])))
        times.append((w, c))
    return {"model_type": model_type, "image_size": size, "seconds_build": build,
            "seconds_per_image": float(np.mean([t[0] for t in times])), "cpu_seconds_per_image": float(np.mean([t[1] for t in times]))}


def bench_post_metrics(images: int, size: int) -> dict:
    from medkt.segmentation.metrics import segmentation_scores
    from medkt.segmentation.postprocess import postprocess_saliency

    rng = np.random.default_rng(0)
    t_post, t_met = [], []
    for _ in range(images):
        sal = rng.random((size, size)) * 0.2
        sal[size // 4 : size // 2, size // 3 : size // 2] += 1
        _, t, post = _time(lambda: postprocess_saliency(sal))
        t_post.append(t)
        gt = np.roll(post.mask, 3, 0)
        _, t, _ = _time(lambda: segmentation_scores(post.mask, gt))
        t_met.append(t)
    return {"image_size": size, "cpu_seconds_postprocess": float(np.mean(t_post)), "cpu_seconds_metrics": float(np.mean(t_met))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", action="append", default=None,
                    help="backend spec(s); default open_clip:ViT-B-16@random and medclip:vit@random")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--naive-images", type=int, default=1)
    ap.add_argument("--sam", default="vit_b", help="comma-separated SAM types (tiny, vit_b, vit_l, vit_h)")
    ap.add_argument("--image-size", type=int, default=512, help="side of the synthetic images for SAM/metrics")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                       "processor": platform.processor() or platform.machine()}, "m2ib": [], "sam": []}
    for spec in args.backend or ["open_clip:ViT-B-16@random", "medclip:vit@random"]:
        r = bench_m2ib(spec, args.images, args.layer, args.naive_images)
        print(json.dumps(r))
        res["m2ib"].append(r)
    for mt in [m for m in args.sam.split(",") if m]:
        r = bench_sam(mt, args.images, args.image_size)
        print(json.dumps(r))
        res["sam"].append(r)
    res["post_metrics"] = bench_post_metrics(max(args.images, 3), args.image_size)
    print(json.dumps(res["post_metrics"]))
    res["m2ib_speedup"] = min(r["m2ib_speedup"] for r in res["m2ib"])  # CPU-time ratio, naive / cached
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"m2ib_speedup (min over backends): {res['m2ib_speedup']:.2f}x")

