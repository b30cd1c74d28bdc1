"""Model inversion: synthesise images whose embedding matches a text description (paper Eq. 3).

All (concept, sample) pairs are optimised together as one pixel tensor ``(N, C, S, S)`` in
[0, 1]:

    loss_i = objective(f_V(A(x_i)), text_i) + sum of the priors' penalties (TV by default)

An inversion is an objective plus small components, each registered once and listed in the
config by name with its settings:

* the **objective** (`INVERSION_OBJECTIVES`; ``"cosine"``, the default, is
  ``-cos(f_V(A(x)), f_T(text))``), called with an `ObjectiveContext` (texts, target embeddings,
  negative embeddings, its own settings);
* **priors** (`medkt.inversion_priors.INVERSION_PRIORS`): penalties such as total variation
  (``"tv"``, the paper's 0.005), where the images start (``"init"``), what is optimised
  (``"residual"`` edit of a start image, ``"progressive"`` resolution) and when a chunk stops
  (``"early_stop"``); with an unlabeled pool of scans (``invert(..., pool=)``) also the pool's
  feature statistics (``"feature_stats"``), real start scans (``"real_start"``) and its
  amplitude spectrum (``"spectrum"``);
* **augmentations** (`medkt.augment.INVERSION_AUGMENTATIONS`), applied in order to each of the
  ``views`` per step: the paper's random affine (``"affine"``, p=0.5), ``"blur"``, ``"noise"``.

The loop itself is the paper's: Adam, a cosine learning-rate schedule, per-image gradient-norm
clipping and clamping to [0, 1].

Reproducibility: every image has its own initialisation generator seeded by ``(seed, index)``
and each chunk of images its own augmentation generator, so the result depends only on the
seed, the targets and the chunking — not on how chunks are spread over processes. A
checkpoint (pixels, Adam state, RNG state, step) is written atomically every
``checkpoint_every`` steps and when a chunk is done; ``resume=True`` continues from it and gives
the same images as an uninterrupted run. The checkpoints are tagged with the settings and targets
that shape the images (`resume_settings`, recorded in ``checkpoints/inversion.settings.json``);
resuming with other ones is refused with a diff (`medkt.checkpoints`).

Device and precision: pixels, targets and optimiser state live on the model's device
(``backend.device``); random numbers are drawn from seeded CPU generators and moved there, so a
seed gives the same start images and augmentations on every device. The forward passes run
under ``backend.autocast()`` (bf16/fp16 when the backend was created with that precision; fp32
is untouched), the optimised pixels stay fp32, and fp16 uses a loss scaler. Checkpoints are
written on the CPU and loaded back to the device.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from medkt.augment import INVERSION_AUGMENTATIONS
from medkt.backends.base import AnyResolution, Backend, as_numpy_image, capture_features, require_embeddings
from medkt.device import grad_scaler
from medkt.errors import ConfigError, unknown_name
from medkt.checkpoints import concept_settings, guard_resume, load_checkpoint, save_checkpoint, settings_digest
from medkt.faults import fault_point
from medkt.inversion_priors import (
    INVERSION_PRIORS,
    EarlyStop,
    Init,
    Parametrisation,
    PriorContext,
    PriorStep,
    Progressive,
    find,
    resize,
    settings_of,
)
from medkt.progress import Progress
from medkt.registry import Registry
from medkt.utils import atomic_write_json, atomic_write_text
from medkt.config_model import Range, build, build_components, check, child, config_dataclass, config_path, fail, recheck


@dataclass
class InversionTarget:
    """One concept to synthesise: ``n_images`` images toward the embedding of ``text``."""

    concept: str
    text: str
    n_images: int = 10


def _default_priors() -> list[dict[str, Any]]:
    return [{"name": "tv", "weight": 0.005}]


def _default_augmentations() -> list[dict[str, Any]]:
    return [{"name": "affine", "p": 0.5}]


@config_dataclass
class InversionConfig:
    """Settings of `invert`; the defaults are the paper's (§4.2, README "Engine defaults").

    5,000 Adam ``steps`` at ``lr`` 0.1 with cosine annealing to ``lr_min``; loss = ``objective``
    (``"cosine"``: -cos(f_V(A(x)), f_T(text))) + the ``priors``' penalties (``tv`` 0.005 * TV(x));
    ``augmentations`` ``A`` applied in order to each of the ``views`` (the random affine with
    p 0.5: ±30°, translation 10 % of the size, scale 0.7-1.0); per-image gradient-norm clip 1.0;
    pixels clamped to [0, 1]; init U(0, 1). Components are ``{"name": NAME, **settings}``
    (module docstring); ``objective`` is a name or such a dict (``"contrastive"`` takes
    ``negative_texts``). Build from a dict (or a ``"preset"``) with `from_dict`; direct
    construction is checked too (`medkt.config_model`: one `ConfigError` line).
    """

    config_name = "inversion"  # names the options in messages (a class attribute, not a field)

    steps: Annotated[int, Range(ge=1)] = 5000
    lr: Annotated[float, Range(gt=0)] = 0.1
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_min: Annotated[float, Range(ge=0)] = 0.0
    objective: str | dict[str, Any] = "cosine"  # a name, or {"name": NAME, **its settings}
    grad_clip: Annotated[float, Range(gt=0)] | None = 1.0  # per-image gradient L2 norm clip
    views: Annotated[int, Range(ge=1)] = 1  # augmented views of each image per step (gradients averaged)
    seed: int = 0
    chunk_size: Annotated[int, Range(ge=1)] | None = None  # images optimised together; None = all at once
    checkpoint_every: Annotated[int, Range(ge=0)] = 0  # 0 = no checkpoints
    priors: list[Any] = field(default_factory=_default_priors)  # medkt.inversion_priors
    augmentations: list[Any] = field(default_factory=_default_augmentations)  # medkt.augment

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, path: str = "inversion") -> "InversionConfig":
        """Build from a dict of fields, checked by `medkt.config_model` (types, ranges and
        choices are the annotations above and the components' fields; ``path`` names the options
        in errors). ``"preset": NAME`` starts from `INVERSION_PRESETS` (explicit fields override
        the preset's)."""
        d = dict(d or {})
        if "preset" in d:
            name = check(d.pop("preset"), str, f"{path}#preset")
            d = {**preset_dict(name), **d}
        return build(cls, d, path, what="inversion")

    def __post_init__(self) -> None:
        # pydantic checked the fields; the components' names and settings are checked here, so
        # direct construction (``InversionConfig(priors=[...])``) fails as early as `from_dict`
        self._check_components(config_path("inversion"))

    def validate(self, path: str = "inversion") -> None:
        """Check again (fields code may have set since construction): field types and ranges,
        every component's name and settings, then the rules that involve several components."""
        recheck(self, path)

    def _check_components(self, path: str) -> None:
        self.objective_settings(path)
        priors = self.build_priors(path)
        self.build_augmentations(path)
        names = {id(p): s["name"] for s, p in zip(self.priors, priors)}
        params = [names[id(p)] for p in priors if isinstance(p, Parametrisation)]
        starts = [names[id(p)] for p in priors if isinstance(p, Init)]
        for group, what in ((params, "each sets what is optimised"), (starts, "each sets where the images start")):
            if len(group) > 1:
                raise ConfigError(f"{path}#priors: {' and '.join(map(repr, group))} {what}; list one",
                                  key=f"{path}#priors")
        if params and find(priors, Progressive):
            raise ConfigError(f"{path}#priors: {params[0]!r} sets its own resolution; remove 'progressive'",
                              key=f"{path}#priors")

    def check_pool(self, pool: Any) -> None:
        """Before any compute: a listed prior that reads the unlabeled pool, without one, is the
        one-line `ConfigError` its ``setup`` would raise later."""
        for spec, prior in zip(self.priors, self.build_priors()):
            if prior.needs_pool:
                PriorContext(None, pool).require_pool(spec["name"])

    def objective_name(self) -> str:
        """The objective's registered name."""
        return self.objective if isinstance(self.objective, str) else str(self.objective.get("name"))

    def objective_settings(self, path: str = "inversion") -> Any:
        """The objective's settings object (its registered ``settings`` class), None if it has none."""
        where = child(path, "objective")
        spec = {"name": self.objective} if isinstance(self.objective, str) else dict(self.objective)
        name = spec.pop("name", None)
        if not isinstance(name, str):
            raise fail(where, self.objective, 'an objective name or {"name": NAME, ...settings}')
        if name not in INVERSION_OBJECTIVES:
            raise ConfigError(f"{where} = {name!r}: {unknown_name('inversion objective', name, objective_names())}",
                              key=where)
        kind = INVERSION_OBJECTIVES.meta(name, "settings")
        if kind is None:
            if spec:
                raise ConfigError(f"{where}: the {name!r} objective takes no settings, got {sorted(spec)}", key=where)
            return None
        return build(kind, spec, where, what=f"{name!r} objective")

    def describe_components(self) -> str:
        """The priors and augmentations in one line for reports, e.g. ``"tv (weight 0.005); affine (p 0.5)"``."""
        specs = [*self.priors, *self.augmentations]
        return "; ".join(f"{s['name']} (" + ", ".join(f"{k} {v}" for k, v in s.items() if k != "name") + ")"
                         for s in specs) or "none"

    def init_kind(self) -> str:
        """Where the images start: the ``"init"`` prior's kind (``"uniform"`` without one)."""
        init = find(self.build_priors(), Init)
        return init.kind if init is not None else "uniform"

    def build_priors(self, path: str = "inversion") -> list[Any]:
        """The ``priors`` as checked component objects (`medkt.inversion_priors`)."""
        return build_components(self.priors, INVERSION_PRIORS, child(path, "priors"))

    def build_augmentations(self, path: str = "inversion") -> list[Any]:
        """The ``augmentations`` as checked component objects (`medkt.augment`)."""
        return build_components(self.augmentations, INVERSION_AUGMENTATIONS, child(path, "augmentations"))


def with_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """An inversion config dict with ``overrides`` applied: fields replaced, except ``priors`` /
    ``augmentations`` given as ``{name: settings}``, which update those components' settings
    (adding a component not listed), e.g. ``{"priors": {"residual": {"sign": "any"}}}``."""
    out = {**config, **{k: v for k, v in overrides.items() if not (k in ("priors", "augmentations")
                                                                     and isinstance(v, dict))}}
    for key in ("priors", "augmentations"):
        changes = overrides.get(key)
        if not isinstance(changes, dict):
            continue
        default = _default_priors() if key == "priors" else _default_augmentations()
        specs = [dict(s) for s in config.get(key, default)]
        for name, settings in changes.items():
            spec = next((s for s in specs if s.get("name") == name), None)
            if spec is None:
                specs.append({"name": name, **settings})
            else:
                spec.update(settings)
        out[key] = specs
    return out


#: Named inversion recipes (``{"preset": NAME}`` in a config). A ``"progressive"`` prior's sizes
#: are given for a 224-px model and scaled to the model by `preset_dict` when told the model size.
#: "paper": the paper's 5,000 steps at the model size (= ``InversionConfig()``).
#: "fast": medkt's measured recipe, 12.5x fewer steps (benchmarks/run/, README "Performance"):
#: random-weight ViT-B/32 ends at similarity 0.9999 (the paper recipe cannot exceed 1); the tiny
#: random ViT at 0.5408 vs 0.5413 after the paper's 5,000 steps; ViT-B/32 (1 image) 0.99991 vs
#: 0.999997. Progressive resolution (64 -> 128 -> 224, the model run at each stage's size) was
#: measured and not adopted: cheaper steps, but a lower final similarity at equal step counts.
INVERSION_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {"steps": 400},
}


