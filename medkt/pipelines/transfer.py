"""Generic knowledge-transfer pipeline for zero-shot classification.

inversion -> fine-tuning -> zero-shot evaluation before/after on one or more named evaluation
sets (e.g. ``novel`` = the new concepts' images, ``retention`` = what the model already knew).

Evaluation set config (one entry of ``evaluations``):

    {"manifest": "path/to/manifest.csv",      # medkt manifest (path,label[,mask,split,sha256])
     "root": "path/to/data",                  # data root (default: the manifest's folder)
     "split": "test",                         # optional
     "classes": {"benign nodule": ["prompt", ...], ...},   # class -> prompts, or
     "templates": ["a photo of a {}."], "class_names": {"label": "display name"},
     "aggregate": "mean" | "mean_similarity" | "max",
     "prompt_generator": {"name": "chexpert", ...},  # instead of "classes"
     "skip_bad": false}

or ``{"source": "inversion", "n_images": 5, "seed": 1}``: held-out images inverted with another
seed (a smoke check for models without any real data, e.g. random weights).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import numpy as np

from medkt.backends.base import Backend
from medkt.config_model import Range, config_dataclass
from medkt.errors import ConfigError, DataError
from medkt.evaluation import ClassificationResult, ZeroShotEvaluator, before_after_table, warnings_block
from medkt.finetune import make_caption
from medkt.pipelines.base import Pipeline, log
from medkt.spine import Concept, TransferStep
from medkt.utils import atomic_write_text
from medkt.registry import Registry


#: ``classes`` of an evaluation set or ``medkt evaluate --classes``: class -> prompts (a string is
#: one prompt; null = the templates), or a list of class names expanded with the templates
ClassPrompts = Union[dict[str, Union[str, list[str], None]], list[str]]


@config_dataclass
class EvaluationSpec:
    """One entry of a pipeline's ``evaluations`` (zero-shot classification sets); each key is
    used by the pipelines noted."""

    config_name: ClassVar[str] = "evaluation-set"

    manifest: str | None = None  # medkt manifest (path,label[,mask,split,sha256])
    root: str | None = None  # data root (default: the manifest's folder)
    split: str | None = None
    classes: ClassPrompts | None = None
    templates: list[str] | None = None  # "a photo of a {}." style, for class names without prompts
    class_names: dict[str, str] | None = None  # label -> display name used in the templates
    aggregate: Literal["mean", "mean_similarity", "max"] | None = None
    prompt_generator: dict[str, Any] | None = None  # {"name": "chexpert", ...} instead of classes
    skip_bad: bool = False
    title: str | None = None
    # {"source": "inversion", "n_images": 5, "seed": 1}: held-out inverted images (smoke check)
    source: Literal["inversion"] | None = None
    n_images: Annotated[int, Range(ge=1)] = 5
    seed: int | None = None
    batch_size: Annotated[int, Range(ge=1)] = 64  # images per encoder batch
    num_workers: Annotated[int, Range(ge=0)] = 0  # DataLoader workers decoding images
    cache_dir: str | None = None  # embedding cache folder
    scoring: Literal["auto", "embedding", "itm"] | None = None  # default: the pipeline's
    text_batch_size: Annotated[int, Range(ge=1)] = 128  # prompts per ITM batch (ViLT)

    def validate(self, path: str = "evaluation") -> None:
        """Require a ``manifest`` (unless ``source`` is set) and ``classes`` or a ``prompt_generator``."""
        if self.source is None and self.manifest is None:
            raise ConfigError(f"{path}: an evaluation set needs a 'manifest' (or \"source\": \"inversion\")", key=path)
        if self.source is None and self.classes is None and self.prompt_generator is None:
            raise ConfigError(f"{path}: an evaluation set needs 'classes' (class -> prompts, or a list of class "
                              "names) or a 'prompt_generator'", key=f"{path}#classes")


#: the run folder's list of the images left out by ``skip_unreadable`` / ``skip_bad``
SKIPPED_IMAGES = "skipped_images.txt"

#: prompt generators: ``fn(**options) -> {class: prompts}`` (``{"prompt_generator": {"name": ..., **options}}``)
PROMPT_GENERATORS: Registry[Callable[..., dict[str, list[str]]]] = Registry("prompt_generator")
PROMPT_GENERATORS.register_lazy("chexpert", "medkt.chexpert:chexpert_class_prompts")


def class_prompts_of(spec: dict[str, Any]) -> dict[str, list[str]]:
    """An evaluation set's class -> prompts: ``classes`` as class -> prompts, or a list of class
    names expanded with ``templates`` (and ``class_names`` for display names), or a
    ``prompt_generator``."""
    if "prompt_generator" in spec:
        gen = dict(spec["prompt_generator"])
        generate = PROMPT_GENERATORS.get(gen.pop("name", None))
        try:
            generated = generate(**gen)
        except TypeError as exc:
            raise ConfigError(f"bad prompt_generator options {gen}: {exc}") from None
        return check_distinct_prompts(generated)
    classes = spec.get("classes")
    if not classes or not isinstance(classes, (dict, list)):
        raise ConfigError("evaluation set needs 'classes' (class -> prompts, or a list of class names) or a "
                          f"'prompt_generator', got keys {sorted(spec)}")
    if isinstance(classes, list):  # names only -> templates
        twice = sorted({str(c) for c in classes if classes.count(c) > 1})
        if twice:
            raise ConfigError(f"class(es) {twice} listed twice in 'classes'; each class once (a duplicate would be "
                              "merged silently)", key=f"classes#{twice[0]}")
        classes = {c: None for c in classes}
    out, named = {}, set()
    for c, prompts in classes.items():
        if prompts is None:
            name = spec.get("class_names", {}).get(c, c)
            if name != c:
                named.add(str(c))
            prompts = [t.format(name) for t in spec.get("templates", ["a photo of a {}."])]
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(f"class {c!r} needs at least one non-empty prompt")
        out[str(c)] = prompts
    return check_distinct_prompts(out, report_only=named)


def check_distinct_prompts(prompts: dict[str, list[str]], report_only: set[str] | frozenset[str] = frozenset()
                           ) -> dict[str, list[str]]:
    """Refuse two classes sharing a prompt (compared without case and surrounding spaces): their
    scores would be tied by construction, so the argmax between them is decided by the class
    order, not the image. Returns ``prompts``.

    Pairs of classes that are both in ``report_only`` are logged as a warning instead: a
    published class-name list can hold the same name twice (CLIP's ImageNet names have two
    "missile" and two "sunglasses" classes), and its benchmark is evaluated with it as it is.
    """
    owner: dict[str, str] = {}
    warned: set[tuple[str, str]] = set()
    for c, ps in prompts.items():
        for p in ps:
            key = " ".join(p.split()).casefold()
            first = owner.setdefault(key, c)
            if first == c:
                continue
            if first in report_only and c in report_only:
                if (first, c) not in warned:  # once per pair, not once per template
                    warned.add((first, c))
                    log.warning("classes %r and %r share the prompt %r (the same class name): their scores tie",
                                first, c, p)
                continue
            raise ConfigError(f"classes {first!r} and {c!r} share the prompt {p!r}: their scores would be "
                              "identical; give each class its own prompt", key=f"classes#{c}")
    return prompts


def load_evaluation_set(backend: Backend, name: str, spec: dict[str, Any], default_aggregate: str = "mean",
                        progress: bool = True, scoring: str = "auto",
                        allow_missing_classes: bool = False) -> tuple[ZeroShotEvaluator, dict[str, Any]]:
    """Read an evaluation set's manifest and build its `ZeroShotEvaluator` (images stream
    from disk at evaluation time; only embeddings are kept).

    With ``skip_bad`` every file is decoded once up front and bad rows/files are skipped and
    counted in the returned info (``skip_unreadable``: only missing or undecodable image files
    are skipped, other bad rows stay errors; the full list is ``info["skipped_all"]``); otherwise a bad row is a `DataError` naming it (at the
    latest when the "before" evaluation reads it, before any transfer compute). Every class needs
    an image unless ``allow_missing_classes`` (distractor classes, e.g. ImageNet's 1000).
    Spec keys besides those of `class_prompts_of`: ``manifest``, ``root``, ``split``,
    ``aggregate``, ``skip_bad``, ``skip_unreadable``, ``title``, ``batch_size``, ``num_workers``, ``cache_dir``,
    ``scoring`` (``auto|embedding|itm``), ``text_batch_size``.
    """
    from medkt.data.manifest import ManifestProblem, read_manifest, readable_rows

    prompts = class_prompts_of(spec)
    if "manifest" not in spec:
        raise ConfigError(f"evaluation {name!r} needs a 'manifest'")
    manifest = Path(spec["manifest"])
    root = Path(spec.get("root") or manifest.parent)
    skip_bad = bool(spec.get("skip_bad", False))
    skip_unreadable = bool(spec.get("skip_unreadable", False))
    aggregate = spec.get("aggregate", default_aggregate)
    problems: list[ManifestProblem] = []
    # with distractor classes a class may have no rows; labels must still be among the classes
    rows = read_manifest(manifest, root, classes=None if allow_missing_classes else list(prompts),
                         split=spec.get("split"), skip_bad=skip_bad, problems=problems,
                         check_files=not skip_unreadable)  # a missing file is one of the unreadable
    unknown = sorted({r.label for r in rows} - set(prompts))
    if unknown:
        raise DataError(f"{manifest}: labels {unknown[:5]} are not among the evaluation classes of {name!r}")
    if skip_bad or skip_unreadable:
        rows, unreadable = readable_rows(rows, root, backend.load_image)
        problems += unreadable
    labels = [r.label for r in rows]
    empty = [c for c in prompts if c not in set(labels)]
    if empty and not allow_missing_classes:
        raise DataError(f"{manifest}: no usable images for class(es) {empty} "
                        f"({len(problems)} bad rows skipped); every class needs at least one image")
    if not rows:
        raise DataError(f"{manifest}: no usable images ({len(problems)} bad rows skipped)")
    paths = [root / r.path for r in rows]
    ev = ZeroShotEvaluator(backend, paths, labels, prompts, aggregate=aggregate,
                           batch_size=int(spec.get("batch_size", 64)), scoring=spec.get("scoring", scoring),
                           num_workers=int(spec.get("num_workers", 0)),
                           text_batch_size=int(spec.get("text_batch_size", 128)),
                           cache_dir=spec.get("cache_dir"), progress=progress,
                           image_names=[str(r.source or r.path) for r in rows])
    info = {"title": spec.get("title", name), "manifest": str(manifest), "n_images": len(labels),
            "n_classes": len(prompts), "skipped_rows": len(problems), "skipped": [str(p) for p in problems[:20]],
            "aggregate": aggregate, "scoring": ev.scoring, "n_prompts": {c: len(p) for c, p in prompts.items()}}
    if problems:
        info["skipped_all"] = [str(p) for p in problems]
        log.warning("%s: skipped %d bad row(s), e.g. %s", name, len(problems), problems[0])
    return ev, info


def check_backend_weights(spec: str, options: dict[str, Any] | None = None) -> None:
    """The backend's weights (and ``tokenizer`` option) can be found locally, as far as that is
    decidable without building the model (`medkt.weights.backend_problems`); raises the
    first problem."""
    from medkt.weights import backend_problems

    problems = backend_problems(spec, options)
    if problems:
        raise problems[0]


class TransferPipeline(Pipeline):
    """Knowledge transfer + zero-shot classification before/after (see module docstring).

    Args:
        backend: backend spec, e.g. ``"clip:ViT-B-32@/models/ViT-B-32.pt"``.
        backend_options: keywords of the backend factory (e.g. ``{"tokenizer": DIR}``).
        concepts: ``[{"name", "description", "n_images"}]``.
        inversion / finetune: options of `InversionConfig` / `FinetuneConfig`.
        evaluations: name -> evaluation set config (see module docstring); may be empty.
        negative_captions: extra fine-tuning negatives; by default one caption per evaluation
            class that is not a transferred concept.
        save_weights: write the fine-tuned parameters to ``finetuned.safetensors``.
        unlabeled: an unlabeled pool of scans for fine-tuning (``--set unlabeled=PATH``: a folder, or
            a manifest whose labels are never read; see `medkt.spine.transfer`); used by the
            ``pool_distill`` control. None (default): no pool.
        self_training: self-training rounds on the pool (``--set 'self_training={"rounds": 1, ...}'``,
            `medkt.self_training.SelfTrainingConfig`; needs ``unlabeled``; bundles pass no known-class
            descriptions, so set ``known_per_class`` to 0). None (default): off.
    """

    kind = "transfer"
    #: evaluation sets may list classes without images (distractors)
    allow_missing_classes = False
    #: evaluation scoring (``auto``: embeddings when the backend has them, else ITM)
    scoring = "auto"
    #: defaults of the inversion / fine-tuning configs for this pipeline's model family
    inversion_defaults: dict[str, Any] = {}
    finetune_defaults: dict[str, Any] = {}
    default_aggregate = "mean"

    def __init__(self, backend: str, concepts: list[dict[str, Any]], inversion: dict | None = None,
                 finetune: dict | None = None, evaluations: dict[str, EvaluationSpec] | None = None,
                 negative_captions: list[str] | None = None, save_weights: bool = True,
                 backend_options: dict[str, Any] | None = None, skip_unreadable: bool = False,
                 unlabeled: str | dict[str, Any] | None = None, self_training: dict[str, Any] | None = None,
                 **kw: Any):
        super().__init__(**kw, backend=backend, concepts=concepts, inversion=inversion, finetune=finetune,
                         evaluations=evaluations, negative_captions=negative_captions,
                         **({"skip_unreadable": True} if skip_unreadable else {}),
                         **({"unlabeled": unlabeled} if unlabeled is not None else {}),
                         **({"self_training": self_training} if self_training is not None else {}))
        # opt-in (``medkt transfer --skip-unreadable``): images that are missing or cannot be
        # decoded are left out of every evaluation and listed in RUN/skipped_images.txt
        self.skip_unreadable = bool(skip_unreadable)
        self.backend_spec = backend
        self.backend_options = dict(backend_options or {})
        self.step = TransferStep(concepts, inversion, finetune, seed=self.seed,
                                 inversion_defaults=self.inversion_defaults, finetune_defaults=self.finetune_defaults,
                                 unlabeled=unlabeled, self_training=self_training)
        self.concepts = self.step.concepts
        self.inv_cfg, self.ft_cfg = self.step.inversion, self.step.finetune
        self.evaluations = dict(evaluations or {})
        self.negative_captions = negative_captions
        self.save_weights = save_weights
        for name, spec in self.evaluations.items():
            if spec.get("source") != "inversion":
                class_prompts_of(spec)  # validate early, before any compute

    def validate(self) -> None:
        """Before any folder is touched: the backend's weights path and every evaluation manifest
        exist (a typo fails in seconds, not after the inversion)."""
        super().validate()
        check_backend_weights(self.backend_spec, self.backend_options)
        for name, spec in self.evaluations.items():
            if spec.get("source") != "inversion" and "manifest" in spec and not Path(spec["manifest"]).is_file():
                raise DataError(f"evaluation {name!r}: manifest not found: {spec['manifest']}; build one with "
                                "'medkt data prepare NAME --root DIR' or fix the path")

    # -- evaluation sets ------------------------------------------------------------------
    def build_evaluator(self, backend: Backend, name: str, spec: dict[str, Any],
                        out: Path | None = None) -> tuple[ZeroShotEvaluator, dict]:
        """An evaluation set's evaluator: a manifest, or ``{"source": "inversion"}`` (held-out
        images inverted with another seed, checkpointed in ``out/heldout_<name>``)."""
        if spec.get("source") == "inversion":
            from medkt.spine import synthesize

            cfg = copy.deepcopy(self.inv_cfg)
            cfg.seed = int(spec.get("seed", self.seed + 1000))
            n = int(spec.get("n_images", 5))
            held_concepts = [Concept(c.name, [c.description], n) for c in self.concepts]
            held = synthesize(backend, held_concepts, cfg, inversion_dir=out / f"heldout_{name}" if out else None,
                              resume=self.resume, progress=self.progress)
            prompts = {c.name: [make_caption(c.name, c.description, self.ft_cfg)] for c in self.concepts}
            info = {"source": "held-out inversions (smoke check, not real images)", "n_images": len(held.images)}
            return ZeroShotEvaluator(backend, held.images, held.concepts, prompts, scoring=self.scoring), info
        return load_evaluation_set(backend, name, spec, default_aggregate=self.default_aggregate,
                                   progress=self.progress, scoring=self.scoring,
                                   allow_missing_classes=self.allow_missing_classes)

    def build_evaluators(self, backend: Backend, out: Path | None) -> tuple[dict[str, ZeroShotEvaluator], dict[str, Any]]:
        """`build_evaluator` for every entry of ``evaluations``: (name -> evaluator, name -> info)."""
        evaluators, info, skipped = {}, {}, []
        for name, spec in self.evaluations.items():
            if self.skip_unreadable and spec.get("source") != "inversion":
                spec = {**spec, "skip_unreadable": True}
            evaluators[name], info[name] = self.build_evaluator(backend, name, spec, out)
            skipped += info[name].pop("skipped_all", [])
        if skipped and out is not None:  # the full list in the run folder (results.json keeps 20 per set)
            from medkt.data.manifest import write_skipped

            path = write_skipped(out / SKIPPED_IMAGES, skipped)
            log.warning("skipped %d unreadable image(s) or bad row(s), listed in %s", len(skipped), path)
        return evaluators, info

    # -- run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Single process: `Pipeline.run`. Under torchrun (``WORLD_SIZE > 1``) every rank
        runs `_run` (sharded inversion, DDP fine-tuning, sharded evaluation, see
        `medkt.distributed`) and rank 0 alone writes the run folder."""
        from medkt import distributed as mdist
        from medkt.errors import MedktError
        from medkt.utils import seed_everything

        if not mdist.init_from_env(device=self.device):
            return super().run()
        if type(self)._run is not TransferPipeline._run:
            # a subclass with its own _run is not rank-aware: run it whole on rank 0, single-process
            main = mdist.is_main()
            log.warning("%s does not support torchrun sharding; running on rank 0 only", type(self).__name__)
            mdist.shutdown()
            return super().run() if main else {}
        # every rank must use rank 0's folder (default folder names carry a timestamp)
        self.output_dir = Path(mdist.broadcast_object(str(self.output_dir)))
        problem = None
        if mdist.is_main():  # rank 0 checks; every rank stops on its verdict (no rank waits at a barrier)
            try:
                self.preflight()
            except MedktError as exc:
                problem = (type(exc), str(exc))
        problem = mdist.broadcast_object(problem)
        if problem is not None:
            raise problem[0](problem[1])
        if mdist.is_main():
            results = super().run()
            mdist.barrier()  # the run folder is complete
            return results
        seed_everything(self.seed)
        self._run(self.staging_dir)  # checkpoints only; rank 0 writes everything else
        mdist.barrier()
        import json

        path = self.output_dir / "results.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _run(self, out: Path) -> dict[str, Any]:
        from medkt import distributed as mdist

        main = mdist.is_main()
        mdist.barrier()  # rank 0 has prepared the staging folder the ranks share for checkpoints
        backend = self.create_backend(self.backend_spec, **self.backend_options)
        log.info("backend %s: %s", self.backend_spec, backend.describe())
        evaluators, eval_info = self.build_evaluators(backend, out)
        result = self.step.run(backend, evaluators=evaluators, negatives=self.negative_captions, out_dir=out,
                               resume=self.resume, progress=self.progress, save_weights=self.save_weights)
        if not main:
            return {}
        results: dict[str, Any] = {"backend": self.backend_spec, **result.summary(),
                                   "evaluations": {n: {"info": eval_info[n], "before": result.before[n].to_dict(),
                                                       "after": result.after[n].to_dict()} for n in evaluators}}
        write_report(out, self, results, result.before, result.after)
        return results


