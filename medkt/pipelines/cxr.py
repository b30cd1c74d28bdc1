"""Chest X-ray knowledge transfer: per-concept transfer with a learning-rate sweep, measured on a
target set (JSRT) and a retention set (CheXpert-5x200c) -- the protocol of the paper's Tab.2 -- and
plain zero-shot evaluation (Tab.3 reference rows).

Evaluation set config (``evaluations`` entry), on top of `medkt.pipelines.transfer`'s:

    {"title": "JSRT",                                  # shown in tables
     "manifest": "data/jsrt/jsrt.csv", "root": "data/jsrt", "split": null,
     "classes": {"lung cancer": ["prompt", ...], ...}  # or:
     "prompt_generator": {"name": "chexpert", "n": 10, "seed": 0},
     "aggregate": "mean_similarity" | "max" | "mean",  # MedCLIP ensemble / best prompt / CLIP
     "skip_bad": false}                                # skip unreadable rows, count them

Bad rows (missing or corrupt file, label outside the classes) stop the run with a one-line
error naming the manifest row, unless ``skip_bad`` is set; then the report counts them.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from medkt.backends.base import Backend
from medkt.errors import ConfigError
from medkt.evaluation import ClassificationResult, ZeroShotEvaluator, transfer_warnings, warnings_block
from medkt.pipelines.base import Pipeline, log
from medkt.pipelines.transfer import EvaluationSpec, TransferPipeline, class_prompts_of
from medkt.pipelines.transfer import load_evaluation_set as load_generic_evaluation_set
from medkt.spine import as_pool, default_negatives, synthesize, transfer
from medkt.utils import atomic_write_json, atomic_write_text


def load_evaluation_set(backend: Backend, name: str, spec: dict[str, Any], progress: bool = True) -> tuple[ZeroShotEvaluator, dict[str, Any]]:
    """The generic evaluation-set loader with MedCLIP's prompt scoring as the default aggregate."""
    return load_generic_evaluation_set(backend, name, spec, default_aggregate="mean_similarity", progress=progress)


def accuracy_table(columns: list[tuple[str, dict[str, ClassificationResult]]], titles: dict[str, str]) -> str:
    """One Markdown table: rows = evaluation set x (classes + top-1), columns = runs (accuracy %)."""
    from medkt.utils import markdown_table

    rows = []
    for ev_name, res in columns[0][1].items():
        title = titles.get(ev_name, ev_name)
        for cls in res.classes:
            vals = [r[ev_name].per_class.get(cls) for _, r in columns]
            rows.append([title, cls, *("-" if v is None else f"{100 * v:.2f}" for v in vals)])
        rows.append([title, "**top-1**", *(f"**{100 * r[ev_name].accuracy:.2f}**" for _, r in columns)])
    return "\n".join(markdown_table(["evaluation", "class", *(c for c, _ in columns)], rows, "ll" + "r" * len(columns))) + "\n"


