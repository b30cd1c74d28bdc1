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

A *vision split* tells M2IB how to cut a backend's image encoder. Splits are looked up in a small
registry by the class of a module inside the backend (open_clip ``VisionTransformer``, HF
``CLIPVisionTransformer``, HF ``SwinModel`` as used by MedCLIP); a backend can also define
``vision_split(layer) -> VisionSplit`` itself, and `register_vision_split` adds new ones.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medkt.errors import ConfigError
from medkt.validation import Range

Tensor = torch.Tensor


@dataclass
class VisionSplit:
    """An image encoder cut after block ``layer``.

    Attributes:
        prefix: normalised pixels ``(B, C, S, S)`` -> tokens ``(B, T, D)`` output by block ``layer``.
        suffix: tokens ``(B, T, D)`` -> image embedding ``(B, E)``, equal (up to scale) to the
            backend's ``encode_image``.
        grid: ``(rows, cols)`` of the spatial tokens.
        n_extra_tokens: leading non-spatial tokens (CLS) dropped from the map.
        hook_module: the block whose output is bottlenecked (the naive path hooks it).
        layer: the block index (0-based) and ``num_layers`` the number of blocks.
    """

    prefix: Callable[[Tensor], Tensor]
    suffix: Callable[[Tensor], Tensor]
    grid: tuple[int, int]
    n_extra_tokens: int
    hook_module: nn.Module
    layer: int
    num_layers: int
    description: str = ""


SplitFactory = Callable[[nn.Module, Any, "int | None"], VisionSplit]
# (class path "module:Class", factory); the class is imported lazily so optional libraries stay optional
_SPLITS: list[tuple[str, SplitFactory]] = []


def register_vision_split(class_path: str) -> Callable[[SplitFactory], SplitFactory]:
    """Decorator: ``@register_vision_split("pkg.module:Class") def make(encoder, backend, layer) -> VisionSplit``.

    ``encoder`` is the first module of that class found in the backend, ``layer`` the requested
    block (None = default depth). Later registrations take precedence.
    """

    def deco(fn: SplitFactory) -> SplitFactory:
        _SPLITS.insert(0, (class_path, fn))
        return fn

    return deco


def default_layer(num_layers: int) -> int:
    """Upstream uses block 9 of 12 (0-based); keep that relative depth for other encoders."""
    return max(0, round(num_layers * 10 / 12) - 1)


def check_layer(layer: int | None, num_layers: int, what: str) -> int:
    """Block index for M2IB in a tower of ``num_layers`` blocks: ``layer`` (negative counts from
    the end) or the upstream-like default depth; out of range is a ConfigError naming ``what``.
    Public for backends that provide their own `VisionSplit`."""
    if layer is None:
        return default_layer(num_layers)
    idx = layer + num_layers if layer < 0 else layer
    if not 0 <= idx < num_layers:
        raise ConfigError(f"M2IB layer {layer} is out of range for {what} with {num_layers} blocks (valid: 0..{num_layers - 1} or negative)")
    return idx


def _find_child_projection(backend: nn.Module, encoder: nn.Module) -> nn.Module | None:
    """The projection applied after ``encoder`` by its parent (HF CLIP ``visual_projection``, MedCLIP ``projection_head``)."""
    for parent in backend.modules():
        children = dict(parent.named_children())
        if any(c is encoder for c in children.values()):
            for name in ("visual_projection", "projection_head", "image_projection", "vision_proj", "proj"):
                mod = children.get(name)
                if isinstance(mod, nn.Module):
                    return mod
    return None


def _class_of(path: str) -> type | None:
    import importlib

    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def get_vision_split(backend: nn.Module, layer: int | None = None) -> VisionSplit:
    """The vision split of a backend at block ``layer`` (None = upstream-like default depth)."""
    from medkt.backends.base import VisionSplitProvider

    if isinstance(backend, VisionSplitProvider):
        return backend.vision_split(layer)
    modules = list(backend.modules())
    for class_path, factory in _SPLITS:
        cls = _class_of(class_path)
        if cls is None:
            continue
        for m in modules:
            if isinstance(m, cls):
                return factory(m, backend, layer)
    known = ", ".join(p for p, _ in _SPLITS)
    raise ConfigError(
        f"M2IB has no vision split for backend {getattr(backend, 'spec', '') or type(backend).__name__}: none of its "
        f"modules is one of [{known}]. Add one with medkt.segmentation.m2ib.register_vision_split or let the "
        "backend declare medkt.backends.base.VisionSplitProvider"
    )


# -- built-in splits -------------------------------------------------------------------------------


@register_vision_split("open_clip.transformer:VisionTransformer")
def _open_clip_vit(visual: nn.Module, backend: nn.Module, layer: int | None) -> VisionSplit:
    blocks = visual.transformer.resblocks
    L = check_layer(layer, len(blocks), "open_clip VisionTransformer")
    batch_first = getattr(visual.transformer, "batch_first", True)

    def run(x: Tensor, mods) -> Tensor:
        if not batch_first:
            x = x.transpose(0, 1).contiguous()
        for r in mods:
            x = r(x, attn_mask=None)
        return x if batch_first else x.transpose(0, 1)

    def prefix(pixels: Tensor) -> Tensor:
        return run(visual._embeds(pixels), blocks[: L + 1])

    def suffix(tokens: Tensor) -> Tensor:
        pooled, _ = visual._pool(run(tokens, blocks[L + 1 :]))
        return pooled @ visual.proj if visual.proj is not None else pooled

    gs = visual.grid_size
    if not batch_first:  # the hook sees (T, B, D); keep one layout for the bottleneck
        raise ConfigError("M2IB needs an open_clip VisionTransformer run batch-first (open_clip >= 2.24 default)")
    return VisionSplit(prefix, suffix, (int(gs[0]), int(gs[1])), 1, blocks[L], L, len(blocks), "open_clip ViT")


