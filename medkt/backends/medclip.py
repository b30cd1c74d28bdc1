"""MedCLIP backend (family ``medclip``): Swin-T vision encoder + Bio_ClinicalBERT text encoder.

The network is rebuilt **offline** from ``transformers`` configs with MedCLIP's module names
(``vision_model.model`` = ``SwinModel``, ``vision_model.projection_head``, ``text_model.model`` =
``BertModel``, ``text_model.projection_head``, ``logit_scale``), so the official
``pytorch_model.bin`` of the MedCLIP-ViT release zip loads as is; buffers that newer transformers
no longer save (``position_ids``, ``relative_position_index``) are the only keys tolerated as
missing/unexpected. Everything runs on CPU (upstream calls ``.cuda()`` unconditionally).

Specs:

* ``medclip:vit@/models/medclip-vit`` -- a folder holding ``pytorch_model.bin`` (unzipped
  ``medclip-vit-pretrained.zip``) or the ``.bin`` file itself, or a repo id in the local HF cache.
  The tokenizer is Bio_ClinicalBERT's ``vocab.txt``: folder from the ``tokenizer=`` keyword, else
  ``$MEDKT_TOKENIZER``, else ``<weights folder>/Bio_ClinicalBERT``, else
  ``emilyalsentzer/Bio_ClinicalBERT`` in the local HF cache.
* ``medclip:vit@random`` -- the real shape with random weights (a locally generated vocabulary
  of Bio_ClinicalBERT's size unless ``tokenizer=`` is given); for timing and shape checks.
* ``medclip:tiny@random`` -- a tiny MedCLIP-shaped model (2-stage Swin, 3-layer BERT, 32x32
  input) with a locally written WordPiece vocabulary, for fast tests.

Keyword options: ``tokenizer`` (folder), ``text_pooling`` (``"upstream"``: mean over *all* token
positions including padding, exactly as MedCLIP; ``"masked"``: padding excluded, so an embedding
does not depend on the other texts in its batch), ``init_seed`` (random init).
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medkt.backends.base import Backend, FeatureBlocks, ImageTextEmbedder
from medkt.errors import ConfigError, MedktError, WeightsNotFoundError, unknown_name
from medkt.weights import README_HINT, resolve_weights

#: MedCLIP image statistics (``medclip.constants.IMG_MEAN/IMG_STD``), one grey channel
MEDCLIP_MEAN = 0.5862785803043838
MEDCLIP_STD = 0.27950088968644304
#: ``log(1/0.07)`` initial value and MedCLIP's clamp of the log temperature, ``log(100)``
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 4.6052
#: MedCLIP sets ``tokenizer.model_max_length = 77``
MAX_TEXT_LENGTH = 77
WEIGHTS_NAME = "pytorch_model.bin"
TOKENIZER_ENV = "MEDKT_TOKENIZER"
TOKENIZER_REPO = "emilyalsentzer/Bio_ClinicalBERT"

HOW_TO_GET_WEIGHTS = (
    "Download the MedCLIP-ViT release zip (the URL is in medclip_vit_weight.txt of the "
    "RyanWangZf/MedCLIP repository), unzip it and pass the folder holding pytorch_model.bin, "
    "e.g. 'medclip:vit@/models/medclip-vit'"
)
HOW_TO_GET_TOKENIZER = (
    "Download vocab.txt and config.json of emilyalsentzer/Bio_ClinicalBERT from the Hugging Face "
    f"hub into a folder DIR and set ${TOKENIZER_ENV}=DIR, or put it in <weights folder>/Bio_ClinicalBERT, or "
    "pass tokenizer=DIR (in a bundle that has a backend_options key: --set backend_options#tokenizer=DIR)"
)

# Buffers that transformers recomputes at construction; older releases saved them, newer drop them.
_REGENERATED_BUFFERS = ("position_ids", "relative_position_index", "token_type_ids")


@dataclass(frozen=True)
class MedCLIPArchitecture:
    """Shape of a MedCLIP-ViT model: BERT and Swin config kwargs + projection size."""

    bert: dict[str, Any]
    swin: dict[str, Any]
    proj_dim: int
    #: vocabulary generated locally when no tokenizer folder is given (None: one is required)
    generated_vocab: bool = False
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        """Side of the square input of the Swin image tower, in pixels."""
        return int(self.swin.get("image_size", 224))


# Bio_ClinicalBERT = bert-base-cased shape (its config.json: vocab 28996, 12 x 768, 3072 MLP);
# swin-tiny-patch4-window7-224 = transformers' SwinConfig defaults (96 -> 768 channels, [2,2,6,2]).
ARCHITECTURES: dict[str, MedCLIPArchitecture] = {
    "vit": MedCLIPArchitecture(
        bert=dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                  layer_norm_eps=1e-12, pad_token_id=0),
        swin=dict(image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=[2, 2, 6, 2],
                  num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, drop_path_rate=0.1,
                  layer_norm_eps=1e-5),
        proj_dim=512,
        description="MedCLIP-ViT: swin-tiny-patch4-window7-224 + Bio_ClinicalBERT, 512-d",
    ),
    "tiny": MedCLIPArchitecture(
        bert=dict(vocab_size=0, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=MAX_TEXT_LENGTH + 3, type_vocab_size=2,
                  pad_token_id=0),
        swin=dict(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                  num_heads=[1, 2], window_size=4, mlp_ratio=2.0, drop_path_rate=0.0),
        proj_dim=16,
        generated_vocab=True,
        description="tiny random MedCLIP-shaped model for tests (32x32 input, 16-d)",
    ),
}
ALIASES = {"medclip-vit": "vit", "swin": "vit", "vit-swin": "vit"}


# -- the network, with MedCLIP's module names ------------------------------------------------
class MedCLIPTextModel(nn.Module):
    """Bio_ClinicalBERT -> mean of hidden states 1, 2 and last -> token mean -> Linear(no bias)."""

    def __init__(self, bert_config, proj_dim: int, pooling: str = "upstream") -> None:
        super().__init__()
        from transformers import BertModel

        self.model = BertModel(bert_config, add_pooling_layer=True)  # pooler kept: it is in the checkpoint
        self.projection_head = nn.Linear(bert_config.hidden_size, proj_dim, bias=False)
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hs = out.hidden_states
        # (3, B, L, H) -> mean over the three layers -> (B, L, H)
        layers = torch.stack([hs[1], hs[2], hs[-1]]).mean(0)
        if self.pooling == "masked" and attention_mask is not None:
            m = attention_mask.to(layers.dtype).unsqueeze(-1)
            embed = (layers * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:  # MedCLIP: plain mean over every position, padding included
            embed = layers.mean(1)
        return self.projection_head(embed)


class MedCLIPVisionModelViT(nn.Module):
    """Swin pooler output (B, 768) -> Linear(768 -> 512, no bias)."""

    def __init__(self, swin_config, proj_dim: int) -> None:
        super().__init__()
        from transformers import SwinModel

        self.model = SwinModel(swin_config, add_pooling_layer=True)
        self.projection_head = nn.Linear(self.model.num_features, proj_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor, project: bool = True) -> torch.Tensor:
        if pixel_values.shape[1] == 1:
            pixel_values = pixel_values.repeat(1, 3, 1, 1)
        embeds = self.model(pixel_values=pixel_values).pooler_output
        return self.projection_head(embeds) if project else embeds


class MedCLIPModel(nn.Module):
    """``vision_model`` + ``text_model`` + ``logit_scale``, key-compatible with MedCLIP's."""

    def __init__(self, arch: MedCLIPArchitecture, vocab_size: int | None = None, pooling: str = "upstream") -> None:
        super().__init__()
        from transformers import BertConfig, SwinConfig

        bert_kw = dict(arch.bert)
        if vocab_size is not None:
            bert_kw["vocab_size"] = vocab_size
        self.vision_model = MedCLIPVisionModelViT(SwinConfig(**arch.swin), arch.proj_dim)
        self.text_model = MedCLIPTextModel(BertConfig(**bert_kw), arch.proj_dim, pooling)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))


