"""The backend protocol: the only interface the knowledge-transfer algorithm uses.

A backend wraps one pretrained vision-language model (CLIP, MedCLIP, ViLT, CoCa, the phantom
model...). Every backend is a `Backend`:

* ``load_image(path_or_array)`` -> ``(C, H, W)`` float tensor in [0, 1] (the model family's own
  preprocessing: grey/RGB, resize, crop); ``normalize`` applies mean/std inside the model call, so
  inversion optimises [0, 1] pixels;
* ``tokenize(texts)`` -> a model-specific token object;
* parameter groups for fine-tuning: ``visual_parameters()``, ``text_parameters()``;
* ``device`` / ``precision`` / ``autocast()`` (see `medkt.device`).

What else a backend can do it *declares* by inheriting capability interfaces; the engine asks
``isinstance(backend, Capability)``, never ``hasattr``:

* `ImageTextEmbedder` (CLIP-like two-tower models: CLIP, MedCLIP, BiomedCLIP, CoCa, the
  phantom model): ``encode_pixels(x)`` on [0, 1] pixels ``(B, C, S, S)`` -> ``(B, D)``,
  ``encode_text(tokens)`` -> ``(B, D)``, ``logit_scale``. Needed by the cosine inversion
  objective, InfoNCE and embedding zero-shot.
* `AnyResolution`: ``encode_pixels`` also takes sizes other than ``image_size`` (ViTs with
  interpolated position embeddings); progressive-resolution inversion then runs the model at
  each stage's size.
* `ImageTextMatcher` (ViLT): ``itm_logits``, ``embed_image`` + ``itm_logits_from_embeds``
  (image tokens computed once, reused for many texts), ``load_image_native``,
  ``match_probability``.
* `Captioner` (CoCa): ``caption``, ``caption_loss``, ``caption_logits``, ``image_tokens``,
  ``decoder_parameters``, ``pad_id``.
* `MaskedLanguageModel` (ViLT): ``mlm_loss``, ``mlm_probability``, ``tokenizer``.
* `VisionSplitProvider`: ``vision_split(layer)``, the encoder split M2IB needs, for models
  whose vision tower is not one of the architectures `medkt.backends.vision_split` knows.
* `FeatureBlocks`: ``feature_modules()``, the image tower's blocks in forward order, whose
  outputs `capture_features` records (the ``feature_stats`` inversion prior).
"""
from __future__ import annotations

import abc
import contextlib
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

    # -- identification -------------------------------------------------------------------
    spec: str = ""

    # -- device and precision (see medkt.device) --------------------------------------------
    #: precision of the forward passes run under `autocast`: "fp32" | "bf16" | "fp16"
    #: (set by ``create_backend(..., precision=)``; parameters always stay fp32)
    precision: str = "fp32"

    @property
    def device(self) -> torch.device:
        """Device of the model (its first parameter or buffer); every engine tensor goes here."""
        from medkt.device import module_device

        return module_device(self)

    def autocast(self):
        """Context manager running forward passes in `precision` on `device` (fp32: no-op)."""
        from medkt.device import autocast

        return autocast(self.device, self.precision)

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

    def load_image(self, image: Any) -> torch.Tensor:
        """A path, PIL image or array -> ``(image_channels, S, S)`` float tensor in [0, 1].

        Default: grey or RGB by ``image_channels``, pad to square, bicubic resize to ``image_size``.
        """
        from medkt.data.images import to_model_pixels

        return to_model_pixels(image, size=self.image_size, channels=self.image_channels)

    # -- to implement ---------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Any:
        """``B`` texts -> what `encode_text` takes (a tensor or dict of tensors) on `device`."""
        raise NotImplementedError

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the visual encoder fine-tuned by knowledge transfer."""
        raise NotImplementedError

    def text_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the text encoder (trained only when fine-tuning unfreezes the text side)."""
        raise NotImplementedError

    def token_embedding(self) -> nn.Embedding:
        """The text tower's input token embedding (``finetune.train = "concept_tokens"``)."""
        from medkt.errors import ConfigError

        raise ConfigError(f"backend family {self.family!r} does not expose its token embedding, so "
                          f"finetune.train='concept_tokens' is not available for it; use train='visual'")

    # -- helpers shared by all backends ---------------------------------------------------
    def set_visual_trainable(self, trainable: bool = True) -> None:
        """Set ``requires_grad`` on every parameter of `visual_parameters`."""
        for p in self.visual_parameters():
            p.requires_grad_(trainable)

    def visual_state_dict(self) -> dict[str, torch.Tensor]:
        """Names -> tensors of the visual parameters (what fine-tuning changes)."""
        ids = {id(p) for p in self.visual_parameters()}
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if id(v) in ids}

    def describe(self) -> dict[str, Any]:
        """Summary for logs: spec, family, image size/channels and parameter counts (visual, total)."""
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


