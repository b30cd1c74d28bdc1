"""Inversion priors, registered in `INVERSION_PRIORS`: what shapes the synthesised images besides
the objective.

A prior is a dataclass whose fields are its settings; a config lists priors in order, e.g.
``"priors": [{"name": "tv", "weight": 0.005}, {"name": "early_stop", "patience": 50}]`` (each
name at most once). The engine (`medkt.inversion`) asks them through small hooks:

* ``penalty(reg (B, C, H, W)) -> (B,) | None``: a term added to each image's loss, in list
  order; ``reg`` is the optimised image (or, with ``"residual"``, the edit). `TotalVariation`
  (``"tv"``) and the residual's ``l1`` use it; a new prior usually only needs this hook.
* ``"init"`` (`Init`) says where the images start: U(0, 1) (the paper; the default), N(0, 1) in
  the model's normalised space, gray, or given images (``invert(..., init_images=...)``) with
  Gaussian jitter.
* ``"residual"`` (`Residual`) changes what is optimised: ``x = clamp(x0 + up(r))`` with ``x0`` the
  init image and ``r`` a low-resolution edit (``size`` px, bicubic-upsampled, bounded by ``max``
  through tanh, optionally one-signed, with an L1 ``l1`` weight). A smooth, bounded edit of a
  normal-anatomy image cannot become an imperceptible adversarial pattern spread over the whole
  image, so the model has to "draw" what the text describes.
* ``"progressive"`` (`Progressive`): optimise at growing ``sizes`` (e.g. 64 -> 128 -> 224),
  the tensor upsampled and Adam restarted at each of ``steps``; not with ``"residual"``.
* ``"early_stop"`` (`EarlyStop`): stop a chunk when the mean similarity has not gained
  ``min_delta`` over ``patience`` steps (at the final resolution).

Priors that learn from an unlabeled pool of real scans of the modality (``invert(..., pool=)``,
`medkt.pool.UnlabeledPool`; listing one without a pool is a `ConfigError`), all off by default:

* ``"feature_stats"`` (`FeatureStats`): DeepInversion's feature-statistics prior for towers
  without BatchNorm: each chosen block's per-channel mean and variance over tokens / positions
  (or Gram matrices, ``gram``) of the synthesised, augmented images pulled toward the pool's.
* ``"real_start"`` (`RealStart`, an `Init`): start from seeded pool scans instead of noise
  (feature accentuation) and stay close to them (pixels and/or embedding); combines with
  ``"residual"``.
* ``"spectrum"`` (`Spectrum`, a `Parametrisation` like ``"residual"``): MACO's Fourier
  parametrisation, only the phase optimised, the amplitude fixed to the pool's mean spectrum.

Hooks besides ``penalty`` (all optional, on `Prior`): ``setup(PriorContext)`` once per
inversion (the pool priors compute their pool statistics there, cached by
`medkt.pool.pool_statistic`); ``feature_blocks()`` the image-tower blocks whose outputs a prior
reads (captured by `medkt.backends.base.capture_features` during the objective's forward pass);
``loss(PriorStep)`` the per-image term given the whole step (default: ``penalty(step.reg)``).

Writing one: ``@INVERSION_PRIORS.register("name")`` on a ``@dataclass`` with a ``penalty``
method (docs/bundles.md "Adding a component"); a plug-in package declares its module under the
entry-point group ``medkt.inversion_priors``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal, TypeVar

import numpy as np

import torch
import torch.nn.functional as F

from medkt.augment import total_variation
from medkt.errors import ConfigError
from medkt.registry import Registry
from medkt.config_model import Range, config_dataclass

#: inversion priors by config name: dataclasses whose fields are their settings
INVERSION_PRIORS: Registry[type] = Registry("inversion prior", group="medkt.inversion_priors")

P = TypeVar("P")


def find(components: Sequence[Any], kind: type[P]) -> P | None:
    """The component of class ``kind`` in ``components`` (None when not listed)."""
    return next((c for c in components if isinstance(c, kind)), None)


def settings_of(component: Any) -> dict[str, Any]:
    """A component's settings (its init fields), e.g. for checkpoint digests."""
    return {f.name: getattr(component, f.name) for f in fields(component) if f.init}


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` (B, C, H, W) bicubic-resized to ``size`` x ``size`` (unchanged when already that size)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


@dataclass
class PriorContext:
    """What `Prior.setup` gets once per inversion: the ``backend``, the unlabeled ``pool``
    (`medkt.pool.UnlabeledPool` or None), the inversion ``seed``, the number of images and the
    ``init_images`` passed to ``invert`` (if any)."""

    backend: Any
    pool: Any = None
    seed: int = 0
    n_images: int = 0
    init_images: torch.Tensor | None = None

    def require_pool(self, prior: str) -> Any:
        """The pool, or a one-line `ConfigError` naming ``prior`` and how to give one."""
        if self.pool is None or len(self.pool) == 0:
            raise ConfigError(f"the {prior!r} inversion prior needs an unlabeled pool of scans: pass "
                              "invert(..., pool=UnlabeledPool), transfer(..., unlabeled=PATH) or --unlabeled PATH, "
                              f"or remove {prior!r} from the priors")
        return self.pool


@dataclass
class PriorStep:
    """What `Prior.loss` gets every step, rows aligned with the chunk's images.

    ``reg`` the optimised tensor the penalties see (image, or edit under ``"residual"``);
    ``image`` ``(n, C, S, S)`` the un-augmented image the model sees; ``start`` ``(n, C, S, S)``
    the chunk's start images at the model size; ``features`` block index -> captured output for
    the augmented batch (``views * n`` rows, view-major); ``views``; ``chunk`` the chunk's index
    (a prior may cache per-chunk values under it); ``backend``."""

    reg: torch.Tensor
    image: torch.Tensor
    start: torch.Tensor
    features: dict[int, torch.Tensor]
    views: int
    chunk: int
    backend: Any


class Prior:
    """Base class of the priors: every hook is a no-op; ``penalty`` is the one a new prior usually
    overrides (module docstring for the others)."""

    #: True for priors that read the unlabeled pool (its identity then tags the checkpoints)
    needs_pool = False

    def setup(self, ctx: PriorContext) -> None:
        """Once per inversion, before any chunk (e.g. statistics of the pool)."""

    def feature_blocks(self) -> list[int]:
        """Indices of the image-tower blocks (`FeatureBlocks`) whose outputs `loss` reads."""
        return []

    def loss(self, step: PriorStep) -> torch.Tensor | None:
        """``(n,)`` term added to each image's loss this step, or None (default: `penalty`)."""
        return self.penalty(step.reg)

    def penalty(self, reg: torch.Tensor) -> torch.Tensor | None:
        """``(B,)`` term added to each image's loss (``reg``: the optimised image or edit), or None."""
        return None


class Parametrisation(Prior):
    """A prior that changes what is optimised (``"residual"``, ``"spectrum"``; one at a time, not
    with ``"progressive"``): the tensor starts at ``start(base)`` and ``render`` makes it the image."""

    def start(self, base: torch.Tensor) -> torch.Tensor:
        """The tensor optimised from step 0, given the start images ``base`` ``(n, C, S, S)``."""
        raise NotImplementedError

    def render(self, p: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image at the base's size in [0, 1], the tensor the penalties see)."""
        raise NotImplementedError

    def project(self, p: torch.Tensor) -> None:
        """In place, after each step (default: nothing)."""


@INVERSION_PRIORS.register("tv")
@config_dataclass
class TotalVariation(Prior):
    """Total variation of the image, ``weight`` * `total_variation` (paper: 0.005; Kazemi et al.'s
    ``diagonals`` optional)."""

    weight: Annotated[float, Range(ge=0)] = 0.005
    diagonals: bool = False

    def penalty(self, reg: torch.Tensor) -> torch.Tensor | None:
        """``(B,)`` TV term, None when the weight is 0."""
        if not self.weight:
            return None
        return self.weight * total_variation(reg, self.diagonals)


@INVERSION_PRIORS.register("init")
@config_dataclass
class Init(Prior):
    """Start images: ``"uniform"`` U(0, 1), ``"normal"`` N(0, 1) in the model's normalised input
    space, ``"gray"`` 0.5 + small noise, or ``"images"`` (``invert(..., init_images=...)``, cycled)
    plus Gaussian ``jitter`` (pixel units)."""

    kind: Literal["uniform", "normal", "gray", "images"] = "uniform"
    jitter: Annotated[float, Range(ge=0)] = 0.0

    def images(self, backend: Any, indices: Sequence[int], size: int, seed: int,
               init_images: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, C, size, size)`` in [0, 1] on ``backend.device``; drawn on the CPU from a generator
        per image seeded by ``(seed, index)``, so the same on every device and for any chunking."""
        if self.kind == "images" and (init_images is None or len(init_images) == 0):
            raise ConfigError("init kind 'images' needs init images: pass invert(..., init_images=(N, C, S, S) tensor)")
        shape = (backend.image_channels, size, size)
        imgs = []
        for i in indices:
            g = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
            if self.kind == "images":
                x0 = resize(init_images[int(i) % len(init_images)][None].to("cpu", torch.float32), size)[0]
                imgs.append(x0 + self.jitter * torch.randn(shape, generator=g) if self.jitter else x0)
            elif self.kind == "uniform":
                imgs.append(torch.rand(shape, generator=g))
            elif self.kind == "gray":
                imgs.append(torch.full(shape, 0.5) + 0.01 * torch.randn(shape, generator=g))
            else:
                mean = torch.tensor(backend.mean[: backend.image_channels]).view(-1, 1, 1)
                std = torch.tensor(backend.std[: backend.image_channels]).view(-1, 1, 1)
                imgs.append(mean + std * torch.randn(shape, generator=g))
        return torch.stack(imgs).clamp(0, 1).to(backend.device)


@INVERSION_PRIORS.register("residual")
@config_dataclass
class Residual(Parametrisation):
    """Optimise a low-resolution edit ``r`` of the start image: ``x = clamp(x0 + up(r))``
    (see the module docstring). ``size`` None = model size; ``max`` None = unbounded; ``l1`` the
    weight of mean |edit| (a sparse, local edit); ``sign`` keeps it one-signed ("positive": the
    finding adds density)."""

    size: Annotated[int, Range(ge=1)] | None = None
    max: Annotated[float, Range(gt=0)] | None = None
    l1: Annotated[float, Range(ge=0)] = 0.0
    sign: Literal["any", "positive", "negative"] = "any"

    def start(self, base: torch.Tensor) -> torch.Tensor:
        """A zero edit at ``size`` (the model size when None)."""
        rsize = self.size or base.shape[-1]
        return torch.zeros(base.shape[0], base.shape[1], rsize, rsize, device=base.device)

    def render(self, r: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image at the base's size in [0, 1], the edit the penalties see)."""
        d = resize(r, base.shape[-1])
        if self.max:
            d = self.max * torch.tanh(d / self.max)
        return (base + d).clamp(0, 1), d

    def penalty(self, reg: torch.Tensor) -> torch.Tensor | None:
        """``(B,)`` L1 of the edit, None when ``l1`` is 0."""
        if not self.l1:
            return None
        return self.l1 * reg.abs().mean(dim=(1, 2, 3))

    def project(self, r: torch.Tensor) -> None:
        """In place, after each step: a projected gradient keeps the edit one-signed."""
        if self.sign == "positive":
            r.clamp_(min=0)
        elif self.sign == "negative":
            r.clamp_(max=0)


@INVERSION_PRIORS.register("progressive")
@config_dataclass
class Progressive(Prior):
    """Progressive resolution: optimise at ``sizes`` (the last = the model size), each later size
    from step ``steps[k]`` on (the tensor bicubic-upsampled and Adam restarted)."""

    sizes: list[Annotated[int, Range(ge=1)]] = field(default_factory=lambda: [64, 128, 224])
    steps: list[Annotated[int, Range(ge=1)]] = field(default_factory=lambda: [900, 1800])

    def validate(self, path: str = "progressive") -> None:
        """One start step per later size, increasing."""
        if len(self.steps) != len(self.sizes) - 1:
            raise ConfigError(f"{path}#sizes {self.sizes} need {len(self.sizes) - 1} steps, got {self.steps}",
                              key=f"{path}#steps")
        if list(self.steps) != sorted(self.steps):
            raise ConfigError(f"{path}#steps must increase, got {self.steps}", key=f"{path}#steps")

    def stages(self) -> list[tuple[int, int]]:
        """``[(start_step, size)]``."""
        return list(zip([0, *self.steps], self.sizes))


@INVERSION_PRIORS.register("early_stop")
@config_dataclass
class EarlyStop(Prior):
    """Stop a chunk when the mean similarity has not improved by ``min_delta`` for ``patience``
    steps. Keeps its state (``best``, ``since_best``; checkpointed) per chunk: use a copy."""

    patience: Annotated[int, Range(ge=1)] = 50
    min_delta: Annotated[float, Range(ge=0)] = 1e-3
    best: float = field(default=-float("inf"), init=False)
    since_best: int = field(default=0, init=False)

    def update(self, mean_sim: float) -> bool:
        """Record this step's mean similarity; True when the chunk should stop."""
        if mean_sim > self.best + self.min_delta:
            self.best, self.since_best = mean_sim, 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience


# --- priors learnt from an unlabeled pool of scans --------------------------------------------
def _tokens(f: torch.Tensor) -> torch.Tensor:
    """A block output as tokens ``(B, T, D)``: CNN maps ``(B, C, h, w)`` -> positions x channels."""
    return f.flatten(2).transpose(1, 2) if f.dim() == 4 else f


def _block_stats(f: torch.Tensor, gram: bool) -> list[torch.Tensor]:
    """Per image: ``[mean (B, D), variance (B, D)]`` over tokens, or ``[Gram (B, D, D)]``."""
    t = _tokens(f).float()
    if gram:
        return [t.transpose(1, 2) @ t / t.shape[1]]
    return [t.mean(1), t.var(1, unbiased=False)]


@INVERSION_PRIORS.register("feature_stats")
@config_dataclass
class FeatureStats(Prior):
    """Match intermediate-feature statistics of the synthesised (augmented) images to the pool's
    (DeepInversion's BatchNorm prior, adapted to towers without BatchNorm).

    Per image and chosen block: each channel's mean and variance over the tokens (ViT, Swin) or
    spatial positions (CNN), or with ``gram`` the Gram matrix ``F^T F / T`` (the style term of
    the paper's appendix B.2.1). The term is ``weight`` * the sum over blocks of the mean squared
    difference to the pool's average statistic, each divided by the pool's mean square of that
    statistic (mean: by the mean channel variance) so that one weight suits any tower. Per-image
    statistics (not batch ones) keep every image independent of how images are chunked.
    ``blocks``: indices into the tower's blocks (`FeatureBlocks`; negative from the end; None = all).
    Default weight 0.1: on the phantom world (``phantom:base``, 200 steps, 8 nodule images) it
    halved the feature gap to held-out normal scans for a mean cosine of 0.570 instead of 0.595
    (weight 1: gap / 8, cosine 0.320).
    """

    weight: Annotated[float, Range(ge=0)] = 0.1
    blocks: list[int] | None = None
    gram: bool = False
    needs_pool = True
    _blocks: Any = field(default=None, init=False, repr=False)
    _targets: Any = field(default=None, init=False, repr=False)  # block -> [(statistic, scale)]

    def setup(self, ctx: PriorContext) -> None:
        """The pool's statistics of the chosen blocks (computed once per model, pool and blocks)."""
        from medkt.backends.base import FeatureBlocks, capture_features, resolve_blocks
        from medkt.pool import pool_statistic

        pool, backend = ctx.require_pool("feature_stats"), ctx.backend
        if not isinstance(backend, FeatureBlocks):
            raise ConfigError(f"the 'feature_stats' inversion prior reads the image tower's blocks, which backend "
                              f"{backend.spec or backend.family!r} does not expose (FeatureBlocks); remove it")
        self._blocks = resolve_blocks(self.blocks, len(backend.feature_modules()), "feature_stats#blocks")

        def compute() -> dict[int, list[torch.Tensor]]:
            sums: dict[int, list[torch.Tensor]] = {}
            with torch.no_grad(), backend.autocast(), capture_features(backend, self._blocks) as feats:
                for x in pool.batches(backend):
                    backend.encode_pixels(x.to(backend.device))
                    for b in self._blocks:
                        stats = [s.sum(0) for s in _block_stats(feats[b], self.gram)]
                        sums[b] = stats if b not in sums else [a + s for a, s in zip(sums[b], stats)]
            return {b: [(v / len(pool)).cpu() for v in sums[b]] for b in self._blocks}

        stats = pool_statistic(backend, pool, "feature_stats", {"blocks": self._blocks, "gram": self.gram}, compute)
        dev = backend.device
        self._targets = {}
        for b in self._blocks:
            ref = [v.to(dev) for v in stats[b]]
            # scales: mean -> the mean channel variance; variance / Gram -> their own mean square
            scales = [ref[0].square().mean()] if self.gram else [ref[1].mean(), ref[1].square().mean()]
            self._targets[b] = [(r, sc.clamp_min(1e-12)) for r, sc in zip(ref, scales)]

    def feature_blocks(self) -> list[int]:
        """The chosen blocks (resolved by `setup`)."""
        return list(self._blocks or [])

    def loss(self, step: PriorStep) -> torch.Tensor | None:
        """``(n,)`` feature-statistics term, averaged over the views; None when the weight is 0."""
        if not self.weight:
            return None
        total = 0.0
        for b, targets in self._targets.items():
            for s, (ref, scale) in zip(_block_stats(step.features[b], self.gram), targets):
                total = total + (s - ref).square().flatten(1).mean(1) / scale
        return self.weight * total.view(step.views, -1).mean(0)


@INVERSION_PRIORS.register("real_start")
@config_dataclass
class RealStart(Init):
    """Start from real scans of the pool instead of noise and stay close to them (feature
    accentuation, Hamblin et al. 2024): image ``i`` starts from scan ``chosen[i % scans]``, a
    seeded choice (the inversion seed) of ``scans`` pool files (None: one per image, at most the
    pool), plus Gaussian ``jitter``. The stay-close term is ``weight`` * the mean squared pixel
    difference to the start (``space`` "pixel"), the squared distance of the normalised
    embeddings of the un-augmented image and its start ("feature": one more forward pass per step),
    or both. Takes the place of ``"init"``; combines with ``"residual"`` (an edit of the scan)."""

    scans: Annotated[int, Range(ge=1)] | None = None
    weight: Annotated[float, Range(ge=0)] = 1.0
    space: Literal["pixel", "feature", "both"] = "pixel"
    kind: str = field(default="pool", init=False)  # `InversionConfig.init_kind`: not the caller's images
    needs_pool = True
    _images: Any = field(default=None, init=False, repr=False)
    _start_emb: dict = field(default_factory=dict, init=False, repr=False)  # chunk -> start embeddings

    def setup(self, ctx: PriorContext) -> None:
        """Choose and decode the start scans."""
        from medkt.backends.base import require_embeddings

        pool = ctx.require_pool("real_start")
        if ctx.init_images is not None:
            raise ConfigError("the 'real_start' inversion prior takes its start images from the pool; do not also "
                              "pass init_images")
        if self.space != "pixel":
            require_embeddings(ctx.backend, "real_start with space 'feature'", "space 'pixel'")
        k = min(self.scans or max(ctx.n_images, 1), len(pool))
        chosen = np.random.default_rng(ctx.seed).choice(len(pool), k, replace=False)
        self._images = pool.images(ctx.backend, chosen.tolist())
        self._start_emb = {}

    def images(self, backend: Any, indices: Sequence[int], size: int, seed: int,
               init_images: torch.Tensor | None = None) -> torch.Tensor:
        """The chosen scans for ``indices`` (cycled), jittered as by ``init`` kind "images"."""
        return Init("images", self.jitter).images(backend, indices, size, seed, self._images)

    def loss(self, step: PriorStep) -> torch.Tensor | None:
        """``(n,)`` stay-close term; None when the weight is 0."""
        if not self.weight:
            return None
        start = resize(step.start, step.image.shape[-1])
        term = 0.0
        if self.space in ("pixel", "both"):
            term = term + (step.image - start).square().flatten(1).mean(1)
        if self.space in ("feature", "both"):
            backend = step.backend
            with backend.autocast():
                if step.chunk not in self._start_emb:
                    with torch.no_grad():
                        self._start_emb[step.chunk] = F.normalize(backend.encode_pixels(start).float(), dim=-1)
                emb = F.normalize(backend.encode_pixels(step.image).float(), dim=-1)
            term = term + (emb - self._start_emb[step.chunk]).square().sum(-1)
        return self.weight * term


@INVERSION_PRIORS.register("spectrum")
@config_dataclass
class Spectrum(Parametrisation):
    """MACO's image parametrisation (Fel et al., NeurIPS 2023): the image is the inverse real FFT
    of ``A * exp(i * phase)``, with ``A`` fixed to the pool's mean amplitude spectrum at the model
    size (per channel, computed once, cached) and only the phase optimised, so every image keeps
    the modality's power spectrum (up to the clamp to [0, 1]). The phase starts from the start
    image's (``init`` / ``real_start``); penalties (e.g. ``tv``) see the image."""

    needs_pool = True
    _amplitude: Any = field(default=None, init=False, repr=False)

    def setup(self, ctx: PriorContext) -> None:
        """The pool's mean amplitude spectrum ``(C, S, S // 2 + 1)`` (on the CPU, then the model's device)."""
        from medkt.pool import pool_statistic

        pool, backend = ctx.require_pool("spectrum"), ctx.backend

        def compute() -> torch.Tensor:
            total = sum(torch.fft.rfft2(x.double()).abs().sum(0) for x in pool.batches(backend))
            return (total / len(pool)).float()

        self._amplitude = pool_statistic(backend, pool, "spectrum", {}, compute).to(backend.device)

    def start(self, base: torch.Tensor) -> torch.Tensor:
        """The start images' phase."""
        return torch.angle(torch.fft.rfft2(base.float()))

    def render(self, p: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image in [0, 1], the same image for the penalties)."""
        a = self._amplitude
        x = torch.fft.irfft2(torch.complex(a * torch.cos(p), a * torch.sin(p)), s=base.shape[-2:])
        x = x.clamp(0, 1)
        return x, x


__all__ = ["INVERSION_PRIORS", "Prior", "PriorContext", "PriorStep", "Parametrisation", "TotalVariation", "Init",
           "Residual", "Progressive", "EarlyStop", "FeatureStats", "RealStart", "Spectrum", "find", "settings_of",
           "resize"]