# -- backend ---------------------------------------------------------------------------------
class MedCLIPBackend(Backend, ImageTextEmbedder, FeatureBlocks):
    """MedCLIP behind the `Backend` protocol.

    Pixels are one grey channel in [0, 1]; ``normalize`` repeats it to 3 channels and applies
    MedCLIP's mean/std. Embeddings are the projected (un-normalised) 512-d vectors.
    """

    family = "medclip"
    image_channels = 1
    model_channels = 3
    mean = (MEDCLIP_MEAN,) * 3
    std = (MEDCLIP_STD,) * 3

    def __init__(self, model: MedCLIPModel, tokenizer, architecture: str, max_length: int = MAX_TEXT_LENGTH):
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self.architecture = architecture
        self.image_size = int(model.vision_model.model.config.image_size)
        self.max_length = int(max_length)
        self.load_report: dict[str, Any] = {}

    # pixels -------------------------------------------------------------------------------
    def load_image(self, image: Any) -> torch.Tensor:
        """MedCLIP preprocessing -> ``(1, S, S)`` in [0, 1] (see `medclip_preprocess`).
        Normalisation happens later inside `encode_pixels`."""
        return medclip_preprocess(image, self.image_size)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values.to(self.model.logit_scale.device))

    def feature_modules(self) -> list[nn.Module]:
        """The Swin blocks of every stage, flat (tokens ``(B, h*w, C)``)."""
        return [blk for stage in self.model.vision_model.model.encoder.layers for blk in stage.blocks]

    # text ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Bio_ClinicalBERT WordPiece, padded to the longest text, truncated at 77 tokens."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self._tokenizer(list(texts), truncation=True, padding=True, max_length=self.max_length,
                              return_tensors="pt")
        device = self.model.logit_scale.device
        # MedCLIP feeds only input_ids and attention_mask (token types default to zeros)
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.text_model(tokens["input_ids"], tokens.get("attention_mask"))

    # parameters ---------------------------------------------------------------------------
    def visual_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.vision_model.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.text_model.parameters()

    def token_embedding(self) -> nn.Embedding:
        return self.model.text_model.model.embeddings.word_embeddings

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(clamp(logit_scale, 0, 4.6052))`` as MedCLIP's ``compute_logits`` (max 100)."""
        return self.model.logit_scale.clamp(0.0, LOGIT_SCALE_MAX).exp()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(architecture=self.architecture, text_pooling=self.model.text_model.pooling,
                    vocab_size=int(self.model.text_model.model.config.vocab_size), **self.load_report)
        return info


