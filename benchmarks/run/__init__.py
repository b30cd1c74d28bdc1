"""medkt performance benchmark (issue 6): one command, one JSON.

    python -m benchmarks.run --json out.json            # full: ViT-B/32 (random weights), medians of 3
    python -m benchmarks.run --json out.json --quick    # same code paths, 1 repetition, fewer M2IB steps
    python -m benchmarks.run --json out.json --tiny     # tiny model, seconds (used by the test suite)

Measured side by side in one process:

* inversion step time of the paper-faithful recipe (``InversionConfig()`` defaults: 5,000 steps
  at 224 px, one view, all images in one batch) and of medkt's default recipe
  (`medkt.inversion.INVERSION_PRESETS` ``"fast"``), stage by stage. A step's time is the
  slope between two real `medkt.inversion.invert` calls with different step counts, so the
  fixed costs (text encoding, final similarity) are measured separately, not mixed into the step;
* model FLOPs of one step (``torch.utils.flop_counter`` around the same two calls: forward +
  input-gradient backward) and the achieved FLOP/s against a large fp32 matmul timed right
  before each step measurement (paired, so machine load affects both alike);
* fine-tuning time (``FinetuneConfig()`` defaults on the inverted images);
* time-to-concept = text encoding + inversion steps + fine-tuning, projected from the step times
  for both recipes;
* final image-text similarity at the model's resolution for both recipes (from real inversion
  runs on ``--similarity-images`` images; the 5,000-step paper run is long, so results are
  cached in ``benchmarks/run/similarity_cache.json`` keyed by backend, recipe, images, seed
  and torch version, and the JSON says which numbers were cached);
* M2IB saliency per image with the naive path (whole encoder every step) vs the cached prefix,
  and whether the maps are identical;
* zero-shot evaluation: encoder calls for two evaluations at an unchanged model state;
* mixed precision: ``bf16_vs_fp32_similarity_delta`` = final similarity of a bf16 (autocast)
  inversion minus that of the same fp32 run, tiny model, both read out in fp32 (plus fine-tuning
  loss / embedding-change deltas in ``bf16_vs_fp32``);
* streamed zero-shot evaluation: peak memory at two dataset sizes, and images/s against a plain
  open_clip loop in the same process (``eval_vs_open_clip_ratio``; `benchmarks.eval_memory`);
* peak memory (max RSS) after each phase; load average before/after.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import log, median
from benchmarks.common import peak_rss_mb as max_rss_mb

#: results of the runs quoted in README.md, and the cache of the long similarity runs
RESULTS_DIR = Path(__file__).resolve().parent
SIM_CACHE = RESULTS_DIR / "similarity_cache.json"
REFERENCE_PEAK_GFLOPS = 190.0  # issue 6: this machine's idle fp32 matmul rate, 2 threads
CONCEPT = ("moongate", "a perfectly round opening cut through a garden wall of pale stone, framing the path beyond")
NEGATIVES = ["a photo of a dog.", "a photo of a bridge.", "a photo of a clock."]


# --- small utilities ---------------------------------------------------------------------------
def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}


# --- peak matmul -------------------------------------------------------------------------------
def matmul_gflops(n: int = 2048, reps: int = 1) -> list[float]:
    """fp32 ``n x n @ n x n`` rates in GFLOP/s (2 n^3 FLOPs each), after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        out.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return out


# --- inversion timing --------------------------------------------------------------------------
def _targets(n_images: int):
    from medkt.inversion import InversionTarget

    return [InversionTarget(CONCEPT[0], CONCEPT[1], n_images)]


def _invert_seconds(backend, cfg: dict[str, Any], n_images: int) -> float:
    from medkt.inversion import invert

    t = time.perf_counter()
    invert(backend, _targets(n_images), cfg, progress=False)
    return time.perf_counter() - t


