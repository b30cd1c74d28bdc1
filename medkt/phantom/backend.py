"""Phantom backend: the small CLIP-style model medkt pretrains on its phantom world and ships.

Specs: ``phantom:base`` (the shipped checkpoint, ``medkt/assets/phantom/phantom_clip.safetensors``),
``phantom:base@/path/to/checkpoint.safetensors`` (or a folder holding one) and
``phantom:base@random`` / ``phantom:tiny@random`` (random initialisation, for tests).

The family is registered in `medkt.backends.BACKENDS` when this module is imported, which
the registry does on the first lookup of ``phantom`` (entry-point group ``medkt.backends``): the
backend layer does not import the phantom world.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from medkt.backends import register_backend
from medkt.backends.base import Backend, FeatureBlocks, ImageTextEmbedder, VisionSplitProvider
from medkt.errors import ConfigError, unknown_name

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "phantom"
DEFAULT_CHECKPOINT = ASSET_DIR / "phantom_clip.safetensors"

ARCHITECTURES = {
    "base": {},
    # a very small variant for fast tests
    "tiny": {"widths": (8, 16, 16, 32), "text_width": 32, "text_layers": 1, "text_heads": 2, "token_dim": 16,
             "embed_dim": 32},
}


class PhantomBackend(Backend, ImageTextEmbedder, VisionSplitProvider, FeatureBlocks):
    """The phantom CLIP model (grey 1-channel input) behind the backend protocol, with its own
    vision split for M2IB and its residual blocks as feature blocks."""

    family = "phantom"
    image_channels = 1
    model_channels = 1

    def __init__(self, model, info: dict | None = None):
        super().__init__()
        self.model = model
        self.info = info or {}
        cfg = model.cfg
        self.image_size = cfg.image_size
        self.mean = (cfg.mean,)
        self.std = (cfg.std,)
        self.context_length = cfg.context_length

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.visual(pixel_values)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        from medkt.phantom.model import tokenize

        return tokenize(list(texts), self.context_length).to(self.model.logit_scale.device)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text(tokens)

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.visual.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.text.parameters()

    def token_embedding(self) -> nn.Embedding:
        return self.model.text.token

    def feature_modules(self) -> list[nn.Module]:
        """The CNN's residual blocks (feature maps ``(B, C, h, w)``)."""
        return list(self.model.visual.blocks)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp().clamp(max=100.0)

    def vision_split(self, layer: int | None = None):
        """The CNN cut after residual block ``layer`` as a token model (for M2IB saliency).

        The feature map ``(B, C, h, w)`` is presented as ``(B, h*w, C)`` tokens (no CLS token).
        Default layer 1: a 16x16 grid at 64 px input, fine enough for 3-px nodules.
        """
        from medkt.backends.vision_split import VisionSplit, check_layer

        vis = self.model.visual
        n = len(vis.blocks)
        L = check_layer(1 if layer is None else layer, n, "phantom CNN")
        with torch.no_grad():
            probe = vis.features(torch.zeros(1, 1, self.image_size, self.image_size, device=self.device))[L + 1]
        c, h, w = probe.shape[1:]

        def prefix(pixels: torch.Tensor) -> torch.Tensor:
            f = vis.stem(pixels)
            for blk in vis.blocks[: L + 1]:
                f = blk(f)
            return f.flatten(2).transpose(1, 2)

        def suffix(tokens: torch.Tensor) -> torch.Tensor:
            f = tokens.transpose(1, 2).reshape(tokens.shape[0], c, h, w)
            for blk in vis.blocks[L + 1 :]:
                f = blk(f)
            return vis.head(f)

        return VisionSplit(prefix, suffix, (int(h), int(w)), 0, vis.blocks[L], L, n, "phantom CNN")


@register_backend("phantom")
def create(architecture: str = "base", weights: str | None = None, **kw) -> PhantomBackend:
    """Build the phantom backend; ``weights`` None -> shipped checkpoint, ``random`` -> random init."""
    from medkt.phantom.model import PhantomCLIP, PhantomCLIPConfig, load_checkpoint
    from medkt.weights import resolve_weights

    if architecture not in ARCHITECTURES:
        raise unknown_name("phantom architecture", architecture, list(ARCHITECTURES))
    if weights == "random":
        seed = int(kw.pop("seed", 0))
        torch.manual_seed(seed)
        cfg = PhantomCLIPConfig(**{**ARCHITECTURES[architecture], **kw})
        return PhantomBackend(PhantomCLIP(cfg), {"weights": "random", "seed": seed})
    if kw:
        raise ConfigError(f"phantom backend: unexpected options {sorted(kw)} with pretrained weights")
    path = resolve_weights(
        str(weights) if weights else str(DEFAULT_CHECKPOINT),
        what="the phantom CLIP model",
        how_to_get="Retrain it with 'python -m medkt.phantom.pretrain --config "
        "medkt/assets/phantom/pretrain_config.json --out medkt/assets/phantom/phantom_clip.safetensors'",
        filenames=("phantom_clip.safetensors",),
    )
    model, side = load_checkpoint(path)
    return PhantomBackend(model, {"weights": str(path), **{k: v for k, v in side.items() if k != "config"}})