def medclip_preprocess(image: Any, size: int = 224) -> torch.Tensor:
    """Any image (path, PIL, array) -> MedCLIP's ``(1, size, size)`` grey pixels in [0, 1].

    The steps of upstream ``MedCLIPFeatureExtractor`` (medclip 0.0.3): grey (PIL ``"L"``), zero
    padding to a centred square of side ``max(size, H, W)`` (``pad_img``), PIL bicubic resize to
    ``size`` (its centre crop is then a no-op). Written out here because the upstream class cannot
    be used: it is an optional test dependency, and on transformers 4.5x its ``__call__`` fails
    (its positional arguments no longer match ``CLIPImageProcessor``). 8-bit images run through
    PIL exactly as upstream (bit-exact); 16-bit/float images are resampled in PIL's float mode
    ``"F"`` (upstream would clip them to 8 bits) so they keep their precision.
    """
    from PIL import Image

    from medkt.data.images import upstream_input

    src = upstream_input(image, grey=True)
    if isinstance(src, Image.Image):  # exactly upstream's pad_img on an "L" canvas + resize
        w, h = src.size
        side = max(size, h, w)  # MedCLIP pads small images up to the model size instead of upscaling
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(src, (int((side - w) / 2), int((side - h) / 2)))
        arr = np.asarray(canvas.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        return torch.from_numpy(arr)[None].contiguous()
    h, w = src.shape
    side = max(size, h, w)
    canvas = np.zeros((side, side), dtype=np.float32)
    top, left = int((side - h) / 2), int((side - w) / 2)
    canvas[top : top + h, left : left + w] = src
    if side != size:
        canvas = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC))  # float32 -> mode "F"
    return torch.from_numpy(np.clip(canvas, 0.0, 1.0).astype(np.float32))[None].contiguous()


# -- weights and tokenizer -------------------------------------------------------------------
def _refuse_zip_archive(path: Path) -> None:
    """The release zip itself given as weights: say to unzip it (torch.load would call it truncated)."""
    from medkt.weights import weights_file_kind, zip_archive_error

    if path.is_file() and weights_file_kind(path) == "zip":
        raise zip_archive_error(path, "pass the folder holding pytorch_model.bin, e.g. `unzip "
                                "medclip-vit-pretrained.zip -d /models/medclip-vit` -> 'medclip:vit@/models/medclip-vit'")