def time_steps(backend, cfg: dict[str, Any], n_images: int, k: int, reps: int, matmul_n: int) -> dict[str, Any]:
    """Seconds per inversion step of ``cfg`` (all steps at one stage) and fixed overhead.

    Each repetition: a matmul (peak), ``invert(steps=1)`` and ``invert(steps=1+k)``; per step =
    difference / k. Returns medians and the paired (step rate / matmul rate) samples.
    """
    per_step, overhead, peaks = [], [], []
    _invert_seconds(backend, {**cfg, "steps": 1}, n_images)  # warm-up (allocator, kernels)
    for _ in range(reps):
        peaks.append(median(matmul_gflops(matmul_n, 1)))
        t1 = _invert_seconds(backend, {**cfg, "steps": 1}, n_images)
        tk = _invert_seconds(backend, {**cfg, "steps": 1 + k}, n_images)
        per_step.append(max(tk - t1, 1e-9) / k)
        overhead.append(max(t1 - per_step[-1], 0.0))
    return {"step_s": median(per_step), "step_s_samples": per_step, "overhead_s": median(overhead),
            "paired_peak_gflops": peaks}


def count_step_flops(backend, cfg: dict[str, Any], n_images: int) -> float:
    """Model FLOPs of one inversion step of ``n_images`` (forward + input-gradient backward), by difference."""
    from torch.utils.flop_counter import FlopCounterMode

    from medkt.inversion import invert

    totals = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as fc:
            invert(backend, _targets(n_images), {**cfg, "steps": steps}, progress=False)
        totals.append(fc.get_total_flops())
    return float(totals[1] - totals[0])


def stage_plan(cfg: dict[str, Any], image_size: int) -> list[tuple[int, int]]:
    """[(size, n_steps)] of a recipe's progressive-resolution schedule."""
    steps = int(cfg.get("steps", 5000))
    prog = _prior(cfg, "progressive") or {}
    sizes = prog.get("sizes") or [image_size]
    starts = [0, *(prog.get("steps") or [])]
    ends = [*starts[1:], steps]
    return [(int(s), int(e - b)) for s, b, e in zip(sizes, starts, ends)]