class CXRTransferSweep(TransferPipeline):
    """Knowledge transfer of chest X-ray concepts with a learning-rate sweep (paper Tab.2).

    Args:
        backend: backend spec, e.g. ``"medclip:vit@/models/medclip-vit"``.
        backend_options: keywords for the backend factory (e.g. ``{"tokenizer": DIR}``).
        concepts: ``[{"name", "description", "n_images", "lr"}]``; ``lr`` is the concept's base
            learning rate (default: ``finetune.lr``).
        multipliers: base-lr multipliers to run (Tab.2 uses 1..5); each starts from the original
            weights and reuses the concept's inverted images.
        mode: ``"separate"`` (one concept at a time, as Tab.2) or ``"joint"`` (all concepts in one
            fine-tuning, lr = ``finetune.lr`` x multiplier; Tab.3).
        concept_filter: run only these concept names (e.g. ``["lung cancer"]``).
        evaluations: name -> evaluation set (module docstring); the first is the target set.
    """

    kind = "cxr_transfer_sweep"

    default_aggregate = "mean_similarity"

    def __init__(self, backend: str, concepts: list[dict[str, Any]], multipliers: list[float] | None = None,
                 mode: str = "separate", concept_filter: list[str] | None = None, **kw: Any):
        super().__init__(backend, concepts, **kw)
        self.settings.update(multipliers=multipliers, mode=mode, concept_filter=concept_filter)
        if not self.evaluations:
            raise ConfigError("a CXR transfer sweep needs at least one evaluation set")
        if mode not in ("separate", "joint"):
            raise ConfigError(f"mode must be 'separate' or 'joint', got {mode!r}")
        self.mode = mode
        self.multipliers = [float(m) for m in (multipliers or [1.0])]
        if not self.multipliers or any(m <= 0 for m in self.multipliers):
            raise ConfigError(f"multipliers must be positive numbers, got {multipliers}")
        base_lrs = {str(c["name"]): float(c.get("lr", self.ft_cfg.lr)) for c in concepts}
        if concept_filter:
            unknown = [c for c in concept_filter if c not in base_lrs]
            if unknown:
                raise ConfigError(f"concept_filter names {unknown} are not concepts of this bundle: {sorted(base_lrs)}")
            self.concepts = [c for c in self.concepts if c.name in concept_filter]
        self.base_lr = base_lrs

    def _groups(self) -> list[tuple[str, list[Any], float]]:
        """(label, concepts, base lr) per transfer experiment."""
        if self.mode == "joint":
            return [("+".join(c.name for c in self.concepts), self.concepts, self.ft_cfg.lr)]
        return [(c.name, [c], self.base_lr[c.name]) for c in self.concepts]

    def _run(self, out: Path) -> dict[str, Any]:
        backend = self.create_backend(self.backend_spec, **self.backend_options)
        log.info("backend %s: %s", self.backend_spec, backend.describe())
        evaluators, info = self.build_evaluators(backend, out)
        titles = {n: i["title"] for n, i in info.items()}
        baseline = {n: ev.evaluate() for n, ev in evaluators.items()}
        original = {k: v.detach().clone() for k, v in backend.state_dict().items()}
        # one pool (and one embedding cache: every sweep run starts from the same weights)
        pool = as_pool(self.step.unlabeled, out / "pool_embeddings") if self.step.unlabeled is not None else None

        columns: list[tuple[str, dict[str, ClassificationResult]]] = [("baseline", baseline)]
        runs: list[dict[str, Any]] = []
        for label, group, base_lr in self._groups():
            slug = "".join(ch if ch.isalnum() else "_" for ch in label.lower()).strip("_")
            backend.load_state_dict(original)
            # one inversion per concept group, reused by every learning rate of the sweep
            inv = synthesize(backend, group, self.inv_cfg, inversion_dir=out / "inversion" / slug, resume=self.resume,
                             progress=self.progress)
            names = {c.name for c in group}
            negatives = (list(self.negative_captions) if self.negative_captions is not None
                         else default_negatives(evaluators, names))
            for m in self.multipliers:
                backend.load_state_dict(original)
                cfg = copy.deepcopy(self.ft_cfg)
                cfg.lr = base_lr * m
                cfg.validate()
                r = transfer(backend, group, inversion_config=self.inv_cfg, finetune_config=cfg, evaluators=evaluators,
                             negatives=negatives, images=inv, before=baseline, out_dir=out / "runs" / f"{slug}_x{m:g}",
                             resume=self.resume, progress=self.progress, save_weights=self.save_weights,
                             unlabeled=pool, self_training=self.step.self_training)
                col = f"{label} x{m:g} (lr {cfg.lr:.0e})"
                columns.append((col, r.after))
                summary = r.summary()
                run = {"concepts": sorted(names), "multiplier": m, "lr": cfg.lr,
                       "warnings": transfer_warnings(baseline, r.after, names, where=col),
                       "seconds_inversion": inv.seconds, "seconds_finetune": summary["seconds_finetune"],
                       "finetune": summary["finetune"], "inversion": summary["inversion"],
                       "evaluations": {n: res.to_dict() for n, res in r.after.items()}}
                runs.append(run)
                atomic_write_json(out / "runs" / f"{slug}_x{m:g}.json", run)
        backend.load_state_dict(original)

        table = accuracy_table(columns, titles)
        results = {
            "backend": self.backend_spec,
            "mode": self.mode,
            "multipliers": self.multipliers,
            "warnings": [w for run in runs for w in run["warnings"]],
            "evaluation_sets": info,
            "baseline": {n: r.to_dict() for n, r in baseline.items()},
            "runs": runs,
            "summary_table": table,
        }
        _write_cxr_report(out, self, table, info, runs)
        return results


