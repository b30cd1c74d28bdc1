"""Unlabeled-pool protocol for phantom knowledge transfer (issue 20, items 5-6).

Teach a finding from its description **and** an unlabeled pool of phantoms (clinic-like prevalence,
labels never read: `medkt.phantom.pool`), on the shipped model and on the held-out model, over seeds;
compare with the data-free path, a placebo and the real-image upper bound; check the issue's targets.
See README.md in this folder for the question, the pre-registered selection rule and the commands.

    OMP_NUM_THREADS=1 python -m benchmarks.phantom_pool --split val --seeds 2 --findings nodule,cavity \\
        --backend shipped,heldout3 --recipes tokens_bare,pool_distill --no-placebo --out runs/pool_val.json
    python -m benchmarks.phantom_pool --report runs/pool_eval.json --plot benchmarks/phantom_pool/frontier.png

Arms are plain recipe dicts (`CANDIDATES`: a base recipe + overrides), so a new component (inversion
priors that read the pool, self-training) is one line here once the engine has it.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (HELDOUT3, ROOT, bundle_config, merge, quick_recipe, rec_wise, recipe_summary, run_finding,
                               wise_curve)
from benchmarks.phantom_generality import CANDIDATES as GENERALITY
from benchmarks.phantom_generality import DESCRIPTIONS as GENERALITY_DESCRIPTIONS

#: the findings taught; "hiatal hernia" is used only for the final evaluation (never to choose)
FINDINGS = ("nodule", "cavity", "pneumoperitoneum", "hiatal hernia")
#: the text each finding is taught from (written once, never tuned on results)
DESCRIPTIONS = {
    **GENERALITY_DESCRIPTIONS,
    "hiatal hernia": "a round dark gas-filled lucency behind the heart with a horizontal air-fluid level",
}
#: the two models of the protocol (``--backend`` takes these names or backend specs)
MODELS = {"shipped": "phantom:base", "heldout3": HELDOUT3}
#: the default pool: 500 phantoms, 5 % of them the novel finding (``--pool-prevalence`` overrides)
POOL = {"size": 500, "prevalence": 0.05}
#: ZSCL-style forgetting control on the pool: embeddings + zero-shot distributions of the frozen model
POOL_DISTILL = {"name": "pool_distill", "per_batch": 4, "weight": 1.0, "zs_weight": 1.0}
#: the bundle's inversion priors (bundles/phantom_nodules) and the pool priors (`medkt.inversion_priors`)
INIT = {"name": "init", "kind": "images"}
TV = {"name": "tv", "weight": 0.1}
RESIDUAL = {"name": "residual", "size": None, "max": 0.6, "l1": 3.0, "sign": "positive"}
FEATURE_STATS = {"name": "feature_stats", "weight": 1.0}
REAL_START = {"name": "real_start", "weight": 1.0}
SPECTRUM = {"name": "spectrum"}
#: replay of the inversion's start images as "no finding" (with ``replay_init``)
REPLAY_INIT = {"name": "replay", "per_batch": 8}
#: one LaFTer-style round (`medkt.self_training`), the engine's defaults but 8 known scans per class
SELF_TRAINING = {"rounds": 1, "per_round": 16, "known_per_class": 8, "min_confidence": 0.5}
SELF_TRAINING_GATED = {**SELF_TRAINING, "skip_start_top": ["no finding"]}
#: label-free replay of the pool scans the frozen model is surest about, per known class
POOL_REPLAY = {"name": "pool_replay", "per_batch": 8, "per_class": 16}
#: inversion priors / fine-tuning controls that read the pool (dropped by `without_pool`)
POOL_COMPONENTS = ("pool_distill", "pool_replay", "feature_stats", "real_start", "spectrum")

#: arm -> (base recipe: "paper" = bundles/phantom_nodules_paper, "bundle" = bundles/phantom_nodules; overrides)
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    # the paper's recipe on this model: noise init, TV, affine p=0.5, 2,000 steps, full visual fine-tune
    "paper": ("paper", {}),
    # round three's best (text side: only the new name's token embeddings train)
    "tokens_bare": ("bundle", GENERALITY["tokens_bare"]),
    # full visual fine-tuning with the pool as the forgetting control (ZSCL), no WiSE
    "pool_distill": ("bundle", {"finetune": {"controls": [POOL_DISTILL]}, "pool": POOL}),
    # ... with the bundle's WiSE-FT 0.5 on top
    "pool_distill_wise": ("bundle", {"finetune": {"controls": [POOL_DISTILL, {"name": "wise", "alpha": 0.5}]},
                                     "pool": POOL}),
    # the token recipe + pool_distill: the visual tower is frozen, so this must equal tokens_bare (a check)
    "tokens_pool_distill": ("bundle", merge(GENERALITY["tokens_bare"], {"finetune": {"controls": [POOL_DISTILL]},
                                                                          "pool": POOL})),
    # in-domain inversion priors (issue 20 item 2) on the text-side recipe (tokens_bare); the bundle's
    # residual edit of a start image, TV 0.1 and augmentations stay
    "tok_fs": ("bundle", merge(GENERALITY["tokens_bare"], {"inversion": {"priors": [INIT, TV, RESIDUAL, FEATURE_STATS]},
                                                             "pool": POOL})),
    "tok_rs": ("bundle", merge(GENERALITY["tokens_bare"], {"inversion": {"priors": [REAL_START, TV, RESIDUAL]},
                                                             "pool": POOL})),
    "tok_rs_fs": ("bundle", merge(GENERALITY["tokens_bare"], {"inversion": {"priors": [REAL_START, TV, RESIDUAL, FEATURE_STATS]},
                                                                "pool": POOL})),
    # ... plus the pool as the forgetting control of the text side (pool_replay)
    "tok_fs_pr": ("bundle", merge(GENERALITY["tokens_bare"], {"inversion": {"priors": [INIT, TV, RESIDUAL, FEATURE_STATS]},
                                                                "finetune": {"controls": [POOL_REPLAY]}, "pool": POOL})),
    "tok_rs_fs_pr": ("bundle", merge(GENERALITY["tokens_bare"], {"inversion": {"priors": [REAL_START, TV, RESIDUAL, FEATURE_STATS]},
                                                                   "finetune": {"controls": [POOL_REPLAY]}, "pool": POOL})),
    # ... plus the inversion's start images (normal phantoms) replayed as "no finding" next to their edits
    "tok_fs_init": ("bundle", merge(GENERALITY["tokens_bare"], {"inversion": {"priors": [INIT, TV, RESIDUAL, FEATURE_STATS]},
                                                                  "finetune": {"controls": [REPLAY_INIT]}, "replay_init": True,
                                                                  "pool": POOL})),
    "tok_fs_init_pr": ("bundle", merge(GENERALITY["tokens_bare"], {"inversion": {"priors": [INIT, TV, RESIDUAL, FEATURE_STATS]},
                                                                     "finetune": {"controls": [REPLAY_INIT, POOL_REPLAY]},
                                                                     "replay_init": True, "pool": POOL})),
    # ... plus one round of self-training (LaFTer-style picks of the transferred model, known replay
    # picked by the frozen model)
    "tok_rs_fs_st": ("bundle", merge(GENERALITY["tokens_bare"], {"inversion": {"priors": [REAL_START, TV, RESIDUAL, FEATURE_STATS]},
                                                                   "self_training": SELF_TRAINING, "pool": POOL})),
    # the label-free controls alone on round three's recipe (its inversion from normal phantoms)
    "tok_pr": ("bundle", merge(GENERALITY["tokens_bare"], {"finetune": {"controls": [POOL_REPLAY]}, "pool": POOL})),
    "tok_st": ("bundle", merge(GENERALITY["tokens_bare"], {"self_training": SELF_TRAINING, "pool": POOL})),
    # second validation round (after the evaluation: nodule picks were normal scans), self-training
    # never picks a scan the start model called "no finding"; "_picks": the round trains on the picks
    # (and the known replay) only, not on the inverted images
    "tok_rs_fs_stg": ("bundle", merge(GENERALITY["tokens_bare"], {"inversion": {"priors": [REAL_START, TV, RESIDUAL, FEATURE_STATS]},
                                                                    "self_training": SELF_TRAINING_GATED, "pool": POOL})),
    "tok_rs_fs_stg_picks": ("bundle", merge(GENERALITY["tokens_bare"], {
        "inversion": {"priors": [REAL_START, TV, RESIDUAL, FEATURE_STATS]},
        "self_training": {**SELF_TRAINING_GATED, "keep_inverted": False}, "pool": POOL})),
    "tok_fs_init_pr_stg_picks": ("bundle", merge(GENERALITY["tokens_bare"], {
        "inversion": {"priors": [INIT, TV, RESIDUAL, FEATURE_STATS]}, "finetune": {"controls": [REPLAY_INIT, POOL_REPLAY]},
        "replay_init": True, "self_training": {**SELF_TRAINING_GATED, "keep_inverted": False}, "pool": POOL})),
    "tok_spec": ("bundle", merge(GENERALITY["tokens_bare"], {"inversion": {"priors": [REAL_START, TV, SPECTRUM]},
                                                               "pool": POOL})),
}
#: the pool recipe whose pool-free twin is the "data_free" arm (set to the chosen recipe after selection)
DATA_FREE_OF = "pool_distill"

#: the issue's targets (item 6): key -> (text, threshold)
TARGETS = {
    "novel_gain": ("novel accuracy +30 points (name prompts)", 0.30),
    "known_loss": ("known mean loss <= 2 points", 0.02),
    "max_class_drop": ("no known class down > 10 points on any seed", 0.10),
    "auroc_gain": ("novel AUROC +0.10", 0.10),
    "auroc_over_placebo": ("novel AUROC >= placebo + 0.05", 0.05),
    "oracle_reach": (">= 70 % of the real-image arm's AUROC gain", 0.70),
    "seconds": ("<= 3 minutes per seed (pool statistics included)", 180.0),
}


def without_pool(rd: dict[str, Any]) -> dict[str, Any]:
    """``rd`` without its pool: no ``pool``, no ``self_training``, no pool-reading prior or control."""
    out = copy.deepcopy(rd)
    out.pop("pool", None)
    out.pop("self_training", None)
    ft = out.get("finetune", {})
    if "controls" in ft:
        ft["controls"] = [c for c in ft["controls"] if c.get("name") not in POOL_COMPONENTS]
    inv = out.get("inversion", {})
    if isinstance(inv.get("priors"), list):
        inv["priors"] = [p for p in inv["priors"] if p.get("name") not in POOL_COMPONENTS]
    return out


def recipe_table(prevalence: float, data_free_of: str = DATA_FREE_OF) -> dict[str, dict[str, Any]]:
    """Every arm's full recipe dict (``data_free`` included), pools at ``prevalence``."""
    bases = {"bundle": bundle_config("phantom_nodules")["recipe"], "paper": bundle_config("phantom_nodules_paper")["recipe"]}
    table = {name: merge(bases[base], over) for name, (base, over) in CANDIDATES.items()}
    table["data_free"] = without_pool(table[data_free_of])
    for rd in table.values():
        if rd.get("pool"):
            rd["pool"]["prevalence"] = prevalence
    return table