def _prior(cfg: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The settings dict of prior ``name`` in an inversion config dict (None when not listed)."""
    return next((p for p in cfg.get("priors", []) if p.get("name") == name), None)


def at_one_size(cfg: dict[str, Any], size: int) -> dict[str, Any]:
    """``cfg`` without its schedule (steps, progressive resolution, early stopping), run at ``size``."""
    priors = [p for p in cfg.get("priors", [{"name": "tv"}]) if p.get("name") not in ("progressive", "early_stop")]
    out = {k: v for k, v in cfg.items() if k not in ("steps", "priors")}
    return {**out, "priors": [*priors, {"name": "progressive", "sizes": [size], "steps": []}]}


# --- fine-tuning, M2IB, zero-shot ---------------------------------------------------------------
def time_finetune(backend, n_images: int, reps: int) -> dict[str, Any]:
    from medkt.finetune import FinetuneConfig, finetune

    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(n_images, backend.image_channels, backend.image_size, backend.image_size, generator=g)
    secs, steps = [], 0
    for _ in range(reps):
        b = copy.deepcopy(backend)  # fine-tuning changes the weights; later phases use the original
        t = time.perf_counter()
        hist = finetune(b, imgs, [CONCEPT[0]] * n_images, {CONCEPT[0]: CONCEPT[1]}, NEGATIVES, FinetuneConfig(),
                        progress=False)
        secs.append(time.perf_counter() - t)
        steps = hist["steps"]
        del b
    return {"seconds": median(secs), "samples": secs, "steps": steps, "config": "FinetuneConfig() defaults"}


def time_m2ib(backend, reps: int, steps: int | None, warm_naive: bool = True) -> dict[str, Any]:
    import numpy as np

    from medkt.segmentation.m2ib import M2IB, M2IBConfig

    over = {} if steps is None else {"steps": steps}
    cached = M2IB(backend, M2IBConfig(cache_prefix=True, **over))
    naive = M2IB(backend, M2IBConfig(cache_prefix=False, **over))
    prompt = "a bright round spot in the upper part of the image"
    size, ch = backend.image_size, backend.image_channels
    warm = torch.rand(ch, size, size, generator=torch.Generator().manual_seed(99))
    cached.saliency(warm, prompt)  # split verification + text cache (once per prompt)
    if warm_naive:  # allocator warm-up only (skipped by --quick: the naive path is the slow one)
        naive.saliency(warm, prompt)
    t_naive, t_cached, identical = [], [], True
    for r in range(reps):
        img = torch.rand(ch, size, size, generator=torch.Generator().manual_seed(r))
        t = time.perf_counter()
        a = naive.saliency(img, prompt, seed=r)
        t_naive.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = cached.saliency(img, prompt, seed=r)
        t_cached.append(time.perf_counter() - t)
        identical = identical and bool(np.array_equal(a, b))
    n, c = median(t_naive), median(t_cached)
    return {"naive_s_per_image": n, "cached_s_per_image": c, "speedup": n / c, "identical_maps": identical,
            "naive_samples": t_naive, "cached_samples": t_cached, "m2ib_steps": cached.config.steps,
            "m2ib_batch": cached.config.batch_size, "layer": cached.split.layer}


def zero_shot_calls(backend) -> dict[str, Any]:
    """Encoder calls made by two ``evaluate()`` calls of one evaluator at an unchanged model state."""
    from medkt.evaluation import ZeroShotEvaluator

    counts = {"encode_text_rows": 0, "encode_pixels_images": 0}
    orig_t, orig_p = backend.encode_text, backend.encode_pixels

    def enc_t(tokens, *a, **k):
        out = orig_t(tokens, *a, **k)
        counts["encode_text_rows"] += len(out)
        return out

    def enc_p(x):
        counts["encode_pixels_images"] += len(x)
        return orig_p(x)

    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(4, backend.image_channels, backend.image_size, backend.image_size, generator=g)
    prompts = {"a": ["a photo of a cat."], "b": ["a photo of a dog."], "c": ["a photo of a car."]}
    backend.encode_text, backend.encode_pixels = enc_t, enc_p
    try:
        ev = ZeroShotEvaluator(backend, imgs, ["a", "b", "c", "a"], prompts)
        ev.evaluate()
        first = dict(counts)
        ev.evaluate()
    finally:
        del backend.encode_text, backend.encode_pixels  # drop the instance attributes
    second = {k: counts[k] - first[k] for k in counts}
    return {"first_evaluate": first, "second_evaluate_same_state": second,
            "text_cached": first["encode_text_rows"] > 0 and second["encode_text_rows"] == 0, "image_embeddings_cached": second["encode_pixels_images"] == 0}


# --- mixed precision ---------------------------------------------------------------------------
def bf16_vs_fp32(steps: int = 100, n_images: int = 4, spec: str = "clip:medkt-tiny-ViT@random") -> dict[str, Any]:
    """How far bf16 (autocast) inversion and fine-tuning land from fp32, same seeds, on this CPU.

    Both runs start from the same random model and start images; the final similarity of each
    run's images is measured with the fp32 model (so the delta is the optimisation's, not bf16's
    measurement error; the bf16 run's own bf16 reading is reported too). Fine-tuning: 5 epochs on
    the inverted images, final loss and embedding change of 4 fixed probe images.
    """
    from medkt.backends import create_backend
    from medkt.finetune import finetune
    from medkt.inversion import invert, similarity

    texts = [CONCEPT[1]] * n_images
    runs: dict[str, Any] = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        b = create_backend(spec, precision=prec).eval()
        t = time.perf_counter()
        inv = invert(b, _targets(n_images), {"steps": steps, "seed": 0}, progress=False)
        t_inv = time.perf_counter() - t
        b.precision = "fp32"  # read every run's images with the fp32 model
        sim32 = similarity(b, inv.images, b.encode_texts(texts)).tolist()
        b.precision = prec
        probe = torch.rand(4, 3, b.image_size, b.image_size, generator=torch.Generator().manual_seed(1))
        e0 = b.encode_images(probe)
        t = time.perf_counter()
        hist = finetune(b, inv.images, inv.concepts, {CONCEPT[0]: CONCEPT[1]}, negative_captions=NEGATIVES,
                        config={"epochs": 5, "lr": 1e-4, "batch_size": 2, "seed": 0}, progress=False)
        t_ft = time.perf_counter() - t
        e1 = b.encode_images(probe)
        runs[prec] = {"final_similarity_fp32_readout": statistics.mean(sim32),
                      "final_similarity_own_precision": statistics.mean(inv.similarities),
                      "inversion_s": t_inv, "finetune_first_loss": hist["loss"][0],
                      "finetune_final_loss": hist["loss"][-1], "finetune_s": t_ft,
                      "embedding_change": float((1 - (e0 * e1).sum(-1)).mean()), "images": inv.images}
    i32, i16 = runs["fp32"].pop("images"), runs["bf16"].pop("images")
    a, b_ = runs["fp32"], runs["bf16"]
    return {
        "similarity_delta": b_["final_similarity_fp32_readout"] - a["final_similarity_fp32_readout"],
        "finetune_final_loss_delta": b_["finetune_final_loss"] - a["finetune_final_loss"],
        "embedding_change_ratio": b_["embedding_change"] / a["embedding_change"] if a["embedding_change"] else None,
        "image_max_abs_diff": float((i16 - i32).abs().max()),
        "runs": runs, "backend": spec, "steps": steps, "images": n_images,
        "note": "bf16 = torch.autocast(bfloat16) forward passes; pixels, weights and optimiser state fp32",
    }


# --- final similarity ---------------------------------------------------------------------------
def _cache_key(spec: str, cfg: dict[str, Any], n: int, seed: int) -> str:
    return json.dumps({"backend": spec, "cfg": cfg, "n": n, "seed": seed, "torch": torch.__version__}, sort_keys=True)


def load_sim_cache() -> dict[str, Any]:
    try:
        return json.loads(SIM_CACHE.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def similarity_run(spec: str, backend, cfg: dict[str, Any], n: int, seed: int, mode: str,
                   write_cache: bool = True) -> dict[str, Any] | None:
    """Final similarity of ``cfg`` on ``n`` images: cached, live, or None (mode: cache|live|auto|off)."""
    from medkt.inversion import invert

    key = _cache_key(spec, cfg, n, seed)
    cache = load_sim_cache()
    if mode in ("cache", "auto") and key in cache:
        return {**cache[key], "cached": True}
    if mode in ("cache", "off"):
        return None
    log(f"similarity run: {cfg} on {n} image(s)")
    t = time.perf_counter()
    res = invert(backend, _targets(n), {**cfg, "seed": seed}, progress=True)
    out = {"final_similarity": float(sum(res.similarities) / len(res.similarities)), "per_image": res.similarities,
           "steps_run": res.steps_run, "seconds": time.perf_counter() - t, "images": n, "backend": spec,
           "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg": os.getloadavg(),
           "threads": torch.get_num_threads(),
           "curve": [float(v) for v in res.history[0][:: max(1, len(res.history[0]) // 50)]]}
    if write_cache:  # --tiny (test) runs do not pollute the cache
        cache = load_sim_cache()
        cache[key] = out
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        SIM_CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True))
    return {**out, "cached": False}


# --- recipes ------------------------------------------------------------------------------------
def recipes(image_size: int, paper_steps: int, default_steps: int | None) -> tuple[dict, dict]:
    from medkt.inversion import preset_dict

    paper = {"steps": paper_steps}
    default = preset_dict("fast", image_size)
    if default_steps is not None:  # --tiny: shrink the schedule proportionally
        f = default_steps / default["steps"]
        default["steps"] = default_steps
        prog, stop = _prior(default, "progressive"), _prior(default, "early_stop")
        if prog and prog.get("steps"):
            prog["steps"] = [max(1, int(round(s * f))) for s in prog["steps"]]
        if stop and stop.get("patience"):
            stop["patience"] = max(2, int(round(stop["patience"] * f)))
    return paper, default


# --- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--quick", action="store_true", help="<= 60 s on an idle machine: 1 repetition, 3 M2IB steps")
    p.add_argument("--tiny", action="store_true", help="tiny random model and short recipes (for the test suite)")
    p.add_argument("--backend", default=None, help="backend spec (default clip:ViT-B-32@random)")
    p.add_argument("--images", type=int, default=10, help="images per concept (batch of the inversion)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per logical CPU)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per timing (default 3, quick 1)")
    p.add_argument("--similarity", choices=["auto", "live", "cache", "off"], default=None,
                   help="final-similarity runs: auto = cached else live (quick: cached only)")
    p.add_argument("--similarity-images", type=int, default=1, help="images per similarity run")
    p.add_argument("--similarity-images-main", type=int, default=1,
                   help="images of the cached similarity runs looked up for --backend when a proxy is used")
    p.add_argument("--similarity-backend", default=None,
                   help="backend of the final-similarity runs (default: --backend), e.g. a cheaper proxy")
    p.add_argument("--paper-steps", type=int, default=5000)
    p.add_argument("--reference-peak-gflops", type=float, default=REFERENCE_PEAK_GFLOPS,
                   help="idle-machine matmul peak used for the idle projection")
    p.add_argument("--levers", action=argparse.BooleanOptionalAction, default=None,
                   help="also time threads / frozen weights / views / batch (default: on unless quick/tiny)")
    a = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = a.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    tiny = a.tiny
    spec = a.backend or ("clip:medkt-tiny-ViT@random" if tiny else "clip:ViT-B-32@random")
    reps = a.reps or (1 if (a.quick or tiny) else 3)
    k = 1 if (a.quick or tiny) else 2
    matmul_n = 256 if tiny else 2048
    sim_mode = a.similarity or ("live" if tiny else ("cache" if a.quick else "auto"))
    levers_on = a.levers if a.levers is not None else not (a.quick or tiny)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    mem: dict[str, float] = {"start": max_rss_mb()}

    from medkt.backends import create_backend

    torch.manual_seed(0)  # random weights are a function of the seed: the similarity cache relies on it
    backend = create_backend(spec).eval()
    mem["model"] = max_rss_mb()
    paper, default = recipes(backend.image_size, 60 if tiny and a.paper_steps == 5000 else a.paper_steps,
                             12 if tiny else None)
    out: dict[str, Any] = {"command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "backend": spec,
                           "machine": machine_info(threads), "loadavg_start": load_start, "quick": a.quick,
                           "tiny": tiny, "reps": reps, "images": a.images,
                           "recipes": {"paper": paper, "default": default}}

    # 1. peak
    log(f"{spec}: peak matmul ({matmul_n}^2 fp32, {threads} thread(s))")
    peak = matmul_gflops(matmul_n, 3 if a.quick or tiny else 5)
    if not (a.quick or tiny):
        peak += matmul_gflops(4096, 2)
    out["peak_matmul_gflops"] = {"median": median(peak), "max": max(peak), "samples": peak, "n": matmul_n}

    # 2. step times, stage by stage (the paper recipe's single stage is the default's last one)
    log("inversion step times")
    paper_step = time_steps(backend, paper, a.images, k, reps, matmul_n)
    log(f"  paper recipe: {paper_step['step_s']:.3f} s/step")
    per_step_settings = {kk: v for kk, v in default.items() if kk != "steps"}
    stage_times: dict[int, dict[str, Any]] = {}
    for size, _ in stage_plan(default, backend.image_size) + [(backend.image_size, 0)]:
        if size in stage_times:
            continue
        if size == backend.image_size and not per_step_settings:  # same step as the paper recipe's
            stage_times[size] = paper_step
            continue
        cfg = at_one_size(default, size)
        stage_times[size] = time_steps(backend, cfg, a.images, k, reps, matmul_n)
        log(f"  default recipe, {size}px stage: {stage_times[size]['step_s']:.3f} s/step")
    mem["inversion"] = max_rss_mb()

    # 3. FLOPs and fraction of peak at the model-resolution stage (paper recipe = 224 only)
    log("FLOP count")
    if a.quick:  # FLOPs are linear in the batch: count one image's step and scale
        flops = count_step_flops(backend, paper, 1) * a.images
    else:
        flops = count_step_flops(backend, paper, a.images)
    paired = [flops / s / 1e9 / pk for s, pk in zip(paper_step["step_s_samples"], paper_step["paired_peak_gflops"])]
    achieved = flops / paper_step["step_s"] / 1e9
    out["inversion_flops_per_step"] = flops
    out["inversion_achieved_gflops"] = achieved
    out["inversion_flops_fraction_of_peak"] = median(paired)
    out["inversion_flops_fraction_of_peak_unpaired"] = achieved / median(peak)

    # 4. fine-tuning
    log("fine-tuning time")
    ft = time_finetune(backend, a.images, reps)
    mem["finetune"] = max_rss_mb()

    # 5. time to concept (projected from the measured step times)
    def project(recipe: dict[str, Any], steps_run: int | None = None) -> dict[str, Any]:
        plan = stage_plan(recipe, backend.image_size)
        if steps_run is not None and steps_run < recipe["steps"]:  # early stopping cut the last stage
            cut = recipe["steps"] - steps_run
            plan[-1] = (plan[-1][0], plan[-1][1] - cut)
        st = paper_step if len(plan) == 1 and plan[0][0] == backend.image_size and recipe is paper else None
        inv = sum(n * (st or stage_times[s])["step_s"] for s, n in plan)
        overhead = (st or stage_times[backend.image_size])["overhead_s"]
        total = overhead + inv + ft["seconds"]
        return {"stages": [{"size": s, "steps": n} for s, n in plan], "inversion_s": inv, "overhead_s": overhead,
                "finetune_s": ft["seconds"], "total_s": total}

    # 6. final similarity (real runs, cached)
    log(f"final similarity (mode {sim_mode})")
    sim_spec, sim_backend = spec, backend
    if a.similarity_backend and a.similarity_backend != spec:
        torch.manual_seed(0)
        sim_spec, sim_backend = a.similarity_backend, create_backend(a.similarity_backend).eval()
    sim_recipes = recipes(sim_backend.image_size, paper["steps"], 12 if tiny else None)
    sim_default = similarity_run(sim_spec, sim_backend, sim_recipes[1], a.similarity_images, 0, sim_mode, not tiny)
    sim_paper = similarity_run(sim_spec, sim_backend, sim_recipes[0], a.similarity_images, 0, sim_mode, not tiny)
    out["similarity_backend"] = sim_spec
    if sim_spec != spec:  # also report what is known (cached) for the timed backend itself
        main_recipes = (paper, default)
        out["similarity_timed_backend"] = {
            "backend": spec, "images": a.similarity_images_main,
            "default": similarity_run(spec, backend, main_recipes[1], a.similarity_images_main, 0, "cache"),
            "paper": similarity_run(spec, backend, main_recipes[0], a.similarity_images_main, 0, "cache"),
            "upper_bound": 1.0, "note": "cached runs only (None = not measured); cosine similarity cannot exceed 1"}
    mem["similarity"] = max_rss_mb()
    steps_default = sim_default["steps_run"][0] if sim_default else None
    ttc_default, ttc_paper = project(default, steps_default), project(paper)
    out["time_to_concept_s"] = ttc_default["total_s"]
    out["time_to_concept_paper_s"] = ttc_paper["total_s"]
    out["time_to_concept_speedup"] = ttc_paper["total_s"] / ttc_default["total_s"]
    scale = median(peak) / a.reference_peak_gflops  # load / thread correction toward an idle 2-core machine
    out["idle_projection"] = {
        "reference_peak_gflops": a.reference_peak_gflops, "measured_peak_gflops": median(peak),
        "time_to_concept_s": ttc_default["total_s"] * scale, "time_to_concept_paper_s": ttc_paper["total_s"] * scale,
        "note": "measured times x (measured matmul peak / reference idle peak): assumes load slows the model "
                "like the matmul"}
    out["time_to_concept_breakdown"] = {"default": ttc_default, "paper": ttc_paper}
    out["inversion_steps_per_s"] = {"paper": 1 / paper_step["step_s"],
                                    **{f"default_{s}px": 1 / v["step_s"] for s, v in stage_times.items()}}
    out["inversion_step_s"] = {"paper": paper_step, **{f"default_{s}px": v for s, v in stage_times.items()}}
    out["finetune"] = ft
    out["final_similarity"] = sim_default["final_similarity"] if sim_default else None
    out["final_similarity_paper"] = sim_paper["final_similarity"] if sim_paper else None
    out["similarity_runs"] = {"default": sim_default, "paper": sim_paper,
                              "note": f"{a.similarity_images} image(s) per run; images are optimised independently "
                                      "(per-image loss, Adam, clipping), so fewer images change only the sample"}

    # 7. M2IB
    log("M2IB naive vs cached")
    try:
        out["m2ib"] = time_m2ib(backend, reps if not a.quick else 1, 3 if (a.quick or tiny) else None,
                                warm_naive=not a.quick)
        out["m2ib_speedup"] = out["m2ib"]["speedup"]
    except ImportError as exc:  # segmentation extra not installed
        out["m2ib"], out["m2ib_speedup"] = {"error": str(exc)}, None
    mem["m2ib"] = max_rss_mb()

    # 8. zero-shot evaluation caching
    out["zero_shot"] = zero_shot_calls(backend)

    # 8b. mixed precision: bf16 vs fp32 on the tiny model (cheap; same in --quick and --tiny)
    log("bf16 vs fp32 (tiny model)")
    out["bf16_vs_fp32"] = bf16_vs_fp32(steps=20 if tiny else (50 if a.quick else 100))
    out["bf16_vs_fp32_similarity_delta"] = out["bf16_vs_fp32"]["similarity_delta"]

    # 8c. dataset-scale evaluation: peak memory must not grow with the number of images
    from benchmarks.eval_memory import measure as eval_measure

    small, large = (30, 240) if tiny else (100, 800) if a.quick else (300, 2400)
    log(f"streamed evaluation memory: {small} vs {large} images at 224 px")
    ev_kw = {"backend": "clip:medkt-tiny-ViT@random"} if tiny else {}
    ev_small = eval_measure(small, 0, **ev_kw)
    ev_large = eval_measure(large, 0, **ev_kw)
    ev_workers = eval_measure(small, 2, **ev_kw)
    out["eval_memory"] = {"small": ev_small, "large": ev_large, "small_2_workers": ev_workers}
    out["eval_peak_rss_mb_small"] = ev_small["peak_rss_mb"]
    out["eval_peak_rss_mb_large"] = ev_large["peak_rss_mb"]
    out["eval_peak_rss_ratio_large_small"] = ev_large["peak_rss_mb"] / ev_small["peak_rss_mb"]
    out["eval_images_per_s"] = {"0_workers": ev_small["images_per_s"], "2_workers": ev_workers["images_per_s"]}

    # 8d. streamed evaluation vs a plain open_clip loop (issue 19): same images, weights and threads
    from benchmarks.eval_memory import compare_open_clip

    vs_args = (16, 64, "medkt-tiny-ViT", 64, 1) if tiny else (256, 512, "ViT-B-32", 64, 1 if a.quick else 2)
    log(f"zero-shot evaluation vs open_clip: {vs_args[0]} grey {vs_args[1]}-px PNGs, {vs_args[2]}")
    out["eval_vs_open_clip"] = compare_open_clip(*vs_args)
    out["eval_vs_open_clip_ratio"] = out["eval_vs_open_clip"]["ratio"]

    # 9. levers (full run only)
    if levers_on:
        log("levers")
        out["levers"] = measure_levers(backend, paper, a.images, reps, threads, matmul_n)
    mem["end"] = max_rss_mb()
    out["peak_memory_mb"] = max(mem.values())
    out["memory_by_phase_mb"] = mem
    out["loadavg_end"] = os.getloadavg()
    out["seconds_total"] = time.perf_counter() - t_start
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=1, default=float))
    print(summary_table(out))
    return out


def measure_levers(backend, paper: dict[str, Any], n: int, reps: int, threads: int, matmul_n: int) -> dict[str, Any]:
    """Per-image step times of alternatives, each paired with the baseline in the same repetition."""
    import medkt.inversion as inv
    from medkt.backends.base import AnyResolution

    base = {**paper}
    res: dict[str, Any] = {}

    def per_image(cfg: dict[str, Any], images: int, k: int = 1) -> float:
        return time_steps(backend, cfg, images, k, reps, matmul_n)["step_s"] / images

    res["baseline_s_per_image"] = per_image(base, n)
    res["views_2_s_per_image"] = per_image({**base, "views": 2}, n)
    res["batch_1_s_per_image"] = per_image(base, 1, k=5)  # short steps: more of them to beat timer noise
    if hasattr(inv.InversionConfig, "freeze_weights"):
        res["weights_requires_grad_s_per_image"] = per_image({**base, "freeze_weights": False}, n)
    other = 1 if threads > 1 else min(2, os.cpu_count() or 1)
    if other != threads:
        torch.set_num_threads(other)
        try:
            res[f"threads_{other}_s_per_image"] = per_image(base, n)
        finally:
            torch.set_num_threads(threads)
    res["threads_baseline"] = threads
    fast = getattr(backend, "fast_paths", None)
    if fast:  # medkt's exact fast paths (backends/vit_fastpath.py) vs the upstream modules, paired
        from medkt.backends.vit_fastpath import disable_fast_paths, enable_fast_paths

        disable_fast_paths(backend.model)
        try:
            res["upstream_kernels_s_per_image"] = per_image(base, n)
        finally:
            enable_fast_paths(backend.model)
    if isinstance(backend, AnyResolution) and backend.accepts_any_size():  # a progressive stage at its own size
        for size in (64, 128):
            res[f"native_{size}px_s_per_image"] = per_image(at_one_size(base, size), n)
    return res


def summary_table(o: dict[str, Any]) -> str:
    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    sp = o["inversion_step_s"]
    ttc = o["time_to_concept_breakdown"]
    rows = [
        ("", "paper-faithful", "medkt default"),
        ("inversion steps", str(sum(s["steps"] for s in ttc["paper"]["stages"])),
         " + ".join(f"{s['steps']}@{s['size']}" for s in ttc["default"]["stages"])),
        ("s / step (model-size stage)", f(sp["paper"]["step_s"]),
         f(sp[[k for k in sp if k.startswith("default_")][-1]]["step_s"])),
        ("time-to-concept (s, measured)", f(o["time_to_concept_paper_s"], "{:.0f}"), f(o["time_to_concept_s"], "{:.0f}")),
        ("time-to-concept (s, idle proj.)", f(o["idle_projection"]["time_to_concept_paper_s"], "{:.0f}"),
         f(o["idle_projection"]["time_to_concept_s"], "{:.0f}")),
        ("final similarity", f(o["final_similarity_paper"]), f(o["final_similarity"])),
    ]
    lines = [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.insert(1, "|---|---:|---:|")
    m = o.get("m2ib") or {}
    lines += ["", f"FLOPs/step {o['inversion_flops_per_step'] / 1e9:.1f} G, achieved {o['inversion_achieved_gflops']:.1f} "
              f"GFLOP/s = {100 * o['inversion_flops_fraction_of_peak']:.0f}% of matmul peak "
              f"({o['peak_matmul_gflops']['median']:.1f} GFLOP/s)",
              f"M2IB per image: naive {f(m.get('naive_s_per_image'))} s, cached {f(m.get('cached_s_per_image'))} s, "
              f"speed-up {f(m.get('speedup'), '{:.1f}')}x, identical maps {m.get('identical_maps')}",
              f"zero-shot evaluation vs plain open_clip loop: {f(o.get('eval_vs_open_clip_ratio'), '{:.2f}')}x "
              "the images/s",
              f"peak memory {o['peak_memory_mb']:.0f} MB; load {o['loadavg_start'][0]:.1f} -> {o['loadavg_end'][0]:.1f}"]
    return "\n".join(lines)

