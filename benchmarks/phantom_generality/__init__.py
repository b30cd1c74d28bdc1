"""Generality protocol for phantom knowledge transfer (issue 14, items 4-5).

One recipe for every held-out finding, chosen on the validation seeds with two findings (nodule,
cavity), then reported on the evaluation seeds for them and for a third finding never used to
choose anything (pneumoperitoneum). All three are held out of the images of
``phantom:base@medkt/assets/phantom/heldout3`` (pretrained with
``medkt/assets/phantom/pretrain_config_heldout3.json``); its text tower learned the three names
from text only, like the shipped model for nodule.

    # choose: validation seeds, no placebo (selection uses gain / loss / AUROC only)
    OMP_NUM_THREADS=1 python -m benchmarks.phantom_generality --split val --seeds 3 \
        --findings nodule,cavity --recipes transfer,lora,dfr,partial --no-placebo --out benchmarks/phantom_generality/val.json
    # report: evaluation seeds, every finding, with placebo
    OMP_NUM_THREADS=1 python -m benchmarks.phantom_generality --split eval --seeds 5 \
        --findings nodule,cavity,pneumoperitoneum --recipes transfer,CHOSEN --out benchmarks/phantom_generality/eval.json

Selection rule (fixed before any run): the recipe with the highest mean over the validation
findings of ``novel gain - known loss`` (points, name prompts); ties by novel AUROC gain.

Round three (forgetting controls around LoRA; rule fixed before its runs, because round two's rule
picked a recipe that collapsed the third finding): validation seeds 0-1, nodule and cavity; the
recipe with the highest mean of ``novel gain - 3 x known loss`` (points) among ``lora`` (its
round-two rows for seeds 0-1) and the ``lora_*`` candidates below, printed as ``strict_score``.
Round four (text side, ``tokens*``): the same strict rule on validation seeds 0-1, nodule and cavity.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (HELDOUT3, bundle_config, merge, quick_recipe, rec_wise, recipe_summary, run_finding,
                               wise_curve)

#: the text each finding is taught from (written once, never tuned on results)
DESCRIPTIONS = {
    "nodule": bundle_config("phantom_nodules")["description"],
    "cavity": "a round thick-walled lesion with a bright rim and a dark air-filled lucent centre in the upper lung",
    "pneumoperitoneum": "a thin dark crescent of free air beneath the diaphragm below the lung base",
}

#: fine-tuning controls of the candidates (`medkt.finetune_controls`); a recipe's ``controls`` list
#: replaces the bundle's ([wise 0.5]) as a whole
LORA = {"name": "lora", "rank": 4, "alpha": 8}
REPLAY = {"name": "replay", "per_batch": 4}
DISTILL = {"name": "distill", "weight": 1.0}
BUNDLE_WISE = {"name": "wise", "alpha": 0.5}
TOKENS = {"train": "concept_tokens", "batch_size": 16, "optimizer": {"name": "adam", "weight_decay": 0.0}, "controls": []}

#: candidate recipes: overrides of the phantom_nodules bundle recipe
CANDIDATES: dict[str, dict] = {
    "transfer": {},
    # the bundle's full visual fine-tuning without WiSE (run with --wise to get the bundle's alpha 0.5 too)
    "full": {"finetune": {"controls": []}},
    # LoRA (rank 4) on the CNN's convolutions, no WiSE shrinkage (LoRA is the forgetting control)
    "lora": {"finetune": {"controls": [LORA], "lr": 1e-3}},
    # data-free replay: 2 inverted images per known class, supervised replay + distillation
    "dfr": {"data_free_replay": 2, "replay_inversion": {"priors": {"residual": {"sign": "any"}}},
            "finetune": {"controls": [BUNDLE_WISE, REPLAY, DISTILL]}},
    # partial-layer inversion of the top 2 blocks (8x8 map entering them), fine-tune only those
    "partial": {"partial": {"top_blocks": 2, "steps": 200, "lr": 0.05, "stat_weight": 1.0}},
    # second validation round (after round one: LoRA best, replay + distillation froze everything)
    "lora_wise": {"finetune": {"controls": [LORA, BUNDLE_WISE], "lr": 1e-3}},
    "lora_replay": {"finetune": {"controls": [LORA, REPLAY], "lr": 1e-3},
                    "data_free_replay": 2, "replay_inversion": {"priors": {"residual": {"sign": "any"}}}},
    "lora_dfr": {"finetune": {"controls": [LORA, REPLAY, DISTILL], "lr": 1e-3},
                 "data_free_replay": 2, "replay_inversion": {"priors": {"residual": {"sign": "any"}}}},
    # round three: forgetting controls around LoRA (see the module docstring)
    "lora_slow": {"finetune": {"controls": [LORA], "lr": 3e-4}},
    "lora_top": {"finetune": {"controls": [{**LORA, "target_modules": [r"blocks\.[45]\.", r"\.proj$"]}], "lr": 1e-3}},
    # the inversion's own start images replayed as "no finding" next to their edited versions
    "lora_init": {"finetune": {"controls": [LORA, REPLAY], "lr": 1e-3}, "replay_init": True},
    "lora_init_dfr": {"finetune": {"controls": [LORA, REPLAY], "lr": 1e-3},
                      "replay_init": True, "data_free_replay": 1, "replay_inversion": {"priors": {"residual": {"sign": "any"}}}},
    # round four: text side (medkt.concept_tokens): only the new name's token embeddings learn, from the
    # same inverted images, against the known findings' name prompts; visual tower frozen
    "tokens": {"finetune": {**TOKENS, "caption_template": "a chest x-ray with {name}", "lr": 0.05, "epochs": 100}},
    # ... plus the inversion's start images as "no finding" in every batch (a balanced negative)
    "tokens_init": {"finetune": {**TOKENS, "caption_template": "a chest x-ray with {name}", "lr": 0.05, "epochs": 100,
                                 "controls": [{"name": "replay", "per_batch": 16}]},
                    "replay_init": True},
    # round four, second batch (one inversion per seed shared by all of them): caption template and strength
    "tokens_bare": {"finetune": {**TOKENS, "caption_template": "{name}", "lr": 0.05, "epochs": 100}},
    "tokens_strong": {"finetune": {**TOKENS, "caption_template": "a chest x-ray with {name}", "lr": 0.1,
                                   "epochs": 200}},
    "tokens_paper_caption": {"finetune": {**TOKENS, "lr": 0.05, "epochs": 100}},
}


def run(args) -> dict:
    from medkt.phantom.experiment import PhantomTransferExperiment

    torch.set_num_threads(1)
    cfg = bundle_config("phantom_nodules")
    recipes = {n: merge(cfg["recipe"], CANDIDATES[n]) for n in args.recipes.split(",")}
    if args.quick:
        for r in recipes.values():
            quick_recipe(r)
    alphas = sorted({float(a) for a in args.wise.split(",") if a.strip()} - {1.0}) if args.wise else []
    placebo_for = set() if args.no_placebo else set(args.placebo.split(",") if args.placebo else recipes)
    oracle_for = set(args.oracle.split(",")) if args.oracle else set()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    out: dict = {"split": args.split, "seeds": seeds, "backend": args.backend, "descriptions": DESCRIPTIONS,
                 "recipes": recipes, "wise_alphas": [*alphas, 1.0], "findings": {}}
    t0 = time.time()
    for finding in args.findings.split(","):
        exp = PhantomTransferExperiment(args.backend, finding, DESCRIPTIONS[finding], cfg["known_descriptions"],
                                        eval_per_class=args.eval_per_class, split=args.split)
        rows = run_finding(exp, recipes, seeds, placebo_for=placebo_for, oracle_for=oracle_for, alphas=alphas, t0=t0)
        summary = {name: recipe_summary(rs, exp.known, rec_wise(recipes[name])) for name, rs in rows.items()}
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
    out["strict_score"] = {name: float(np.mean([100 * (f["summary"][name]["novel_gain"]["mean"]
                                                       - 3 * f["summary"][name]["known_loss"]["mean"])
                                               for f in out["findings"].values()])) for name in recipes}
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print("\nfinding          recipe      novel gain      known loss      max drop   AUROC before->after (placebo) [oracle]")
    for finding, f in out["findings"].items():
        for name, s in f["summary"].items():
            p = f" ({s['placebo_auroc']['mean']:.3f})" if "placebo_auroc" in s else ""
            o = (f" [{100 * s['oracle_novel_gain']['mean']:.1f} / {100 * s['oracle_known_loss']['mean']:.1f} / "
                 f"{s['oracle_auroc']['mean']:.3f}]" if "oracle_auroc" in s else "")
            print(f"{finding:16s} {name:10s} {100 * s['novel_gain']['mean']:5.1f} ± {100 * s['novel_gain']['ci95']:4.1f}   "
                  f"{100 * s['known_loss']['mean']:5.1f} ± {100 * s['known_loss']['ci95']:4.1f}   "
                  f"{100 * s['max_class_drop']['mean']:5.1f}   {s['auroc_before']['mean']:.3f} -> {s['auroc_after']['mean']:.3f}{p}{o}")
    print("selection score (gain - loss, AUROC gain):", score, "-> chosen:", out["chosen"])
    print("strict score (gain - 3 x loss):", out["strict_score"])
    return out


def at_equal_loss(curve: list[dict], loss: float, key: str) -> float:
    """``key`` of a WiSE curve linearly interpolated at known loss ``loss`` (the curve's points
    sorted by loss; beyond its ends: the end value)."""
    pts = sorted(curve, key=lambda p: p["known_loss"])
    return float(np.interp(loss, [p["known_loss"] for p in pts], [p[key] for p in pts]))


def markdown_table(d: dict) -> str:
    """One row per finding x recipe (x WiSE weight, when swept): means ± 95% CI in points."""
    def pm(st, scale=100.0):
        return f"{scale * st['mean']:+.1f} ± {scale * st['ci95']:.1f}"

    lines = ["| finding | recipe | WiSE a | seeds | novel gain (pts) | known loss (pts) | worst class drop (pts) | "
             "AUROC before → after | placebo AUROC | real-image arm gain / loss / AUROC | s per seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for finding, f in d["findings"].items():
        for r, s in f["summary"].items():
            curves = s.get("wise", {}).get("after") or {f"{rec_wise(d['recipes'][r]):g}": s}
            for a in sorted(curves, key=float, reverse=True):
                st = curves[a]
                plc = s.get("wise", {}).get("placebo", {}).get(a)
                orc = s.get("wise", {}).get("oracle", {}).get(a)
                if not s.get("wise"):
                    plc = {"auroc_after": s["placebo_auroc"]} if "placebo_auroc" in s else None
                    orc = ({"novel_gain": s["oracle_novel_gain"], "known_loss": s["oracle_known_loss"],
                            "auroc_after": s["oracle_auroc"]} if "oracle_auroc" in s else None)
                p_txt = f"{plc['auroc_after']['mean']:.3f}" if plc else "–"
                o_txt = (f"{100 * orc['novel_gain']['mean']:+.0f} / {100 * orc['known_loss']['mean']:.0f} / "
                         f"{orc['auroc_after']['mean']:.3f}" if orc else "–")
                lines.append(f"| {finding} | `{r}` | {a} | {len(st['novel_gain']['values'])} | {pm(st['novel_gain'])} | "
                             f"{pm(st['known_loss'])} | {100 * st['max_class_drop']['mean']:.0f} ({st['worst_class']}) | "
                             f"{st['auroc_before']['mean']:.3f} → {st['auroc_after']['mean']:.3f} | {p_txt} | {o_txt} | "
                             f"{s['seconds']['mean']:.0f} |")
    return "\n".join(lines)


def report(paths: list[Path], plot: Path | None) -> dict:
    """Frontier plot + how much of the real-image upper bound each text-only transfer reaches
    (``paths``: result JSONs, merged by finding and recipe)."""
    d = {"findings": {}, "recipes": {}}
    for path in paths:
        one = json.loads(Path(path).read_text())
        for finding, f in one["findings"].items():  # recipes of one finding may come from several files
            merged = d["findings"].setdefault(finding, {"summary": {}})
            merged["summary"].update(f["summary"])
        d["recipes"].update(one["recipes"])
    panels, reach = {}, {}
    labels = {"after": "{r}", "placebo": "{r} placebo", "oracle": "{r} on real images"}
    kinds = {"after": "transfer", "placebo": "placebo", "oracle": "upper_bound"}
    for finding, f in d["findings"].items():
        curves = []
        for r, s in f["summary"].items():
            for arm, st in s.get("wise", {}).items():
                if arm == "placebo":  # placebos are in the table; the plot stays readable
                    continue
                curves.append({"label": labels[arm].format(r=r), "group": r, "kind": kinds[arm], "points": wise_curve(st)})
            if "oracle" in s.get("wise", {}):
                text, real = wise_curve(s["wise"]["after"]), wise_curve(s["wise"]["oracle"])
                reach.setdefault(finding, {})[r] = [
                    {"alpha": p["alpha"], "known_loss": p["known_loss"], "novel_gain": p["novel_gain"],
                     "auroc_gain": p["auroc_gain"],
                     "real_novel_gain_at_equal_loss": at_equal_loss(real, p["known_loss"], "novel_gain"),
                     "real_auroc_gain_at_equal_loss": at_equal_loss(real, p["known_loss"], "auroc_gain")}
                    for p in text if p["alpha"] > 0]
        panels[finding] = curves
    print(markdown_table(d))
    if plot is not None:
        from medkt.phantom.report import wise_frontier_figure

        wise_frontier_figure(panels, plot)
    print("\n| finding | recipe | WiSE a | known loss (pts) | novel gain: text / real images at that loss (pts) | "
          "AUROC gain: text / real images at that loss |\n|---|---|---|---|---|---|")
    for finding, rows in reach.items():
        for r, pts in rows.items():
            for v in sorted(pts, key=lambda p: -p["alpha"]):
                print(f"| {finding} | `{r}` | {v['alpha']:g} | {100 * v['known_loss']:.1f} | "
                      f"{100 * v['novel_gain']:+.1f} / {100 * v['real_novel_gain_at_equal_loss']:+.1f} | "
                      f"{v['auroc_gain']:+.3f} / {v['real_auroc_gain_at_equal_loss']:+.3f} |")
    return reach


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
    ap.add_argument("--placebo", default="", help="recipes that get a placebo arm (default: all)")
    ap.add_argument("--oracle", default="", help="recipes that also run on real phantoms of the finding (upper bound)")
    ap.add_argument("--wise", default="", help="extra WiSE-FT weights evaluated without re-training, e.g. 0.25,0.5,0.75")
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the script (numbers meaningless)")
    ap.add_argument("--out", default=None, help="result JSON (required unless --report)")
    ap.add_argument("--report", default=None, help="no runs: frontier plot + upper-bound reach of these result "
                                                   "JSONs (comma-separated)")
    ap.add_argument("--plot", default=None, help="frontier plot PNG (with --report)")
    args = ap.parse_args()
    if args.report:
        report([Path(p) for p in args.report.split(",")], Path(args.plot) if args.plot else None)
    elif not args.out:
        ap.error("--out is required")
    else:
        run(args)