def load_medclip_checkpoint(model: MedCLIPModel, path: str | Path) -> dict[str, Any]:
    """Load a MedCLIP ``pytorch_model.bin`` into ``model``.

    Only regenerated buffers may be missing or unexpected; any other mismatch (e.g. the ResNet
    release, a truncated file) raises with the offending keys.

    Returns:
        ``{"weights": path, "ignored_keys": [...]}``.
    """
    path = Path(path)
    _refuse_zip_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsNotFoundError(
            f"cannot read MedCLIP checkpoint {path} ({str(exc).splitlines()[0][:200]}); the file may be "
            f"truncated: download it again. {HOW_TO_GET_WEIGHTS} ({README_HINT})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = model.state_dict()

    def regenerated(key: str) -> bool:
        return key.rsplit(".", 1)[-1] in _REGENERATED_BUFFERS

    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    bad_unexpected = [k for k in unexpected if not regenerated(k)]
    bad_missing = [k for k in missing if not regenerated(k)]
    if bad_unexpected or bad_missing:
        hint = " (this looks like the MedCLIP-ResNet release; medkt supports MedCLIP-ViT)" if any(
            k.startswith("vision_model.model.conv1") or ".layer1." in k for k in bad_unexpected) else ""
        raise MedktError(
            f"{path} is not a MedCLIP-ViT checkpoint{hint}: {len(bad_missing)} missing keys "
            f"(e.g. {bad_missing[:3]}), {len(bad_unexpected)} unexpected keys (e.g. {bad_unexpected[:3]})"
        )
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in state
             if k in own and tuple(state[k].shape) != tuple(own[k].shape) and not regenerated(k)]
    if wrong:
        k, got, want = wrong[0]
        raise MedktError(f"{path}: tensor {k} has shape {got}, MedCLIP-ViT expects {want} ({len(wrong)} mismatches)")
    model.load_state_dict({k: v for k, v in state.items() if k in own and not (regenerated(k) and
                           tuple(v.shape) != tuple(own[k].shape))}, strict=False)
    return {"weights": str(path), "ignored_keys": sorted(unexpected)}


def _tokenizer_folder(tokenizer: str | os.PathLike | None, weights_dir: Path | None) -> Path:
    """Where Bio_ClinicalBERT's vocab.txt lives (see the module docstring for the search order)."""
    from medkt.weights import hf_cache_snapshot

    tried: list[str] = []
    candidates: list[Path] = []
    if tokenizer is not None:
        given = Path(tokenizer).expanduser()
        if not given.exists() and "/" in str(tokenizer) and not str(tokenizer).startswith((".", "/", "~")):
            snap = hf_cache_snapshot(str(tokenizer))
            given = snap if snap is not None else given
        if given.is_file():
            given = given.parent
        if not (given / "vocab.txt").is_file():
            raise WeightsNotFoundError(
                f"Bio_ClinicalBERT tokenizer not found: {given} has no vocab.txt. {HOW_TO_GET_TOKENIZER} ({README_HINT})"
            )
        return given
    if os.environ.get(TOKENIZER_ENV):
        candidates.append(Path(os.environ[TOKENIZER_ENV]).expanduser())
    if weights_dir is not None:
        candidates += [weights_dir / "Bio_ClinicalBERT", weights_dir / "tokenizer", weights_dir]
    snap = hf_cache_snapshot(TOKENIZER_REPO)
    if snap is not None:
        candidates.append(snap)
    for c in candidates:
        tried.append(str(c))
        if (c / "vocab.txt").is_file():
            return c
    raise WeightsNotFoundError(
        f"Bio_ClinicalBERT tokenizer not found (looked in {', '.join(tried) or 'no folder'} and the HF cache "
        f"for {TOKENIZER_REPO}). {HOW_TO_GET_TOKENIZER} ({README_HINT})"
    )


def load_tokenizer(folder: str | Path):
    """``BertTokenizerFast`` from a local folder (offline). Like ``AutoTokenizer`` on
    Bio_ClinicalBERT, a folder without tokenizer_config.json gets BERT's default lower-casing."""
    from transformers import BertTokenizerFast

    from medkt.weights import offline

    with offline():
        try:
            tok = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except OSError as exc:
            raise WeightsNotFoundError(f"cannot load the tokenizer in {folder}: {exc}. {HOW_TO_GET_TOKENIZER}") from None
    tok.model_max_length = MAX_TEXT_LENGTH
    return tok


