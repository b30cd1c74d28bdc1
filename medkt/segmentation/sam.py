"""Segment Anything (segment-anything 1.0) prompted with boxes from the post-processed saliency.

A SAM model is named by a spec: a checkpoint path alone (``/models/sam_vit_b_01ec64.pth``: the
model type is read from the file, `sam_layout`), ``MODEL_TYPE@PATH`` with ``vit_b`` /
``vit_l`` / ``vit_h`` (checked against the file), a bare type (its checkpoint from
``$MEDKT_SAM_CHECKPOINT``), or ``tiny@random`` / ``tiny@FILE`` for tests (a ~0.3M-parameter SAM
with the real architecture classes). Nothing is downloaded. Masks are thresholded at 0 on the
logits (``SamPredictor``'s ``mask_threshold``), one box per saliency component is sent in one
batched call, the per-box masks are united and the ``top_k`` largest components kept.

Importing this module does not import torch (`check_sam_checkpoint` is meant for cheap
pre-flight checks).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from medkt.errors import ConfigError, MedktError, WeightsNotFoundError, unknown_name

SAM_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")
SAM_CHECKPOINT_ENV = "MEDKT_SAM_CHECKPOINT"
SAM_SUFFIXES = (".pth", ".pt")
HOW_TO_GET_SAM = (
    "Download a Segment Anything checkpoint (e.g. sam_vit_h_4b8939.pth or sam_vit_b_01ec64.pth from "
    "the segment-anything README) on a machine with internet access and pass its local path "
    "as sam=/path/sam_vit_b_01ec64.pth (or set MEDKT_SAM_CHECKPOINT); the model type is read from the file"
)

# The three SAM 1.0 releases (segment_anything/build_sam.py): image-encoder blocks -> type, and
# the width / heads / global-attention blocks of the release. The number of image-encoder blocks
# decides the type (the rule of `sam_layout`); the width and every other size are read from
# the file, so a checkpoint with the release's block count at another width (medkt's tiny test
# layouts, fine-tuned variants) loads as that type.
RELEASE_LAYOUTS: dict[str, dict[str, Any]] = {
    "vit_b": {"depth": 12, "embed_dim": 768, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"depth": 24, "embed_dim": 1024, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}
TYPE_BY_DEPTH = {v["depth"]: k for k, v in RELEASE_LAYOUTS.items()}
# Not in the weights' shapes: the mask decoder's attention heads (8 in every release) and the
# normalisation constants (non-persistent buffers of ``Sam``).
DECODER_HEADS = 8
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def parse_sam_spec(spec: str | os.PathLike) -> tuple[str | None, str]:
    """``"vit_b@/p.pth"`` -> ``("vit_b", "/p.pth")``; ``"/p.pth"`` -> ``(None, "/p.pth")``;
    ``"vit_b"`` -> ``("vit_b", "")`` (checkpoint from ``$MEDKT_SAM_CHECKPOINT``).

    An existing file is a path whatever its name; otherwise a word before ``@`` without a path
    separator is a model type (an unknown one is an error), anything else a path (paths may
    contain ``@``).
    """
    text = os.fspath(spec).strip()
    if text and Path(text).expanduser().is_file():
        return None, text
    head, sep, tail = text.partition("@")
    head = head.strip()
    if sep and head and not any(c in head for c in "/\\.~"):
        if head in ("auto", ""):
            return None, tail.strip()
        if head not in SAM_TYPES:
            raise unknown_name("SAM model type", head, SAM_TYPES)
        return head, tail.strip()
    if not sep and text in SAM_TYPES:
        return text, ""
    return None, text


def _file_problems(path: str) -> list[tuple[type[MedktError], str]]:
    """(error class, one-line message) for each problem found without reading the weights."""
    if not path:
        return [(WeightsNotFoundError, f"no SAM checkpoint given. {HOW_TO_GET_SAM}")]
    p = Path(path).expanduser()
    if not p.exists():
        return [(WeightsNotFoundError, f"SAM checkpoint not found: {p}. {HOW_TO_GET_SAM}")]
    if p.is_dir():
        return [(ConfigError, f"SAM checkpoint {p} is a folder: pass the .pth file inside it (e.g. {p}/sam_vit_b_01ec64.pth)")]
    problems: list[tuple[type[MedktError], str]] = []
    if not p.name.lower().endswith(SAM_SUFFIXES):
        problems.append((ConfigError, f"SAM checkpoint {p} is not a .pth file: pass the sam_vit_*.pth file of the "
                                      "Segment Anything release"))
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        return problems + [(ConfigError, f"SAM checkpoint {p} cannot be read ({exc.strerror or exc}): fix its "
                                         "permissions or copy it to a readable place")]
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (0x80 protocol byte)
    if not head:
        problems.append((ConfigError, f"SAM checkpoint {p} is empty: download it again. {HOW_TO_GET_SAM}"))
    elif head[:2] == b"PK":
        if not zipfile.is_zipfile(p):  # reads only the archive's end record: catches cut-off downloads
            problems.append((ConfigError, f"SAM checkpoint {p} is truncated or corrupt (an interrupted download?): "
                                          f"download it again. {HOW_TO_GET_SAM}"))
    elif head[:1] != b"\x80":
        problems.append((ConfigError, f"SAM checkpoint {p} is not a PyTorch file (an HTML page saved instead of the "
                                      f"weights?): download it again. {HOW_TO_GET_SAM}"))
    return problems


def check_sam_checkpoint(path: str | os.PathLike | None) -> list[str]:
    """Cheap checks of a SAM checkpoint, for pre-flight checks: no torch import, the weights are not read.

    Checks that the file exists, is a readable ``.pth`` file and starts like a PyTorch file
    (a cut-off zip archive is caught from its end record). Whether it is a vit_b / vit_l / vit_h
    model is checked when it is loaded (`inspect_sam`).

    Args:
        path: a checkpoint path or a SAM spec (``"vit_b@/p.pth"``); ``None``/``""`` means
            ``$MEDKT_SAM_CHECKPOINT``. ``tiny@random`` has nothing to check.
    Returns:
        Problems, one line each naming the file and the fix; ``[]`` when none was found.
    """
    try:
        model_type, ckpt = parse_sam_spec(path or "")
    except MedktError as exc:
        return [str(exc)]
    ckpt = ckpt or os.environ.get(SAM_CHECKPOINT_ENV, "").strip()
    if model_type == "tiny" and ckpt in ("", "random"):
        return []
    return [msg for _, msg in _file_problems(ckpt)]


@dataclass(frozen=True)
class SamLayout:
    """The sizes of a SAM model, read from its weights by `sam_layout` (SAM 1.0 names)."""

    model_type: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    img_size: int
    patch_size: int
    mlp_ratio: float
    qkv_bias: bool
    out_chans: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    iou_head_depth: int
    iou_head_hidden_dim: int
    num_multimask_outputs: int

    def describe(self) -> str:
        """``"vit_b (12 image-encoder blocks, width 768)"``."""
        return f"{self.model_type} ({self.depth} image-encoder blocks, width {self.embed_dim})"


def sam_layout(state: Mapping[str, Any], source: str = "the SAM checkpoint") -> SamLayout:
    """Read a SAM model's sizes from its state dict (only ``.shape`` of the values is used).

    Rule for the type: the number of image-encoder blocks (``image_encoder.blocks.N``) names it,
    12 -> ``vit_b``, 24 -> ``vit_l``, 32 -> ``vit_h`` (`RELEASE_LAYOUTS`); any other count
    is an error. The other sizes are read from the weights: width from the patch embedding,
    heads from the relative-position tables (width / their last dimension), global-attention
    blocks as those whose table spans the whole patch grid, window size from the others, image
    size from the absolute position embedding, the prompt encoder and mask decoder sizes from
    their layers.

    Raises:
        ConfigError: not a Segment Anything state dict, or a block count of no release.
    """
    def shape(key: str) -> tuple[int, ...]:
        v = state.get(key)
        if v is None or not hasattr(v, "shape"):
            raise ConfigError(f"{source} is not a Segment Anything checkpoint (no {key!r} in its weights): pass a "
                              "sam_vit_b/l/h .pth file of the segment-anything release")
        return tuple(int(d) for d in v.shape)

    def indices(prefix: str) -> list[int]:
        return sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)
                       and k[len(prefix):].split(".")[0].isdigit()})

    embed_dim, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    grid = shape("image_encoder.pos_embed")[1]
    blocks = indices("image_encoder.blocks.")
    depth = len(blocks)
    model_type = TYPE_BY_DEPTH.get(depth)
    if model_type is None or blocks != list(range(depth)):
        raise ConfigError(f"{source} has an image encoder of {depth} blocks (width {embed_dim}); Segment Anything "
                          "releases have 12 (vit_b), 24 (vit_l) or 32 (vit_h): pass a sam_vit_b/l/h .pth file "
                          "(tiny@FILE loads medkt's tiny test model)")
    rel = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in blocks]
    head_dim = rel[0][1]
    global_idx = tuple(i for i, r in zip(blocks, rel) if r[0] == 2 * grid - 1)
    windows = sorted({(r[0] + 1) // 2 for r in rel if r[0] != 2 * grid - 1})
    if len(windows) > 1 or embed_dim % head_dim:
        raise ConfigError(f"{source}: image-encoder blocks of mixed window sizes {windows} or heads that do not "
                          f"divide the width {embed_dim}: not a Segment Anything release layout")
    decoder_layers = indices("mask_decoder.transformer.layers.")
    iou_layers = indices("mask_decoder.iou_prediction_head.layers.")
    return SamLayout(
        model_type=model_type,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=global_idx,
        window_size=windows[0] if windows else 0,  # 0: every block attends globally
        img_size=grid * patch,
        patch_size=patch,
        mlp_ratio=shape("image_encoder.blocks.0.mlp.lin1.weight")[0] / embed_dim,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state,
        out_chans=shape("image_encoder.neck.0.weight")[0],
        mask_in_chans=shape("prompt_encoder.mask_downscaling.3.weight")[0],
        decoder_depth=len(decoder_layers),
        decoder_mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        iou_head_depth=len(iou_layers),
        iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
        num_multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1,
    )


def build_sam(layout: SamLayout, device: Any = "meta"):
    """An uninitialised ``Sam`` of ``layout``'s sizes (on the meta device by default: its weights
    come from a checkpoint via ``load_state_dict(..., assign=True)``, so the ~0.6B random values of
    vit_h are never drawn)."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = layout.img_size // layout.patch_size
    with torch.device(device):
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=layout.img_size, patch_size=layout.patch_size, embed_dim=layout.embed_dim,
                depth=layout.depth, num_heads=layout.num_heads, mlp_ratio=layout.mlp_ratio,
                out_chans=layout.out_chans, qkv_bias=layout.qkv_bias,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                window_size=layout.window_size, global_attn_indexes=layout.global_attn_indexes,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=layout.out_chans, image_embedding_size=(grid, grid),
                input_image_size=(layout.img_size, layout.img_size), mask_in_chans=layout.mask_in_chans,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=layout.num_multimask_outputs,
                transformer=TwoWayTransformer(depth=layout.decoder_depth, embedding_dim=layout.out_chans,
                                              mlp_dim=layout.decoder_mlp_dim, num_heads=DECODER_HEADS),
                transformer_dim=layout.out_chans,
                iou_head_depth=layout.iou_head_depth,
                iou_head_hidden_dim=layout.iou_head_hidden_dim,
            ),
            pixel_mean=list(PIXEL_MEAN),
            pixel_std=list(PIXEL_STD),
        )
    return sam.eval()