class CXRZeroShotEvaluation(Pipeline):
    """Zero-shot evaluation only (e.g. MedCLIP on CheXpert-5x200c, the reference row of Tab.3)."""

    kind = "cxr_zero_shot"

    def __init__(self, backend: str, evaluations: dict[str, EvaluationSpec], backend_options: dict[str, Any] | None = None,
                 **kw: Any):
        super().__init__(**kw, backend=backend, evaluations=evaluations, backend_options=backend_options)
        if not evaluations:
            raise ConfigError("nothing to evaluate: 'evaluations' is empty")
        for spec in evaluations.values():
            class_prompts_of(spec)
        self.backend_spec = backend
        self.backend_options = dict(backend_options or {})
        self.evaluations = dict(evaluations)

    def _run(self, out: Path) -> dict[str, Any]:
        backend = self.create_backend(self.backend_spec, **self.backend_options)
        results, info = {}, {}
        for name, spec in self.evaluations.items():
            ev, info[name] = load_evaluation_set(backend, name, spec, progress=self.progress)
            results[name] = ev.evaluate()
        table = accuracy_table([(self.backend_spec, results)], {n: i["title"] for n, i in info.items()})
        atomic_write_text(out / "report.md", f"# Zero-shot evaluation: {self.bundle_name or ''}\n\n"
                          f"- backend: `{self.backend_spec}`\n- seed: {self.seed}\n\n{table}\n"
                          + _skipped_lines(info))
        return {"backend": self.backend_spec, "evaluation_sets": info,
                "evaluations": {n: r.to_dict() for n, r in results.items()}, "summary_table": table}


def _skipped_lines(info: dict[str, dict[str, Any]]) -> str:
    lines = [f"- {i['title']}: {i['n_images']} images, {i['skipped_rows']} bad rows skipped" for i in info.values()]
    return "\n".join(lines) + "\n"


def _write_cxr_report(out: Path, pipe: CXRTransferSweep, table: str, info: dict, runs: list[dict]) -> Path:
    lines = [f"# Chest X-ray knowledge transfer{': ' + pipe.bundle_name if pipe.bundle_name else ''}", "",
             *warnings_block([w for r in runs for w in r["warnings"]]),
             f"- backend: `{pipe.backend_spec}`", f"- seed: {pipe.seed}", f"- mode: {pipe.mode}; multipliers "
             f"{', '.join(f'x{m:g}' for m in pipe.multipliers)}",
             f"- inversion: {pipe.inv_cfg.steps} steps, lr {pipe.inv_cfg.lr}, components {pipe.inv_cfg.describe_components()}",
             f"- fine-tuning ({pipe.ft_cfg.train} encoder): batch {pipe.ft_cfg.batch_size}, {pipe.ft_cfg.epochs} epoch(s), "
             f"wd {pipe.ft_cfg.optimizer.weight_decay}", "", _skipped_lines(info),
             "Zero-shot accuracy (%) per class and top-1, before (baseline) and after each transfer:", "", table]
    for r in runs:
        lines.append(f"- {', '.join(r['concepts'])} x{r['multiplier']:g}: lr {r['lr']:.1e}, fine-tune loss "
                     f"{r['finetune']['first_loss']:.3f} -> {r['finetune']['last_loss']:.3f}, inversion "
                     f"{r['seconds_inversion']:.1f} s, fine-tuning {r['seconds_finetune']:.1f} s")
    lines += ["", "Inverted images: `inversion/<concept>/grid.png`; per-run numbers: `runs/*.json`."]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