def preset_dict(name: str, image_size: int | None = None) -> dict[str, Any]:
    """The fields of preset ``name``; a progressive prior's sizes scaled to ``image_size`` if given."""
    if name not in INVERSION_PRESETS:
        raise unknown_name("inversion preset", name, list(INVERSION_PRESETS))
    d = copy.deepcopy(INVERSION_PRESETS[name])
    for prior in d.get("priors", []) if image_size else []:
        if prior.get("name") == "progressive" and prior.get("sizes"):
            f = image_size / 224
            prior["sizes"] = [min(image_size, max(4, int(round(r * f)))) for r in prior["sizes"][:-1]] + [image_size]
    return d


@dataclass
class InversionResult:
    """What `invert` returns: ``images`` ``(N, C, S, S)`` in [0, 1] with their ``concepts``
    and ``texts`` (one per image), the final un-augmented cosine ``similarities``, wall-clock
    ``seconds``, and per chunk the ``steps_run`` and ``history`` of mean similarity."""

    images: torch.Tensor  # (N, C, S, S) in [0, 1]
    concepts: list[str]
    texts: list[str]
    similarities: list[float]  # final cosine similarity of each image (un-augmented) to its text
    seconds: float = 0.0
    steps_run: list[int] = field(default_factory=list)  # per chunk
    history: list[list[float]] = field(default_factory=list)  # per chunk: mean similarity every log step

    def by_concept(self) -> dict[str, torch.Tensor]:
        """Concept -> its images ``(n, C, S, S)``, in first-seen order of the concepts."""
        out: dict[str, list[torch.Tensor]] = {}
        for img, c in zip(self.images, self.concepts):
            out.setdefault(c, []).append(img)
        return {c: torch.stack(v) for c, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (`inversion_summary`): seconds, mean similarity per concept, steps run."""
        return inversion_summary(self)


# --- objectives --------------------------------------------------------------------------------
@dataclass
class ObjectiveContext:
    """What an inversion objective gets besides the images, aligned with the batch's rows.

    ``texts`` (B strings); ``text_emb`` (B, D) normalised target embeddings, None for objectives
    registered with ``uses_text_embeddings=False``; ``negative_emb`` (K, D) the embeddings of the
    settings' ``negative_texts`` (if any); ``settings`` the objective's settings object (the
    class registered as its ``settings``), None when it has none."""

    texts: list[str]
    text_emb: torch.Tensor | None = None
    negative_emb: torch.Tensor | None = None
    settings: Any = None


ObjectiveFn = Callable[[Backend, torch.Tensor, ObjectiveContext], tuple[torch.Tensor, torch.Tensor]]
#: inversion objectives: ``fn(backend, x01 (B,C,S,S), ctx: ObjectiveContext) -> (loss (B,), similarity (B,))``;
#: metadata ``uses_text_embeddings`` (default True) and ``settings`` (a dataclass, or None). ViLT's
#: "itm" registers itself from `medkt.natural.objectives` (an entry point of the group
#: ``medkt.inversion_objectives``, see `medkt.registry`).
INVERSION_OBJECTIVES: Registry[ObjectiveFn] = Registry("inversion objective", group="medkt.inversion_objectives")


def objective_names() -> list[str]:
    """Names of the registered inversion objectives (built-in plug-ins included)."""
    return INVERSION_OBJECTIVES.names()


def register_inversion_objective(name: str, uses_text_embeddings: bool = True,
                                 settings: type | None = None) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator registering an objective in `INVERSION_OBJECTIVES`:
    ``fn(backend, x01 (B,C,S,S), ctx: ObjectiveContext) -> (loss (B,), similarity (B,))``.

    ``uses_text_embeddings=False`` (e.g. ViLT's image-text matching, which reads ``ctx.texts``:
    such a model has no embeddings): ``ctx.text_emb`` is None and the returned similarity (e.g.
    the match probability) is what the run reports per image. ``settings``: a dataclass of the
    objective's options, given as ``"objective": {"name": NAME, **options}`` and passed as
    ``ctx.settings``.
    """
    return INVERSION_OBJECTIVES.register(name, uses_text_embeddings=uses_text_embeddings, settings=settings)


@register_inversion_objective("cosine")
def cosine_objective(backend: Backend, x: torch.Tensor, ctx: ObjectiveContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The default (paper Eq. 3): loss ``-cos(f_V(x), text_emb)`` and the cosine, both ``(B,)``."""
    emb = F.normalize(backend.encode_pixels(x).float(), dim=-1)
    sim = (emb * ctx.text_emb).sum(-1)
    return -sim, sim


@register_inversion_objective("l2")
def l2_objective(backend: Backend, x: torch.Tensor, ctx: ObjectiveContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 between normalised embeddings (= 2 - 2 cos; the CLIP-inversion reference's loss)."""
    emb = F.normalize(backend.encode_pixels(x).float(), dim=-1)
    sim = (emb * ctx.text_emb).sum(-1)
    return (emb - ctx.text_emb).pow(2).sum(-1), sim


@config_dataclass
class ContrastiveSettings:
    """Settings of the ``"contrastive"`` objective: captions the images must NOT look like (e.g.
    the known classes) and the logit ``scale`` (0 = the backend's)."""

    negative_texts: list[str]
    scale: Annotated[float, Range(ge=0)] = 0.0

    def validate(self, path: str = "objective") -> None:
        """At least one negative caption."""
        if not self.negative_texts:
            raise ConfigError(f"{path}#negative_texts is empty: the 'contrastive' objective needs captions to "
                              "push away from (e.g. the known classes')", key=f"{path}#negative_texts")


@register_inversion_objective("contrastive", settings=ContrastiveSettings)
def contrastive_objective(backend: Backend, x: torch.Tensor, ctx: ObjectiveContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the target text against ``negative_texts`` (paper Eq. 1/2 used for inversion):
    it inverts Eq. 1's condition directly, the image closer to its text than to every negative."""
    neg = ctx.negative_emb
    if neg is None or len(neg) == 0:
        raise ConfigError("the 'contrastive' inversion objective needs negative_texts (e.g. the known classes' captions)")
    emb = F.normalize(backend.encode_pixels(x).float(), dim=-1)
    sim = (emb * ctx.text_emb).sum(-1)
    scale = ctx.settings.scale or float(backend.logit_scale)
    logits = scale * torch.cat([sim[:, None], emb @ neg.T], 1)
    return F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long, device=logits.device), reduction="none"), sim


def get_objective(name: str) -> ObjectiveFn:
    """The registered objective ``name`` (`INVERSION_OBJECTIVES`)."""
    return INVERSION_OBJECTIVES.get(name)


# --- helpers -----------------------------------------------------------------------------------
def lr_scheduler(opt: torch.optim.Optimizer, cfg: InversionConfig,
                 step: int = 0) -> torch.optim.lr_scheduler.LRScheduler | None:
    """torch's schedule of ``cfg.lr_schedule`` for ``opt``, positioned at ``step`` (0-based).

    ``"cosine"``: `CosineAnnealingLR` from ``lr`` to ``lr_min``
    over ``steps``; ``"constant"``: None (``lr`` throughout). A new optimiser (progressive
    resolution restarts Adam; a resumed run) gets a scheduler stepped forward from ``lr`` to
    ``step``, so its learning rates are those of an uninterrupted run, float for float.
    """
    for group in opt.param_groups:  # a loaded optimiser state carries the lr of its last step
        group["lr"] = cfg.lr
        group.pop("initial_lr", None)
    if cfg.lr_schedule == "constant":
        return None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        for _ in range(step):
            sched.step()
    return sched



def _to_cpu(obj: Any) -> Any:
    """Tensors of a nested state (e.g. an optimiser's state dict) copied to the CPU, for checkpoints."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _clip_per_image(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (max_norm / norms).clamp(max=1.0)
    return grad * factor.view(-1, *([1] * (grad.dim() - 1)))


def similarity(backend: Backend, images: torch.Tensor, text_emb: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Cosine similarity of each image ``(N, C, S, S)`` to its row of ``text_emb`` ``(N, D)``."""
    return (backend.encode_images(images, batch_size) * text_emb).sum(-1)


# --- checkpoints -------------------------------------------------------------------------------
#: fields that do not change the images (how often they are checkpointed)
_NOT_RESULT_SHAPING = ("checkpoint_every",)


def resume_settings(backend: Backend, cfg: InversionConfig, targets: Sequence[InversionTarget],
                    init_images: torch.Tensor | None = None, pool: Any = None) -> dict[str, Any]:
    """What an inversion's images depend on (recorded with its checkpoints; ``--resume`` with
    different values is refused): the backend spec and precision, every config field but
    ``checkpoint_every`` with each component's full settings (defaults included, keyed by name so
    a diff reads ``inversion.priors.tv.weight: 0.005 -> 0.01``), the targets, a digest of the
    init images and, when a prior reads it, the unlabeled pool (source and size)."""
    import hashlib

    inv = {k: v for k, v in asdict(cfg).items() if k not in _NOT_RESULT_SHAPING}
    obj = cfg.objective_settings()
    inv["objective"] = {"name": cfg.objective_name(), **(settings_of(obj) if obj is not None else {})}
    priors = cfg.build_priors()
    inv["priors"] = {s["name"]: settings_of(p) for s, p in zip(cfg.priors, priors)}
    inv["augmentations"] = {s["name"]: settings_of(a) for s, a in zip(cfg.augmentations, cfg.build_augmentations())}
    settings: dict[str, Any] = {"backend": backend.spec, "inversion": inv, "concepts": concept_settings(targets),
                                "precision": str(backend.precision)}
    init = find(priors, Init)
    if init_images is not None and init is not None and init.kind == "images":
        data = init_images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        settings["init_images"] = hashlib.sha256(data).hexdigest()[:16]
    if pool is not None and any(p.needs_pool for p in priors):
        settings["pool"] = [pool.source, len(pool)]
    return settings


def _chunk_path(ckpt_dir: Path, chunk_id: int) -> Path:
    return ckpt_dir / f"chunk{chunk_id:04d}.pt"


# --- main loop ---------------------------------------------------------------------------------
class _Canvas:
    """What a chunk optimises and how it becomes the image the model sees: the pixels (at the
    ``"progressive"`` prior's sizes, if listed) or, with a `Parametrisation` prior (``"residual"``
    edit, ``"spectrum"`` phase), its tensor rendered from the fixed start images ``base``."""

    def __init__(self, backend: Backend, priors: list[Any], indices: Sequence[int], seed: int,
                 init_images: torch.Tensor | None):
        self.backend, self.indices, self.seed, self.init_images = backend, indices, seed, init_images
        self.size = backend.image_size
        self.init = find(priors, Init) or Init()
        self.param = find(priors, Parametrisation)
        progressive = find(priors, Progressive)
        self.stages = progressive.stages() if progressive is not None else [(0, self.size)]
        self.base = self.start_images(self.size).detach()  # the start images at the model size
        # A backend that takes any input size runs at the stage's size (the saving progressive
        # resolution is for); otherwise each stage is upsampled to the model size every step.
        self.native = isinstance(backend, AnyResolution) and backend.accepts_any_size()

    def start_images(self, size: int) -> torch.Tensor:
        return self.init.images(self.backend, self.indices, size, self.seed, self.init_images)

    def start(self) -> torch.Tensor:
        """The tensor optimised from step 0."""
        if self.param is None:
            return self.start_images(self.stage_size(0))
        return self.param.start(self.base)

    def stage_size(self, step: int) -> int:
        """The image size at ``step`` (progressive resolution)."""
        if self.param is not None:
            return self.size
        size = self.stages[0][1]
        for start, s in self.stages:
            if step >= start:
                size = s
        return size

    def final_stage(self, step: int) -> bool:
        return self.param is not None or self.stage_size(step) == self.stages[-1][1]

    def render(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image the model sees, the tensor the priors' penalties see)."""
        if self.param is not None:
            return self.param.render(p, self.base)
        return (p if self.native else resize(p, self.size)), p

    def project(self, p: torch.Tensor) -> None:
        """In place after each step: pixels clamped to [0, 1], or the parametrisation's projection."""
        if self.param is not None:
            self.param.project(p)
        else:
            p.clamp_(0, 1)

    def final(self, p: torch.Tensor) -> torch.Tensor:
        """The images at the model size, in [0, 1]."""
        return resize(self.render(p.detach())[0], self.size).clamp(0, 1)


@dataclass
class _Run:
    """What every chunk of one `invert` call shares."""

    backend: Backend
    cfg: InversionConfig
    priors: list[Any]
    augmentations: list[Any]
    objective: ObjectiveFn
    ctx: ObjectiveContext  # for all images; `_run_chunk` takes the chunk's rows
    ckpt_dir: Path | None = None
    resume: bool = False
    init_images: torch.Tensor | None = None
    digest: str | None = None
    blocks: list[int] = field(default_factory=list)  # feature blocks the priors read (`capture_features`)


class _Chunk:
    """The optimisation state of one chunk: tensor, Adam, schedule, loss scaler, augmentation RNG,
    step, history and early stopping; saved to and restored from a checkpoint."""

    def __init__(self, run: _Run, chunk_id: int, indices: list[int]):
        cfg, backend = run.cfg, run.backend
        self.run, self.indices, self.chunk_id = run, indices, chunk_id
        self.path = _chunk_path(run.ckpt_dir, chunk_id) if run.ckpt_dir is not None else None
        self.canvas = _Canvas(backend, run.priors, indices, cfg.seed, run.init_images)
        self.gen = torch.Generator().manual_seed(cfg.seed * 7919 + chunk_id)  # CPU: same draws on every device
        stop = find(run.priors, EarlyStop)
        self.stop = copy.copy(stop) if stop is not None else None  # its state is per chunk
        self.step, self.history, self.done, state = 0, [], False, None
        if run.resume and self.path is not None and self.path.is_file():
            state = load_checkpoint(self.path, run.digest)
            self.step, self.history, self.done = int(state["step"]), list(state["history"]), bool(state.get("done"))
            if self.stop is not None:
                self.stop.best, self.stop.since_best = state.get("early_stop", (self.stop.best, self.stop.since_best))
            p = state["pixels"].clone().to(backend.device)
            self.gen.set_state(state["rng"])
        else:
            p = self.canvas.start()
        self.restart(p, state.get("adam") if state is not None else None)
        # fp16 forward passes: scale the loss so small pixel gradients do not underflow (disabled otherwise)
        self.scaler = grad_scaler(backend.device, backend.precision)
        if state is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])

    def restart(self, p: torch.Tensor, adam_state: dict[str, Any] | None = None) -> None:
        """Optimise ``p`` with a new Adam (or one loaded from ``adam_state``), its schedule
        positioned at the current step."""
        self.p = p.requires_grad_(True)
        self.opt = torch.optim.Adam([self.p], lr=self.run.cfg.lr)
        if adam_state is not None:
            self.opt.load_state_dict(adam_state)  # Adam moves its state to the pixels' device
        self.sched = lr_scheduler(self.opt, self.run.cfg, self.step)

    def grow(self) -> None:
        """Progressive resolution: upsample to this step's size and restart Adam."""
        size = self.canvas.stage_size(self.step)
        if self.canvas.param is None and self.p.shape[-1] != size:
            with torch.no_grad():
                p = resize(self.p.detach(), size).clamp(0, 1)
            self.restart(p)

    def checkpoint(self, done: bool = False) -> None:
        stop = [self.stop.best, self.stop.since_best] if self.stop is not None else [-float("inf"), 0]
        ckpt = {"step": self.step, "pixels": self.p.detach().cpu().clone(), "adam": _to_cpu(self.opt.state_dict()),
                "rng": self.gen.get_state(), "history": self.history, "indices": list(self.indices),
                "early_stop": stop, "done": done, "settings_digest": self.run.digest}
        if self.scaler.is_enabled():
            ckpt["scaler"] = self.scaler.state_dict()
        save_checkpoint(ckpt, self.path)
        fault_point("inversion")  # kill-and-resume tests: die right after a checkpoint

    def loss(self, ctx: ObjectiveContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image loss ``(n,)`` (objective averaged over the views, plus the priors' penalties)
        and the objective's similarity per view row."""
        views = self.run.cfg.views
        xm, reg = self.canvas.render(self.p)
        xa = xm.repeat(views, 1, 1, 1)
        for aug in self.run.augmentations:
            xa = aug(xa, self.gen)
        backend = self.run.backend
        # only the model runs in low precision; pixels and losses stay fp32
        with backend.autocast(), capture_features(backend, self.run.blocks) as features:
            loss_rows, sim_rows = self.run.objective(backend, xa, ctx)
        loss = loss_rows.float().view(views, -1).mean(0)
        step = PriorStep(reg, xm, self.canvas.base, features, views, self.chunk_id, backend)
        for prior in self.run.priors:
            term = prior.loss(step)
            if term is not None:
                loss = loss + term
        return loss, sim_rows

    def update(self, loss: torch.Tensor) -> None:
        """One Adam step on ``loss.sum()`` with the per-image clip, the schedule and the projection."""
        scaler, opt, clip = self.scaler, self.opt, self.run.cfg.grad_clip
        (self.p.grad,) = torch.autograd.grad(scaler.scale(loss.sum()), self.p)
        scaler.unscale_(opt)  # no-op unless fp16
        if clip:
            self.p.grad = _clip_per_image(self.p.grad, clip)
        scaler.step(opt)  # skips the step if fp16 gradients overflowed
        scaler.update()
        if self.sched is not None:
            self.sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.canvas.project(self.p)


def _run_chunk(run: _Run, chunk_id: int, indices: list[int], progress: Any) -> tuple[torch.Tensor, int, list[float]]:
    """Optimise one chunk of images; returns (images at model size, steps run, mean-similarity history).

    Checkpoints (every ``cfg.checkpoint_every`` steps and once more when the chunk is done) carry
    ``run.digest``, the digest of the settings that shape the result; resuming from a checkpoint
    with another digest is refused, and a finished chunk is not run again.
    """
    cfg, views = run.cfg, run.cfg.views
    c = _Chunk(run, chunk_id, indices)
    emb = run.ctx.text_emb
    rows = ObjectiveContext([run.ctx.texts[i] for i in indices] * views,  # the chunk's rows, once per view
                            emb[indices].repeat(views, 1) if emb is not None else None,
                            run.ctx.negative_emb, run.ctx.settings)
    saving = c.path is not None and cfg.checkpoint_every > 0
    if progress is not None:
        progress.skip(c.step)
    while c.step < cfg.steps and not c.done:
        c.grow()
        loss, sim_rows = c.loss(rows)
        c.update(loss)
        c.step += 1
        mean_sim = float(sim_rows.detach().mean())
        c.history.append(mean_sim)
        if progress is not None:
            progress.set_postfix(sim=f"{mean_sim:.3f}", size=c.p.shape[-1])
            progress.update(1)
        if c.stop is not None and c.canvas.final_stage(c.step - 1) and c.stop.update(mean_sim):
            break
        # after the early-stopping update, so a resumed run continues from exactly this state
        if saving and c.step % cfg.checkpoint_every == 0 and c.step < cfg.steps:
            c.checkpoint()
    if saving and not c.done:
        c.checkpoint(done=True)  # a finished chunk is not optimised again on resume
    with torch.no_grad():
        return c.canvas.final(c.p), c.step, c.history


def invert(
    backend: Backend,
    targets: Sequence[InversionTarget],
    config: InversionConfig | dict | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    chunks: Sequence[int] | None = None,
    init_images: torch.Tensor | None = None,
    pool: Any = None,
) -> InversionResult:
    """Synthesise ``sum(t.n_images)`` images, ``n_images`` per target, toward each target's text.

    Args:
        backend: any `Backend`; its weights are not changed.
        targets: concepts and the descriptions to invert.
        config: `InversionConfig` or a dict of its fields.
        out_dir: when given, checkpoints go to ``out_dir/checkpoints`` and
            `save_inversion` writes PNGs, a grid and ``manifest.csv`` there.
        resume: continue from the checkpoints in ``out_dir`` (refused with
            `ResumeMismatchError` if they were made with other settings or
            targets). Without it, the chunk checkpoints in ``out_dir`` are started over.
        chunks: only run these chunk indices (used to shard work across processes); the result
            then holds only their images.
        init_images: ``(M, C, S, S)`` [0, 1] starting images for the ``"init"`` prior's kind
            ``"images"`` (image ``i`` starts from ``init_images[i % M]``), e.g. a few normal scans.
        pool: an unlabeled pool of scans (`medkt.pool.UnlabeledPool`) for the priors that learn
            from it (``feature_stats``, ``real_start``, ``spectrum``); without one they are refused.
    Returns:
        `InversionResult` with images ``(N, C, S, S)`` in [0, 1].
    """
    cfg = config if isinstance(config, InversionConfig) else InversionConfig.from_dict(config)
    cfg.validate()  # every name and setting fails here, before any work
    n = sum(int(t.n_images) for t in targets)
    chunk = cfg.chunk_size or max(n, 1)
    all_chunks = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    selected = list(range(len(all_chunks))) if chunks is None else list(chunks)
    images, steps_run, histories, keep = [], [], [], []
    bar = Progress(cfg.steps * len(selected), "inversion", unit="step", enabled=progress)
    with _frozen(backend), contextlib.closing(bar):  # frozen already while the priors read the pool
        run = _prepare(backend, cfg, targets, out_dir, resume, init_images, pool)
        if run.ckpt_dir is not None and not resume:  # a fresh start: chunk files left in this folder are stale
            for cid in selected:
                _chunk_path(run.ckpt_dir, cid).unlink(missing_ok=True)
        start = time.perf_counter()
        for cid in selected:
            x, s, hist = _run_chunk(run, cid, all_chunks[cid], bar)
            images.append(x)
            steps_run.append(s)
            histories.append(hist)
            keep += all_chunks[cid]
    imgs = torch.cat(images)
    sims = _final_similarities(run, imgs, keep)
    concepts = [t.concept for t in targets for _ in range(t.n_images)]
    return InversionResult(images=imgs, concepts=[concepts[i] for i in keep], texts=[run.ctx.texts[i] for i in keep],
                           similarities=sims, seconds=time.perf_counter() - start, steps_run=steps_run,
                           history=histories)


@contextlib.contextmanager
def _frozen(backend: Backend) -> Iterator[None]:
    """Eval mode and no parameter gradients (only the pixels need them); restored afterwards."""
    requires = [p.requires_grad for p in backend.parameters()]
    for p in backend.parameters():
        p.requires_grad_(False)
    was_training = backend.training
    backend.eval()
    try:
        yield
    finally:
        for p, r in zip(backend.parameters(), requires):
            p.requires_grad_(r)
        backend.train(was_training)


def _prepare(backend: Backend, cfg: InversionConfig, targets: Sequence[InversionTarget], out_dir: str | Path | None,
             resume: bool, init_images: torch.Tensor | None, pool: Any = None) -> _Run:
    """The shared part of an inversion: components (set up once, e.g. the pool priors' statistics),
    target texts and embeddings, and the checkpoint folder (tagged with the settings that shape
    the images; resuming with others is refused)."""
    if not targets:
        raise ConfigError("nothing to invert: the list of concepts is empty")
    texts = []
    for t in targets:
        if t.n_images < 1:
            raise ConfigError(f"concept {t.concept!r}: n_images must be >= 1, got {t.n_images}")
        texts += [t.text] * t.n_images
    ckpt_dir = Path(out_dir) / "checkpoints" if out_dir is not None else None
    digest = None
    if ckpt_dir is not None:
        settings = resume_settings(backend, cfg, targets, init_images, pool)
        guard_resume(ckpt_dir, "inversion", settings, resume)
        digest = settings_digest(settings)
    name, obj_settings = cfg.objective_name(), cfg.objective_settings()
    ctx = ObjectiveContext(texts, settings=obj_settings)
    if INVERSION_OBJECTIVES.meta(name, "uses_text_embeddings", True):
        require_embeddings(backend, f"inversion objective {name!r}", "objective 'itm'")
        uniq = sorted(set(texts), key=texts.index)
        with backend.autocast():
            emb_by_text = dict(zip(uniq, backend.encode_texts(uniq)))
        ctx.text_emb = torch.stack([emb_by_text[t] for t in texts])
    negatives = getattr(obj_settings, "negative_texts", None)  # a settings field, not a backend capability
    if negatives:
        with backend.autocast():
            ctx.negative_emb = backend.encode_texts(list(negatives))
    priors = cfg.build_priors()
    for prior in priors:
        prior.setup(PriorContext(backend, pool, cfg.seed, len(texts), init_images))
    blocks = sorted({b for prior in priors for b in prior.feature_blocks()})
    return _Run(backend, cfg, priors, cfg.build_augmentations(), get_objective(name), ctx,
                ckpt_dir, resume, init_images, digest, blocks)


def _final_similarities(run: _Run, imgs: torch.Tensor, keep: list[int]) -> list[float]:
    """Un-augmented similarity of each kept image: the cosine to its text, or (objectives without
    text embeddings) the objective's own similarity, e.g. ViLT's match probability."""
    backend = run.backend
    if run.ctx.text_emb is not None:
        with backend.autocast():
            return similarity(backend, imgs, run.ctx.text_emb[keep]).tolist()
    kept_texts, sims = [run.ctx.texts[i] for i in keep], []
    with torch.no_grad(), backend.autocast():
        for i in range(0, len(imgs), 32):
            sims += run.objective(backend, imgs[i : i + 32], ObjectiveContext(kept_texts[i : i + 32]))[1].tolist()
    return sims


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "concept"


def save_inversion(result: InversionResult, out_dir: str | Path, config: InversionConfig | None = None) -> Path:
    """Write ``images/<concept>_<k>.png``, ``grid.png``, ``manifest.csv`` (path, concept, caption,
    similarity) and ``inversion.json`` into ``out_dir``. Returns the manifest path."""
    import csv
    import io

    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counters: dict[str, int] = {}
    rows = []
    for img, concept, text, sim in zip(result.images, result.concepts, result.texts, result.similarities):
        k = counters.get(concept, 0)
        counters[concept] = k + 1
        rel = f"images/{_slug(concept)}_{k:03d}.png"
        Image.fromarray(as_numpy_image(img)).save(out / rel)
        rows.append({"path": rel, "concept": concept, "caption": text, "similarity": f"{sim:.6f}"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "concept", "caption", "similarity"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "manifest.csv", buf.getvalue())
    from medkt.figures import save_grid

    save_grid(result.images, out / "grid.png", labels=result.concepts)
    meta = {"seconds": result.seconds, "steps_run": result.steps_run,
            "mean_similarity": float(np.mean(result.similarities))}
    if config is not None:
        meta["config"] = asdict(config)
    atomic_write_json(out / "inversion.json", meta)
    return out / "manifest.csv"


def load_inversion(manifest: str | Path, backend: Backend | None = None) -> InversionResult:
    """Read images written by `save_inversion` back (as [0, 1] tensors)."""
    import csv

    from medkt.data.images import to_model_pixels

    manifest = Path(manifest)
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ConfigError(f"inversion manifest {manifest} is empty")
    size = backend.image_size if backend is not None else None
    ch = backend.image_channels if backend is not None else 3
    imgs = []
    for r in rows:
        path = manifest.parent / r["path"]
        if size is None:
            from PIL import Image

            with Image.open(path) as im:
                size = im.size[0]
        imgs.append(to_model_pixels(path, size=size, channels=ch))
    return InversionResult(torch.stack(imgs), [r["concept"] for r in rows], [r["caption"] for r in rows],
                           [float(r["similarity"]) for r in rows])


def inversion_summary(result: InversionResult) -> dict[str, Any]:
    """JSON-ready ``{"seconds", "per_concept_similarity" (mean cosine per concept), "steps_run"}``."""
    per: dict[str, list[float]] = {}
    for c, s in zip(result.concepts, result.similarities):
        per.setdefault(c, []).append(s)
    return {"seconds": result.seconds, "per_concept_similarity": {c: float(np.mean(v)) for c, v in per.items()},
            "steps_run": result.steps_run}


# --- several processes (torchrun; see medkt.distributed) ---------------------------------------
def invert_sharded(backend, targets, config=None, out_dir: str | Path | None = None, resume: bool = False,
                   progress: bool = True, init_images: torch.Tensor | None = None, pool: Any = None):
    """`medkt.inversion.invert` with the chunks spread over the ranks; every rank gets the
    whole result (images in the single-process order). Without a process group: plain ``invert``.

    Use ``config.chunk_size`` to make several chunks (one chunk = nothing to share): e.g. the
    number of images per concept, so each concept is one chunk.
    """
    import torch.distributed as dist

    from medkt.distributed import is_main, n_chunks, rank, shard_chunks, world_size

    cfg = config if isinstance(config, InversionConfig) else InversionConfig.from_dict(config)
    world = world_size()
    if world == 1:
        return invert(backend, targets, cfg, out_dir=out_dir, resume=resume, progress=progress,
                      init_images=init_images, pool=pool)
    total = n_chunks(targets, cfg.chunk_size)
    mine = shard_chunks(total, rank(), world)
    part = None
    if mine:
        part = invert(backend, targets, cfg, out_dir=out_dir, resume=resume, progress=progress and is_main(),
                      chunks=mine, init_images=init_images, pool=pool)
    payload = None if part is None else {
        "chunks": mine, "images": part.images.cpu(), "concepts": part.concepts, "texts": part.texts,
        "similarities": part.similarities, "steps_run": part.steps_run, "history": part.history,
        "seconds": part.seconds}
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, payload)
    # reassemble in chunk order: chunk c's images are the next block of its rank's images
    chunk_size = cfg.chunk_size or sum(int(t.n_images) for t in targets)
    by_chunk: dict[int, dict[str, Any]] = {}
    for p in parts:
        if p is None:
            continue
        offset = 0
        for j, c in enumerate(p["chunks"]):
            n_c = min(chunk_size, sum(int(t.n_images) for t in targets) - c * chunk_size)
            sl = slice(offset, offset + n_c)
            by_chunk[c] = {"images": p["images"][sl], "concepts": p["concepts"][sl], "texts": p["texts"][sl],
                           "similarities": p["similarities"][sl], "steps_run": p["steps_run"][j],
                           "history": p["history"][j]}
            offset += n_c
    if sorted(by_chunk) != list(range(total)):
        raise RuntimeError(f"sharded inversion is missing chunks: got {sorted(by_chunk)} of {total}")
    order = [by_chunk[c] for c in range(total)]
    device = backend.device
    return InversionResult(
        images=torch.cat([o["images"] for o in order]).to(device),
        concepts=[c for o in order for c in o["concepts"]],
        texts=[t for o in order for t in o["texts"]],
        similarities=[s for o in order for s in o["similarities"]],
        seconds=max(p["seconds"] for p in parts if p is not None),
        steps_run=[o["steps_run"] for o in order],
        history=[o["history"] for o in order],
    )


__all__ = [
    "InversionConfig", "InversionResult", "InversionTarget", "invert", "INVERSION_PRESETS", "preset_dict",
    "save_inversion", "load_inversion",
    "register_inversion_objective", "get_objective", "invert_sharded", "INVERSION_OBJECTIVES", "similarity", "inversion_summary",
    "ObjectiveContext", "ContrastiveSettings", "with_overrides",
]
