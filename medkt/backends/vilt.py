"""ViLT backend (family ``vilt``): transformers ``ViltForMaskedLM`` + the 2-way ITM head.

ViLT is a single-stream (early-fusion) transformer: image patches and word pieces go through the
same encoder, so there are no separate image/text embeddings to compare with a cosine. What the
knowledge-transfer recipe needs from it is the **image-text matching (ITM) head**, a
``Linear(hidden -> 2)`` on the pooler output whose logits are ``[no match, match]``.

transformers has no class carrying that head (``ViltForImageAndTextRetrieval`` has a 1-logit rank
head and refuses training), so `ViltITM` wraps ``ViltForMaskedLM`` (which keeps the pooler
and the MLM head) and adds ``itm_score.fc``. The ``dandelin/vilt-b32-mlm-itm`` checkpoint stores
this head under the keys ``itm_score.fc.{weight,bias}``; they are loaded explicitly and a missing
head is an error (a randomly initialised ITM head would silently produce meaningless scores).

Specs:

* ``vilt:b32@/path/to/vilt-b32-mlm-itm`` - a local folder (``config.json`` + ``pytorch_model.bin``
  or ``model.safetensors``) or an HF-cache repo id such as ``dandelin/vilt-b32-mlm-itm``. The
  tokenizer comes from the same folder if it has ``vocab.txt``, else from ``tokenizer=`` (a folder
  or the cached ``dandelin/vilt-b32-mlm`` repo).
* ``vilt:tiny@random`` - a 2-layer random model of the real classes with a locally written
  BERT vocabulary, for tests.

Pixels: the backend takes [0, 1] RGB tensors; normalisation is ViLT's mean = std = 0.5.
`ViltBackend.load_image_native` is transformers' own ``ViltImageProcessor`` (shortest edge
``image_size`` = 384, longest <= 640, multiples of 32, PIL bicubic) without its normalisation and
batch padding; retrieval and ITM classification use it (variable sizes, one pixel mask each).
`ViltBackend.load_image` is the one intended difference: inversion and fine-tuning batch
square ``image_size`` inputs, so it resizes the short side with the same PIL bicubic filter and
centre-crops the square (the processor would keep the whole, non-square picture).
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator, Sequence

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medkt.backends.base import Backend, ImageTextMatcher, MaskedLanguageModel
from medkt.errors import ConfigError, WeightsNotFoundError, unknown_name

log = logging.getLogger(__name__)

#: ViLT was pre-trained with at most 40 text positions ([CLS] + 38 pieces + [SEP]); position 41
#: does not exist in the embedding table.
MAX_TEXT_POSITIONS = 40
HOW_TO_GET = (
    "Download the Hugging Face repos dandelin/vilt-b32-mlm-itm (weights with the ITM head) and "
    "dandelin/vilt-b32-mlm (tokenizer) on a machine with internet, e.g. "
    "`hf download dandelin/vilt-b32-mlm-itm` (and dandelin/vilt-b32-mlm), and copy the HF cache or the folders here"
)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # dandelin/vilt-b32-* (ViT-B/32 + BERT-base embeddings)
    "b32": dict(),
    # test model: real classes, random weights, tiny sizes
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
    ),
}

# Words of the tiny test vocabulary (besides characters and ##-pieces): enough for the concept
# captions used in tests to tokenise to whole words most of the time.
_TINY_WORDS = (
    "a an the is of and with in on to for by as at or from it its this that are be used "
    "photo picture image circular round archway stone stones wall garden portal moongate "
    "tonometer gyroscope probe pen medical metal metallic wheel spinning disc frame axis "
    "dog cat car man woman people person two three red blue green white black small large "
    "sitting standing riding playing street water grass field table board wheels ocean "
    "fruit yellow long flat shape device screen handle container glass cup"
).split()


class ITMHead(nn.Module):
    """The 2-way image-text matching head of ViLT: ``Linear(hidden, 2)`` on the pooled [CLS]."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


class ViltITM(nn.Module):
    """``ViltForMaskedLM`` (encoder + pooler + MLM head) with the ITM head next to it.

    Attribute names follow the checkpoint: ``vilt.*``, ``mlm_score.*``, ``itm_score.fc.*``.
    """

    def __init__(self, config):
        super().__init__()
        from transformers import ViltForMaskedLM

        self.mlm = ViltForMaskedLM(config)
        self.itm_score = ITMHead(config.hidden_size)
        self.config = config

    @property
    def vilt(self):
        """The ViLT trunk shared by the MLM and ITM heads."""
        return self.mlm.vilt

    def state_dict_checkpoint_names(self) -> dict[str, torch.Tensor]:
        """State dict keyed like the HF checkpoint (``vilt.*``, ``mlm_score.*``, ``itm_score.*``)."""
        out = {}
        for k, v in self.state_dict().items():
            out[k[len("mlm."):] if k.startswith("mlm.") else k] = v
        return out


