"""The backend protocol: the only interface the knowledge-transfer algorithm uses.

A backend wraps one pretrained vision-language model (CLIP, MedCLIP, ViLT, CoCa, the phantom
model...) and exposes:

* ``encode_pixels(x)``: images in **[0, 1] pixel space**, shape ``(B, C, H, W)`` with
  ``C == image_channels`` and ``H == W == image_size`` -> embeddings ``(B, D)`` (not normalised).
  Normalisation (mean/std, grey->RGB repeat) happens inside, so inversion optimises pixels.
* ``tokenize(texts)`` -> a model-specific token object accepted by ``encode_text``.
* ``encode_text(tokens)`` -> ``(B, D)``.
* ``load_image(path_or_array)`` -> ``(C, H, W)`` float tensor in [0, 1] (the model's
  preprocessing: grey/RGB, pad/crop, resize).
* parameter groups for fine-tuning: ``visual_parameters()``, ``text_parameters()``.
* optional hooks: ``itm_logits(x, tokens)`` (2-way image-text matching, ViLT) and
  ``caption_loss(x, tokens)`` (CoCa); ``supports_itm`` / ``supports_captioning`` tell which.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


class Backend(nn.Module):
    """Base class of all backends. Subclasses set the attributes and implement the encoders."""

    #: registry family name, e.g. ``"open_clip"``
    family: str = "base"
    #: side of the square model input in pixels
    image_size: int = 224
    #: channels of the [0, 1] pixel tensor the backend takes (1 = grayscale model input)
    image_channels: int = 3
    #: per-channel mean/std applied inside ``encode_pixels`` (length ``model_channels``)
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    #: channels the wrapped network expects after normalisation (grey is repeated to this)
    model_channels: int = 3
    #: default dtype/device live on the parameters
    supports_itm: bool = False
    supports_captioning: bool = False
    #: ``encode_pixels`` also accepts sizes other than ``image_size`` (e.g. ViTs with interpolated
    #: position embeddings); progressive-resolution inversion then runs the model at each stage's size
    supports_any_resolution: bool = False

    # -- identification -------------------------------------------------------------------
    spec: str = ""

    # -- pixels ---------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] pixels ``(B, image_channels, H, W)`` -> normalised network input."""
        if x.dim() != 4:
            raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.model_channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.model_channels, -1, -1)
            else:
                raise ValueError(f"expected {self.image_channels} channel(s), got {x.shape[1]}")
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] pixels ``(B, C, H, W)`` -> image embeddings ``(B, D)``."""
        return self.encode_image(self.normalize(x))

    def load_image(self, image: Any) -> torch.Tensor:
        """A path, PIL image or array -> ``(image_channels, S, S)`` float tensor in [0, 1].

        Default: grey or RGB by ``image_channels``, pad to square, bicubic resize to ``image_size``.
        """
        from medkt.data.images import to_model_pixels

        return to_model_pixels(image, size=self.image_size, channels=self.image_channels)

    # -- to implement ---------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised network input ``(B, model_channels, S, S)`` -> ``(B, D)``."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> Any:
        raise NotImplementedError

    def encode_text(self, tokens: Any) -> torch.Tensor:
        """Tokens from :meth:`tokenize` -> ``(B, D)``."""
        raise NotImplementedError

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the visual encoder fine-tuned by knowledge transfer."""
        raise NotImplementedError

    def text_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp of the learned temperature (a scalar tensor); CLIP's default 100."""
        return torch.tensor(100.0)

    # -- optional hooks -------------------------------------------------------------------
    def itm_logits(self, x: torch.Tensor, tokens: Any) -> torch.Tensor:
        """[0,1] pixels + tokens (paired row by row) -> 2-way logits ``(B, 2)`` [no match, match]."""
        raise NotImplementedError(f"backend {self.family!r} has no image-text matching head")

    def caption_loss(self, x: torch.Tensor, tokens: Any) -> torch.Tensor:
        """Captioning (next-token) loss of the tokens given the [0,1] pixels."""
        raise NotImplementedError(f"backend {self.family!r} has no caption decoder")

    # -- helpers shared by all backends ---------------------------------------------------
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Normalised text embeddings ``(N, D)`` of raw strings, batched, without gradients."""
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                out.append(self.encode_text(self.tokenize(list(texts[i : i + batch_size]))).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def encode_images(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Normalised image embeddings ``(N, D)`` of [0,1] pixels ``(N, C, S, S)``, batched, without gradients."""
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                out.append(self.encode_pixels(x[i : i + batch_size]).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1) if out else torch.empty(0)

    def set_visual_trainable(self, trainable: bool = True) -> None:
        for p in self.visual_parameters():
            p.requires_grad_(trainable)

    def visual_state_dict(self) -> dict[str, torch.Tensor]:
        """Names -> tensors of the visual parameters (what fine-tuning changes)."""
        ids = {id(p) for p in self.visual_parameters()}
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if id(v) in ids}

    def describe(self) -> dict[str, Any]:
        n_vis = sum(p.numel() for p in self.visual_parameters())
        n_all = sum(p.numel() for p in self.parameters())
        return {
            "spec": self.spec,
            "family": self.family,
            "image_size": self.image_size,
            "image_channels": self.image_channels,
            "visual_parameters": n_vis,
            "parameters": n_all,
        }


def as_numpy_image(x: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` [0,1] tensor -> ``(H, W)`` or ``(H, W, 3)`` uint8 array."""
    arr = (x.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
