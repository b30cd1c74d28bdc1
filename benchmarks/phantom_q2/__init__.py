"""Paper §7.3 Q2 in the phantom world: do images inverted with one model teach another model?

Model A is the generality protocol's model (``heldout3``, pretraining seed 0); model B has the
same settings and held-out findings but pretraining seeds 1 / data seed 1001
(``medkt/assets/phantom/pretrain_config_heldout3_seed1.json``; not shipped, reproduce with
``python -m medkt.phantom.pretrain --config medkt/assets/phantom/pretrain_config_heldout3_seed1.json
--out runs/heldout3_seed1/phantom_clip.safetensors``). For every finding and seed the recipe's
images are inverted with A and with B; B is then taught with B's own images (``self``) and with A's
(``cross``), and A with its own (``A self``), same recipe, same evaluation phantoms.

    OMP_NUM_THREADS=1 python -m benchmarks.phantom_q2 --second runs/heldout3_seed1 --recipe tokens \\
        --seeds 3 --out benchmarks/phantom_q2/results.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import HELDOUT3, bundle_config, finding_stats, merge, quick_recipe
from benchmarks.phantom_generality import CANDIDATES, DESCRIPTIONS


def run(args) -> dict:
    from medkt.phantom.experiment import PhantomTransferExperiment, Recipe, summarize

    torch.set_num_threads(1)
    cfg = bundle_config("phantom_nodules")
    rd = merge(cfg["recipe"], CANDIDATES[args.recipe])
    if args.quick:
        quick_recipe(rd)
    rec = Recipe.from_dict({"name": args.recipe, **rd})
    if not args.second:
        raise SystemExit("--second FOLDER (model B) is required for a run")
    second = f"phantom:base@{Path(args.second).resolve()}"
    seeds = list(range(args.seeds))
    out = {"recipe": rd, "model_a": HELDOUT3, "model_b": second, "seeds": seeds, "findings": {}}
    t0 = time.time()
    for finding in args.findings.split(","):
        exps = {m: PhantomTransferExperiment(spec, finding, DESCRIPTIONS[finding], cfg["known_descriptions"],
                                             eval_per_class=args.eval_per_class, split="eval")
                for m, spec in (("A", HELDOUT3), ("B", second))}
        rows = {k: [] for k in ("A self", "B self", "B cross")}
        befores = {"A": [], "B": []}
        for seed in seeds:
            ds = exps["A"].eval_set(seed)  # the same phantoms for both models
            for m, exp in exps.items():
                befores[m].append(summarize(exp.evaluate(exp.new_backend(), ds)[0], finding))
            a_self = exps["A"].run_arm(rec, seed, ds, keep_images=True)
            b_self = exps["B"].run_arm(rec, seed, ds)
            b_cross = exps["B"].run_arm(rec, seed, ds, given_images=a_self.extra["images"])
            for k, arm in (("A self", a_self), ("B self", b_self), ("B cross", b_cross)):
                rows[k].append(summarize(arm.name_prompts, finding))
            print(f"[{time.time() - t0:5.0f}s] {finding} seed {seed}: " + "; ".join(
                f"{k} {r[-1]['novel_accuracy']:.2f}/{r[-1]['known_accuracy']:.3f}/{r[-1]['novel_auroc']:.3f}"
                for k, r in rows.items()), flush=True)
        known = exps["A"].known
        summ = {k: finding_stats(r, befores["A" if k.startswith("A") else "B"], known) for k, r in rows.items()}
        out["findings"][finding] = {"summary": summ, "per_seed": rows, "before": befores}
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(markdown_table(out))
    return out


def markdown_table(out: dict) -> str:
    """One row per finding x arm: means ± 95% CI over seeds (points; AUROC before -> after)."""
    lines = ["| finding | arm (model taught ← images from) | novel gain (pts) | known loss (pts) | worst class drop (pts) | "
             "AUROC before → after |", "|---|---|---|---|---|---|"]
    names = {"A self": "A ← A", "B self": "B ← B", "B cross": "B ← A"}
    for finding, f in out["findings"].items():
        for k, s in f["summary"].items():
            lines.append(f"| {finding} | {names.get(k, k)} | {100 * s['novel_gain']['mean']:+.1f} ± "
                         f"{100 * s['novel_gain']['ci95']:.1f} | {100 * s['known_loss']['mean']:+.1f} ± "
                         f"{100 * s['known_loss']['ci95']:.1f} | {100 * s['max_class_drop']['mean']:.0f} "
                         f"({s['worst_class']}) | {s['auroc_before']['mean']:.3f} → {s['auroc_after']['mean']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--second", default=None, help="folder of model B's phantom_clip.safetensors")
    ap.add_argument("--recipe", default="tokens", choices=sorted(CANDIDATES))
    ap.add_argument("--findings", default="nodule,cavity,pneumoperitoneum")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval-per-class", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the script (numbers meaningless)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", default=None, help="no runs: print the markdown table of this result JSON")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
    elif not args.out:
        ap.error("--out is required")
    else:
        run(args)

