"""Partial-layer inversion (paper Eq. 4, §7.1.1): invert only the top ``k`` blocks of the visual encoder.

Full inversion optimises pixels through the whole encoder, and small encoders are easily fooled
by pixel patterns no real image has. Here the visual encoder is cut before its top ``k`` blocks
(`split_top`); the representation ``h`` entering them — tokens ``(B, T, D)``, for a CNN the
feature map as ``h*w`` tokens of ``C`` channels — is optimised instead, starting from the features
of normal images of the domain:

    h* = argmin_h  -cos(top(h), f_T(description))  +  lambda * stats(h, real)

where ``stats`` (style-transfer-like) keeps the per-channel mean and standard deviation over
tokens (``"meanstd"``) or the channel Gram matrix (``"gram"``) of ``h`` close to those of real
images' features, so ``h`` stays a representation the bottom blocks could produce. Fine-tuning
then trains only the top ``k`` blocks on ``(h*, caption)`` with the ordinary engine
(`medkt.finetune.finetune` on a `FeatureBackend`, so replay, distillation, LoRA and
WiSE-FT all apply); the bottom blocks never change.

Works for every backend with a vision split (`medkt.backends.vision_split.get_vision_split`:
the phantom CNN, open_clip ViTs, HF CLIP ViTs).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medkt.backends.base import Backend, ImageTextEmbedder
from medkt.errors import ConfigError
from medkt.config_model import Range, build, config_dataclass, recheck


@config_dataclass
class PartialInversionConfig:
    """Settings of `invert_features` (the ``partial`` section of a phantom recipe)."""

    top_blocks: Annotated[int, Range(ge=1)] = 2  # k: blocks above the optimised representation (the ones fine-tuned)
    steps: Annotated[int, Range(ge=1)] = 200
    lr: Annotated[float, Range(gt=0)] = 0.05  # Adam step on h, relative to the features' scale (h is optimised as h0 + s * delta)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    stat: Literal["meanstd", "gram"] = "meanstd"  # which statistics of real features h must keep
    stat_weight: Annotated[float, Range(ge=0)] = 1.0
    noise_std: Annotated[float, Range(ge=0)] = 0.0  # Gaussian noise on h per step (relative to the features' scale): robustness
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | "PartialInversionConfig" | None,
                  path: str = "partial") -> "PartialInversionConfig":
        """Checked by `medkt.config_model` (types, ranges, choices: the annotations above)."""
        if isinstance(d, PartialInversionConfig):
            d.validate(path)
            return d
        return build(cls, d, path, what="partial-inversion")

    def validate(self, path: str = "partial") -> None:
        """Check every field again (code may have set one): its declared type and range
        (`ConfigError` names ``path#field``)."""
        recheck(self, path)


@dataclass
class TopSplit:
    """The visual encoder cut before its top ``top_blocks`` blocks.

    ``bottom``: [0, 1] pixels -> tokens ``(B, T, D)`` (normalisation inside; frozen);
    ``top``: tokens -> image embedding; ``top_parameters``: the parameters ``top`` uses.
    """

    bottom: Any
    top: Any
    top_parameters: list[nn.Parameter]
    layer: int
    num_layers: int

    @torch.no_grad()
    def features(self, backend: Backend, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Tokens of ``images`` ``(N, C, S, S)`` [0, 1] -> ``(N, T, D)`` (no gradients)."""
        was = backend.training
        backend.eval()
        try:
            return torch.cat([self.bottom(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)])
        finally:
            backend.train(was)


def split_top(backend: Backend, top_blocks: int) -> TopSplit:
    """Cut ``backend``'s visual encoder before its last ``top_blocks`` blocks (see `TopSplit`)."""
    from medkt.backends.vision_split import get_vision_split

    probe_split = get_vision_split(backend, 0)
    n = probe_split.num_layers
    if not 1 <= top_blocks < n:
        raise ConfigError(f"top_blocks must be between 1 and {n - 1} (the encoder has {n} blocks), got {top_blocks}")
    sp = get_vision_split(backend, n - top_blocks - 1)

    def bottom(pixels: torch.Tensor) -> torch.Tensor:
        return sp.prefix(backend.normalize(pixels))

    # the parameters the top uses, found by autograd (works for any architecture)
    visual = list(backend.visual_parameters())
    x = torch.rand(1, backend.image_channels, backend.image_size, backend.image_size, device=backend.device)
    with torch.no_grad():
        h = bottom(x)
    h.requires_grad_(True)
    req = [p.requires_grad for p in visual]
    for p in visual:
        p.requires_grad_(True)
    try:
        grads = torch.autograd.grad(sp.suffix(h).float().sum(), visual, allow_unused=True)
    finally:
        for p, r in zip(visual, req):
            p.requires_grad_(r)
    top_params = [p for p, g in zip(visual, grads) if g is not None]
    return TopSplit(bottom, sp.suffix, top_params, sp.layer, n)


def feature_statistics(h: torch.Tensor, stat: str = "meanstd") -> tuple[torch.Tensor, ...]:
    """Per-image statistics of tokens ``(B, T, D)`` over tokens: ``(mean, std)`` ``(B, D)`` each, or
    the channel Gram matrix ``(B, D, D)`` (normalised by T)."""
    if stat == "gram":
        return (h.transpose(1, 2) @ h / h.shape[1],)
    return h.mean(1), h.std(1)


def statistics_loss(h: torch.Tensor, reference: tuple[torch.Tensor, ...], stat: str = "meanstd") -> torch.Tensor:
    """Mean squared distance of ``h``'s per-image statistics to the reference (mean over real images),
    divided by the reference's mean square so the weight is scale-free. ``(B,)``"""
    out = 0.0
    for s, r in zip(feature_statistics(h, stat), reference):
        d = (s - r.unsqueeze(0)).pow(2).flatten(1).mean(1)
        out = out + d / r.pow(2).mean().clamp(min=1e-8)
    return out


@dataclass
class FeatureInversionResult:
    """What `invert_features` returns: the optimised representations and their text similarity."""

    features: torch.Tensor  # (N, T, D) optimised representations entering the top blocks
    start_features: torch.Tensor  # (N, T, D) the normal images' features they started from
    similarities: list[float]  # final cosine to the text
    start_similarities: list[float]
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # mean cosine every 10 steps


def invert_features(
    backend: Backend,
    split: TopSplit,
    text: str,
    init_images: torch.Tensor,
    config: PartialInversionConfig | dict | None = None,
    reference_images: torch.Tensor | None = None,
) -> FeatureInversionResult:
    """Optimise the representation entering the top blocks toward ``text`` (paper Eq. 4).

    Args:
        init_images: ``(N, C, S, S)`` [0, 1] images whose features are the starting points (one
            result per image), e.g. normal scans of the domain.
        reference_images: real images whose feature statistics ``h`` must keep (default:
            ``init_images``).
    """
    cfg = PartialInversionConfig.from_dict(config)
    start = time.perf_counter()
    h0 = split.features(backend, init_images)
    ref_h = h0 if reference_images is None else split.features(backend, reference_images)
    reference = tuple(s.mean(0) for s in feature_statistics(ref_h, cfg.stat))
    scale = ref_h.std().clamp(min=1e-6)
    text_emb = backend.encode_texts([text]).to(h0.device)
    requires = [p.requires_grad for p in backend.parameters()]
    for p in backend.parameters():
        p.requires_grad_(False)
    was = backend.training
    backend.eval()
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    delta = torch.zeros_like(h0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    history: list[float] = []

    def cos(h: torch.Tensor) -> torch.Tensor:
        return (F.normalize(split.top(h).float(), dim=-1) * text_emb).sum(-1)

    try:
        with torch.no_grad():
            start_sim = cos(h0)
        for step in range(cfg.steps):
            if cfg.lr_schedule == "cosine":
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            h = h0 + scale * delta
            hin = h + cfg.noise_std * scale * torch.randn(h.shape, generator=gen).to(h) if cfg.noise_std else h
            sim = cos(hin)
            loss = (-sim + cfg.stat_weight * statistics_loss(h, reference, cfg.stat)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 10 == 0:
                history.append(float(sim.detach().mean()))
        with torch.no_grad():
            h = h0 + scale * delta
            final = cos(h)
    finally:
        for p, r in zip(backend.parameters(), requires):
            p.requires_grad_(r)
        backend.train(was)
    return FeatureInversionResult(h.detach(), h0, final.tolist(), start_sim.tolist(), time.perf_counter() - start,
                                  history)


class FeatureBackend(Backend, ImageTextEmbedder):
    """``backend`` seen from the cut: ``encode_pixels`` takes the tokens entering the top blocks.

    Its visual parameters are the top blocks' only, so `medkt.finetune.finetune` (with
    replay, distillation, LoRA, WiSE-FT) trains the top blocks of ``backend`` in place on
    features; the text side is ``backend``'s own.
    """

    def __init__(self, backend: Backend, split: TopSplit):
        super().__init__()
        self.inner = backend
        self.split = split
        self.family = backend.family
        self.spec = f"{backend.spec}#top{split.num_layers - split.layer - 1}"
        self.precision = backend.precision

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens entering the top blocks ``(B, T, D)`` -> image embeddings ``(B, E)``."""
        return self.split.top(x)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The engine's image input here is already features: no pixel normalisation."""
        return self.encode_image(x)

    def tokenize(self, texts: Sequence[str]) -> Any:
        return self.inner.tokenize(texts)

    def encode_text(self, tokens: Any) -> torch.Tensor:
        return self.inner.encode_text(tokens)

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.split.top_parameters)

    def text_parameters(self) -> Iterator[nn.Parameter]:
        return self.inner.text_parameters()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.inner.logit_scale