def _tiny_vocab_dir() -> Path:
    """Write (once) a BERT WordPiece vocabulary for the tiny test model and return its folder."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&")
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += chars + ["##" + c for c in chars if c.isalnum()] + list(dict.fromkeys(_TINY_WORDS))
    text = "\n".join(tokens) + "\n"
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"medkt_vilt_tiny_vocab_{digest}"
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        from medkt.utils import atomic_write_text

        atomic_write_text(vocab, text)
    return folder


def _load_tokenizer(folder: Path | None, tokenizer: str | None):
    from transformers import BertTokenizerFast

    candidates: list[Path] = []
    if tokenizer:
        from medkt.weights import hf_cache_snapshot

        p = Path(tokenizer).expanduser()
        if not p.exists() and "/" in tokenizer:
            snap = hf_cache_snapshot(tokenizer)
            p = snap if snap is not None else p
        candidates.append(p)
    if folder is not None:
        candidates.append(folder)
    from medkt.weights import hf_cache_snapshot

    snap = hf_cache_snapshot("dandelin/vilt-b32-mlm")
    if snap is not None:
        candidates.append(snap)
    for c in candidates:
        if (c / "vocab.txt").is_file() or (c / "tokenizer.json").is_file():
            tok = BertTokenizerFast.from_pretrained(str(c), local_files_only=True)
            tok.model_max_length = MAX_TEXT_POSITIONS
            return tok
    raise WeightsNotFoundError(
        "no ViLT tokenizer found (vocab.txt): the dandelin/vilt-b32-mlm-itm repo ships none; pass "
        "tokenizer='/path/to/vilt-b32-mlm' (or keep dandelin/vilt-b32-mlm in the HF cache). " + HOW_TO_GET
    )


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    for name in ("pytorch_model.bin", "model.pt", "model.bin"):
        if (folder / name).is_file():
            sd = torch.load(folder / name, map_location="cpu", weights_only=True)
            return sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    raise WeightsNotFoundError(
        f"ViLT weights folder {folder} holds no model.safetensors or pytorch_model.bin. {HOW_TO_GET}"
    )


def load_itm_checkpoint(model: ViltITM, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load an HF-format ViLT state dict *including* ``itm_score.fc.{weight,bias}`` into ``model``.

    Raises:
        WeightsNotFoundError: the checkpoint has no ITM head (e.g. plain ``vilt-b32-mlm``) or
            misses encoder weights.
    """
    itm = {k.split("itm_score.", 1)[1]: v for k, v in state_dict.items() if "itm_score." in k}
    if set(itm) != {"fc.weight", "fc.bias"}:
        raise WeightsNotFoundError(
            f"{source} has no 2-way ITM head (keys itm_score.fc.weight/bias; found {sorted(itm) or 'none'}). "
            "Use the dandelin/vilt-b32-mlm-itm checkpoint, not vilt-b32-mlm. " + HOW_TO_GET
        )
    model.itm_score.load_state_dict(itm)
    rest = {k: v for k, v in state_dict.items() if "itm_score." not in k}
    missing, unexpected = model.mlm.load_state_dict(rest, strict=False)
    # position_ids is a non-persistent buffer in recent transformers; the MLM decoder may be tied.
    missing = [k for k in missing if not k.endswith("position_ids") and not k.startswith("mlm_score.decoder")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing:
        raise WeightsNotFoundError(f"{source} misses ViLT weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        log.warning("ignoring %d unexpected keys in %s (e.g. %s)", len(unexpected), source, unexpected[:3])


class ViltBackend(Backend, ImageTextMatcher, MaskedLanguageModel):
    """ViLT with the ITM and MLM heads; single-stream, so no separate image/text embedding space."""

    family = "vilt"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    image_channels = 3
    model_channels = 3

    def __init__(self, model: ViltITM, tokenizer, max_text_len: int = MAX_TEXT_POSITIONS):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(model.config.image_size)
        self.patch_size = int(model.config.patch_size)
        from transformers import ViltImageProcessor

        # transformers' own preprocessing; for ViLT-B/32 exactly dandelin's (shortest edge 384, /32)
        self.image_processor = ViltImageProcessor(size={"shortest_edge": self.image_size}, size_divisor=self.patch_size,
                                                  image_mean=list(self.mean), image_std=list(self.std))
        if max_text_len > model.config.max_position_embeddings:
            raise ConfigError(
                f"max_text_len={max_text_len} exceeds ViLT's {model.config.max_position_embeddings} text positions"
            )
        self.max_text_len = max_text_len
        self._warned_truncation = False

    # -- text ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> ``{"input_ids", "attention_mask", "token_type_ids"}`` (B, L <= 40), truncating.

        A caption longer than the 40 positions ViLT knows is cut (with one warning per backend),
        never passed through (position 41 would raise inside the embedding).
        """
        texts = [str(t) for t in texts]
        full = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        too_long = [t for t, ids in zip(texts, full) if len(ids) > self.max_text_len]
        if too_long and not self._warned_truncation:
            log.warning(
                "%d caption(s) exceed ViLT's %d text positions and were truncated, e.g. %r",
                len(too_long), self.max_text_len, too_long[0][:80],
            )
            self._warned_truncation = True
        enc = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        device = self.model.itm_score.fc.weight.device
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    # -- images ----------------------------------------------------------------------------
    def load_image_native(self, image: Any) -> torch.Tensor:
        """``ViltImageProcessor`` without normalisation and batch padding -> ``(3, H, W)`` in [0, 1]
        (shortest edge ``image_size``, longest <= 1333/800 of it, multiples of the patch size).

        8-bit images reach the processor as PIL RGB images (as ``Image.open(p).convert("RGB")``);
        others as float arrays in [0, 1] (the processor resamples those through 8-bit PIL itself).
        """
        from medkt.data.images import upstream_input

        src = upstream_input(image)
        kw: dict[str, Any] = {"do_normalize": False, "do_pad": False, "return_tensors": "pt"}
        if hasattr(src, "mode"):
            src = src.convert("RGB")
        else:
            if src.ndim == 2:
                src = src[..., None].repeat(3, axis=-1)
            kw.update(do_rescale=False, input_data_format="channels_last")
        return self.image_processor(images=src, **kw)["pixel_values"][0].float().clamp(0, 1).contiguous()

    def load_image(self, image: Any) -> torch.Tensor:
        """Square ``(3, S, S)`` in [0, 1] for batched inversion/fine-tuning: the short side resized
        to ``image_size`` with PIL bicubic (the processor's filter), then the centre square
        (see the module docstring for why this differs from `load_image_native`)."""
        from medkt.data.images import open_clip_pixels

        return open_clip_pixels(image, {"size": self.image_size, "interpolation": "bicubic", "resize_mode": "shortest"})

    def embed_image(self, x: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[0,1] pixels ``(B, 3, H, W)`` -> cached image tokens ``(B, 1+P, hidden)`` and mask ``(B, 1+P)``.

        These are ViLT's patch embeddings with [CLS] and position embeddings added (before the
        modality-type embedding), i.e. what ``ViltModel`` accepts as ``image_embeds``; computing
        them once per image is what makes all-pairs retrieval scoring affordable.
        """
        pv = self.normalize(x)
        if pixel_mask is None:
            pixel_mask = torch.ones(pv.shape[0], pv.shape[-2], pv.shape[-1], dtype=torch.long, device=pv.device)
        emb, mask, _ = self.model.vilt.embeddings.visual_embed(
            pv, pixel_mask, max_image_length=self.model.config.max_image_length
        )
        return emb, mask

    def _forward(self, tokens: dict[str, torch.Tensor], **image_kw) -> Any:
        return self.model.mlm.vilt(
            input_ids=tokens["input_ids"],
            attention_mask=tokens.get("attention_mask"),
            token_type_ids=tokens.get("token_type_ids"),
            **image_kw,
        )

    @staticmethod
    def _pair(n_img: int, tokens: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
        n_txt = tokens["input_ids"].shape[0]
        if n_img == n_txt:
            return n_img, tokens
        if n_txt == 1:
            return n_img, {k: v.expand(n_img, -1) for k, v in tokens.items()}
        if n_img == 1:
            return n_txt, tokens
        raise ValueError(f"ITM pairs images with texts row by row: got {n_img} images and {n_txt} texts")

    def itm_logits(self, x: torch.Tensor, tokens: dict[str, torch.Tensor], pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[0,1] pixels ``(B, 3, H, W)`` + tokens (paired row by row; either side may be 1 and is
        broadcast) -> ``(B, 2)`` logits ``[no match, match]``."""
        n, tokens = self._pair(x.shape[0], tokens)
        if x.shape[0] != n:
            x = x.expand(n, -1, -1, -1)
            pixel_mask = pixel_mask.expand(n, -1, -1) if pixel_mask is not None else None
        pv = self.normalize(x)
        if pixel_mask is None:
            pixel_mask = torch.ones(n, pv.shape[-2], pv.shape[-1], dtype=torch.long, device=pv.device)
        out = self._forward(tokens, pixel_values=pv, pixel_mask=pixel_mask)
        return self.model.itm_score(out.pooler_output)

    def itm_logits_from_embeds(
        self, image_embeds: torch.Tensor, image_masks: torch.Tensor, tokens: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Like `itm_logits` from cached `embed_image` outputs (broadcast as there)."""
        n, tokens = self._pair(image_embeds.shape[0], tokens)
        if image_embeds.shape[0] != n:
            image_embeds = image_embeds.expand(n, -1, -1)
            image_masks = image_masks.expand(n, -1)
        out = self._forward(tokens, image_embeds=image_embeds, pixel_mask=image_masks)
        return self.model.itm_score(out.pooler_output)

    def mlm_logits(self, x: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """[0,1] pixels + (masked) tokens -> MLM logits ``(B, L, vocab)`` over the text positions."""
        n, tokens = self._pair(x.shape[0], tokens)
        if x.shape[0] != n:
            x = x.expand(n, -1, -1, -1)
        pv = self.normalize(x)
        pixel_mask = torch.ones(n, pv.shape[-2], pv.shape[-1], dtype=torch.long, device=pv.device)
        out = self._forward(tokens, pixel_values=pv, pixel_mask=pixel_mask)
        text_len = tokens["input_ids"].shape[1]
        return self.model.mlm.mlm_score(out.last_hidden_state[:, :text_len])

    def mlm_loss(self, x: torch.Tensor, tokens: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Masked-language-modelling cross-entropy; ``labels`` (B, L) hold -100 where not masked."""
        logits = self.mlm_logits(x, tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), ignore_index=-100)

    # -- parameter groups --------------------------------------------------------------------
    def _text_only(self) -> list[nn.Parameter]:
        return list(self.model.vilt.embeddings.text_embeddings.parameters()) + list(
            self.model.mlm.mlm_score.parameters()
        )

    def text_parameters(self) -> Iterator[nn.Parameter]:
        """Word/position embeddings of the text and the MLM head (used only by text)."""
        seen: set[int] = set()
        for p in self._text_only():
            if id(p) not in seen:
                seen.add(id(p))
                yield p

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        """Everything the image path goes through: patch/position/type embeddings, the shared
        transformer, pooler and ITM head (ViLT shares the encoder between modalities, so
        "fine-tune the visual side" means all weights except the text-only embeddings/MLM head)."""
        text_ids = {id(p) for p in self._text_only()}
        seen: set[int] = set()
        for p in self.model.parameters():
            if id(p) not in text_ids and id(p) not in seen:
                seen.add(id(p))
                yield p

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["max_text_len"] = self.max_text_len
        return d


def create(architecture: str, weights: str | None, tokenizer: str | None = None, **kw) -> ViltBackend:
    """Factory for ``vilt:<architecture>@<weights>`` (see the module docstring)."""
    from transformers import ViltConfig

    if architecture not in ARCHITECTURES:
        raise unknown_name("ViLT architecture", architecture, list(ARCHITECTURES))
    if weights == "random" or (weights is None and architecture == "tiny"):
        cfg_kw = dict(ARCHITECTURES[architecture])
        if architecture == "tiny":
            vocab_dir = _tiny_vocab_dir()
            tok = _load_tokenizer(vocab_dir, None)
            cfg_kw["vocab_size"] = len(tok)
        else:
            tok = _load_tokenizer(None, tokenizer)
        torch.manual_seed(int(kw.pop("seed", 0)))
        model = ViltITM(ViltConfig(**cfg_kw))
        return ViltBackend(model, tok)

    from medkt.weights import resolve_weights

    folder = resolve_weights(weights, what="ViLT (dandelin/vilt-b32-mlm-itm)", how_to_get=HOW_TO_GET)
    if folder.is_file():
        folder = folder.parent
    if (folder / "config.json").is_file():
        config = ViltConfig.from_pretrained(str(folder), local_files_only=True)
    elif architecture == "b32":  # ViltConfig's defaults are ViLT-B/32 (dandelin/vilt-b32-*)
        log.warning("no config.json in %s: using ViltConfig() defaults (ViLT-B/32)", folder)
        config = ViltConfig(**ARCHITECTURES[architecture])
    else:
        raise WeightsNotFoundError(f"ViLT weights folder {folder} has no config.json. {HOW_TO_GET}")
    model = ViltITM(config)
    load_itm_checkpoint(model, _read_state_dict(folder), source=str(folder))
    tok = _load_tokenizer(folder, tokenizer)
    return ViltBackend(model, tok)


__all__ = ["ITMHead", "ViltITM", "ViltBackend", "create", "load_itm_checkpoint", "MAX_TEXT_POSITIONS"]
