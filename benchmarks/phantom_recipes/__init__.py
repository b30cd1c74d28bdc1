"""Recipe research and multi-seed results for the phantom knowledge-transfer demo.

    # research on the validation split (never the evaluation images)
    OMP_NUM_THREADS=1 python -m benchmarks.phantom_recipes --split val --seeds 2 --recipes best,paper --out runs/recipes_val.json
    # final numbers: 5 seeds on the evaluation split, every recipe with its own placebo, frontier plot
    OMP_NUM_THREADS=1 python -m benchmarks.phantom_recipes --split eval --seeds 5 --recipes all --out runs/recipes_eval.json

Recipes: ``transfer`` = bundles/phantom_nodules, ``paper`` = bundles/phantom_nodules_paper, plus the
variants in `VARIANTS` (overrides of the ``transfer`` recipe).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import bundle_config, merge


# overrides of the phantom_nodules recipe explored during research (see docs/README.md)
VARIANTS: dict[str, dict] = {
    "wise_0.3": {"finetune": {"controls": [{"name": "wise", "alpha": 0.3}]}},
    "wise_0.7": {"finetune": {"controls": [{"name": "wise", "alpha": 0.7}]}},
    "wise_1.0": {"finetune": {"controls": []}},
    "replay_distill": {"finetune": {"controls": [{"name": "replay", "per_batch": 4}, {"name": "distill", "weight": 1.0}]},
                       "replay_per_class": 4},
    "replay_init": {"finetune": {"controls": [{"name": "wise", "alpha": 0.5}, {"name": "replay", "per_batch": 4}]},
                    "replay_init": True},
    "replay_init_wise1": {"finetune": {"controls": [{"name": "replay", "per_batch": 4}]}, "replay_init": True},
    "replay_all_wise1": {"finetune": {"controls": [{"name": "replay", "per_batch": 4}]}, "replay_init": True,
                         "replay_per_class": 2},
    "replay_init_lr1e-4": {"finetune": {"lr": 1e-4, "epochs": 5, "controls": [{"name": "replay", "per_batch": 4}]},
                           "replay_init": True},
    "lr1e-4_5ep": {"finetune": {"lr": 1e-4, "epochs": 5, "controls": []}},
    "images_32": {"n_images": 32},
    # issue 6: does the short inversion lose anything downstream? the same recipe at the paper's 5,000 steps
    "steps_5000": {"inversion": {"steps": 5000}},
    "contrastive_objective": {"inversion": {"objective": "contrastive"}},
    "any_sign": {"inversion": {"priors": {"residual": {"sign": "any"}}}},
    "from_noise": {"inversion": {"lr": 0.1, "views": 1, "priors": [{"name": "tv", "weight": 0.005}],
                                 "augmentations": [{"name": "affine", "p": 0.5, "rotate_deg": 30, "translate": 0.1,
                                                    "scale": [0.7, 1.0]}]}},
    "paper_finetune": {"finetune": {"lr": 1e-5, "epochs": 1, "optimizer": {"name": "adam"}, "controls": []}},
    "oracle": {"placebo": "oracle", "inversion": {"steps": 1}},
    # upper bounds of the fine-tuning recipe itself: 16 *real* nodules (the "placebo" arm of these
    # rows) with supervised replay of the normal start images and of real known-class phantoms
    "oracle_replay": {"placebo": "oracle", "inversion": {"steps": 1}, "replay_init": True,
                      "finetune": {"lr": 1e-4, "epochs": 5, "controls": [{"name": "replay", "per_batch": 4}]}},
    "oracle_replay_all": {"placebo": "oracle", "inversion": {"steps": 1}, "replay_init": True, "replay_per_class": 4,
                          "finetune": {"lr": 1e-4, "epochs": 5, "controls": [{"name": "replay", "per_batch": 4}]}},
    "oracle_lr3e-5": {"placebo": "oracle", "inversion": {"steps": 1},
                      "finetune": {"lr": 3e-5, "epochs": 5, "controls": []}},
    "noise_placebo": {"placebo": "noise"},
}


def recipes_by_name(names: list[str]) -> dict[str, dict]:
    main = bundle_config("phantom_nodules")
    paper = bundle_config("phantom_nodules_paper")
    table = {"transfer": main["recipe"], "paper": paper["recipe"]}
    for k, v in VARIANTS.items():
        table[k] = merge(main["recipe"], v)
    if names == ["all"]:
        names = list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {sorted(table)}")
    return {n: table[n] for n in names}


def merged_frontier(files: list[Path]) -> list[dict]:
    """Frontier points of several result files; rows trained on real nodules become upper bounds.

    A recipe with ``placebo: "oracle"`` trains its "placebo" arm on real nodule phantoms (green,
    "real nodules: NAME") and its transfer arm on 1-step inversions (dropped: not a transfer).
    """
    points = []
    for f in files:
        d = json.loads(f.read_text())
        oracle = {n for n, r in d["recipes"].items() if r.get("placebo") == "oracle"}
        for p in d["frontier"]:
            base = p["name"].removesuffix(" placebo")
            if base in oracle:
                if p["placebo"]:
                    points.append({**p, "name": f"real nodules: {base}", "kind": "upper_bound", "placebo": False})
                continue
            points.append({**p, "kind": "placebo" if p["placebo"] else "transfer"})
    return points


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", choices=["val", "eval"], default="val")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--recipes", default="transfer,paper")
    ap.add_argument("--eval-per-class", type=int, default=100)
    ap.add_argument("--set", action="append", default=[], help="recipe override NAME.key.sub=JSON (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None, help="frontier plot PNG")
    ap.add_argument("--backend", default=None, help="backend spec (default: the phantom_nodules bundle's)")
    ap.add_argument("--plot-from", nargs="+", default=None,
                    help="only draw --plot from the frontier points of these result JSONs (no runs)")
    args = ap.parse_args()
    if args.plot_from:
        from medkt.phantom.report import frontier_figure

        frontier_figure(merged_frontier([Path(f) for f in args.plot_from]), Path(args.plot or "frontier.png"))
        return
    torch.set_num_threads(1)
    from medkt.phantom.experiment import PhantomTransferExperiment, Recipe, aggregate

    cfg = bundle_config("phantom_nodules")
    recipes = recipes_by_name(args.recipes.split(","))
    for s in args.set:
        key, _, val = s.partition("=")
        name, *path = key.split(".")
        d = recipes[name]
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = json.loads(val)
    exp = PhantomTransferExperiment(args.backend or cfg["backend"], cfg["novel"], cfg["description"], cfg["known_descriptions"],
                                    eval_per_class=args.eval_per_class, split=args.split)
    results: dict = {"split": args.split, "seeds": [], "recipes": recipes, "per_recipe": {}}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results["seeds"] = seeds
    per_recipe_seed: dict[str, list] = {n: [] for n in recipes}
    t0 = time.time()
    for seed in seeds:
        ds = exp.eval_set(seed)
        before = exp.evaluate(exp.new_backend(), ds)
        from medkt.phantom.experiment import summarize

        for name, rd in recipes.items():
            rec = Recipe.from_dict({"name": name, **rd})
            arm = exp.run_arm(rec, seed, ds)
            plc = exp.run_arm(rec, seed, ds, placebo=True)
            row = {"seed": seed,
                   "before": {"name": summarize(before[0], exp.novel), "description": summarize(before[1], exp.novel)},
                   name: {"name": summarize(arm.name_prompts, exp.novel),
                          "description": summarize(arm.description_prompts, exp.novel),
                          "seconds_inversion": arm.seconds_inversion, "seconds_finetune": arm.seconds_finetune},
                   "placebo": {"name": summarize(plc.name_prompts, exp.novel),
                               "description": summarize(plc.description_prompts, exp.novel),
                               "seconds_finetune": plc.seconds_finetune}}
            per_recipe_seed[name].append(row)
            s = row[name]["name"]
            p = row["placebo"]["name"]
            b = row["before"]["name"]
            print(f"[{time.time() - t0:6.0f}s] seed {seed} {name:18s} novel {b['novel_accuracy']:.2f}->{s['novel_accuracy']:.2f} "
                  f"(placebo {p['novel_accuracy']:.2f})  known {b['known_accuracy']:.3f}->{s['known_accuracy']:.3f} "
                  f"(placebo {p['known_accuracy']:.3f})  AUROC {b['novel_auroc']:.3f}->{s['novel_auroc']:.3f} "
                  f"(placebo {p['novel_auroc']:.3f})  t={arm.seconds_inversion + arm.seconds_finetune:.0f}s", flush=True)
    points = []
    for name, rows in per_recipe_seed.items():
        agg = aggregate(rows, [name, "placebo"], "name")
        agg_d = aggregate(rows, [name, "placebo"], "description")
        results["per_recipe"][name] = {"name_prompts": agg, "description_prompts": agg_d, "per_seed": rows}
        for arm, is_placebo in ((name, False), ("placebo", True)):
            gain = [r[arm]["name"]["novel_accuracy"] - r["before"]["name"]["novel_accuracy"] for r in rows]
            loss = [r["before"]["name"]["known_accuracy"] - r[arm]["name"]["known_accuracy"] for r in rows]
            from medkt.phantom.metrics import mean_ci

            g, gh = mean_ci(gain)
            l, lh = mean_ci(loss)
            points.append({"name": name if not is_placebo else f"{name} placebo", "novel_gain": g, "novel_gain_ci": gh,
                           "known_loss": l, "known_loss_ci": lh, "placebo": is_placebo,
                           "auroc": agg[arm]["novel_auroc"]["mean"]})
    results["frontier"] = points
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=float))
    print("\nrecipe              novel gain (pts)   known loss (pts)   AUROC")
    for p in points:
        print(f"{p['name']:28s} {100 * p['novel_gain']:6.1f} ± {100 * p['novel_gain_ci']:4.1f}   "
              f"{100 * p['known_loss']:6.1f} ± {100 * p['known_loss_ci']:4.1f}   {p['auroc']:.3f}")
    if args.plot:
        from medkt.phantom.report import frontier_figure

        frontier_figure(points, Path(args.plot))

