"""open_clip CLIP backend (family ``open_clip``, alias ``clip``).

Specs: ``clip:ViT-B-32@/models/ViT-B-32.pt`` (a local checkpoint file), ``clip:ViT-B-32@openai``
(an open_clip pretrained tag, resolved with open_clip's registry from the local HF cache only; see
`medkt.weights.open_clip_tag_checkpoint`), ``clip:medkt-tiny-ViT@random`` (random weights;
tiny configs ship in ``medkt/configs/open_clip/``).

Images are preprocessed by open_clip's own eval transform built from the model's
``visual.preprocess_cfg`` (short side resized, centre crop; the tag's interpolation/resize mode),
see `medkt.data.images.open_clip_pixels`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medkt.backends.base import Backend
from medkt.backends.vit_fastpath import install_fast_paths
from medkt.errors import ConfigError, unknown_name
from medkt.weights import offline, open_clip_tag_checkpoint, open_clip_tag_options, resolve_weights

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "open_clip"
_registered = False


def register_medkt_configs() -> None:
    """Make medkt's tiny open_clip JSON configs known to ``open_clip.create_model``."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


_offline = offline  # old name, kept for importers


class OpenClipBackend(Backend):
    family = "open_clip"

    def __init__(self, model: nn.Module, tokenizer, architecture: str, mean, std):
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self.architecture = architecture
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean, self.std = tuple(mean), tuple(std)
        install_fast_paths(self, model)

    def load_image(self, image: Any) -> torch.Tensor:
        """open_clip's eval preprocessing of this model (its ``preprocess_cfg``) -> ``(3, S, S)`` in [0, 1]."""
        from medkt.data.images import open_clip_pixels

        return open_clip_pixels(image, self.model.visual.preprocess_cfg)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts)).to(self.model.logit_scale.device)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.visual.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        visual = {id(p) for p in self.model.visual.parameters()}
        skip = visual | {id(self.model.logit_scale)}
        if getattr(self.model, "logit_bias", None) is not None:
            skip.add(id(self.model.logit_bias))
        return (p for p in self.model.parameters() if id(p) not in skip)

    def token_embedding(self) -> nn.Embedding:
        # CLIP keeps it at the top level; CustomTextCLIP (e.g. SigLIP / HF text towers) in .text
        emb = getattr(self.model, "token_embedding", None) or getattr(getattr(self.model, "text", None), "token_embedding", None)
        if not isinstance(emb, nn.Embedding):
            return super().token_embedding()
        return emb

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100.0)


def create(architecture: str, weights: str | None, **kwargs) -> OpenClipBackend:
    import open_clip

    register_medkt_configs()
    if architecture not in open_clip.list_models():
        raise unknown_name("open_clip architecture", architecture, open_clip.list_models())
    pretrained: str | None
    if weights == "random":
        pretrained = None
    elif weights is not None and open_clip.is_pretrained_cfg(architecture, weights):
        # a tag: its file is found in the local HF cache (or WeightsNotFoundError naming it) and
        # open_clip gets the local path, plus what the tag implies (preprocessing, QuickGELU)
        pretrained = str(open_clip_tag_checkpoint(architecture, weights))
        kwargs = {**open_clip_tag_options(architecture, weights), **kwargs}
    else:
        pretrained = str(
            resolve_weights(
                weights,
                what=f"open_clip {architecture}",
                how_to_get=(
                    f"Download the {architecture} checkpoint (e.g. OpenAI's ViT-B-32.pt) on a machine with "
                    "internet access and pass its local path as 'clip:ARCH@/path/to/file.pt'"
                ),
            )
        )
    try:
        with offline():  # pretrained is a local file or None: nothing to fetch
            model = open_clip.create_model(architecture, pretrained=pretrained, device="cpu", **kwargs)
            # bundled BPE for CLIP; HF-tokenizer models (SigLIP...) need their tokenizer cached
            tokenizer = open_clip.get_tokenizer(architecture)
    except RuntimeError as exc:
        raise ConfigError(f"could not build open_clip {architecture} from {pretrained}: {exc}") from exc
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return OpenClipBackend(model, tokenizer, architecture, mean, std)
