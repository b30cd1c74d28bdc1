"""PhantomCLIP: a small CLIP-style model for the phantom world.

* Image tower: a residual CNN on ``(B, 1, 64, 64)`` normalised pixels with GroupNorm (stable at
  batch 4 fine-tuning; no batch statistics to corrupt) and smooth SiLU activations (smooth
  input gradients help inversion); avg+max pooled features -> linear projection. Max pooling
  keeps small focal lesions from being averaged away.
* Text tower: open_clip's bundled BPE tokenizer (any English text, no download), a compact
  token table (``token_dim``) projected to the transformer width, a bidirectional transformer
  with padding mask, pooled at the end-of-text token -> linear projection.
* A learnable temperature (``logit_scale``, CLIP init log(1/0.07)).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 49408  # open_clip SimpleTokenizer
SOT, EOT = 49406, 49407


@dataclass
class PhantomCLIPConfig:
    """Architecture of a `PhantomCLIP` (saved in its checkpoint's metadata)."""

    image_size: int = 64
    embed_dim: int = 128
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 2, 2)
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    token_dim: int = 64
    context_length: int = 32
    vocab_size: int = VOCAB_SIZE
    mean: float = 0.45
    std: float = 0.25

    @classmethod
    def from_dict(cls, d: dict) -> "PhantomCLIPConfig":
        """From a JSON dict (lists become tuples; unknown keys are ignored)."""
        known = {f for f in cls.__dataclass_fields__}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)

    def to_dict(self) -> dict:
        """As a JSON-ready dict."""
        return asdict(self)


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c // 4) or 1, c)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU, plus a shortcut (average pooling + 1x1
    convolution when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _gn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _gn(cout)
        self.skip = None if (cin == cout and stride == 1) else nn.Sequential(
            nn.AvgPool2d(stride) if stride > 1 else nn.Identity(), nn.Conv2d(cin, cout, 1, bias=False), _gn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + (x if self.skip is None else self.skip(x)))


class VisualTower(nn.Module):
    """``(B, 1, S, S)`` normalised pixels -> ``(B, embed_dim)``."""

    def __init__(self, cfg: PhantomCLIPConfig):
        super().__init__()
        w = cfg.widths
        # 5x5 stride-2 stem: 64 -> 32 px (cheap on CPU; a 5x5 kernel still resolves 3-px lesions)
        self.stem = nn.Sequential(nn.Conv2d(1, w[0], 5, 2, 2, bias=False), _gn(w[0]), nn.SiLU())
        stages = []
        cin = w[0]
        for i, (cout, nb) in enumerate(zip(w, cfg.blocks)):
            for b in range(nb):
                stride = 2 if (b == 0 and i > 0) else 1  # 32 -> 32 -> 16 -> 8 -> 4
                stages.append(ResBlock(cin, cout, stride))
                cin = cout
        self.blocks = nn.ModuleList(stages)
        self.proj = nn.Linear(2 * cin, cfg.embed_dim)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after the stem and every block (for saliency / layer inversion)."""
        out = [self.stem(x)]
        for blk in self.blocks:
            out.append(blk(out[-1]))
        return out

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Feature maps ``(B, C, h, w)`` -> embedding: average and max pooled, projected."""
        return self.proj(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


class TextTower(nn.Module):
    """Token ids ``(B, L)`` (0 = padding, EOT-terminated) -> ``(B, embed_dim)``."""

    def __init__(self, cfg: PhantomCLIPConfig):
        super().__init__()
        self.token = nn.Embedding(cfg.vocab_size, cfg.token_dim, sparse=True)  # 49k rows: update only used ones
        self.up = nn.Linear(cfg.token_dim, cfg.text_width)
        self.pos = nn.Parameter(torch.zeros(cfg.context_length, cfg.text_width))
        layer = nn.TransformerEncoderLayer(cfg.text_width, cfg.text_heads, 4 * cfg.text_width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        nn.init.normal_(self.token.weight, std=1.0)  # `up` rescales; a small init made all sentences alike
        nn.init.normal_(self.pos, std=0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        # drop all-padding columns (shorter batches are much cheaper; results are identical)
        width = int((ids != 0).sum(1).max().clamp(min=1))
        ids = ids[:, :width]
        pad = ids == 0
        h = self.up(self.token(ids)) + self.pos[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        # end-of-text token (the last non-padding position) pools the sentence
        last = (~pad).long().sum(1).clamp(min=1) - 1
        return self.proj(h[torch.arange(len(ids)), last])


class PhantomCLIP(nn.Module):
    """The phantom world's CLIP-style model: `VisualTower`, `TextTower` and a learnable temperature."""

    def __init__(self, cfg: PhantomCLIPConfig | None = None):
        super().__init__()
        self.cfg = cfg or PhantomCLIPConfig()
        self.visual = VisualTower(self.cfg)
        self.text = TextTower(self.cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 1, S, S)`` -> image embeddings ``(B, embed_dim)`` (not unit length)."""
        return self.visual(x)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, context_length)`` from `tokenize` -> text embeddings ``(B, embed_dim)``."""
        return self.text(ids)


_TOKENIZER = None


def get_tokenizer(context_length: int = 32):
    """open_clip's bundled BPE tokenizer (offline); returns ``texts -> LongTensor (B, L)``."""
    global _TOKENIZER
    if _TOKENIZER is None or _TOKENIZER.context_length != context_length:
        from open_clip.tokenizer import SimpleTokenizer

        _TOKENIZER = SimpleTokenizer(context_length=context_length)
    return _TOKENIZER


def tokenize(texts, context_length: int = 32) -> torch.Tensor:
    """Text(s) -> token ids ``(B, context_length)`` with open_clip's BPE tokenizer."""
    if isinstance(texts, str):
        texts = [texts]
    return get_tokenizer(context_length)(list(texts), context_length=context_length)


def save_checkpoint(model: PhantomCLIP, path: str | Path, meta: dict | None = None, half: bool = True) -> None:
    """safetensors weights (fp16 by default, to stay small) + ``<stem>.json`` sidecar (config + meta)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous().cpu()
          for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"format": "pt", "config": json.dumps(model.cfg.to_dict())})
    side = {"config": model.cfg.to_dict(), **(meta or {})}
    path.with_suffix(".json").write_text(json.dumps(side, indent=2, default=str))


def load_checkpoint(path: str | Path) -> tuple[PhantomCLIP, dict]:
    """Load a checkpoint written by `save_checkpoint` (weights cast back to float32)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    side = {}
    if path.with_suffix(".json").exists():
        side = json.loads(path.with_suffix(".json").read_text())
    cfg_d = side.get("config") or json.loads(md.get("config", "{}"))
    model = PhantomCLIP(PhantomCLIPConfig.from_dict(cfg_d))
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(sd)
    return model.eval(), side
