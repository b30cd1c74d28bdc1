"""Hugging Face ``transformers`` CLIP backend (family ``hf_clip``).

Specs: ``hf_clip:openai/clip-vit-base-patch32@/models/clip-vit-base-patch32`` (a local folder
saved with ``save_pretrained``, or a repo id already in the local HF cache when no path is
given: ``hf_clip:openai/clip-vit-base-patch32``), ``hf_clip:tiny@random`` (a tiny random
CLIPModel for tests; tokenised with open_clip's bundled BPE, the same vocabulary as CLIP's).

Images are preprocessed by transformers' own ``CLIPImageProcessor`` (the folder's
``preprocessor_config.json`` when present): short side resized, centre crop; normalisation is
left to `normalize` with the processor's mean/std.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medkt.backends.base import Backend, FeatureBlocks, ImageTextEmbedder
from medkt.errors import WeightsNotFoundError
from medkt.weights import README_HINT, offline, resolve_weights

TINY = {
    "text_config": dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32, bos_token_id=49406,
                        eos_token_id=49407, pad_token_id=0),
    "vision_config": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2),
    "projection_dim": 32,
}


class _OpenClipBPE:
    """Callable tokenizer returning HF-style ``input_ids``/``attention_mask`` from open_clip's BPE."""

    def __init__(self, context_length: int):
        import open_clip

        self._tok = open_clip.SimpleTokenizer(context_length=context_length)

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self._tok(texts)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class HFClipBackend(Backend, ImageTextEmbedder, FeatureBlocks):
    """A transformers ``CLIPModel`` behind the backend protocol, preprocessed by its folder's own
    ``CLIPImageProcessor``."""

    family = "hf_clip"

    def __init__(self, model, tokenizer, image_processor=None):
        super().__init__()
        from transformers import CLIPImageProcessor

        self.model = model
        self._tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        if image_processor is None:  # CLIP's defaults at this model's input size
            s = self.image_size
            image_processor = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        self.image_processor = image_processor
        self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)

    def load_image(self, image: Any) -> torch.Tensor:
        """``CLIPImageProcessor`` without its normalisation -> ``(3, S, S)`` in [0, 1].

        8-bit images reach the processor as PIL images (as ``Image.open`` gives them); others
        as float arrays in [0, 1] (the processor resamples those through 8-bit PIL itself).
        """
        from medkt.data.images import upstream_input

        src = upstream_input(image)
        kw: dict[str, Any] = {"do_normalize": False, "return_tensors": "pt"}
        if not hasattr(src, "mode"):  # float array: already in [0, 1], channels last
            if src.ndim == 2:
                src = src[..., None].repeat(3, axis=-1)
            kw.update(do_rescale=False, do_convert_rgb=False, input_data_format="channels_last")
        return self.image_processor(images=src, **kw)["pixel_values"][0].float().clamp(0, 1).contiguous()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values)

    def feature_modules(self) -> list[nn.Module]:
        """The vision transformer's encoder layers (tokens ``(B, T, D)``)."""
        return list(self.model.vision_model.encoder.layers)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(self._tokenizer, _OpenClipBPE):
            out = self._tokenizer(list(texts))
        else:
            out = dict(self._tokenizer(list(texts), padding=True, truncation=True,
                                       max_length=self.context_length, return_tensors="pt"))
        device = self.model.logit_scale.device
        return {k: v.to(device) for k, v in out.items() if k in ("input_ids", "attention_mask")}

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.get_text_features(**tokens)

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.vision_model.parameters()
        yield from self.model.visual_projection.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.text_model.parameters()
        yield from self.model.text_projection.parameters()

    def token_embedding(self) -> nn.Embedding:
        return self.model.text_model.embeddings.token_embedding

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100.0)


def create(architecture: str, weights: str | None, **kwargs) -> HFClipBackend:
    """Build ``hf_clip:ORG/NAME[@folder]`` from a local folder or the local HF cache, or
    ``hf_clip:tiny@random`` (a small random CLIP for tests); nothing is downloaded."""
    from transformers import CLIPConfig, CLIPModel

    if weights == "random":
        if architecture == "tiny":
            config = CLIPConfig(**TINY)
        else:  # a local folder / cached repo holding only config.json is enough for random init
            folder = resolve_weights(architecture, what=f"HF CLIP config {architecture}",
                                     how_to_get="Pass 'tiny' or a local folder holding config.json")
            config = CLIPConfig.from_pretrained(folder, local_files_only=True)
        torch.manual_seed(int(kwargs.pop("init_seed", 0)))
        model = CLIPModel(config)
        return HFClipBackend(model, _OpenClipBPE(config.text_config.max_position_embeddings))
    source = weights if weights is not None else architecture
    folder = resolve_weights(
        source,
        what=f"Hugging Face CLIP {architecture}",
        how_to_get=(f"Save the model on a machine with internet access (CLIPModel.from_pretrained('{architecture}')"
                    ".save_pretrained(DIR), same for CLIPProcessor) and pass 'hf_clip:ARCH@DIR'"),
    )
    if not Path(folder).is_dir():
        raise WeightsNotFoundError(f"expected a folder saved with save_pretrained, got file {folder} ({README_HINT})")
    from transformers import AutoTokenizer

    from transformers import CLIPImageProcessor

    with offline():  # a local folder: nothing to fetch
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            processor = None
            if (Path(folder) / "preprocessor_config.json").is_file():
                processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        except OSError as exc:
            raise WeightsNotFoundError(f"incomplete CLIP folder {folder}: {exc} ({README_HINT})") from None
    return HFClipBackend(model, tokenizer, processor)
