"""Differentiable augmentations used during inversion, registered in `INVERSION_AUGMENTATIONS`.

An augmentation is anything with ``__call__(x (B, C, H, W), generator) -> (B, C, H, W)``,
differentiable w.r.t. ``x``, drawing its random numbers from ``generator`` (a seeded CPU
generator, so a run is reproducible and resumable from its seed, on every device). Its settings
are its dataclass fields; a config lists them in order, e.g.
``"augmentations": [{"name": "affine", "p": 0.5}, {"name": "blur", "sigma": 1.0}]``.

* ``"affine"``: the paper's random affine (rotation, translation, isotropic scale) applied per
  sample with probability ``p`` through ``affine_grid`` + ``grid_sample``.
* ``"blur"`` / ``"noise"``: acquisition-like degradations (Gaussian blur with sigma drawn in
  [0, ``sigma``] px; additive noise with std drawn in [0, ``std``]), so the synthesised content
  must survive what real scans do to it.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Protocol

import torch
import torch.nn.functional as F

from medkt.config_model import Range, config_dataclass
from medkt.errors import ConfigError
from medkt.registry import Registry


class Augmentation(Protocol):
    """The interface of an inversion augmentation (see the module docstring)."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


#: inversion augmentations by config name; a class whose dataclass fields are its settings
INVERSION_AUGMENTATIONS: Registry[type] = Registry("inversion augmentation", group="medkt.inversion_augmentations")


@INVERSION_AUGMENTATIONS.register("affine")
@config_dataclass
class AffineAugment:
    """Random affine: rotation in [-rotate_deg, rotate_deg], translation up to ``translate`` of the
    image side, scale in ``scale``; each sample transformed with probability ``p``."""

    p: Annotated[float, Range(0, 1)] = 0.5
    rotate_deg: Annotated[float, Range(0, 180)] = 30.0
    translate: Annotated[float, Range(0, 1)] = 0.1  # fraction of the image side
    scale: tuple[float, float] = (0.7, 1.0)
    padding_mode: Literal["border", "zeros", "reflection"] = "border"

    def validate(self, path: str = "affine") -> None:
        """``scale`` is [min, max] with 0 < min <= max."""
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(f"{path}#scale = {list(self.scale)}: expected [min, max] with 0 < min <= max",
                              key=f"{path}#scale")

    def sample_matrices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n, 2, 3)`` affine matrices in normalised coordinates (identity where not applied)."""
        u = torch.rand(n, 5, generator=generator)
        apply = u[:, 0] < self.p
        angle = (u[:, 1] * 2 - 1) * math.radians(self.rotate_deg)
        lo, hi = self.scale
        s = lo + u[:, 2] * (hi - lo)
        # normalised coords span [-1, 1] (= 2 units per side), so a shift of t*side is 2t
        tx, ty = (u[:, 3] * 2 - 1) * 2 * self.translate, (u[:, 4] * 2 - 1) * 2 * self.translate
        # grid_sample maps output coords to input coords: zoom in by 1/s shows a scaled-up image
        # for s<1; use s directly so scale<1 shrinks the content as torchvision's RandomAffine.
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        mat = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3)
        return torch.where(apply[:, None, None], mat, eye)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x`` (B, C, H, W) -> augmented (B, C, H, W), differentiable w.r.t. ``x``."""
        if self.p <= 0:
            return x
        mats = self.sample_matrices(x.shape[0], generator).to(dtype=x.dtype, device=x.device)
        grid = F.affine_grid(mats, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)


@INVERSION_AUGMENTATIONS.register("blur")
@config_dataclass
class Blur:
    """Gaussian blur per sample, sigma drawn uniformly in [0, ``sigma``] px (separable, replicate-padded)."""

    sigma: Annotated[float, Range(gt=0)] = 1.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x`` (B, C, H, W) -> blurred, one kernel per sample."""
        # hand-written: MONAI's GaussianSmooth takes one sigma per call, here each sample has its own
        sig = torch.rand(x.shape[0], generator=generator) * self.sigma
        r = max(1, int(math.ceil(2.5 * self.sigma)))
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * sig.clamp_min(1e-3)[:, None].to(x.dtype) ** 2))
        k = (k / k.sum(1, keepdim=True)).to(x.device)  # (B, K) separable kernels, one per sample
        B, C, H, W = x.shape
        xp = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="replicate")
        kk = k.repeat_interleave(C, 0)
        xp = F.conv2d(xp, kk[:, None, None, :], groups=B * C)
        return F.conv2d(xp, kk[:, None, :, None], groups=B * C).reshape(B, C, H, W)


@INVERSION_AUGMENTATIONS.register("noise")
@config_dataclass
class Noise:
    """Additive Gaussian noise per sample, std drawn uniformly in [0, ``std``] (pixel units)."""

    std: Annotated[float, Range(gt=0)] = 0.05

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x`` (B, C, H, W) -> ``x`` + noise (drawn on the CPU, moved to ``x``'s device)."""
        std = torch.rand(x.shape[0], 1, 1, 1, generator=generator) * self.std
        return x + std.to(x.device, x.dtype) * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)


def total_variation(x: torch.Tensor, diagonals: bool = False) -> torch.Tensor:
    """Anisotropic L1 total variation per image: ``(B, C, H, W)`` -> ``(B,)``, mean absolute
    difference of neighbouring pixels (optionally also along both diagonals, as Kazemi et al.)."""
    tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3)) + (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    if diagonals:
        tv = tv + (x[..., 1:, 1:] - x[..., :-1, :-1]).abs().mean(dim=(1, 2, 3))
        tv = tv + (x[..., 1:, :-1] - x[..., :-1, 1:]).abs().mean(dim=(1, 2, 3))
    return tv