@register_vision_split("transformers.models.clip.modeling_clip:CLIPVisionTransformer")
def _hf_clip_vit(vm: nn.Module, backend: nn.Module, layer: int | None) -> VisionSplit:
    layers = vm.encoder.layers
    L = check_layer(layer, len(layers), "HF CLIPVisionTransformer")
    proj = _find_child_projection(backend, vm)

    def prefix(pixels: Tensor) -> Tensor:
        h = vm.pre_layrnorm(vm.embeddings(pixels))
        for lyr in layers[: L + 1]:
            h = lyr(h, None, None)[0]
        return h

    def suffix(tokens: Tensor) -> Tensor:
        h = tokens
        for lyr in layers[L + 1 :]:
            h = lyr(h, None, None)[0]
        pooled = vm.post_layernorm(h[:, 0, :])
        return proj(pooled) if proj is not None else pooled

    cfg = vm.config
    g = int(cfg.image_size) // int(cfg.patch_size)
    return VisionSplit(prefix, suffix, (g, g), 1, layers[L], L, len(layers), "HF CLIP ViT")


@register_vision_split("transformers.models.swin.modeling_swin:SwinModel")
def _hf_swin(sm: nn.Module, backend: nn.Module, layer: int | None) -> VisionSplit:
    """Swin (MedCLIP's vision tower): ``layer`` is a flat block index over all stages
    (swin-tiny: depths 2-2-6-2 -> 12 blocks, so layer 9 is the last block of stage 3 on a 14x14 grid)."""
    stages = sm.encoder.layers
    flat = [(s, b) for s, st in enumerate(stages) for b in range(len(st.blocks))]
    L = check_layer(layer, len(flat), "HF SwinModel")
    s_idx, b_idx = flat[L]
    proj = _find_child_projection(backend, sm)
    grid = tuple(int(v) for v in sm.embeddings.patch_grid)
    for _ in range(s_idx):
        grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)

    def prefix(pixels: Tensor) -> Tensor:
        h, dims = sm.embeddings(pixels)
        for st in stages[:s_idx]:
            out = st(h, dims)
            h, dims = out[0], (out[2][-2], out[2][-1])
        for blk in stages[s_idx].blocks[: b_idx + 1]:
            h = blk(h, dims)[0]
        return h

    def suffix(tokens: Tensor) -> Tensor:
        h, dims = tokens, grid
        st = stages[s_idx]
        for blk in st.blocks[b_idx + 1 :]:
            h = blk(h, dims)[0]
        if st.downsample is not None:
            h = st.downsample(h, dims)
            dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        for st in stages[s_idx + 1 :]:
            out = st(h, dims)
            h, dims = out[0], (out[2][-2], out[2][-1])
        seq = sm.layernorm(h)
        pooled = torch.flatten(sm.pooler(seq.transpose(1, 2)), 1) if sm.pooler is not None else seq.mean(1)
        return proj(pooled) if proj is not None else pooled

    return VisionSplit(prefix, suffix, grid, 0, stages[s_idx].blocks[b_idx], L, len(flat), "HF Swin")


@register_vision_split("open_clip.timm_model:TimmModel")
def _open_clip_timm_vit(tm: nn.Module, backend: nn.Module, layer: int | None) -> VisionSplit:
    """open_clip's timm adapter around a timm ``VisionTransformer`` (e.g. BiomedCLIP's ViT-B/16)."""
    trunk = tm.trunk
    if not all(hasattr(trunk, a) for a in ("blocks", "patch_embed", "_pos_embed", "forward_head")):
        raise ConfigError(f"M2IB supports open_clip timm towers that are ViTs; got {type(trunk).__name__}")
    blocks = trunk.blocks
    L = check_layer(layer, len(blocks), f"timm {type(trunk).__name__}")

    def prefix(pixels: Tensor) -> Tensor:
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixels))))
        for blk in blocks[: L + 1]:
            x = blk(x)
        return x

    def suffix(tokens: Tensor) -> Tensor:
        x = tokens
        for blk in blocks[L + 1 :]:
            x = blk(x)
        return tm.head(trunk.forward_head(trunk.norm(x)))

    gs = trunk.patch_embed.grid_size
    n_extra = int(trunk.num_prefix_tokens)  # CLS (+ register) tokens precede the patches
    return VisionSplit(prefix, suffix, (int(gs[0]), int(gs[1])), n_extra, blocks[L], L, len(blocks), "open_clip timm ViT")


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


@dataclass
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

        from medkt.validation import build, check_instance

        self.config = config or M2IBConfig()
        check_instance(self.config, "m2ib")
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
                f"{getattr(self.backend, 'spec', '')!r} (shapes {tuple(ref.shape)} vs {tuple(mine.shape)}); "
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