def build_tiny_sam(img_size: int = 256, seed: int | None = 0):
    """A tiny random SAM built from the real classes (tests, benchmarks, smoke runs)."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if seed is not None:
        torch.manual_seed(seed)
    patch = 16
    emb = img_size // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=32,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(emb, emb), input_image_size=(img_size, img_size), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def sam_type_of(sam: Any) -> str:
    """``vit_b`` / ``vit_l`` / ``vit_h`` by the number of image-encoder blocks, ``tiny`` otherwise."""
    return TYPE_BY_DEPTH.get(len(sam.image_encoder.blocks), "tiny")


def resolve_sam_spec(spec: str | os.PathLike, model_type: str | None = None) -> tuple[str | None, str]:
    """A SAM spec (+ an optional separate model type, the bundles' ``sam_model_type``) ->
    ``(model type or None = read from the file, checkpoint path)``; an empty path is taken from
    ``$MEDKT_SAM_CHECKPOINT``. Two different types are an error."""
    spec_type, ckpt = parse_sam_spec(spec)
    extra = None if model_type in (None, "", "auto") else str(model_type).strip()
    if extra is not None and extra not in SAM_TYPES:
        raise unknown_name("SAM model type", extra, SAM_TYPES)
    if spec_type and extra and spec_type != extra:
        raise ConfigError(f"sam={os.fspath(spec)!r} names {spec_type} but sam_model_type is {extra!r}: set "
                          "sam_model_type=null (the type is read from the checkpoint) or make them agree")
    return spec_type or extra, ckpt or os.environ.get(SAM_CHECKPOINT_ENV, "").strip()


def _raise_file_problems(ckpt: str) -> None:
    problems = _file_problems(ckpt)
    if problems:
        cls, msg = problems[0]
        raise cls(msg)


def _read_checked(spec: str | os.PathLike, model_type: str | None) -> tuple[str | None, str, Any, SamLayout | None]:
    """Everything `load_sam` checks before building: (type, path, state dict or None, layout or None)."""
    kind, ckpt = resolve_sam_spec(spec, model_type)
    if kind == "tiny":
        if ckpt in ("", "random"):
            return kind, ckpt, None, None
        _raise_file_problems(ckpt)
        return kind, ckpt, _load_state(ckpt), None
    if ckpt == "random":
        raise ConfigError("random weights are only available for the 'tiny' SAM (tests): give a checkpoint path")
    if not ckpt:
        raise WeightsNotFoundError(f"no checkpoint given for SAM{' ' + kind if kind else ''}. {HOW_TO_GET_SAM}")
    _raise_file_problems(ckpt)
    state = _load_state(ckpt)
    layout = sam_layout(state, source=f"SAM checkpoint {ckpt}")
    if kind is not None and kind != layout.model_type:
        raise ConfigError(f"SAM checkpoint {ckpt} is {layout.describe()}, not {kind}: pass sam={ckpt} alone (the type "
                          f"is read from the file) or sam={layout.model_type}@{ckpt}")
    return layout.model_type, ckpt, state, layout


def inspect_sam(spec: str | os.PathLike, model_type: str | None = None) -> SamLayout | None:
    """Check a SAM spec without building the model (reads the checkpoint memory-mapped: about a
    second even for vit_h): file problems, a state dict of a SAM release layout, an explicit type
    that agrees with the file. Returns the layout (None for ``tiny``)."""
    return _read_checked(spec, model_type)[3]


def load_sam(spec: str | os.PathLike, device: Any = "cpu", model_type: str | None = None):
    """A SAM spec (module docstring) -> a ``Sam`` in eval mode on ``device`` (``auto``, ``cuda:N``...
    see `medkt.device.resolve_device`; torchrun: this rank's GPU).

    Args:
        spec: ``/path/sam_vit_b_01ec64.pth``, ``vit_b@/path``, ``vit_b`` (path from
            ``$MEDKT_SAM_CHECKPOINT``), ``tiny@random`` / ``tiny@FILE``.
        model_type: a type the checkpoint must have (``None``/``"auto"``: read from the file).
    Raises:
        WeightsNotFoundError: no checkpoint given or the file is missing.
        ConfigError: unreadable file, not a SAM release layout, or a type that contradicts the file.
    """
    from medkt.distributed import local_device

    device = local_device(device)  # an unavailable device fails before a large checkpoint is read
    kind, ckpt, state, layout = _read_checked(spec, model_type)
    if kind == "tiny":
        sam = build_tiny_sam()
        if state is not None:
            try:
                sam.load_state_dict(state)
            except RuntimeError as exc:
                raise ConfigError(f"SAM checkpoint {ckpt} does not fit medkt's tiny test SAM "
                                  f"({str(exc).splitlines()[0]}): pass it without 'tiny@'") from None
        return sam.to(device).eval()
    sam = build_sam(layout)
    try:
        sam.load_state_dict(state, assign=True)
    except RuntimeError as exc:  # sam_layout read these sizes from the same file: a damaged or edited state dict
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ConfigError(f"SAM checkpoint {ckpt} ({layout.describe()}) has weights that do not fit that model: "
                          f"{lines[1] if len(lines) > 1 else lines[0]}; download the release file again") from None
    return sam.to(device).eval()


def _load_state(path: str) -> Mapping[str, Any]:
    import torch

    p = Path(path).expanduser()
    try:
        # memory-mapped: the sizes are known without reading 2.5 GB, and loading does not copy the weights
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # the legacy (non-zip) format cannot be memory-mapped; any other problem shows below
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for damaged files
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"SAM checkpoint {p} could not be read ({first}): download it again. "
                              f"{HOW_TO_GET_SAM}") from None
    for key in ("model", "state_dict"):  # some re-releases wrap the state dict
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ConfigError(f"SAM checkpoint {p} holds a {type(state).__name__}, not a state dict: pass the "
                          "sam_vit_*.pth file of the segment-anything release")
    return state


def to_rgb_uint8(image: np.ndarray | Any) -> np.ndarray:
    """``(H, W)``, ``(H, W, 3)`` or ``(C, H, W)`` image (uint8 or float [0, 1], array or tensor) -> ``(H, W, 3)`` uint8."""
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ConfigError(f"expected an image (H, W) or (H, W, 3), got shape {a.shape}")
    return np.ascontiguousarray(a)


@dataclass
class SamSegmenter:
    """Box-prompted SAM.

    Args:
        sam: a ``segment_anything.modeling.Sam``.
        multimask_output: ask SAM for 3 masks per box and keep the one with the best predicted IoU
            (upstream default off: one mask per box).
        top_k: connected components kept in the final mask (upstream: 1; 2 for lungs).
    """

    sam: Any  # a segment_anything.modeling.Sam
    multimask_output: bool = False
    top_k: int = 1

    def __post_init__(self) -> None:
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(self.sam)

    @classmethod
    def from_spec(cls, spec: str, device: Any = "cpu", model_type: str | None = None, **kw: Any) -> "SamSegmenter":
        """Load SAM from a spec (`load_sam`) and wrap it; ``kw`` as the dataclass fields."""
        return cls(load_sam(spec, device=device, model_type=model_type), **kw)

    @property
    def model_type(self) -> str:
        """``vit_b`` / ``vit_l`` / ``vit_h`` (or ``tiny``), from the model's image encoder."""
        return sam_type_of(self.sam)

    def segment(self, image: np.ndarray | Any, boxes: np.ndarray) -> np.ndarray:
        """Image + boxes ``(K, 4)`` ``[x0, y0, x1, y1]`` in the image's pixels -> bool mask ``(H, W)``.

        No box -> an empty mask (SAM is not run).
        """
        import torch

        with torch.no_grad():  # torch imported here: this module loads without it
            return self._segment(image, boxes)

    def _segment(self, image: np.ndarray | Any, boxes: np.ndarray) -> np.ndarray:
        import torch

        from medkt.segmentation.postprocess import keep_largest_components

        rgb = to_rgb_uint8(image)
        h, w = rgb.shape[:2]
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((h, w), dtype=bool)
        self.predictor.set_image(rgb)
        device = self.predictor.device
        tb = self.predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, device=device), (h, w))
        masks, scores, _ = self.predictor.predict_torch(
            point_coords=None, point_labels=None, boxes=tb, multimask_output=self.multimask_output
        )  # masks (K, M, H, W) bool (logits > 0), scores (K, M)
        if masks.shape[1] > 1:
            best = scores.argmax(dim=1)
            masks = masks[torch.arange(masks.shape[0], device=masks.device), best][:, None]
        union = masks[:, 0].any(dim=0).cpu().numpy()
        self.predictor.reset_image()
        out, _ = keep_largest_components(union, self.top_k)
        return out
