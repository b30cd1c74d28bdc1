"""Generality protocol for phantom knowledge transfer (issue 14, items 4-5).

One recipe for every held-out finding, chosen on the validation seeds with two findings (nodule,
cavity), then reported on the evaluation seeds for them and for a third finding never used to
choose anything (pneumoperitoneum). All three are held out of the images of
``phantom:base@medkt/assets/phantom/heldout3`` (pretrained with
``medkt/assets/phantom/pretrain_config_heldout3.json``); its text tower learned the three names
from text only, like the shipped model for nodule.

    # choose: validation seeds, no placebo (selection uses gain / loss / AUROC only)
    OMP_NUM_THREADS=1 python benchmarks/phantom_generality.py --split val --seeds 3 \
        --findings nodule,cavity --recipes transfer,lora,dfr,partial --no-placebo --out benchmarks/phantom_generality_val.json
    # report: evaluation seeds, every finding, with placebo
    OMP_NUM_THREADS=1 python benchmarks/phantom_generality.py --split eval --seeds 5 \
        --findings nodule,cavity,pneumoperitoneum --recipes transfer,CHOSEN --out benchmarks/phantom_generality_eval.json

Selection rule (fixed before any run): the recipe with the highest mean over the validation
findings of ``novel gain - known loss`` (points, name prompts); ties by novel AUROC gain.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.phantom_recipes import _bundle, _merge  # noqa: E402

HELDOUT3 = f"phantom:base@{ROOT / 'medkt' / 'assets' / 'phantom' / 'heldout3'}"

#: the text each finding is taught from (written once, never tuned on results)
DESCRIPTIONS = {
    "nodule": _bundle("phantom_nodules")["description"],
    "cavity": "a round thick-walled lesion with a bright rim and a dark air-filled lucent centre in the upper lung",
    "pneumoperitoneum": "a thin dark crescent of free air beneath the diaphragm below the lung base",
}

#: candidate recipes: overrides of the phantom_nodules bundle recipe
CANDIDATES: dict[str, dict] = {
    "transfer": {},
    # LoRA (rank 4) on the CNN's convolutions, no WiSE shrinkage (LoRA is the forgetting control)
    "lora": {"finetune": {"lora": {"rank": 4, "alpha": 8}, "lr": 1e-3, "wise_alpha": 1.0}},
    # data-free replay: 2 inverted images per known class, supervised replay + distillation
    "dfr": {"data_free_replay": 2, "replay_inversion": {"residual_sign": "any"},
            "finetune": {"replay_per_batch": 4, "distill_weight": 1.0}},
    # partial-layer inversion of the top 2 blocks (8x8 map entering them), fine-tune only those
    "partial": {"partial": {"top_blocks": 2, "steps": 200, "lr": 0.05, "stat_weight": 1.0}},
    # second validation round (after round one: LoRA best, replay + distillation froze everything)
    "lora_wise": {"finetune": {"lora": {"rank": 4, "alpha": 8}, "lr": 1e-3, "wise_alpha": 0.5}},
    "lora_replay": {"finetune": {"lora": {"rank": 4, "alpha": 8}, "lr": 1e-3, "wise_alpha": 1.0, "replay_per_batch": 4},
                    "data_free_replay": 2, "replay_inversion": {"residual_sign": "any"}},
    "lora_dfr": {"finetune": {"lora": {"rank": 4, "alpha": 8}, "lr": 1e-3, "wise_alpha": 1.0,
                              "replay_per_batch": 4, "distill_weight": 1.0},
                 "data_free_replay": 2, "replay_inversion": {"residual_sign": "any"}},
}


def run(args) -> dict:
    from medkt.phantom.experiment import PhantomTransferExperiment, Recipe, summarize
    from medkt.phantom.metrics import mean_ci

    torch.set_num_threads(1)
    cfg = _bundle("phantom_nodules")
    recipes = {n: _merge(cfg["recipe"], CANDIDATES[n]) for n in args.recipes.split(",")}
    if args.quick:  # smoke test of the script itself: numbers meaningless
        for r in recipes.values():
            r["n_images"] = 2
            r["inversion"]["steps"] = 3
            r["finetune"]["epochs"] = 1
            if r.get("partial"):
                r["partial"]["steps"] = 3
            if r.get("data_free_replay"):
                r["data_free_replay"] = 1
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    out: dict = {"split": args.split, "seeds": seeds, "backend": args.backend, "descriptions": DESCRIPTIONS,
                 "recipes": recipes, "findings": {}}
    t0 = time.time()
    for finding in args.findings.split(","):
        exp = PhantomTransferExperiment(args.backend, finding, DESCRIPTIONS[finding], cfg["known_descriptions"],
                                        eval_per_class=args.eval_per_class, split=args.split)
        rows: dict[str, list] = {n: [] for n in recipes}
        for seed in seeds:
            ds = exp.eval_set(seed)
            before = summarize(exp.evaluate(exp.new_backend(), ds)[0], finding)
            for name, rd in recipes.items():
                rec = Recipe.from_dict({"name": name, **rd})
                arm = exp.run_arm(rec, seed, ds)
                row = {"seed": seed, "before": before, "after": summarize(arm.name_prompts, finding),
                       "seconds": arm.seconds_inversion + arm.seconds_finetune}
                if not args.no_placebo:
                    row["placebo"] = summarize(exp.run_arm(rec, seed, ds, placebo=True).name_prompts, finding)
                rows[name].append(row)
                a, b = row["after"], before
                drop = max(b["per_class"][c] - a["per_class"][c] for c in exp.known)
                plc = f" placebo AUROC {row['placebo']['novel_auroc']:.3f}" if "placebo" in row else ""
                print(f"[{time.time() - t0:6.0f}s] {finding:16s} seed {seed} {name:10s} novel {b['novel_accuracy']:.2f}->"
                      f"{a['novel_accuracy']:.2f} known {b['known_accuracy']:.3f}->{a['known_accuracy']:.3f} (max class "
                      f"drop {drop:.2f}) AUROC {b['novel_auroc']:.3f}->{a['novel_auroc']:.3f}{plc} t={row['seconds']:.0f}s",
                      flush=True)
        summary = {}
        for name, rs in rows.items():
            def stat(vals):
                m, h = mean_ci(vals)
                return {"mean": m, "ci95": h, "values": vals}

            s = {"novel_gain": stat([r["after"]["novel_accuracy"] - r["before"]["novel_accuracy"] for r in rs]),
                 "known_loss": stat([r["before"]["known_accuracy"] - r["after"]["known_accuracy"] for r in rs]),
                 "max_class_drop": stat([max(r["before"]["per_class"][c] - r["after"]["per_class"][c] for c in exp.known)
                                         for r in rs]),
                 "auroc_before": stat([r["before"]["novel_auroc"] for r in rs]),
                 "auroc_after": stat([r["after"]["novel_auroc"] for r in rs]),
                 "seconds": stat([r["seconds"] for r in rs])}
            if "placebo" in rs[0]:
                s["placebo_auroc"] = stat([r["placebo"]["novel_auroc"] for r in rs])
                s["placebo_novel_gain"] = stat([r["placebo"]["novel_accuracy"] - r["before"]["novel_accuracy"] for r in rs])
                s["placebo_known_loss"] = stat([r["before"]["known_accuracy"] - r["placebo"]["known_accuracy"] for r in rs])
            summary[name] = s
        out["findings"][finding] = {"summary": summary, "per_seed": rows}
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))  # partial results survive a stop
    # selection score (see module docstring)
    score = {}
    for name in recipes:
        vals = [f["summary"][name] for f in out["findings"].values()]
        score[name] = (float(np.mean([100 * (v["novel_gain"]["mean"] - v["known_loss"]["mean"]) for v in vals])),
                       float(np.mean([v["auroc_after"]["mean"] - v["auroc_before"]["mean"] for v in vals])))
    out["selection_score"] = score
    out["chosen"] = max(score, key=lambda n: score[n])
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print("\nfinding          recipe      novel gain      known loss      max drop   AUROC before->after (placebo)")
    for finding, f in out["findings"].items():
        for name, s in f["summary"].items():
            p = f" ({s['placebo_auroc']['mean']:.3f})" if "placebo_auroc" in s else ""
            print(f"{finding:16s} {name:10s} {100 * s['novel_gain']['mean']:5.1f} ± {100 * s['novel_gain']['ci95']:4.1f}   "
                  f"{100 * s['known_loss']['mean']:5.1f} ± {100 * s['known_loss']['ci95']:4.1f}   "
                  f"{100 * s['max_class_drop']['mean']:5.1f}   {s['auroc_before']['mean']:.3f} -> {s['auroc_after']['mean']:.3f}{p}")
    print("selection score (gain - loss, AUROC gain):", score, "-> chosen:", out["chosen"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", choices=["val", "eval"], default="val")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--findings", default="nodule,cavity")
    ap.add_argument("--recipes", default="transfer,lora,dfr,partial")
    ap.add_argument("--eval-per-class", type=int, default=100)
    ap.add_argument("--backend", default=HELDOUT3)
    ap.add_argument("--no-placebo", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the script (numbers meaningless)")
    ap.add_argument("--out", required=True)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