def _stat_mean(s: dict, key: str) -> float:
    return float(s[key]["mean"])


def targets(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pass / fail of each `TARGETS` entry for one summary (None: not measured, e.g. no placebo arm)."""
    gain = s["auroc_after"]["mean"] - s["auroc_before"]["mean"]
    out = {"novel_gain": (_stat_mean(s, "novel_gain"), lambda v, t: v >= t),
           "known_loss": (_stat_mean(s, "known_loss"), lambda v, t: v <= t),
           "max_class_drop": (float(max(s["max_class_drop"]["values"])), lambda v, t: v <= t),
           "auroc_gain": (gain, lambda v, t: v >= t),
           "seconds": (float(s["seconds"]["max"]), lambda v, t: v <= t)}
    if "placebo_auroc" in s:
        out["auroc_over_placebo"] = (s["auroc_after"]["mean"] - s["placebo_auroc"]["mean"], lambda v, t: v >= t)
    if "oracle_reach" in s:
        out["oracle_reach"] = (s["oracle_reach"], lambda v, t: v >= t)
    res = {}
    for key, (text, thr) in TARGETS.items():
        if key in out:
            v, ok = out[key]
            res[key] = {"target": text, "value": v, "pass": bool(ok(v, thr))}
        else:
            res[key] = {"target": text, "value": None, "pass": None}
    return res


def summarize_recipe(rs: list[dict], known: list[str], own_wise: float) -> dict[str, Any]:
    """`benchmarks.common.recipe_summary` + the real-image reach (transfer AUROC gain / real-image
    AUROC gain), the self-training picks per round and the targets."""
    s = recipe_summary(rs, known, own_wise)
    if "oracle_auroc" in s:
        og = s["oracle_auroc"]["mean"] - s["auroc_before"]["mean"]
        s["oracle_auroc_gain"] = og
        s["oracle_reach"] = (s["auroc_after"]["mean"] - s["auroc_before"]["mean"]) / og if og > 0 else float("nan")
    picks = [r.get("extra", {}).get("self_training") for r in rs]
    if any(picks):
        s["self_training"] = [{"picked": [p[k]["picked"] for p in picks], "true_positives": [p[k]["true_positives"] for p in picks]}
                              for k in range(min(len(p) for p in picks))]
    writes = [r.get("extra", {}).get("seconds_pool_write", 0.0) for r in rs]
    s["seconds_pool_write"] = float(np.sum(writes))
    s["targets"] = targets(s)
    return s


def run(args) -> dict:
    """Run the protocol (see README.md); writes ``args.out`` after every finding and returns the result."""
    from medkt.phantom.experiment import PhantomTransferExperiment

    torch.set_num_threads(1)
    cfg = bundle_config("phantom_nodules")
    table = recipe_table(args.pool_prevalence, args.data_free_of)
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {sorted(table)}")
    recipes = {n: table[n] for n in names}
    if args.quick:
        for r in recipes.values():
            quick_recipe(r)
            if r.get("pool"):
                r["pool"]["size"] = 20
    alphas = sorted({float(a) for a in args.wise.split(",") if a.strip()} - {1.0}) if args.wise else []
    placebo_for = set() if args.no_placebo else set(args.placebo.split(",") if args.placebo else recipes)
    oracle_for = set(args.oracle.split(",")) if args.oracle else set()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    out: dict = {"split": args.split, "seeds": seeds, "pool_prevalence": args.pool_prevalence,
                 "descriptions": DESCRIPTIONS, "recipes": recipes, "wise_alphas": [*alphas, 1.0], "models": {}}
    t0 = time.time()
    for model in args.backend.split(","):
        spec = MODELS.get(model, model)
        res = out["models"].setdefault(model, {"backend": spec, "findings": {}})
        for finding in args.findings.split(","):
            exp = PhantomTransferExperiment(spec, finding, DESCRIPTIONS[finding], cfg["known_descriptions"],
                                            eval_per_class=args.eval_per_class, split=args.split, pool_dir=args.pool_dir)
            rows = run_finding(exp, recipes, seeds, placebo_for=placebo_for, oracle_for=oracle_for, alphas=alphas,
                               prefix=f"{model:8s} ", t0=t0)
            summary = {n: summarize_recipe(rs, exp.known, rec_wise(recipes[n])) for n, rs in rows.items()}
            res["findings"][finding] = {"summary": summary, "per_seed": rows}
            Path(args.out).write_text(json.dumps(out, indent=1, default=float))  # partial results survive a stop
    out["selection_score"] = selection_score(out)
    out["chosen"] = choose(out)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(summary_table(out))
    print("\n" + targets_table(out))
    print("\nselection score (mean of novel gain - 3 x known loss, points; None: a class dropped > 10):",
          out["selection_score"], "-> chosen:", out["chosen"])
    return out


def _selection_parts(d: dict, name: str) -> tuple[float, float, bool]:
    """(mean strict score in points, mean AUROC gain, no class dropped > 10 points) of ``name``."""
    vals, auroc, ok = [], [], True
    for m in d["models"].values():
        for f in m["findings"].values():
            s = f["summary"].get(name)
            if s is None:
                continue
            vals.append(100 * (s["novel_gain"]["mean"] - 3 * s["known_loss"]["mean"]))
            auroc.append(s["auroc_after"]["mean"] - s["auroc_before"]["mean"])
            ok &= max(s["max_class_drop"]["values"]) <= 0.10
    return float(np.mean(vals)), float(np.mean(auroc)), ok


def selection_score(d: dict) -> dict[str, float | None]:
    """The pre-registered rule's score of each recipe: mean over models x findings of
    ``100 * (novel gain - 3 x known loss)``; None when any known class dropped > 10 points on a seed."""
    parts = {name: _selection_parts(d, name) for name in d["recipes"]}
    return {name: (p[0] if p[2] else None) for name, p in parts.items()}


def choose(d: dict) -> dict[str, Any]:
    """The pre-registered choice (README.md): the highest eligible score, ties by AUROC gain; with no
    eligible recipe, the highest score without the drop rule, marked not eligible."""
    parts = {name: _selection_parts(d, name) for name in d["recipes"] if name != "data_free"}
    eligible = [n for n, p in parts.items() if p[2]]
    pool = eligible or list(parts)
    best = max(pool, key=lambda n: (parts[n][0], parts[n][1]))
    return {"recipe": best, "eligible": bool(eligible), "score": parts[best][0], "auroc_gain": parts[best][1]}


def _rows(d: dict):
    for model, m in d["models"].items():
        for finding, f in m["findings"].items():
            for name, s in f["summary"].items():
                yield model, finding, name, s


def summary_table(d: dict) -> str:
    """Markdown: one row per model x finding x recipe, means ± 95 % CI (points / AUROC)."""
    def pm(st, scale=100.0):
        return f"{scale * st['mean']:+.1f} ± {scale * st['ci95']:.1f}"

    lines = ["| model | finding | recipe | seeds | novel gain (pts) | known loss (pts) | max class drop per seed (pts) | "
             "AUROC before → after | placebo AUROC | real-image AUROC gain / reach | s per seed | picks (true / picked) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, finding, name, s in _rows(d):
        drops = " ".join(f"{100 * v:.0f}" for v in s["max_class_drop"]["values"])
        plc = f"{s['placebo_auroc']['mean']:.3f}" if "placebo_auroc" in s else "–"
        orc = f"{s['oracle_auroc_gain']:+.3f} / {100 * s['oracle_reach']:.0f} %" if "oracle_auroc_gain" in s else "–"
        picks = ("; ".join(f"{sum(r['true_positives'])}/{sum(r['picked'])}" for r in s["self_training"])
                 if s.get("self_training") else "–")
        lines.append(f"| {model} | {finding} | `{name}` | {len(s['novel_gain']['values'])} | {pm(s['novel_gain'])} | "
                     f"{pm(s['known_loss'])} | {drops} ({s['worst_class']}) | {s['auroc_before']['mean']:.3f} → "
                     f"{s['auroc_after']['mean']:.3f} | {plc} | {orc} | {s['seconds']['mean']:.0f} "
                     f"(max {s['seconds']['max']:.0f}) | {picks} |")
    return "\n".join(lines)


def targets_table(d: dict) -> str:
    """Markdown: pass / fail of each target of issue 20 item 6, per model x finding x recipe."""
    keys = list(TARGETS)
    lines = ["| model | finding | recipe | " + " | ".join(TARGETS[k][0] for k in keys) + " | all |",
             "|---|---|---|" + "---|" * (len(keys) + 1)]
    for model, finding, name, s in _rows(d):
        t = s.get("targets") or targets(s)
        cells = []
        for k in keys:
            v = t[k]
            cells.append("–" if v["pass"] is None else ("pass" if v["pass"] else "FAIL") + f" ({v['value']:.3g})")
        measured = [t[k]["pass"] for k in keys if t[k]["pass"] is not None]
        all_ok = "pass" if all(measured) and len(measured) == len(keys) else ("FAIL" if not all(measured) else "incomplete")
        lines.append(f"| {model} | {finding} | `{name}` | " + " | ".join(cells) + f" | {all_ok} |")
    return "\n".join(lines)


def report(paths: list[Path], plot: Path | None) -> dict:
    """No runs: merge result files (by model, finding and recipe), print the tables and draw a
    frontier figure per model x finding (each arm's WiSE curve, or its single point without a sweep)."""
    d: dict = {"models": {}, "recipes": {}}
    for path in paths:
        one = json.loads(Path(path).read_text())
        d["recipes"].update(one["recipes"])
        for model, m in one["models"].items():
            dm = d["models"].setdefault(model, {"backend": m["backend"], "findings": {}})
            for finding, f in m["findings"].items():
                dm["findings"].setdefault(finding, {"summary": {}})["summary"].update(f["summary"])
    print(summary_table(d))
    print("\n" + targets_table(d))
    panels: dict[str, list] = {}
    kinds = {"after": ("transfer", "{r}"), "oracle": ("upper_bound", "{r} on real images")}
    for model, finding, name, s in _rows(d):
        curves = panels.setdefault(f"{finding} ({model})", [])
        for arm, (kind, label) in kinds.items():
            if s.get("wise", {}).get(arm):
                pts = wise_curve(s["wise"][arm])
            elif arm == "after":
                pts = wise_curve({f"{rec_wise(d['recipes'][name]):g}": s})
            else:
                continue
            curves.append({"label": label.format(r=name), "group": name, "kind": kind, "points": pts})
    if plot is not None:
        from medkt.phantom.report import wise_frontier_figure

        wise_frontier_figure(panels, plot)
    return d


def main(argv: list[str] | None = None) -> None:
    """Command line (see README.md)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.phantom_pool")
    ap.add_argument("--split", choices=["val", "eval"], default="val")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--findings", default="nodule,cavity")
    ap.add_argument("--backend", default="shipped,heldout3", help="models: shipped, heldout3 or backend specs (comma-separated)")
    ap.add_argument("--recipes", default="tokens_bare,pool_distill", help=f"arms of CANDIDATES or data_free (of {DATA_FREE_OF})")
    ap.add_argument("--data-free-of", default=DATA_FREE_OF, help="the pool recipe whose pool-free twin is 'data_free'")
    ap.add_argument("--pool-prevalence", type=float, default=POOL["prevalence"], help="fraction of the novel finding in the pool (e.g. 0.05 or 0)")
    ap.add_argument("--pool-dir", default=str(ROOT / "runs" / "phantom_pools"), help="where pools are written once and reused")
    ap.add_argument("--eval-per-class", type=int, default=100)
    ap.add_argument("--no-placebo", action="store_true")
    ap.add_argument("--placebo", default="", help="recipes that get a placebo arm (default: all)")
    ap.add_argument("--oracle", default="", help="recipes that also run on real phantoms of the finding (upper bound)")
    ap.add_argument("--wise", default="", help="extra WiSE-FT weights evaluated without re-training, e.g. 0.25,0.5,0.75")
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the script (numbers meaningless)")
    ap.add_argument("--out", default=None, help="result JSON (required unless --report)")
    ap.add_argument("--report", default=None, help="no runs: tables + frontier plot of these result JSONs (comma-separated)")
    ap.add_argument("--plot", default=None, help="frontier plot PNG (with --report)")
    args = ap.parse_args(argv)
    if args.report:
        report([Path(p) for p in args.report.split(",")], Path(args.plot) if args.plot else None)
    elif not args.out:
        ap.error("--out is required")
    else:
        run(args)
