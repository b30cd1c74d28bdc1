"""Helpers shared by the benchmark studies (and by the test suite, which imports the data writers).

* paths and recipes: `ROOT`, `bundle_config`, `merge`, `quick_recipe`, `rec_wise`, `HELDOUT3`;
* measurement: `peak_rss_mb`, `median`, `log`;
* synthetic data in the real on-disk formats (random pixels, seeded): `write_random_pngs`,
  natural-image datasets (`write_rare_concepts`, `write_imagenet`, `write_karpathy`,
  `write_coco_captions`), chest radiographs (`chest_like`, `write_radiograph_dicom`) and
  ultrasound-like lesions (`blob_image`, `write_png`, `write_mask_png`). `benchmarks.gpu_smoke`
  builds its bundle inputs with them; tests/helpers_*.py re-export them for the tests.
"""
from __future__ import annotations

import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: the repository root (benchmarks/ is a top-level folder, not installed)
ROOT = Path(__file__).resolve().parent.parent
#: the phantom model with nodule, cavity and pneumoperitoneum held out of its images
HELDOUT3 = f"phantom:base@{ROOT / 'medkt' / 'assets' / 'phantom' / 'heldout3'}"


# --- recipes ----------------------------------------------------------------------------------------
def bundle_config(name: str) -> dict[str, Any]:
    """The ``configs/transfer.json`` of the shipped bundle ``name``."""
    return json.loads((ROOT / "bundles" / name / "configs" / "transfer.json").read_text())


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``over`` merged in (nested dicts merged key by key; an
    ``"inversion"`` section through `medkt.inversion.with_overrides`, so
    ``{"priors": {"residual": {"sign": "any"}}}`` changes one setting of a listed component)."""
    from medkt.inversion import with_overrides

    out = copy.deepcopy(base)
    for k, v in over.items():
        if k == "inversion" and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = copy.deepcopy(with_overrides(out[k], v))
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def quick_recipe(r: dict[str, Any]) -> None:
    """Shrink a recipe in place for a smoke test of a benchmark script (numbers meaningless)."""
    r["n_images"] = 2
    r["inversion"]["steps"] = 3
    r["finetune"]["epochs"] = 1
    if r.get("partial"):
        r["partial"]["steps"] = 3
    if r.get("data_free_replay"):
        r["data_free_replay"] = 1


def rec_wise(recipe: dict[str, Any]) -> float:
    """The recipe's own WiSE-FT weight (1 = no interpolation); also of the recipes recorded in
    result files before the controls (``finetune.wise_alpha``)."""
    ft = recipe.get("finetune", {})
    wise = [c for c in ft.get("controls", []) if c.get("name") == "wise"]
    return float(wise[0].get("alpha", 0.5)) if wise else float(ft.get("wise_alpha", 1.0))


# --- measurement ------------------------------------------------------------------------------------
def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak RSS in MB. For this process: ``VmHWM`` of /proc (the high-water mark of this
    program's memory) — ``ru_maxrss`` survives ``fork`` + ``execve`` on Linux, so a process
    started by a large parent would report the parent's peak."""
    if who == resource.RUSAGE_SELF:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
        except OSError:
            pass
    r = resource.getrusage(who).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def median(xs: list[float]) -> float:
    """Median, NaN for no samples."""
    return float(statistics.median(xs)) if xs else float("nan")


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- synthetic data ---------------------------------------------------------------------------------
def write_random_pngs(folder: Path, n: int, size: int, channels: int = 3, seed: int = 0) -> list[Path]:
    """``n`` random 8-bit PNGs of ``size`` x ``size`` (grey for ``channels=1``), kept between runs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, channels)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:05d}.png"
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)  # drawn even when cached: same images for any n
        if not p.is_file():
            Image.fromarray(pixels).save(p)
        paths.append(p)
    return paths


WORDS = "a dog cat man woman red blue car sitting on the grass street two people playing with ball".split()


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=85)


def write_rare_concepts(root: Path, concepts=("moongate", "tonometer", "gyroscope"), per_concept: int = 2, seed: int = 0) -> Path:
    """``<root>/<concept>/<concept>_<k>.jpg``."""
    rng = np.random.default_rng(seed)
    for c in concepts:
        for k in range(per_concept):
            _jpeg(root / c / f"{c}_{k:02d}.jpg", rng)
    return root


def write_imagenet(root: Path, wnids: list[str], per_class: int = 1, split: str = "val", seed: int = 1) -> Path:
    """``<root>/<split>/<wnid>/ILSVRC2012_val_<n>.JPEG``."""
    rng = np.random.default_rng(seed)
    n = 0
    for w in wnids:
        for _ in range(per_class):
            n += 1
            _jpeg(root / split / w / f"ILSVRC2012_val_{n:08d}.JPEG", rng, size=(36, 30))
    return root


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 9)))).capitalize() + "."


def write_karpathy(root: Path, name: str = "flickr30k", n_test: int = 4, n_train: int = 2, seed: int = 2) -> Path:
    """``dataset_<name>.json`` (Karpathy format) + images; COCO layout uses ``val2014/`` + cocoid."""
    rng = np.random.default_rng(seed)
    coco = name == "coco"
    images = []
    for i in range(n_test + n_train):
        split = "test" if i < n_test else "train"
        fname = f"COCO_val2014_{100 + i:012d}.jpg" if coco else f"{1000 + i}.jpg"
        folder = "val2014" if coco else "flickr30k-images"
        _jpeg(root / folder / fname, rng, size=(48, 36) if i % 2 else (36, 48))
        rec = {"filename": fname, "imgid": i, "split": split,
               "sentences": [{"raw": _sentence(rng), "tokens": [], "imgid": i, "sentid": 5 * i + j} for j in range(5)],
               "sentids": [5 * i + j for j in range(5)]}
        if coco:
            rec.update(filepath="val2014", cocoid=100 + i)
        images.append(rec)
    path = root / f"dataset_{name}.json"
    path.write_text(json.dumps({"images": images, "dataset": name}))
    return path


def write_coco_captions(root: Path, karpathy_json: Path) -> Path:
    """``annotations/captions_val2014.json`` with the same captions as the Karpathy file."""
    data = json.loads(karpathy_json.read_text())
    imgs, anns = [], []
    for rec in data["images"]:
        imgs.append({"id": rec["cocoid"], "file_name": rec["filename"], "width": 48, "height": 36})
        for s in rec["sentences"]:
            anns.append({"id": s["sentid"], "image_id": rec["cocoid"], "caption": s["raw"]})
    path = root / "annotations" / "captions_val2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": imgs, "annotations": anns}))
    return path


def chest_like(rng: np.random.Generator, size: int, *, nodule: float = 0.0, kind: str = "none") -> np.ndarray:
    """A synthetic [0, 1] grey 'radiograph': bright mediastinum, two dark lung fields, and an
    optional round (``kind="benign"``) or spiky (``"cancer"``) blob of contrast ``nodule``."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.75 - 0.35 * (np.exp(-((xx - 0.3) ** 2 / 0.02 + (yy - 0.5) ** 2 / 0.08))
                         + np.exp(-((xx - 0.7) ** 2 / 0.02 + (yy - 0.5) ** 2 / 0.08)))
    if kind != "none":
        cy, cx = rng.uniform(0.35, 0.65), rng.choice([0.3, 0.7]) + rng.uniform(-0.05, 0.05)
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        theta = np.arctan2(yy - cy, xx - cx)
        radius = 0.05 * (1 + (0.5 * np.abs(np.sin(7 * theta)) if kind == "cancer" else 0.0))
        img = img + nodule * (r < radius)
    img = img + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def write_radiograph_dicom(path: Path, image01: np.ndarray, *, monochrome1: bool = False,
                           window: tuple[float, float] | None = None, bits: int = 12, slope: float = 1.0,
                           intercept: float = 0.0) -> Path:
    """Write a [0, 1] array as a single-frame uncompressed DICOM (Explicit VR Little Endian)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    top = (1 << bits) - 1
    stored = np.rint(np.clip(image01, 0, 1) * top)
    if monochrome1:
        stored = top - stored
    stored = stored.astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def blob_image(size: tuple[int, int], center: tuple[int, int], radius: int, rng: np.random.Generator,
               bright: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Grey image in [0, 1] with a disk lesion (dark like ultrasound, or bright) + its mask."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2
    img = 0.55 + 0.1 * rng.standard_normal((h, w))
    img[mask] = (0.95 if bright else 0.1) + 0.03 * rng.standard_normal(int(mask.sum()))
    return np.clip(img, 0, 1).astype(np.float32), mask


def write_png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    a = arr if arr.dtype == np.uint8 else (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    if a.dtype == np.uint8 and arr.dtype == bool:
        a = arr.astype(np.uint8) * 255
    Image.fromarray(a).save(path)
    return path


def write_mask_png(path: Path, mask: np.ndarray) -> Path:
    return write_png(path, mask.astype(np.uint8) * 255)


# --- phantom transfer studies (benchmarks.phantom_generality, benchmarks.phantom_pool) ----------------
def wise_rows(exp, trained, start: dict, alphas: list[float], ds, finding: str) -> dict[str, dict]:
    """Evaluate ``start + a * (trained - start)`` for each a (WiSE-FT without re-training).

    The fine-tuned weights are restored afterwards. Equal to fine-tuning with a wise control of ``alpha = a``:
    the phantom CNN has no buffers that fine-tuning changes (GroupNorm), and untrained
    parameters are equal in both states.
    """
    from medkt.phantom.experiment import summarize

    ft = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    rows = {}
    try:
        for a in alphas:
            trained.load_state_dict({k: start[k] + a * (v - start[k]) if v.is_floating_point() else v
                                     for k, v in ft.items()})
            rows[f"{a:g}"] = summarize(exp.evaluate(trained, ds)[0], finding)
    finally:
        trained.load_state_dict(ft)
    return rows


def finding_stats(rows: list[dict], before: list[dict], known: list[str]) -> dict:
    """Mean and 95 % CI over seeds of novel gain, known loss, largest known-class drop and novel
    AUROC, from the per-seed summaries after (``rows``) and before (``before``) transfer."""
    from medkt.phantom.metrics import mean_ci

    def stat(vals):
        m, h = mean_ci(vals)
        return {"mean": m, "ci95": h, "values": vals}

    return {"novel_gain": stat([a["novel_accuracy"] - b["novel_accuracy"] for a, b in zip(rows, before)]),
            "known_loss": stat([b["known_accuracy"] - a["known_accuracy"] for a, b in zip(rows, before)]),
            "max_class_drop": stat([max(b["per_class"][c] - a["per_class"][c] for c in known)
                                    for a, b in zip(rows, before)]),
            "worst_class": max(known, key=lambda c: np.mean([b["per_class"][c] - a["per_class"][c]
                                                            for a, b in zip(rows, before)])),
            "auroc_before": stat([b["novel_auroc"] for b in before]),
            "auroc_after": stat([a["novel_auroc"] for a in rows])}


def wise_curve(stats_by_alpha: dict[str, dict]) -> list[dict]:
    """Frontier points (alpha, known loss, novel gain, AUROC gain) of a WiSE sweep's `finding_stats`,
    the start model (alpha 0) included."""
    pts = [{"alpha": 0.0, "known_loss": 0.0, "novel_gain": 0.0, "auroc_gain": 0.0}]
    for a, st in stats_by_alpha.items():
        pts.append({"alpha": float(a), "known_loss": st["known_loss"]["mean"], "novel_gain": st["novel_gain"]["mean"],
                    "auroc_gain": st["auroc_after"]["mean"] - st["auroc_before"]["mean"]})
    return sorted(pts, key=lambda p: p["alpha"])


def run_recipe_seed(exp, name: str, rd: dict[str, Any], seed: int, ds, before: dict, *, placebo: bool,
                    oracle: bool, alphas: list[float], start_state: dict | None) -> dict[str, Any]:
    """One seed of one recipe: its transfer arm (``after``), optionally its placebo and its
    real-image arm (``oracle``: the recipe fine-tuned on real phantoms of the finding), each with
    its WiSE sweep (``<arm>_wise``: effective weight = a x the recipe's own WiSE alpha) -> the row.
    ``row["seconds"]`` is the transfer arm's inversion + fine-tuning time (a reused inversion's
    seconds included; pool embeddings are computed in fine-tuning); ``row["extra"]`` its
    JSON-ready extras (e.g. self-training picks)."""
    from medkt.phantom.experiment import Recipe, summarize

    rec = Recipe.from_dict({"name": name, **rd})
    wise = rec_wise(rd)
    arms: dict[str, dict] = {"after": {}}
    if placebo:
        arms["placebo"] = {"placebo": True}
    if oracle:  # real-image upper bound: the same recipe on real phantoms of the finding
        arms["oracle"] = {"placebo": True, "recipe": Recipe.from_dict({**rd, "name": name, "placebo": "oracle"})}
    row: dict[str, Any] = {"seed": seed, "before": before}
    for arm_name, kw in arms.items():
        r = exp.run_arm(kw.get("recipe", rec), seed, ds, placebo=kw.get("placebo", False), keep_images=bool(alphas))
        row[arm_name] = summarize(r.name_prompts, exp.novel)
        if arm_name == "after":
            row["seconds"] = r.seconds_inversion + r.seconds_finetune
            row["seconds_inversion"], row["seconds_finetune"] = r.seconds_inversion, r.seconds_finetune
            row["extra"] = {k: v for k, v in r.extra.items()
                            if k in ("self_training", "seconds_pool_write", "finetune_steps")}
        if alphas:
            row[arm_name + "_wise"] = {f"{a * wise:g}": v for a, v in zip(
                alphas, wise_rows(exp, r.extra["backend"], start_state, alphas, ds, exp.novel).values())}
    return row


def row_line(finding: str, seed: int, name: str, row: dict, known: list[str]) -> str:
    """A progress line of one `run_recipe_seed` row: before -> after, worst class drop, placebo / oracle."""
    a, b = row["after"], row["before"]
    drop = max(b["per_class"][c] - a["per_class"][c] for c in known)
    plc = f" placebo AUROC {row['placebo']['novel_auroc']:.3f}" if "placebo" in row else ""
    orc = (f" oracle {row['oracle']['novel_accuracy']:.2f}/{row['oracle']['known_accuracy']:.3f}/"
           f"{row['oracle']['novel_auroc']:.3f}" if "oracle" in row else "")
    return (f"{finding:16s} seed {seed} {name:10s} novel {b['novel_accuracy']:.2f}->"
            f"{a['novel_accuracy']:.2f} known {b['known_accuracy']:.3f}->{a['known_accuracy']:.3f} (max class "
            f"drop {drop:.2f}) AUROC {b['novel_auroc']:.3f}->{a['novel_auroc']:.3f}{plc}{orc} t={row['seconds']:.0f}s")


def run_finding(exp, recipes: dict[str, dict], seeds: list[int], *, placebo_for: set[str], oracle_for: set[str],
                alphas: list[float], prefix: str = "", t0: float | None = None) -> dict[str, list]:
    """Every recipe of ``recipes`` on every seed of one experiment (`run_recipe_seed`), a progress
    line per row (``prefix`` first; self-training picks when the arm has them) -> recipe -> rows."""
    import time

    from medkt.phantom.experiment import summarize

    t0 = time.time() if t0 is None else t0
    start_state = {k: v.detach().clone() for k, v in exp.new_backend().state_dict().items()}
    rows: dict[str, list] = {n: [] for n in recipes}
    for seed in seeds:
        ds = exp.eval_set(seed)
        before = summarize(exp.evaluate(exp.new_backend(), ds)[0], exp.novel)
        for name, rd in recipes.items():
            row = run_recipe_seed(exp, name, rd, seed, ds, before, placebo=name in placebo_for,
                                  oracle=name in oracle_for, alphas=alphas, start_state=start_state)
            rows[name].append(row)
            picks = row.get("extra", {}).get("self_training")
            st = (" picks " + ", ".join(f"{p['true_positives']}/{p['picked']}" for p in picks)) if picks else ""
            print(f"[{time.time() - t0:6.0f}s] {prefix}" + row_line(exp.novel, seed, name, row, exp.known) + st, flush=True)
    return rows


def recipe_summary(rs: list[dict], known: list[str], own_wise: float) -> dict[str, Any]:
    """Over the seeds' rows of one recipe: `finding_stats` of the transfer arm, seconds, the
    placebo's / real-image arm's AUROC, gain, loss and drop, and the WiSE curve of each arm."""
    bef = [r["before"] for r in rs]
    s = finding_stats([r["after"] for r in rs], bef, known)
    secs = [r["seconds"] for r in rs]
    s["seconds"] = {"mean": float(np.mean(secs)), "max": float(np.max(secs)), "values": secs}
    for arm in ("placebo", "oracle"):
        if arm in rs[0]:
            st = finding_stats([r[arm] for r in rs], bef, known)
            s[f"{arm}_auroc"] = st["auroc_after"]
            s[f"{arm}_novel_gain"] = st["novel_gain"]
            s[f"{arm}_known_loss"] = st["known_loss"]
            s[f"{arm}_max_class_drop"] = st["max_class_drop"]
    if "after_wise" in rs[0]:  # the WiSE-FT curve of each arm (effective alpha -> stats), alpha 1 included
        s["wise"] = {}
        for arm in ("after", "placebo", "oracle"):
            if arm not in rs[0]:
                continue
            curve = {k: finding_stats([r[arm + "_wise"][k] for r in rs], bef, known) for k in rs[0][arm + "_wise"]}
            curve[f"{own_wise:g}"] = finding_stats([r[arm] for r in rs], bef, known)
            s["wise"][arm] = curve
    return s
