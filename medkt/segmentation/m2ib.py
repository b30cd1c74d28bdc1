"""Multi-Modal Information Bottleneck (M2IB) saliency for any backend with a registered vision split.

M2IB (Wang et al., NeurIPS 2023; YingWANGG/M2IB) puts a bottleneck on the tokens ``X`` that one
block of the vision encoder outputs, ``(T, D)`` for ``T`` tokens of width ``D``:

    lambda = sigmoid(alpha)                     alpha: (1, T, D), initialised to 5 -> lambda ~ 0.9933
    Z      = lambda * X + (1 - lambda) * eps    eps ~ N(0, I), a batch of ``batch_size`` draws
    KL     = -1/2 (1 + log s2 - mu^2 - s2)      mu = lambda * X, s2 = (1 - lambda)^2   (per token x channel)
    loss   = beta * mean(KL) - cos(text_embedding, image_embedding(Z))

optimised over ``alpha`` with Adam (lr 1, 10 steps). The saliency is the KL of the last forward
pass summed over channels, averaged over the batch, with the non-spatial (CLS) tokens dropped,
reshaped to the patch grid, bilinearly upsampled and min-max normalised. As upstream, ``X`` is
not standardised (upstream's "var" hyper-parameter is unused there, so it does not exist here).

Two code paths give the same map for the same seed:

* ``cache_prefix=True`` (default): the frozen part of the encoder up to the bottleneck (the
  "prefix") runs once per image, the text embedding once per prompt; each step only runs the
  rest of the encoder (the "suffix") with the weights frozen.
* ``cache_prefix=False`` ("naive", what upstream does): every step runs the whole image encoder
  with a forward hook on the bottleneck block and re-encodes the prompt, with the backend's
  parameters left as they are (upstream back-propagates into all of them).

Both paths run each piece of the network on the same batch shape and in the same autograd mode,
so their floating-point results are identical, not merely close.

A *vision split* tells M2IB how to cut a backend's image encoder; splits are part of the backend
protocol (`medkt.backends.vision_split`, re-exported here).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medkt.backends.vision_split import (  # noqa: F401  (re-exported: the M2IB API names them)
    VISION_SPLITS,
    VisionSplit,
    check_layer,
    default_layer,
    get_vision_split,
    register_vision_split,
)
from medkt.errors import ConfigError
from medkt.config_model import Range, build, config_dataclass, recheck

Tensor = torch.Tensor


# -- the bottleneck ----------------------------------------------------------------------------------


class TokenBottleneck(nn.Module):
    """``Z = sigmoid(alpha) X + (1 - sigmoid(alpha)) eps`` with a per-(token, channel) ``alpha``.

    ``eps`` is drawn from ``generator`` at every call, so two runs with the same seed see the same
    noise. ``last_kl`` keeps the KL of the latest call, ``(B, T, D)``.
    """

    def __init__(self, n_tokens: int, width: int, alpha_init: float = 5.0, generator: torch.Generator | None = None):
        super().__init__()
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.full((1, n_tokens, width), self.alpha_init))
        self.generator = generator
        self.last_kl: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        lam = torch.sigmoid(self.alpha).expand(x.shape[0], -1, -1)
        mu = x * lam
        var = (1 - lam) ** 2
        self.last_kl = -0.5 * (1 + torch.log(var) - mu**2 - var)
        eps = torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device="cpu").to(x.device)
        return mu + (1 - lam) * eps


@config_dataclass
class M2IBConfig:
    """M2IB hyper-parameters (upstream defaults; MedCLIP-SAMv2 uses beta 1-2 and layers 7-9)."""

    layer: int | None = None  # vision block (negative counts from the end); None = upstream-like depth
    beta: Annotated[float, Range(ge=0)] = 0.1
    steps: Annotated[int, Range(ge=1)] = 10
    lr: Annotated[float, Range(ge=0)] = 1.0  # 0: no optimisation (the initial bottleneck)
    batch_size: Annotated[int, Range(ge=1)] = 10
    alpha_init: float = 5.0
    seed: int = 0
    cache_prefix: bool = True
    verify_split: bool = True


@dataclass
class SaliencyResult:
    """One M2IB explanation: the per-token KL map on the encoder's token grid and the loss of
    every optimisation step."""

    token_kl: np.ndarray  # (rows, cols) raw per-token KL (summed over channels, batch-averaged)
    losses: list[float] = field(default_factory=list)


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


@contextlib.contextmanager
def _no_grad_leak(module: nn.Module) -> Iterator[None]:
    """The naive path back-propagates into the backend's weights (as upstream); drop those grads after."""
    before = {id(p): p.grad for p in module.parameters()}
    try:
        yield
    finally:
        for p in module.parameters():
            p.grad = before.get(id(p))


