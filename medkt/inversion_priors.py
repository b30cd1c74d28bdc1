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

Writing one: ``@INVERSION_PRIORS.register("name")`` on a ``@dataclass`` with a ``penalty``
method (docs/bundles.md "Adding a component"); a plug-in package declares its module under the
entry-point group ``medkt.inversion_priors``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field, fields
from typing import Annotated, Any, Literal, TypeVar

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


class Prior:
    """Base class of the priors: ``penalty`` (the hook a new prior usually overrides) adds nothing."""

    def penalty(self, reg: torch.Tensor) -> torch.Tensor | None:
        """``(B,)`` term added to each image's loss (``reg``: the optimised image or edit), or None."""
        return None


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
class Residual(Prior):
    """Optimise a low-resolution edit ``r`` of the start image: ``x = clamp(x0 + up(r))``
    (see the module docstring). ``size`` None = model size; ``max`` None = unbounded; ``l1`` the
    weight of mean |edit| (a sparse, local edit); ``sign`` keeps it one-signed ("positive": the
    finding adds density)."""

    size: Annotated[int, Range(ge=1)] | None = None
    max: Annotated[float, Range(gt=0)] | None = None
    l1: Annotated[float, Range(ge=0)] = 0.0
    sign: Literal["any", "positive", "negative"] = "any"

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


__all__ = ["INVERSION_PRIORS", "Prior", "TotalVariation", "Init", "Residual", "Progressive", "EarlyStop", "find",
           "settings_of", "resize"]
