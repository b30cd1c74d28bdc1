"""The transfer step: the one sequence every medkt pipeline composes.

    evaluate before -> synthesise images (invert the visual encoder toward each concept's
    description; checkpointed, sharded under torchrun) -> save them -> fine-tune
    (visual encoder by default) -> save weights -> evaluate after

`transfer` runs it on a backend and a list of `Concept` and returns a
`TransferResult`. Pipelines (bundles) add what their task needs around it: evaluation
sets, reports, sweeps over learning rates, segmentation or retrieval metrics. A research script
calls it directly:

    from medkt import Concept, create_backend, transfer
    from medkt.inversion import InversionConfig
    from medkt.finetune import FinetuneConfig

    backend = create_backend("phantom:base", device="auto")
    result = transfer(backend, [Concept("nodule", ["a small round bright spot in a lung"])],
                      inversion_config=InversionConfig(steps=300), finetune_config=FinetuneConfig(lr=1e-4),
                      negatives=["a chest x-ray with no finding"], out_dir="runs/nodule")

With ``out_dir`` every phase leaves its outputs there: ``inversion/`` (checkpoints, PNGs,
``manifest.csv``), ``finetune.json`` and ``finetuned.safetensors`` (each self-training round the
same in ``self_training/round_<r>/``). With ``resume=True`` a finished phase whose recorded
settings match is not run again (its outputs are read back), an interrupted inversion continues
from its checkpoint, and changed settings are refused (`medkt.checkpoints.guard_resume`).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from medkt.backends.base import Backend, ImageTextEmbedder, ImageTextMatcher
from medkt.checkpoints import guard_resume
from medkt.errors import ConfigError, DataError
from medkt.faults import fault_point
from medkt.evaluation import ClassificationResult, ZeroShotEvaluator, transfer_warnings
from medkt.finetune import FinetuneConfig, finetune, load_finetuned, make_caption, save_finetuned
from medkt.pool import UnlabeledPool
from medkt.self_training import SelfTrainingConfig, as_self_training, run_self_training
from medkt.inversion import (
    InversionConfig,
    InversionResult,
    InversionTarget,
    inversion_summary,
    invert_sharded,
    save_inversion,
)


@dataclass
class Concept:
    """A concept to teach: its ``name``, one or more ``descriptions`` (the text the images are
    inverted toward; the first one also captions the fine-tuning images) and ``n_images``."""

    name: str
    descriptions: list[str]
    n_images: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.descriptions, str):
            self.descriptions = [self.descriptions]
        if not str(self.name).strip():
            raise ConfigError("a concept needs a non-empty name")
        if not self.descriptions or not all(isinstance(d, str) and d.strip() for d in self.descriptions):
            raise ConfigError(f"concept {self.name!r}: descriptions must be non-empty strings, got {self.descriptions!r}")
        if int(self.n_images) < 1:
            raise ConfigError(f"concept {self.name!r}: n_images must be >= 1, got {self.n_images}")
        self.name, self.n_images = str(self.name), int(self.n_images)

    @property
    def description(self) -> str:
        """The first description (the fine-tuning caption's)."""
        return self.descriptions[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"name", "descriptions", "n_images"}`` (accepted back by `parse_concepts`)."""
        return {"name": self.name, "descriptions": list(self.descriptions), "n_images": self.n_images}


def parse_concepts(concepts: Sequence[Concept | Mapping[str, Any]], default_n: int = 10) -> list[Concept]:
    """``[{"name", "description" (str or list), "n_images"}]`` (bundle form) or `Concept`\\ s."""
    if not concepts:
        raise ConfigError("no concepts to transfer ('concepts' is empty)")
    out = []
    for i, c in enumerate(concepts):
        if isinstance(c, Concept):
            out.append(c)
            continue
        if not isinstance(c, Mapping) or "name" not in c or not ("description" in c or "descriptions" in c):
            raise ConfigError(f"concept #{i} must have 'name' and 'description', got {c!r}")
        descs = c.get("description", c.get("descriptions"))
        out.append(Concept(c["name"], descs if isinstance(descs, list) else [descs], c.get("n_images", default_n)))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"concept names must be unique, got {names}")
    return out


def inversion_targets(concepts: Sequence[Concept]) -> list[InversionTarget]:
    """``n_images`` per concept, spread over its descriptions (round-robin)."""
    targets = []
    for c in concepts:
        k = len(c.descriptions)
        for j, d in enumerate(c.descriptions):
            n = c.n_images // k + (1 if j < c.n_images % k else 0)
            if n:
                targets.append(InversionTarget(c.name, d, n))
    return targets


def noise_images(backend: Backend, targets: Sequence[InversionTarget], seed: int) -> InversionResult:
    """N(0, 1) noise in the model's normalised input space, clamped to [0, 1] pixels: one image
    per example of each target (the implicit-transfer inputs of the paper's §8.9)."""
    g = torch.Generator().manual_seed(seed)
    s, c = backend.image_size, backend.image_channels
    mean = torch.tensor(backend.mean[:c]).view(1, -1, 1, 1)
    std = torch.tensor(backend.std[:c]).view(1, -1, 1, 1)
    n = sum(t.n_images for t in targets)
    images = (mean + std * torch.randn(n, c, s, s, generator=g)).clamp(0, 1)
    concepts = [t.concept for t in targets for _ in range(t.n_images)]
    texts = [t.text for t in targets for _ in range(t.n_images)]
    return InversionResult(images, concepts, texts, [float("nan")] * n, steps_run=[0], history=[[]])


def images_from_manifests(source: str | Path, backend: Backend, concepts: Sequence[Concept]) -> InversionResult:
    """Images of ``concepts`` from an earlier run: an inversion ``manifest.csv`` or a folder holding
    several (every ``inversion/manifest.csv`` below it), picked by concept name."""
    from medkt.inversion import load_inversion

    src = Path(source)
    manifests = sorted(src.rglob("inversion/manifest.csv")) if src.is_dir() else [src]
    if not manifests or not manifests[0].is_file():
        raise DataError(f"no inversion manifest at {src} (expected a manifest.csv or a folder with inversion/manifest.csv)")
    parts = [load_inversion(m, backend) for m in manifests]
    names = {c.name for c in concepts}
    keep = [(p, i) for p in parts for i, c in enumerate(p.concepts) if c in names]
    if not keep:
        raise DataError(f"{src} holds no images of the concepts {sorted(names)}")
    return InversionResult(torch.stack([p.images[i] for p, i in keep]), [p.concepts[i] for p, i in keep],
                           [p.texts[i] for p, i in keep], [p.similarities[i] for p, i in keep])


@dataclass
class TransferResult:
    """What `transfer` did: the images, the fine-tuning history, evaluations and timings."""

    images: InversionResult
    history: dict[str, Any]
    before: dict[str, ClassificationResult] = field(default_factory=dict)
    after: dict[str, ClassificationResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)  # phases read back from out_dir instead of run
    finetune_config: FinetuneConfig | None = None
    #: one record per self-training round (`medkt.self_training.run_self_training`); empty when off
    self_training: list[dict[str, Any]] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """Known classes that fell more than 10 points before -> after (`medkt.evaluation.transfer_warnings`)."""
        return transfer_warnings(self.before, self.after, set(self.images.concepts))

    def summary(self) -> dict[str, Any]:
        """JSON-ready inversion / fine-tuning summary, timings, forgetting ``warnings`` and the
        ``self_training`` rounds (when run); no per-class evaluations."""
        loss = self.history.get("loss") or [float("nan")]
        cfg = self.finetune_config or FinetuneConfig()
        return {
            "warnings": self.warnings(),
            **({"self_training": self.self_training} if self.self_training else {}),
            "concepts": sorted(set(self.images.concepts), key=self.images.concepts.index),
            "inversion": inversion_summary(self.images),
            "finetune": {"loss": cfg.loss, "lr": cfg.lr, "batch_size": cfg.batch_size, "train": cfg.train,
                         "steps": self.history.get("steps", 0), "first_loss": loss[0], "last_loss": loss[-1]},
            "seconds_inversion": self.seconds.get("inversion", 0.0),
            "seconds_finetune": self.seconds.get("finetune", 0.0),
            "seconds_transfer": self.seconds.get("inversion", 0.0) + self.seconds.get("finetune", 0.0),
        }

    def to_dict(self) -> dict[str, Any]:
        """`summary` plus every evaluation before/after."""
        names = list(dict.fromkeys([*self.before, *self.after]))
        return {**self.summary(), "evaluations": {
            n: {"before": self.before[n].to_dict() if n in self.before else None,
                "after": self.after[n].to_dict() if n in self.after else None} for n in names}}


def default_negatives(evaluators: Mapping[str, ZeroShotEvaluator], exclude: set[str]) -> list[str]:
    """First prompt of every evaluation class not in ``exclude`` (the transferred concepts): the
    fine-tuning negatives that keep the task's other classes apart from the new ones."""
    negs: list[str] = []
    for ev in evaluators.values():
        for c in ev.classes:
            if c not in exclude:
                negs.append(ev.class_prompts[c][0])
    return list(dict.fromkeys(negs))


def synthesize(backend: Backend, concepts: Sequence[Concept], config: InversionConfig, *,
               images: str | Path | InversionResult = "inversion", inversion_dir: str | Path | None = None,
               resume: bool = False, progress: bool = True, init_images: torch.Tensor | None = None,
               pool: UnlabeledPool | None = None) -> InversionResult:
    """The images to fine-tune on: ``"inversion"`` (sharded across torchrun ranks, checkpointed in
    ``inversion_dir``; ``pool`` for the inversion priors that learn from unlabeled scans),
    ``"noise"``, an earlier run's manifest/folder, or an
    `InversionResult` (reused as is, e.g. by a learning-rate sweep). New images are saved to
    ``inversion_dir`` on the main rank. For ITM backends the reported similarities are match
    probabilities."""
    from medkt import distributed as mdist

    if isinstance(images, InversionResult):
        return images
    out = Path(inversion_dir) if inversion_dir is not None else None
    targets = inversion_targets(concepts)
    if images == "inversion":
        if mdist.world_size() > 1 and mdist.n_chunks(targets, config.chunk_size) < mdist.world_size():
            import logging

            logging.getLogger("medkt").warning(
                "inversion has %d chunk(s) for %d ranks: set inversion.chunk_size (e.g. the images per concept) to "
                "share it", mdist.n_chunks(targets, config.chunk_size), mdist.world_size())
        inv = invert_sharded(backend, targets, config, out_dir=out, resume=resume, progress=progress,
                             init_images=init_images, pool=pool)
    elif images == "noise":
        inv = noise_images(backend, targets, config.seed)
    else:
        inv = images_from_manifests(images, backend, concepts)
    if isinstance(backend, ImageTextMatcher) and not isinstance(backend, ImageTextEmbedder):
        # cosine similarities mean nothing for a single-stream model: report ITM match probabilities
        inv.similarities = backend.match_probability(inv.images, inv.texts).tolist()
    if out is not None and mdist.is_main():
        save_inversion(inv, out, config)
    return inv


@contextlib.contextmanager
def _locked_output(out: Path | None) -> Iterator[None]:
    """``out`` created and locked while the block runs (a second process on it is refused, naming
    its pid); nothing to lock without a folder, or under torchrun, where the ranks share rank 0's."""
    from medkt import distributed as mdist

    if out is None or mdist.world_size() > 1:
        yield
        return
    from medkt.run_folder import folder_lock

    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "output folder"):
        yield


def transfer(backend: Backend, concepts: Sequence[Concept | Mapping[str, Any]], *,
             inversion_config: InversionConfig | Mapping[str, Any] | None = None,
             finetune_config: FinetuneConfig | Mapping[str, Any] | None = None,
             evaluators: Mapping[str, ZeroShotEvaluator] | None = None,
             negatives: Sequence[str] | None = None, out_dir: str | Path | None = None,
             images: str | Path | InversionResult = "inversion", before: Mapping[str, ClassificationResult] | None = None,
             evaluate_before: bool = True, resume: bool = False, progress: bool = True, save_weights: bool = True,
             init_images: torch.Tensor | None = None, finetune_options: Mapping[str, Any] | None = None,
             known_descriptions: Mapping[str, str] | None = None,
             unlabeled: str | Path | Mapping[str, Any] | UnlabeledPool | None = None,
             self_training: SelfTrainingConfig | Mapping[str, Any] | None = None) -> TransferResult:
    """Teach ``concepts`` to ``backend`` (in place) and evaluate before/after.

    Args:
        backend: the model (its device and precision are used throughout).
        concepts: `Concept`\\ s or their dict form.
        inversion_config / finetune_config: `InversionConfig` / `FinetuneConfig`
            (or dicts of their fields).
        evaluators: name -> `ZeroShotEvaluator` run before and after.
        negatives: extra fine-tuning captions that are never a target; None = the first prompt
            of every evaluation class that is not a concept (`default_negatives`).
        out_dir: where the phases write their outputs (None: nothing is written); locked while the call
            runs (``medkt.run_folder.folder_lock``: another process on it is refused naming its pid).
        images: what to fine-tune on (see `synthesize`).
        before: "before" results already computed (e.g. shared by a sweep); else evaluated here
            when ``evaluate_before``.
        resume: continue from ``out_dir`` (see the module docstring).
        save_weights: write ``out_dir/finetuned.safetensors``.
        init_images: starting images for ``inversion_config.init == "images"``.
        finetune_options: extra keyword arguments of `medkt.finetune.finetune` (replay
            images, ``select_fn``, loss context, ...).
        known_descriptions: concepts the model already knows -> description: their captions are
            fine-tuning negatives and the targets of replay images (``finetune_options``).
        unlabeled: an unlabeled pool of scans (a folder, a manifest whose labels are never read,
            a dict of `UnlabeledPool.from_path` arguments with ``path``, or an `UnlabeledPool`),
            passed to the inversion (``pool=``, for the ``feature_stats`` / ``real_start`` /
            ``spectrum`` priors) and to fine-tuning as ``pool=`` (the ``pool_distill`` control); its
            start-model embeddings and statistics are cached in ``out_dir/pool_embeddings`` unless
            the pool names a cache_dir.
        self_training: rounds on pool scans the model picks (`medkt.self_training`; needs ``unlabeled``).
    Returns:
        a `TransferResult`.
    """
    from medkt import distributed as mdist

    concepts = parse_concepts(concepts)
    inv_cfg, ft_cfg = as_configs(inversion_config, finetune_config)
    evaluators = dict(evaluators or {})
    out = Path(out_dir) if out_dir is not None else None
    pool = None if unlabeled is None else as_pool(unlabeled, out / "pool_embeddings" if out is not None else None)
    if images == "inversion":
        inv_cfg.check_pool(pool)  # a pool prior without a pool fails here, not after the "before" evaluation
    descriptions = concept_descriptions(concepts, known_descriptions)
    st_cfg = as_self_training(self_training, has_pool=unlabeled is not None, known=[*descriptions][len(concepts):])
    with _locked_output(out):
        main, seconds, resumed = mdist.is_main(), {}, []

        t = time.perf_counter()
        before = dict(before) if before is not None else (
            {n: ev.evaluate() for n, ev in evaluators.items()} if evaluate_before else {})
        seconds["evaluation_before"], t = time.perf_counter() - t, time.perf_counter()
        inv = synthesize(backend, concepts, inv_cfg, images=images, inversion_dir=out / "inversion" if out else None,
                         resume=resume, progress=progress, init_images=init_images, pool=pool)
        seconds["inversion"] = time.perf_counter() - t
        fault_point("after_inversion")

        negs = list(negatives) if negatives is not None else default_negatives(evaluators, {c.name for c in concepts})
        options = {**(finetune_options or {}), **({"pool": pool} if pool is not None else {})}
        t = time.perf_counter()
        history, rounds = run_self_training(st_cfg, backend, lambda x, opts, cfg, where: _finetune_phase(
            backend, x, descriptions, negs, cfg, where, resume, progress and main, save_weights, opts, resumed),
            inv, concepts, descriptions, negs, ft_cfg, options, out)
        seconds["finetune"] = time.perf_counter() - t

        fault_point("evaluation")
        t = time.perf_counter()
        after = {n: ev.evaluate() for n, ev in evaluators.items()}
        seconds["evaluation_after"] = time.perf_counter() - t
        return TransferResult(inv, history, before, after, seconds, resumed, ft_cfg, rounds)


def concept_descriptions(concepts: Sequence[Concept], known: Mapping[str, str] | None) -> dict[str, str]:
    """Concept -> description, the concepts first, then the ``known`` ones that are not a concept."""
    out = {c.name: c.description for c in concepts}
    out.update({k: v for k, v in (known or {}).items() if k not in out})
    return out


def as_configs(inversion_config: InversionConfig | Mapping[str, Any] | None,
               finetune_config: FinetuneConfig | Mapping[str, Any] | None) -> tuple[InversionConfig, FinetuneConfig]:
    """`transfer`'s two configs as config objects (dicts of their fields are checked and built)."""
    inv = inversion_config if isinstance(inversion_config, InversionConfig) else InversionConfig.from_dict(dict(inversion_config or {}))
    ft = finetune_config if isinstance(finetune_config, FinetuneConfig) else FinetuneConfig.from_dict(dict(finetune_config or {}))
    return inv, ft


def as_pool(unlabeled: str | Path | Mapping[str, Any] | UnlabeledPool, cache_dir: Path | None) -> UnlabeledPool:
    """An `UnlabeledPool` from `transfer`'s ``unlabeled`` (a path, a dict of
    `UnlabeledPool.from_path` arguments with ``path``, or a pool; ``cache_dir`` unless it names one)."""
    if isinstance(unlabeled, UnlabeledPool):
        return unlabeled
    spec = dict(unlabeled) if isinstance(unlabeled, Mapping) else {"path": unlabeled}
    if not isinstance(spec.get("path"), (str, Path)):
        raise ConfigError(f"unlabeled = {unlabeled!r}: give a folder or manifest path, or a dict with a \"path\" "
                          f"(and optionally max_images, seed, cache_dir)")
    unknown = sorted(set(spec) - {"path", "max_images", "seed", "cache_dir"})
    if unknown:
        raise ConfigError(f"unlabeled: unknown key(s) {unknown}; allowed: path, max_images, seed, cache_dir")
    spec.setdefault("cache_dir", cache_dir)
    return UnlabeledPool.from_path(spec.pop("path"), **spec)


def _finetune_phase(backend: Backend, inv: InversionResult, descriptions: dict[str, str],
                    negatives: list[str], cfg: FinetuneConfig, out: Path | None, resume: bool, progress: bool,
                    save_weights: bool, options: dict[str, Any], resumed: list[str]) -> dict[str, Any]:
    """Fine-tune (or, on resume, read back a finished fine-tuning) and save its outputs."""
    import json

    from medkt import distributed as mdist
    from medkt.utils import atomic_write_json

    weights = out / "finetuned.safetensors" if out is not None else None
    record = out / "finetune.json" if out is not None else None
    settings = {"finetune": asdict(cfg), "negatives": negatives, "descriptions": descriptions,
                "captions": [make_caption(c, d, cfg) for c, d in descriptions.items()],
                "images": [inv.concepts, inv.texts], "options": sorted(options)}
    if isinstance(options.get("pool"), UnlabeledPool):  # a resume on another pool is refused
        settings["pool"] = [options["pool"].source, len(options["pool"])]
    # fine-tuning outputs are reused only when they were saved whole (weights written last)
    can_reuse = resume and save_weights and weights is not None and weights.is_file() and record.is_file()
    if out is not None:
        guard_resume(out, "finetune", settings, resume)  # records or compares (JSON-normalised)
    if can_reuse:
        load_finetuned(backend, weights)
        resumed.append("finetune")
        return json.loads(record.read_text())
    history = finetune(backend, inv.images, inv.concepts, descriptions, negatives, cfg, texts_of_images=inv.texts,
                       progress=progress, **options)
    fault_point("finetune")
    if out is not None and mdist.is_main():
        atomic_write_json(record, history)
        if save_weights:
            save_finetuned(backend, weights, which=cfg.train)
    return history


class TransferStep:
    """A configured transfer step for pipelines: the backend spec's concepts and configs, built
    once from bundle dictionaries (validated before any compute) and run with `run`."""

    def __init__(self, concepts: Sequence[Concept | Mapping[str, Any]], inversion: Mapping[str, Any] | None = None,
                 finetune: Mapping[str, Any] | None = None, seed: int = 0,
                 inversion_defaults: Mapping[str, Any] | None = None, finetune_defaults: Mapping[str, Any] | None = None,
                 unlabeled: str | Path | Mapping[str, Any] | None = None,
                 self_training: Mapping[str, Any] | None = None):
        self.concepts = parse_concepts(concepts)
        self.unlabeled = unlabeled  # an unlabeled pool for inversion and fine-tuning (`transfer`'s ``unlabeled``)
        # rounds on pool scans the transferred model picks (`transfer`'s ``self_training``), checked now
        self.self_training = as_self_training(self_training, has_pool=unlabeled is not None)
        self.inversion = InversionConfig.from_dict({"seed": seed, **(inversion_defaults or {}), **(inversion or {})})
        ft = {"seed": seed, **(finetune_defaults or {}), **(finetune or {})}
        opt_default, opt_given = (finetune_defaults or {}).get("optimizer"), (finetune or {}).get("optimizer")
        if isinstance(opt_default, Mapping) and isinstance(opt_given, Mapping):  # a given weight decay keeps the default name
            ft["optimizer"] = {**opt_default, **opt_given}
        self.finetune = FinetuneConfig.from_dict(ft)

    def run(self, backend: Backend, **kw: Any) -> TransferResult:
        """`transfer` with this step's concepts and configs; ``kw`` as there (a
        ``concepts=`` subset runs only those)."""
        concepts = kw.pop("concepts", self.concepts)
        kw.setdefault("unlabeled", self.unlabeled)
        kw.setdefault("self_training", self.self_training)
        return transfer(backend, concepts, inversion_config=kw.pop("inversion_config", self.inversion),
                        finetune_config=kw.pop("finetune_config", self.finetune), **kw)


__all__ = ["Concept", "TransferResult", "TransferStep", "as_configs", "as_pool", "concept_descriptions", "default_negatives", "images_from_manifests",
           "inversion_targets", "noise_images", "parse_concepts", "synthesize", "transfer"]
