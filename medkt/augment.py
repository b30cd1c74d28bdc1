"""Differentiable augmentation used during inversion.

Random affine (rotation, translation, isotropic scale) applied per sample with probability ``p``
through ``affine_grid`` + ``grid_sample``: gradients flow to the image, the parameters are drawn
from an explicit generator so a run is reproducible (and resumable) from its seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AffineAugment:
    """Random affine: rotation in [-rotate_deg, rotate_deg], translation up to ``translate`` of the
    image side, scale in ``scale``; each sample transformed with probability ``p``."""

    p: float = 0.5
    rotate_deg: float = 30.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.7, 1.0)
    padding_mode: str = "border"

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


def total_variation(x: torch.Tensor, diagonals: bool = False) -> torch.Tensor:
    """Anisotropic L1 total variation per image: ``(B, C, H, W)`` -> ``(B,)``, mean absolute
    difference of neighbouring pixels (optionally also along both diagonals, as Kazemi et al.)."""
    tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3)) + (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    if diagonals:
        tv = tv + (x[..., 1:, 1:] - x[..., :-1, :-1]).abs().mean(dim=(1, 2, 3))
        tv = tv + (x[..., 1:, :-1] - x[..., :-1, 1:]).abs().mean(dim=(1, 2, 3))
    return tv