#: words the generated test vocabulary knows whole (everything else falls back to characters)
_TINY_WORDS = (
    "a an the is of in at with and or to on by as are no not lung lungs chest x ray radiograph "
    "nodule nodules benign cancer malignant mass opacity round well defined smooth spiculated "
    "margin margins edge edges irregular small large mild minimal moderate severe left right upper "
    "lower mid middle zone lobe base bases bilateral heart cardiac silhouette size enlarged "
    "cardiomegaly atelectasis consolidation edema pleural effusion pulmonary interstitial "
    "airspace patchy linear subsegmental trace normal photo image showing shows calcified "
    "calcification solitary dense density hilar vessels fluid angle costophrenic blunting"
).split()


def write_generated_vocab(folder: str | Path, size: int | None = None) -> Path:
    """Write a WordPiece ``vocab.txt`` (specials, ASCII characters and their ``##`` forms,
    common radiology words), padded with ``[unusedN]`` entries up to ``size`` when given."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    tokens += chars + ["##" + c for c in chars] + _TINY_WORDS
    seen: set[str] = set()
    uniq = [t for t in tokens if not (t in seen or seen.add(t))]
    if size is not None:
        if size < len(uniq):
            raise ConfigError(f"generated vocabulary needs at least {len(uniq)} entries, asked for {size}")
        uniq += [f"[unused{i}]" for i in range(size - len(uniq))]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(uniq) + "\n")
    return folder


def generated_tokenizer(size: int | None = None):
    """A BERT tokenizer over `write_generated_vocab` (built in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="medkt-vocab-") as tmp:
        return load_tokenizer(write_generated_vocab(tmp, size))


def create(architecture: str, weights: str | None, *, tokenizer: str | os.PathLike | None = None,
           text_pooling: str = "upstream", init_seed: int = 0, **kwargs: Any) -> MedCLIPBackend:
    """Build a MedCLIP backend (see the module docstring for specs and keywords)."""
    if kwargs:
        raise ConfigError(f"unknown option(s) for the medclip backend: {sorted(kwargs)}; "
                          "known: tokenizer, text_pooling, init_seed")
    name = ALIASES.get(architecture.lower(), architecture.lower())
    if name not in ARCHITECTURES:
        if name in ("resnet", "resnet50", "medclip-resnet"):
            raise ConfigError("MedCLIP-ResNet50 is not supported; use 'medclip:vit@DIR' (the paper's MedCLIP-ViT)")
        raise unknown_name("MedCLIP architecture", architecture, list(ARCHITECTURES))
    if text_pooling not in ("upstream", "masked"):
        raise ConfigError(f"text_pooling must be 'upstream' or 'masked', got {text_pooling!r}")
    arch = ARCHITECTURES[name]
    random_init = weights == "random"
    if not random_init and arch.generated_vocab:
        raise ConfigError(f"medclip:{name} exists only with random weights: use 'medclip:{name}@random'")

    ckpt: Path | None = None
    if not random_init:
        ckpt = resolve_weights(weights, what="MedCLIP-ViT", how_to_get=HOW_TO_GET_WEIGHTS,
                               filenames=(WEIGHTS_NAME,))
        if ckpt.is_dir():  # resolve_weights returns the folder itself only when no filename is asked
            raise WeightsNotFoundError(f"no {WEIGHTS_NAME} in {ckpt}. {HOW_TO_GET_WEIGHTS} ({README_HINT})")
        _refuse_zip_archive(ckpt)  # before looking for the tokenizer: this is the mistake to report

    if tokenizer is None and random_init:
        tok = generated_tokenizer(None if arch.generated_vocab else int(arch.bert["vocab_size"]))
    else:
        tok = load_tokenizer(_tokenizer_folder(tokenizer, ckpt.parent if ckpt is not None else None))
    vocab_size = len(tok) if arch.generated_vocab else int(arch.bert["vocab_size"])
    if len(tok) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but MedCLIP's text encoder has {vocab_size}; "
                          f"is it Bio_ClinicalBERT's vocab.txt?")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        model = MedCLIPModel(arch, vocab_size=vocab_size, pooling=text_pooling)
    backend = MedCLIPBackend(model, tok, name)
    if ckpt is not None:
        backend.load_report = load_medclip_checkpoint(model, ckpt)
    return backend.eval()


__all__ = [
    "ARCHITECTURES",
    "MEDCLIP_MEAN",
    "MEDCLIP_STD",
    "MedCLIPArchitecture",
    "MedCLIPBackend",
    "MedCLIPModel",
    "create",
    "load_medclip_checkpoint",
    "medclip_preprocess",
    "write_generated_vocab",
]