class ImageTextEmbedder(abc.ABC):
    """Capability: two-tower image and text embeddings in one space (CLIP-like models).

    Single-stream models (ViLT) do not have it; they score pairs with `ImageTextMatcher`.
    """

    @abc.abstractmethod
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised network input ``(B, model_channels, S, S)`` -> ``(B, D)``."""

    @abc.abstractmethod
    def encode_text(self, tokens: Any) -> torch.Tensor:
        """Tokens from ``tokenize`` -> ``(B, D)``."""

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp of the learned temperature (a scalar tensor); CLIP's default 100."""
        return torch.tensor(100.0)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] pixels ``(B, C, H, W)`` -> image embeddings ``(B, D)``."""
        return self.encode_image(self.normalize(x))

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
                out.append(self.encode_pixels(x[i : i + batch_size].to(self.device)).float())  # batch by batch
        return torch.nn.functional.normalize(torch.cat(out), dim=-1) if out else torch.empty(0)


class AnyResolution(abc.ABC):
    """Capability: `ImageTextEmbedder.encode_pixels` takes sizes other than ``image_size``.

    Declared by backends whose ViT can interpolate its position embeddings
    (`medkt.backends.vit_fastpath`); whether this model's tower can is known only once it is
    built (and ``MEDKT_FAST_PATHS=0`` switches it off), hence the method.
    """

    @abc.abstractmethod
    def accepts_any_size(self) -> bool:
        """True when ``encode_pixels`` runs at any input size for this model."""


class ImageTextMatcher(abc.ABC):
    """Capability: a 2-way image-text matching head (ViLT). Pixels are [0, 1]."""

    @abc.abstractmethod
    def itm_logits(self, x: torch.Tensor, tokens: Any) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` + tokens (row-paired; a side of 1 broadcasts) -> ``(B, 2)``
        logits ``[no match, match]``."""

    @abc.abstractmethod
    def embed_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels ``(B, 3, H, W)`` -> image tokens ``(B, T, H)`` and their mask ``(B, T)``,
        reusable with `itm_logits_from_embeds` for many texts."""

    @abc.abstractmethod
    def itm_logits_from_embeds(self, image_embeds: torch.Tensor, image_masks: torch.Tensor, tokens: Any) -> torch.Tensor:
        """`itm_logits` from `embed_image` outputs -> ``(B, 2)``."""

    def load_image_native(self, image: Any) -> torch.Tensor:
        """The model's own variable-size preprocessing -> ``(3, H, W)`` [0, 1] (default: ``load_image``)."""
        return self.load_image(image)

    @torch.no_grad()
    def match_probability(self, images: torch.Tensor, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """"Match" probability of each image ``(N, 3, S, S)`` with its row's text -> ``(N,)`` (CPU)."""
        out = []
        with self.autocast():
            for i in range(0, len(images), batch_size):
                x = images[i : i + batch_size].to(self.device)
                logits = self.itm_logits(x, self.tokenize(list(texts[i : i + batch_size])))
                out.append(logits.float().softmax(-1)[:, 1].cpu())
        return torch.cat(out) if out else torch.zeros(0)


class Captioner(abc.ABC):
    """Capability: an autoregressive caption decoder (CoCa). Pixels are [0, 1]."""

    #: token id of padding, ignored by the caption loss
    pad_id: int = 0

    @abc.abstractmethod
    def caption(self, x: torch.Tensor, **generation: Any) -> list[str]:
        """Pixels ``(B, 3, S, S)`` -> one generated caption per image."""

    @abc.abstractmethod
    def caption_loss(self, x: torch.Tensor, tokens: Any) -> torch.Tensor:
        """Next-token cross-entropy of ``tokens`` given the pixels (scalar)."""

    @abc.abstractmethod
    def image_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels -> (normalised image embedding ``(B, D)``, decoder image tokens ``(B, T, H)``)."""

    @abc.abstractmethod
    def caption_logits(self, x: torch.Tensor | None, tokens: Any,
                       image_embs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder logits ``(B, T-1, V)`` and their labels ``(B, T-1)`` for pixels
        ``x`` (or precomputed ``image_embs`` from `image_tokens`)."""

    @abc.abstractmethod
    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the caption decoder (trained with ``finetune.train="visual+decoder"``)."""


class MaskedLanguageModel(abc.ABC):
    """Capability: masked-language modelling conditioned on the image (ViLT)."""

    #: fraction of text tokens masked for the MLM loss
    mlm_probability: float = 0.15
    #: the Hugging Face tokenizer whose word boundaries whole-word masking follows
    tokenizer: Any = None

    @abc.abstractmethod
    def mlm_loss(self, x: torch.Tensor, tokens: Any, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over masked positions; ``labels`` ``(B, L)`` hold -100 elsewhere."""


class VisionSplitProvider(abc.ABC):
    """Capability: the vision-encoder split M2IB needs (for towers M2IB does not know)."""

    @abc.abstractmethod
    def vision_split(self, layer: int | None = None) -> Any:
        """A `medkt.backends.vision_split.VisionSplit` at ``layer`` (None = the default)."""


class FeatureBlocks(abc.ABC):
    """Capability: the image tower's blocks, whose outputs are its intermediate features.

    Each block's output (or the first element of a tuple output) is either tokens
    ``(B, T, D)`` (ViT, Swin) or feature maps ``(B, C, h, w)`` (CNN stages); read them with
    `capture_features`. Declared by the phantom CNN, open_clip (ViT resblocks, timm trunk blocks,
    ResNet stages), BiomedCLIP, CoCa, MedCLIP (Swin blocks) and HF CLIP.
    """

    @abc.abstractmethod
    def feature_modules(self) -> list[nn.Module]:
        """The image tower's blocks in forward order (a `ConfigError` if this tower's are unknown)."""


def resolve_blocks(blocks: Sequence[int] | None, n: int, what: str) -> list[int]:
    """Block indices (negative count from the end; None = all ``n``) -> sorted distinct
    non-negative indices; out of range is a `ConfigError` naming ``what``."""
    from medkt.errors import ConfigError

    if blocks is None:
        return list(range(n))
    out = set()
    for b in blocks:
        idx = b + n if b < 0 else b
        if not 0 <= idx < n:
            raise ConfigError(f"{what}: block {b} is out of range for an image tower with {n} blocks "
                              f"(valid: 0..{n - 1} or negative)")
        out.add(idx)
    return sorted(out)


@contextlib.contextmanager
def capture_features(backend: Backend, blocks: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While the block runs, the outputs of ``backend.feature_modules()[i]`` for each ``i`` in
    ``blocks`` land in the yielded dict (the last forward pass's, gradients intact): tokens
    ``(B, T, D)`` or maps ``(B, C, h, w)``. Forward hooks, removed on exit; no blocks = no hooks
    (and no `FeatureBlocks` needed)."""
    store: dict[int, torch.Tensor] = {}
    if not blocks:
        yield store
        return
    if not isinstance(backend, FeatureBlocks):
        from medkt.errors import ConfigError

        raise ConfigError(f"backend {backend.spec or backend.family!r} does not expose its image tower's blocks "
                          "(medkt.backends.base.FeatureBlocks), which feature statistics need")
    modules = backend.feature_modules()

    def hook(index: int):
        def save(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store[index] = output[0] if isinstance(output, (tuple, list)) else output  # HF blocks return tuples
        return save

    handles = [modules[i].register_forward_hook(hook(i)) for i in blocks]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def require_embeddings(backend: Backend, what: str, instead: str) -> None:
    """A `ConfigError` unless ``backend`` declares `ImageTextEmbedder`
    (``what`` needs it; ``instead`` is the choice that works without embeddings)."""
    if not isinstance(backend, ImageTextEmbedder):
        from medkt.errors import ConfigError

        raise ConfigError(f"{what} compares image and text embeddings, but backend "
                          f"{backend.spec or backend.family!r} is single-stream (no embeddings); use {instead}")


def as_numpy_image(x: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` [0,1] tensor -> ``(H, W)`` or ``(H, W, 3)`` uint8 array."""
    arr = (x.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
