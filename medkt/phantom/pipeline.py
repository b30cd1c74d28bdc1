"""Phantom-world knowledge-transfer pipeline (bundles ``phantom_nodules``, ``phantom_nodules_paper``).

Per seed: fresh evaluation phantoms -> zero-shot before -> transfer (inversion + fine-tuning with
the core engine) -> zero-shot after, plus a **placebo** arm (same recipe and number of images,
but plain normal phantoms or noise captioned as the new finding) and optional baseline recipes
(e.g. the paper-faithful one). Writes ``results.json`` (means over seeds, fractions),
``report.md`` with figures, ``per_seed.json`` and the inverted images of the first seed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medkt.errors import ConfigError
from medkt.pipelines.base import Pipeline, log
from medkt.utils import atomic_write_json, atomic_write_text

ARM_LABELS = {
    "before": "name prompts, no training",
    "before_cupl": "description-ensemble prompts (CuPL-style), no training",
    "paper": "paper-faithful transfer",
    "transfer": "this bundle's transfer recipe",
    "placebo": "placebo (same recipe, no inversion)",
}


class PhantomTransferPipeline(Pipeline):
    """Knowledge transfer of a held-out phantom finding, with placebo and baselines.

    Args:
        backend: backend spec (``phantom:base`` = the shipped checkpoint).
        novel / description: the finding to teach and the text it is taught from.
        known_descriptions: known finding -> description (negatives and replay captions).
        recipe: the transfer recipe (`medkt.phantom.experiment.Recipe` fields).
        baselines: extra recipes run on the same images, e.g. ``{"paper": {...}}``.
        seeds: number of seeds (``seed``, ``seed + 1``...) or an explicit list.
        eval_per_class: fresh evaluation phantoms per class and seed.
        segmentation: run the saliency -> mask DSC check on the novel finding's images.
        classes: evaluation classes (default: the keys of ``known_descriptions`` plus ``novel``).
        plugins: modules to import before anything else; each registers finding plugins
            (`medkt.phantom.register_finding`), so ``novel`` can name a finding that is not
            built in.
    """

    kind = "phantom_transfer"

    def __init__(self, backend: str = "phantom:base", novel: str = "nodule", description: str = "",
                 known_descriptions: dict[str, str] | None = None, recipe: dict | None = None,
                 baselines: dict[str, dict] | None = None, seeds: int | list[int] = 1, eval_per_class: int = 100,
                 cupl_prompts: int = 12, segmentation: bool = True, segmentation_images: int = 24,
                 split: str = "eval", classes: list[str] | None = None, plugins: list[str] | None = None,
                 **kw: Any):
        super().__init__(**kw, backend=backend, novel=novel, description=description,
                         known_descriptions=known_descriptions, recipe=recipe, baselines=baselines, seeds=seeds,
                         eval_per_class=eval_per_class, cupl_prompts=cupl_prompts, segmentation=segmentation,
                         split=split, classes=classes, plugins=plugins)
        from medkt.phantom.experiment import PhantomTransferExperiment, Recipe
        from medkt.phantom.world import load_plugins

        load_plugins(plugins)  # before the class list is checked: plugins register findings

        if recipe is None:
            raise ConfigError("the phantom pipeline needs a 'recipe' (inversion + finetune settings)")
        self.recipes = {"transfer": Recipe.from_dict({"name": "transfer", **recipe})}
        for name, r in (baselines or {}).items():
            if name in ("transfer", "placebo", "before"):
                raise ConfigError(f"baseline name {name!r} is reserved; rename it")
            self.recipes[name] = Recipe.from_dict({"name": name, **r})
        self.seeds = list(range(self.seed, self.seed + int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
        if not self.seeds:
            raise ConfigError("seeds must be >= 1")
        self.segmentation = segmentation
        self.segmentation_images = int(segmentation_images)
        self.exp = PhantomTransferExperiment(backend, novel, description, known_descriptions, classes=classes,
                                             eval_per_class=eval_per_class, cupl_prompts=cupl_prompts,
                                             split=split, progress=self.progress)

    # ------------------------------------------------------------------------------------------
    def _run(self, out: Path) -> dict[str, Any]:
        from medkt.evaluation import forgetting_warnings
        from medkt.phantom.experiment import aggregate

        per_seed: list[dict[str, Any]] = []
        figures: dict[str, str] = {}
        seg: dict[str, Any] | None = None
        for i, seed in enumerate(self.seeds):
            log.info("phantom transfer: seed %d (%d/%d)", seed, i + 1, len(self.seeds))
            r = self.exp.run_seed(self.recipes, seed, placebo_of="transfer", keep_images=(i == 0))
            objs = r.pop("_objects")
            if i == 0:
                figures = self._figures(out, objs)
                if self.segmentation:
                    seg = self._segmentation(objs)
            per_seed.append(r)
        arms = list(self.recipes) + ["placebo"]
        agg = aggregate(per_seed, arms, "name")
        agg_desc = aggregate(per_seed, arms, "description")
        t = agg["transfer"]
        results: dict[str, Any] = {
            "novel_accuracy_before": agg["before"]["novel_accuracy"]["mean"],
            "novel_accuracy_after": t["novel_accuracy"]["mean"],
            "known_accuracy_before": agg["before"]["known_accuracy"]["mean"],
            "known_accuracy_after": t["known_accuracy"]["mean"],
            "placebo_novel_accuracy_after": agg["placebo"]["novel_accuracy"]["mean"],
            "placebo_known_accuracy_after": agg["placebo"]["known_accuracy"]["mean"],
            "novel_auroc_before": agg["before"]["novel_auroc"]["mean"],
            "novel_auroc_after": t["novel_auroc"]["mean"],
            "placebo_novel_auroc_after": agg["placebo"]["novel_auroc"]["mean"],
            "seconds_transfer": t["seconds_inversion"]["mean"] + t["seconds_finetune"]["mean"],
            "seconds_transfer_max": max(s["transfer"]["seconds_inversion"] + s["transfer"]["seconds_finetune"]
                                        for s in per_seed),
            "seeds": self.seeds,
            "novel": self.exp.novel,
            "eval_per_class": self.exp.eval_per_class,
            "prompts": "name prompts (3 templates averaged); see arms_description_prompts for CuPL-style prompts",
            "arms": agg,
            "arms_description_prompts": agg_desc,
            "segmentation": seg,
            # known findings that fell more than 10 points (means over seeds, name prompts)
            "warnings": forgetting_warnings(agg["before"]["per_class"], t["per_class"], [self.exp.novel]),
        }
        atomic_write_json(out / "per_seed.json", per_seed)
        table = [*self._table(agg, agg_desc), "", *self._per_class_table(agg)]
        atomic_write_text(out / "report.md", self._report(results, table, figures, seg))
        # printed by `medkt transfer` after the forgetting warnings (as the CXR pipelines' tables)
        results["summary_table"] = "\n".join(table)
        return results

    # ------------------------------------------------------------------------------------------
    def _table(self, agg: dict, agg_desc: dict) -> list[str]:
        from medkt.phantom.report import results_table

        rows = dict(agg)
        rows["before_cupl"] = agg_desc["before"]
        labels = {k: ARM_LABELS.get(k, k) for k in ["before", "before_cupl", *[k for k in self.recipes if k != "transfer"],
                                                       "transfer", "placebo"]}
        return results_table(rows, labels)

    def _per_class_table(self, agg: dict) -> list[str]:
        """Per class: accuracy before -> after the transfer (and the placebo), means over seeds (%)."""
        from medkt.utils import markdown_table

        before, after, placebo = agg["before"]["per_class"], agg["transfer"]["per_class"], agg["placebo"]["per_class"]
        rows = [[f"{c} (new)" if c == self.exp.novel else c, f"{100 * before[c]:.1f}", f"{100 * after[c]:.1f}",
                 f"{100 * (after[c] - before[c]):+.1f}", f"{100 * placebo[c]:.1f}"] for c in before]
        return markdown_table(["class", "before (%)", "after transfer (%)", "change (points)", "placebo (%)"], rows,
                              "lrrrr")

    def _figures(self, out: Path, objs: dict[str, Any]) -> dict[str, str]:
        import torch

        from medkt.figures import save_grid
        from medkt.phantom.report import confusion_figure, image_rows_figure, per_class_bars

        ds = objs["eval_set"]
        novel = self.exp.novel
        x = ds.tensor()
        lab = np.array(ds.labels)
        arm = objs["arms"]["transfer"]
        if arm.extra.get("partial"):  # features were inverted, not pixels: there is no inverted image to show
            rows = [(f"start images of the partial-layer inversion toward '{novel}' (their features were edited)",
                     arm.extra["images"])]
        else:
            rows = [(f"inverted toward the description of '{novel}' (transfer recipe)", arm.extra["images"])]
        if arm.extra.get("init_images") is not None and not arm.extra.get("partial"):
            rows.append(("their starting images (normal phantoms)", arm.extra["init_images"]))
        for key, a in objs["arms"].items():
            if key not in ("transfer", "placebo") and "images" in a.extra:
                rows.append((f"inverted, {ARM_LABELS.get(key, key)}", a.extra["images"]))
        rows.append((f"real '{novel}' phantoms (never seen by the model)", x[torch.from_numpy(lab == novel)]))
        rows.append(("real 'no finding' phantoms", x[torch.from_numpy(lab == "no finding")]))
        figs = {"images": "inverted_vs_real.png"}
        image_rows_figure(rows, out / figs["images"])
        (out / "inversion").mkdir(exist_ok=True)
        save_grid(arm.extra["images"], out / "inversion" / "grid.png")
        torch.save(arm.extra["images"], out / "inversion" / "images.pt")
        b_name, _ = objs["before"]
        series = {"before": b_name.per_class, "after transfer": arm.name_prompts.per_class,
                  "after placebo": objs["arms"]["placebo"].name_prompts.per_class}
        if "paper" in objs["arms"]:
            series["after paper recipe"] = objs["arms"]["paper"].name_prompts.per_class
        figs["bars"] = "per_class_accuracy.png"
        per_class_bars(series, out / figs["bars"], f"seed {self.seeds[0]}, name prompts")
        figs["confusion"] = "confusion.png"
        confusion_figure({"before": b_name.confusion, "after transfer": arm.name_prompts.confusion,
                          "after placebo": objs["arms"]["placebo"].name_prompts.confusion},
                         b_name.classes, out / figs["confusion"])
        return figs

    def _segmentation(self, objs: dict[str, Any]) -> dict[str, Any]:
        from medkt.phantom.saliency import saliency_dsc

        ds = objs["eval_set"]
        idx = [i for i, l in enumerate(ds.labels) if l == self.exp.novel][: self.segmentation_images]
        sub = ds.subset(idx)
        prompt = f"a chest x-ray with {self.exp.novel}"
        before = saliency_dsc(objs["before_backend"], sub, prompt)
        after = saliency_dsc(objs["arms"]["transfer"].extra["backend"], sub, prompt)
        return {"prompt": prompt, "n_images": len(idx), "method": before["method"],
                "dsc_before": before["dsc"], "dsc_after": after["dsc"],
                "dsc_before_ci95": before["dsc_ci95"], "dsc_after_ci95": after["dsc_ci95"]}

    def _report(self, results: dict, table: list[str], figures: dict[str, str], seg: dict | None) -> str:
        from medkt.evaluation import warnings_block

        s = self.settings
        r = results
        lines = [
            f"# Knowledge transfer in the phantom world: '{self.exp.novel}'",
            "",
            *warnings_block(r.get("warnings", [])),
            f"Backend `{self.exp.backend_spec}`; seeds {self.seeds}; {self.exp.eval_per_class} fresh evaluation phantoms "
            f"per class and seed ({len(self.exp.classes)} classes). Accuracies are {len(self.exp.classes)}-way zero-shot top-1 with name "
            "prompts unless stated; ± is the 95% confidence interval over seeds (Student t). The novel AUROC scores "
            f"P({self.exp.novel}) of {self.exp.novel} images against all other images: a shift of the new class's bias "
            "(what the placebo can learn) does not move it.",
            "",
            *table,
            "",
            f"- Transfer: novel {100 * r['novel_accuracy_before']:.1f}% -> {100 * r['novel_accuracy_after']:.1f}%, "
            f"known {100 * r['known_accuracy_before']:.1f}% -> {100 * r['known_accuracy_after']:.1f}%, AUROC "
            f"{r['novel_auroc_before']:.3f} -> {r['novel_auroc_after']:.3f}.",
            f"- Placebo: novel {100 * r['placebo_novel_accuracy_after']:.1f}%, known "
            f"{100 * r['placebo_known_accuracy_after']:.1f}%, AUROC {r['placebo_novel_auroc_after']:.3f}.",
            f"- Inversion + fine-tuning wall time: {r['seconds_transfer']:.1f} s per seed (max {r['seconds_transfer_max']:.1f} s).",
            "",
        ]
        if seg:
            lines += [
                "## Zero-shot segmentation check",
                f"M2IB saliency (prompt \"{seg['prompt']}\") -> {seg['method']} -> mask, Dice against the drawn "
                f"{self.exp.novel} masks on {seg['n_images']} evaluation images: before {100 * seg['dsc_before']:.1f} ± "
                f"{100 * seg['dsc_before_ci95']:.1f}%, after {100 * seg['dsc_after']:.1f} ± {100 * seg['dsc_after_ci95']:.1f}%.",
                "",
            ]
        if figures:
            lines += [
                "## Inverted images beside real phantoms (first seed)",
                f"![inverted vs real]({figures['images']})",
                "",
                "## Per-class accuracy before/after (first seed)",
                f"![per-class accuracy]({figures['bars']})",
                "",
                "## Confusion matrices (first seed; rows = true class)",
                f"![confusion]({figures['confusion']})",
                "",
            ]
        lines += ["## Settings", "", "```json", json.dumps(json.loads(json.dumps(s, default=str)), indent=2), "```", ""]
        return "\n".join(lines)
