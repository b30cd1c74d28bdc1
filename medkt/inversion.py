"""Model inversion: synthesise images whose embedding matches a text description (paper Eq. 3).

All (concept, sample) pairs are optimised together as one pixel tensor ``(N, C, S, S)`` in
[0, 1]:

    loss_i = objective(f_V(A(x_i)), text_i) + tv_weight * TV(x_i)

with ``A`` a differentiable random affine (p=0.5), Adam, a cosine learning-rate schedule,
per-image gradient-norm clipping, clamping to [0, 1], optional progressive resolution
(e.g. 64 -> 128 -> 224, the parameter tensor is upsampled and Adam restarted at each stage) and
several augmented views per step. Objectives are pluggable (`register_inversion_objective`);
the default ``"cosine"`` is ``-cos(f_V(A(x)), f_T(text))``.

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

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from medkt.augment import AffineAugment, total_variation
from medkt.backends.base import AnyResolution, Backend, as_numpy_image, require_embeddings
from medkt.device import grad_scaler
from medkt.errors import ConfigError, unknown_name
from medkt.checkpoints import concept_settings, guard_resume, load_checkpoint, save_checkpoint, settings_digest
from medkt.faults import fault_point
from medkt.progress import Progress
from medkt.registry import Registry
from medkt.utils import atomic_write_json, atomic_write_text
from medkt.validation import OneOf, Range


@dataclass
class InversionTarget:
    """One concept to synthesise: ``n_images`` images toward the embedding of ``text``."""

    concept: str
    text: str
    n_images: int = 10


@dataclass
class InversionConfig:
    """Settings of `invert`; the defaults are the paper's (§4.2, README "Engine defaults").

    5,000 Adam ``steps`` at ``lr`` 0.1 with cosine annealing to ``lr_min``; loss = ``objective``
    (``"cosine"``: -cos(f_V(A(x)), f_T(text))) + ``tv_weight`` 0.005 * TV(x); random affine ``A``
    with probability ``augment_p`` 0.5 (±``rotate_deg`` 30°, ``translate`` 10 % of the size,
    ``scale`` 0.7-1.0); per-image gradient-norm clip 1.0; pixels clamped to [0, 1]; init U(0, 1).
    Progressive ``resolutions``, ``views``, ``chunk_size``, checkpoints, early stopping, the
    ``"residual"`` parametrization and the acquisition/contrastive options are off by default.
    Build from a dict (or a ``"preset"``) with `from_dict`; the field comments give the
    units and the meaning of each option.
    """

    steps: Annotated[int, Range(ge=1)] = 5000
    lr: Annotated[float, Range(gt=0)] = 0.1
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_min: Annotated[float, Range(ge=0)] = 0.0
    tv_weight: Annotated[float, Range(ge=0)] = 0.005
    tv_diagonals: bool = False
    objective: Annotated[str, OneOf(objective_names, "inversion objective")] = "cosine"
    augment_p: Annotated[float, Range(0, 1)] = 0.5  # probability of the random affine per view
    rotate_deg: Annotated[float, Range(0, 180)] = 30.0
    translate: Annotated[float, Range(0, 1)] = 0.1  # fraction of the image size
    scale: tuple[float, float] = (0.7, 1.0)
    views: Annotated[int, Range(ge=1)] = 1  # augmented views of each image per step (gradients averaged)
    grad_clip: Annotated[float, Range(gt=0)] | None = 1.0  # per-image gradient L2 norm clip
    clamp: bool = True  # keep pixels in [0, 1] after each step
    init: Literal["uniform", "normal", "gray", "images"] = "uniform"  # "uniform" U(0,1) | "normal" (N(0,1) in the model's normalised space) | "gray"
    resolutions: list[Annotated[int, Range(ge=1)]] | None = None  # progressive sizes, e.g. [64, 128, 224]; last = model size
    resolution_steps: list[Annotated[int, Range(ge=1)]] | None = None  # step at which each later size starts, e.g. [900, 1800]
    chunk_size: Annotated[int, Range(ge=1)] | None = None  # images optimised together; None = all at once
    checkpoint_every: Annotated[int, Range(ge=0)] = 0  # 0 = no checkpoints
    early_stop_patience: Annotated[int, Range(ge=0)] = 0  # 0 = off; stop a chunk when mean similarity gains < min_delta over this many steps
    early_stop_min_delta: Annotated[float, Range(ge=0)] = 1e-3
    seed: int = 0
    # --- inversion priors (off by default; see docs/README "inversion priors") ---------------
    # "pixels": optimise the image itself (paper Eq. 3). "residual": x = clamp(x0 + up(r)), with
    # x0 an init image and r a low-resolution residual (``residual_size`` px, bicubic-upsampled,
    # bounded by ``residual_max`` through tanh); TV then regularises the residual only. A smooth,
    # bounded residual on a normal-anatomy image cannot become an imperceptible adversarial
    # pattern spread over the whole image, so the model has to "draw" what the text describes.
    parametrization: Literal["pixels", "residual"] = "pixels"
    residual_size: Annotated[int, Range(ge=1)] | None = None  # None = model size
    residual_max: Annotated[float, Range(gt=0)] | None = None  # None = unbounded
    residual_l1: Annotated[float, Range(ge=0)] = 0.0  # weight of mean |residual|: a sparse, local edit of the init image
    residual_sign: Literal["any", "positive", "negative"] = "any"  # "positive" (the finding adds density) | "negative" | "any"
    # acquisition-like augmentation of each view (after the affine): Gaussian blur with sigma
    # drawn in [0, blur_sigma] px and additive noise with std drawn in [0, noise_std], so the
    # synthesised content must survive the degradations real scans have
    blur_sigma: Annotated[float, Range(ge=0)] = 0.0
    noise_std: Annotated[float, Range(ge=0)] = 0.0
    # captions of concepts the images must NOT look like (e.g. the known classes); used by the
    # "contrastive" objective, which inverts the paper's Eq. 1 condition directly: the image
    # should be closer to its text than to every negative caption (softmax cross-entropy)
    negative_texts: list[str] | None = None
    contrastive_scale: Annotated[float, Range(ge=0)] = 0.0  # 0 = the backend's logit scale
    # init="images" starts from ``invert(..., init_images=...)`` (cycled; e.g. normal scans)
    init_jitter: Annotated[float, Range(ge=0)] = 0.0  # std of Gaussian noise added to init images (pixel units)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, path: str = "inversion") -> "InversionConfig":
        """Build from a dict of fields, checked by `medkt.validation` (types, ranges and
        choices are the annotations above; ``path`` names the options in errors). ``"preset": NAME``
        starts from `INVERSION_PRESETS` (explicit fields override the preset's)."""
        from medkt.validation import build, check

        d = dict(d or {})
        if "preset" in d:
            name = check(d.pop("preset"), str, f"{path}#preset")
            d = {**preset_dict(name), **d}
        return build(cls, d, path, what="inversion")

    def validate(self, path: str = "inversion") -> None:
        """Field types and ranges (the annotations), then the rules that involve several fields."""
        from medkt.validation import check_instance

        check_instance(self, path)
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(f"{path}#scale = {list(self.scale)}: expected [min, max] with 0 < min <= max", key=f"{path}#scale")
        if self.parametrization == "residual" and self.resolutions is not None:
            raise ConfigError(f"{path}: parametrization='residual' sets its own resolution (residual_size); "
                              "remove 'resolutions'", key=f"{path}#resolutions")
        if self.resolutions is not None:
            n_steps = len(self.resolution_steps or [])
            if n_steps != len(self.resolutions) - 1:
                raise ConfigError(
                    f"{path}#resolutions {self.resolutions} need {len(self.resolutions) - 1} resolution_steps, "
                    f"got {self.resolution_steps}", key=f"{path}#resolution_steps")
            if list(self.resolution_steps or []) != sorted(self.resolution_steps or []):
                raise ConfigError(f"{path}#resolution_steps must increase, got {self.resolution_steps}",
                                  key=f"{path}#resolution_steps")


#: Named inversion recipes (``{"preset": NAME}`` in a config). Resolutions are given for a
#: 224-px model and scaled to the model by `preset_dict` when it is told the model size.
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
    """The fields of preset ``name``; progressive resolutions scaled to ``image_size`` if given."""
    if name not in INVERSION_PRESETS:
        raise unknown_name("inversion preset", name, list(INVERSION_PRESETS))
    d = copy.deepcopy(INVERSION_PRESETS[name])
    if image_size and d.get("resolutions"):
        f = image_size / 224
        d["resolutions"] = [min(image_size, max(4, int(round(r * f)))) for r in d["resolutions"][:-1]] + [image_size]
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
ObjectiveFn = Callable[[Backend, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
#: inversion objectives: ``fn(backend, x01 (B,C,S,S), ctx) -> (loss (B,), similarity (B,))``;
#: metadata ``uses_text_embeddings`` (default True). ViLT's "itm" registers itself from
#: `medkt.natural.objectives` (an entry point of the group ``medkt.inversion_objectives``, see `medkt.registry`).
INVERSION_OBJECTIVES: Registry[ObjectiveFn] = Registry("inversion objective", group="medkt.inversion_objectives")


def objective_names() -> list[str]:
    """Names of the registered inversion objectives (built-in plug-ins included)."""
    return INVERSION_OBJECTIVES.names()


def register_inversion_objective(name: str, uses_text_embeddings: bool = True) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator registering an objective in `INVERSION_OBJECTIVES`:
    ``fn(backend, x01 (B,C,S,S), ctx) -> (loss (B,), similarity (B,))``.

    ``ctx`` holds ``texts`` (list of B strings) and ``text_emb`` (B, D) normalised target
    embeddings, aligned with the rows of ``x01`` (plus ``negative_emb``/``contrastive_scale``).
    ``text_emb`` is None for objectives registered with ``uses_text_embeddings=False`` (e.g.
    ViLT's image-text matching, which reads the texts: such a model has no embeddings); their
    returned similarity (e.g. the match probability) is what the run reports per image.
    """
    return INVERSION_OBJECTIVES.register(name, uses_text_embeddings=uses_text_embeddings)


@register_inversion_objective("cosine")
def cosine_objective(backend: Backend, x: torch.Tensor, ctx: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The default (paper Eq. 3): loss ``-cos(f_V(x), text_emb)`` and the cosine, both ``(B,)``."""
    emb = F.normalize(backend.encode_pixels(x).float(), dim=-1)
    sim = (emb * ctx["text_emb"]).sum(-1)
    return -sim, sim


@register_inversion_objective("l2")
def l2_objective(backend: Backend, x: torch.Tensor, ctx: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 between normalised embeddings (= 2 - 2 cos; the CLIP-inversion reference's loss)."""
    emb = F.normalize(backend.encode_pixels(x).float(), dim=-1)
    sim = (emb * ctx["text_emb"]).sum(-1)
    return (emb - ctx["text_emb"]).pow(2).sum(-1), sim


@register_inversion_objective("contrastive")
def contrastive_objective(backend: Backend, x: torch.Tensor, ctx: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the target text against ``negative_texts`` (paper Eq. 1/2 used for inversion)."""
    neg = ctx.get("negative_emb")
    if neg is None or len(neg) == 0:
        raise ConfigError("the 'contrastive' inversion objective needs negative_texts (e.g. the known classes' captions)")
    emb = F.normalize(backend.encode_pixels(x).float(), dim=-1)
    sim = (emb * ctx["text_emb"]).sum(-1)
    scale = ctx.get("contrastive_scale") or float(backend.logit_scale)
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


def _stages(cfg: InversionConfig, model_size: int) -> list[tuple[int, int]]:
    """[(start_step, size)] of the progressive-resolution schedule."""
    if not cfg.resolutions:
        return [(0, model_size)]
    starts = [0, *cfg.resolution_steps]
    return list(zip(starts, cfg.resolutions))


def _stage_size(stages: list[tuple[int, int]], step: int) -> int:
    size = stages[0][1]
    for start, s in stages:
        if step >= start:
            size = s
    return size


def _init_pixels(backend: Backend, cfg: InversionConfig, indices: Sequence[int], size: int,
                 init_images: torch.Tensor | None = None) -> torch.Tensor:
    """Start images ``(n, C, size, size)`` on ``backend.device``; drawn on the CPU (same on every device)."""
    imgs = []
    for i in indices:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(i))
        shape = (backend.image_channels, size, size)
        if cfg.init == "images":
            if init_images is None or len(init_images) == 0:
                raise ConfigError("init='images' needs init images: pass invert(..., init_images=(N, C, S, S) tensor)")
            x0 = _to_model_size(init_images[int(i) % len(init_images)][None].to("cpu", torch.float32), size)[0]
            if cfg.init_jitter:
                x0 = x0 + cfg.init_jitter * torch.randn(shape, generator=g)
            imgs.append(x0)
        elif cfg.init == "uniform":
            imgs.append(torch.rand(shape, generator=g))
        elif cfg.init == "gray":
            imgs.append(torch.full(shape, 0.5) + 0.01 * torch.randn(shape, generator=g))
        else:  # N(0, 1) in the model's normalised input space
            mean = torch.tensor(backend.mean[: backend.image_channels]).view(-1, 1, 1)
            std = torch.tensor(backend.std[: backend.image_channels]).view(-1, 1, 1)
            imgs.append(mean + std * torch.randn(shape, generator=g))
    x = torch.stack(imgs)
    return (x.clamp(0, 1) if cfg.clamp else x).to(backend.device)


def _to_model_size(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def _negative_emb(backend: Backend, cfg: InversionConfig) -> torch.Tensor | None:
    if not cfg.negative_texts:
        return None
    with backend.autocast():
        return backend.encode_texts(list(cfg.negative_texts))


def _degrade(x: torch.Tensor, cfg: InversionConfig, gen: torch.Generator) -> torch.Tensor:
    """Random blur / noise per sample (``blur_sigma``, ``noise_std``); identity when both are 0."""
    if cfg.blur_sigma > 0:
        sig = torch.rand(x.shape[0], generator=gen) * cfg.blur_sigma
        r = max(1, int(math.ceil(2.5 * cfg.blur_sigma)))
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * sig.clamp_min(1e-3)[:, None].to(x.dtype) ** 2))
        k = (k / k.sum(1, keepdim=True)).to(x.device)  # (B, K) separable kernels, one per sample
        B, C, H, W = x.shape
        xp = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="replicate")
        kk = k.repeat_interleave(C, 0)
        xp = F.conv2d(xp, kk[:, None, None, :], groups=B * C)
        x = F.conv2d(xp, kk[:, None, :, None], groups=B * C).reshape(B, C, H, W)
    if cfg.noise_std > 0:
        std = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * cfg.noise_std
        x = x + std.to(x.device, x.dtype) * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    return x


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
                    init_images: torch.Tensor | None = None) -> dict[str, Any]:
    """What an inversion's images depend on (recorded with its checkpoints; ``--resume`` with
    different values is refused): the backend spec and precision, every config field but
    ``checkpoint_every``, the targets and a digest of the init images."""
    import hashlib

    settings: dict[str, Any] = {
        "backend": backend.spec,
        "inversion": {k: v for k, v in asdict(cfg).items() if k not in _NOT_RESULT_SHAPING},
        "concepts": concept_settings(targets),
    }
    settings["precision"] = str(backend.precision)
    if init_images is not None and cfg.init == "images":
        data = init_images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        settings["init_images"] = hashlib.sha256(data).hexdigest()[:16]
    return settings


def _chunk_path(ckpt_dir: Path, chunk_id: int) -> Path:
    return ckpt_dir / f"chunk{chunk_id:04d}.pt"


# --- main loop ---------------------------------------------------------------------------------
def _run_chunk(
    backend: Backend,
    cfg: InversionConfig,
    chunk_id: int,
    indices: list[int],
    text_emb: torch.Tensor | None,
    texts: list[str],
    ckpt_path: Path | None,
    resume: bool,
    progress: Any,
    init_images: torch.Tensor | None = None,
    digest: str | None = None,
) -> tuple[torch.Tensor, int, list[float]]:
    """Optimise one chunk of images; returns (images at model size, steps run, mean-similarity history).

    Checkpoints (``ckpt_path``, every ``cfg.checkpoint_every`` steps and once more when the chunk
    is done) carry ``digest``, the digest of the settings that shape the result; resuming from
    a checkpoint with another digest is refused, and a finished chunk is not run again.

    The optimised tensor is the pixels themselves (``parametrization="pixels"``, optionally at
    progressive resolutions) or, with ``"residual"``, a low-resolution edit ``d`` on top of fixed
    start images: ``x = clamp(base + residual_max * tanh(up(d) / residual_max))``.
    """
    objective = get_objective(cfg.objective)
    augment = AffineAugment(cfg.augment_p, cfg.rotate_deg, cfg.translate, cfg.scale)
    residual = cfg.parametrization == "residual"
    size = backend.image_size
    stages = [(0, size)] if residual else _stages(cfg, size)
    device = backend.device
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + chunk_id)  # CPU: same draws on every device
    base = _init_pixels(backend, cfg, indices, size, init_images).detach() if residual else None
    step, history, state = 0, [], None
    best, since_best = -float("inf"), 0  # early stopping
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, digest)
        step, history = int(state["step"]), list(state["history"])
        best, since_best = state.get("early_stop", (best, since_best))
        p = state["pixels"].clone().to(device)
        gen.set_state(state["rng"])
    elif residual:
        rsize = cfg.residual_size or size
        p = torch.zeros(base.shape[0], base.shape[1], rsize, rsize, device=device)
    else:
        p = _init_pixels(backend, cfg, indices, _stage_size(stages, 0), init_images)
    p.requires_grad_(True)
    opt = torch.optim.Adam([p], lr=cfg.lr)
    if state is not None and state.get("adam") is not None:
        opt.load_state_dict(state["adam"])  # Adam moves its state to the pixels' device
    sched = lr_scheduler(opt, cfg, step)
    # fp16 forward passes: scale the loss so small pixel gradients do not underflow (disabled otherwise)
    scaler = grad_scaler(device, backend.precision)
    if state is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])

    # A backend that takes any input size runs at the stage's size (the saving progressive
    # resolution is for); otherwise each stage is upsampled to the model size every step.
    native_stages = isinstance(backend, AnyResolution) and backend.accepts_any_size()

    def render(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image the model sees, the tensor TV/sparsity regularise)."""
        if not residual:
            return (t if native_stages else _to_model_size(t, size)), t
        d = _to_model_size(t, size)
        if cfg.residual_max:
            d = cfg.residual_max * torch.tanh(d / cfg.residual_max)
        x = base + d
        return (x.clamp(0, 1) if cfg.clamp else x), d

    ctx = {"text_emb": text_emb.repeat(cfg.views, 1) if text_emb is not None else None,
           "texts": list(texts) * cfg.views,
           "negative_emb": _negative_emb(backend, cfg), "contrastive_scale": cfg.contrastive_scale}
    done = bool(state is not None and state.get("done"))

    def checkpoint(done: bool = False) -> None:
        ckpt = {"step": step, "pixels": p.detach().cpu().clone(), "adam": _to_cpu(opt.state_dict()),
                "rng": gen.get_state(), "history": history, "indices": list(indices),
                "early_stop": [best, since_best], "done": done, "settings_digest": digest}
        if scaler.is_enabled():
            ckpt["scaler"] = scaler.state_dict()
        save_checkpoint(ckpt, ckpt_path)
        fault_point("inversion")  # kill-and-resume tests: die right after a checkpoint

    if progress is not None:
        progress.skip(step)
    while step < cfg.steps and not done:
        stage = _stage_size(stages, step)
        if not residual and p.shape[-1] != stage:  # progressive resolution: upsample and restart Adam
            with torch.no_grad():
                p = _to_model_size(p.detach(), stage)
                p = p.clamp(0, 1) if cfg.clamp else p
            p.requires_grad_(True)
            opt = torch.optim.Adam([p], lr=cfg.lr)
            sched = lr_scheduler(opt, cfg, step)
        xm, reg = render(p)
        xa = augment(xm.repeat(cfg.views, 1, 1, 1), gen)
        if cfg.blur_sigma > 0 or cfg.noise_std > 0:
            xa = _degrade(xa, cfg, gen)
        with backend.autocast():  # only the model runs in low precision; pixels and losses stay fp32
            loss_rows, sim_rows = objective(backend, xa, ctx)
        loss = loss_rows.float().view(cfg.views, -1).mean(0)
        if cfg.tv_weight:
            loss = loss + cfg.tv_weight * total_variation(reg, cfg.tv_diagonals)
        if residual and cfg.residual_l1:
            loss = loss + cfg.residual_l1 * reg.abs().mean(dim=(1, 2, 3))
        (p.grad,) = torch.autograd.grad(scaler.scale(loss.sum()), p)
        scaler.unscale_(opt)  # no-op unless fp16
        if cfg.grad_clip:
            p.grad = _clip_per_image(p.grad, cfg.grad_clip)
        scaler.step(opt)  # skips the step if fp16 gradients overflowed
        scaler.update()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if residual and cfg.residual_sign != "any":  # projected gradient: keep the edit one-signed
                p.clamp_(min=0) if cfg.residual_sign == "positive" else p.clamp_(max=0)
            elif not residual and cfg.clamp:
                p.clamp_(0, 1)
        step += 1
        mean_sim = float(sim_rows.detach().mean())
        history.append(mean_sim)
        if progress is not None:
            progress.set_postfix(sim=f"{mean_sim:.3f}", size=p.shape[-1])
            progress.update(1)
        if cfg.early_stop_patience and stage == stages[-1][1]:
            if mean_sim > best + cfg.early_stop_min_delta:
                best, since_best = mean_sim, 0
            else:
                since_best += 1
                if since_best >= cfg.early_stop_patience:
                    break
        # after the early-stopping update, so a resumed run continues from exactly this state
        if ckpt_path is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            checkpoint()
    if ckpt_path is not None and cfg.checkpoint_every and not done:
        checkpoint(done=True)  # a finished chunk is not optimised again on resume
    with torch.no_grad():
        final = _to_model_size(render(p.detach())[0], size)
    return (final.clamp(0, 1) if cfg.clamp else final), step, history


def invert(
    backend: Backend,
    targets: Sequence[InversionTarget],
    config: InversionConfig | dict | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    chunks: Sequence[int] | None = None,
    init_images: torch.Tensor | None = None,
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
        init_images: ``(M, C, S, S)`` [0, 1] starting images for ``init="images"`` (image ``i``
            starts from ``init_images[i % M]``), e.g. a few normal scans of the target domain.
    Returns:
        `InversionResult` with images ``(N, C, S, S)`` in [0, 1].
    """
    cfg = config if isinstance(config, InversionConfig) else InversionConfig.from_dict(config)
    cfg.validate()
    if not targets:
        raise ConfigError("nothing to invert: the list of concepts is empty")
    texts, concepts = [], []
    for t in targets:
        if t.n_images < 1:
            raise ConfigError(f"concept {t.concept!r}: n_images must be >= 1, got {t.n_images}")
        texts += [t.text] * t.n_images
        concepts += [t.concept] * t.n_images
    n = len(texts)
    get_objective(cfg.objective)  # an unknown name fails before any work
    # checkpoints are tagged with the settings that shape the images; resuming with others is refused
    ckpt_dir = Path(out_dir) / "checkpoints" if out_dir is not None else None
    digest = None
    if ckpt_dir is not None:
        settings = resume_settings(backend, cfg, targets, init_images)
        guard_resume(ckpt_dir, "inversion", settings, resume)
        digest = settings_digest(settings)
    text_emb = None
    if INVERSION_OBJECTIVES.meta(cfg.objective, "uses_text_embeddings", True):
        require_embeddings(backend, f"inversion objective {cfg.objective!r}", "objective 'itm'")
        uniq = sorted(set(texts), key=texts.index)
        with backend.autocast():
            emb_by_text = dict(zip(uniq, backend.encode_texts(uniq)))
        text_emb = torch.stack([emb_by_text[t] for t in texts])
    chunk = cfg.chunk_size or n
    all_chunks = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    selected = list(range(len(all_chunks))) if chunks is None else list(chunks)

    if ckpt_dir is not None and not resume:  # a fresh start: chunk files left in this folder are stale
        for cid in selected:
            _chunk_path(ckpt_dir, cid).unlink(missing_ok=True)
    requires = [p.requires_grad for p in backend.parameters()]
    for p in backend.parameters():  # only the pixels need gradients
        p.requires_grad_(False)
    was_training = backend.training
    backend.eval()
    start = time.perf_counter()
    images, steps_run, histories, keep = [], [], [], []
    bar = Progress(cfg.steps * len(selected), "inversion", unit="step", enabled=progress)
    try:
        for cid in selected:
            idx = all_chunks[cid]
            path = _chunk_path(ckpt_dir, cid) if ckpt_dir is not None else None
            chunk_emb = text_emb[idx] if text_emb is not None else None
            x, s, hist = _run_chunk(backend, cfg, cid, idx, chunk_emb, [texts[i] for i in idx], path, resume, bar,
                                    init_images, digest)
            images.append(x)
            steps_run.append(s)
            histories.append(hist)
            keep += idx
    finally:
        bar.close()
        for p, r in zip(backend.parameters(), requires):
            p.requires_grad_(r)
        backend.train(was_training)
    imgs = torch.cat(images)
    if text_emb is not None:
        with backend.autocast():
            sims = similarity(backend, imgs, text_emb[keep]).tolist()
    else:  # the objective's own similarity (e.g. ITM match probability), un-augmented
        fn, kept_texts, sims = get_objective(cfg.objective), [texts[i] for i in keep], []
        with torch.no_grad(), backend.autocast():
            for i in range(0, len(imgs), 32):
                sims += fn(backend, imgs[i : i + 32], {"texts": kept_texts[i : i + 32], "text_emb": None})[1].tolist()
    return InversionResult(
        images=imgs,
        concepts=[concepts[i] for i in keep],
        texts=[texts[i] for i in keep],
        similarities=sims,
        seconds=time.perf_counter() - start,
        steps_run=steps_run,
        history=histories,
    )


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
                   progress: bool = True, init_images: torch.Tensor | None = None):
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
                      init_images=init_images)
    total = n_chunks(targets, cfg.chunk_size)
    mine = shard_chunks(total, rank(), world)
    part = None
    if mine:
        part = invert(backend, targets, cfg, out_dir=out_dir, resume=resume, progress=progress and is_main(),
                      chunks=mine, init_images=init_images)
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
]