class M2IB:
    """M2IB saliency maps of one backend.

    Example:

        m2ib = M2IB(backend, M2IBConfig(beta=1.0, layer=9))
        sal = m2ib.saliency(pixels01, "A breast ultrasound showing a dark, oval lesion", output_size=(H, W))
    """

    def __init__(self, backend: nn.Module, config: M2IBConfig | None = None, **overrides: Any):
        self.backend = backend
        from dataclasses import asdict

        self.config = config or M2IBConfig()
        recheck(self.config, "m2ib")
        if overrides:  # checked like a bundle's "m2ib" options (unknown keys, types, ranges)
            self.config = build(M2IBConfig, {**asdict(self.config), **overrides}, "m2ib")
        self.split = get_vision_split(backend, self.config.layer)
        self._text_cache: dict[str, Tensor] = {}
        self._verified = not self.config.verify_split

    # -- pieces -------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        """The model's device: images, noise and the bottleneck live there."""
        from medkt.device import module_device

        return module_device(self.backend)

    def _batch(self, pixels01: Tensor) -> Tensor:
        x = pixels01 if pixels01.dim() == 4 else pixels01[None]
        if x.shape[0] != 1:
            raise ConfigError(f"M2IB explains one image at a time, got a batch of {x.shape[0]}")
        x = self.backend.normalize(x.to(self._device(), torch.float32))
        return x.repeat(self.config.batch_size, 1, 1, 1)

    def _encode_prompt(self, tokens: Any) -> Tensor:
        """Text embedding of the batch of prompt copies, in the naive path's autograd mode."""
        return self.backend.encode_text(tokens).float()

    def _tokens(self, prompt: str) -> Any:
        tok = self.backend.tokenize([prompt] * self.config.batch_size)
        return tok

    def text_embedding(self, prompt: str) -> Tensor:
        """Cached ``(batch_size, E)`` text embedding of ``prompt`` (detached)."""
        if prompt not in self._text_cache:
            with torch.enable_grad():  # same kernels as the naive path, which runs with grad on
                self._text_cache[prompt] = self._encode_prompt(self._tokens(prompt)).detach()
        return self._text_cache[prompt]

    def prefix_tokens(self, xb: Tensor) -> Tensor:
        """Tokens ``(B, T, D)`` after the frozen encoder prefix (computed once per image, then
        only the suffix runs at every bottleneck step)."""
        with torch.enable_grad():  # same kernels as the naive path (e.g. PyTorch's MHA fast path is off there)
            return self.split.prefix(xb).detach()

    def verify(self, xb: Tensor) -> None:
        """Check once that prefix+suffix reproduces the backend's ``encode_image`` (cosine > 0.999)."""
        with torch.no_grad():
            ref = self.backend.encode_image(xb[:1]).float()
            mine = self.split.suffix(self.split.prefix(xb[:1])).float()
        if ref.shape != mine.shape or float(F.cosine_similarity(ref, mine).min()) < 0.999:
            raise ConfigError(
                f"the {self.split.description} vision split does not reproduce encode_image of backend "
                f"{self.backend.spec!r} (shapes {tuple(ref.shape)} vs {tuple(mine.shape)}); "
                "register a matching split with register_vision_split"
            )
        self._verified = True

    # -- main entry ---------------------------------------------------------------------------
    def explain(self, pixels01: Tensor, prompt: str, seed: int | None = None) -> SaliencyResult:
        """Per-token KL map of one ``(C, S, S)`` [0, 1] image for ``prompt`` (see `saliency`)."""
        cfg = self.config
        was_training = self.backend.training
        self.backend.eval()
        xb = self._batch(pixels01)
        if not self._verified:
            self.verify(xb)
        gen = torch.Generator().manual_seed(int(cfg.seed if seed is None else seed))
        try:
            if cfg.cache_prefix:
                kl, losses = self._run_cached(xb, prompt, gen)
            else:
                kl, losses = self._run_naive(xb, prompt, gen)
        finally:
            self.backend.train(was_training)
        token_kl = kl.mean(0).sum(-1)[self.split.n_extra_tokens :]  # (T_spatial,)
        rows, cols = self.split.grid
        if token_kl.numel() != rows * cols:
            raise ConfigError(f"{token_kl.numel()} spatial tokens do not fill the {rows}x{cols} grid of {self.split.description}")
        grid = token_kl.reshape(rows, cols).detach().float().cpu().numpy()
        return SaliencyResult(token_kl=grid, losses=losses)

    def saliency(
        self, pixels01: Tensor, prompt: str, output_size: tuple[int, int] | None = None, seed: int | None = None
    ) -> np.ndarray:
        """Saliency ``(H, W)`` in [0, 1] of one image ``(C, S, S)`` in [0, 1] for ``prompt``.

        The token map is bilinearly upsampled to ``output_size`` (default the model input size) and
        min-max normalised; a constant map becomes all zeros (with a warning).
        """
        res = self.explain(pixels01, prompt, seed=seed)
        size = output_size or tuple(pixels01.shape[-2:])
        return upsample_normalize(res.token_kl, size)

    def _run_cached(self, xb: Tensor, prompt: str, gen: torch.Generator) -> tuple[Tensor, list[float]]:
        cfg = self.config
        text = self.text_embedding(prompt)
        x_tokens = self.prefix_tokens(xb)
        bottleneck = TokenBottleneck(x_tokens.shape[1], x_tokens.shape[2], cfg.alpha_init, gen).to(xb.device)
        opt = torch.optim.Adam(bottleneck.parameters(), lr=cfg.lr)
        losses = []
        with _frozen(self.backend), torch.enable_grad():
            for _ in range(cfg.steps):
                opt.zero_grad()
                img = self.split.suffix(bottleneck(x_tokens)).float()
                loss = self._loss(bottleneck, text, img)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        return bottleneck.last_kl.detach(), losses

    def _run_naive(self, xb: Tensor, prompt: str, gen: torch.Generator) -> tuple[Tensor, list[float]]:
        cfg = self.config
        tokens = self._tokens(prompt)
        holder: dict[str, TokenBottleneck] = {}

        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if "b" not in holder:  # built lazily: the token shape is only known here
                t = output[0] if isinstance(output, tuple) else output
                holder["b"] = TokenBottleneck(t.shape[1], t.shape[2], cfg.alpha_init, gen).to(t.device)
                holder["opt"] = torch.optim.Adam(holder["b"].parameters(), lr=cfg.lr)
            if isinstance(output, tuple):
                return (holder["b"](output[0]), *output[1:])
            return holder["b"](output)

        handle = self.split.hook_module.register_forward_hook(hook)
        losses = []
        try:
            with _no_grad_leak(self.backend), torch.enable_grad():
                for _ in range(cfg.steps):
                    if "opt" in holder:
                        holder["opt"].zero_grad()
                    text = self._encode_prompt(tokens)
                    img = self.backend.encode_image(xb).float()
                    loss = self._loss(holder["b"], text, img)
                    loss.backward()
                    holder["opt"].step()
                    losses.append(float(loss.detach()))
        finally:
            handle.remove()
        return holder["b"].last_kl.detach(), losses

    def _loss(self, bottleneck: TokenBottleneck, text: Tensor, img: Tensor) -> Tensor:
        compression = bottleneck.last_kl.mean()
        fitting = F.cosine_similarity(text, img, dim=-1, eps=1e-6).mean()
        return self.config.beta * compression - fitting


def upsample_normalize(token_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(rows, cols)`` map -> bilinear ``size`` -> min-max [0, 1] (all zeros if constant)."""
    t = torch.as_tensor(np.asarray(token_map, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[0, 0].numpy()
    up = np.nan_to_num(up, nan=0.0)
    lo, hi = float(up.min()), float(up.max())
    if not hi > lo:
        warnings.warn("M2IB saliency is constant; returning zeros", RuntimeWarning, stacklevel=2)
        return np.zeros_like(up)
    return (up - lo) / (hi - lo)