def accuracy_bars(before: ClassificationResult, after: ClassificationResult, path: Path, title: str = "",
                  max_classes: int = 30) -> Path:
    """Per-class accuracy before/after as a bar chart (PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medkt.utils import atomic_write_bytes

    classes = [c for c in before.classes if c in before.per_class]
    if len(classes) > max_classes:  # e.g. ImageNet-1k: show the classes that changed most
        change = {c: abs(after.per_class.get(c, 0.0) - before.per_class[c]) for c in classes}
        keep = set(sorted(classes, key=lambda c: -change[c])[:max_classes])
        classes = [c for c in classes if c in keep]
        title = f"{title} ({max_classes} classes with the largest change)"
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(classes) + 2), 3.2))
    ax.bar(x - 0.2, [100 * before.per_class[c] for c in classes], 0.4, label="before")
    ax.bar(x + 0.2, [100 * after.per_class.get(c, np.nan) for c in classes], 0.4, label="after")
    ax.set_xticks(x, classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_report(out: Path, pipe: TransferPipeline, results: dict[str, Any],
                 before: dict[str, ClassificationResult], after: dict[str, ClassificationResult]) -> Path:
    """Write ``out/report.md`` (forgetting warnings at the top, ``results["warnings"]``; run summary,
    before/after table and accuracy plot per evaluation); returns its path."""
    lines = [f"# Knowledge transfer report{': ' + pipe.bundle_name if pipe.bundle_name else ''}", "",
             *warnings_block(results.get("warnings", [])),
             f"- backend: `{pipe.backend_spec}`", f"- seed: {pipe.seed}",
             f"- concepts: {', '.join(results['concepts'])}",
             f"- inversion: {pipe.inv_cfg.steps} steps, lr {pipe.inv_cfg.lr}, components {pipe.inv_cfg.describe_components()}, "
             f"{results['seconds_inversion']:.1f} s; mean similarity per concept: "
             + ", ".join(f"{k} {v:.3f}" for k, v in results["inversion"]["per_concept_similarity"].items()),
             f"- fine-tuning ({pipe.ft_cfg.train} encoder): {results['finetune']['steps']} steps, lr {pipe.ft_cfg.lr}, "
             f"loss {results['finetune']['first_loss']:.3f} -> {results['finetune']['last_loss']:.3f}, "
             f"{results['seconds_finetune']:.1f} s", "", "![inverted images](inversion/grid.png)", ""]
    for name in before:
        info = results["evaluations"][name]["info"]
        lines.append(f"## {name}")
        if info.get("source"):
            lines.append(f"_{info['source']}_\n")
        lines.append(before_after_table(before[name], after[name]))
        accuracy_bars(before[name], after[name], out / f"accuracy_{name}.png", name)
        lines.append(f"![accuracy {name}](accuracy_{name}.png)\n")
    lines.append("Settings: see `settings.json`; all numbers: `results.json`.")
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
