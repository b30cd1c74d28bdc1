"""Segment Anything (segment-anything 1.0) prompted with boxes from the post-processed saliency.

A SAM model is named by a spec ``"MODEL_TYPE@CHECKPOINT"``: ``vit_b``/``vit_l``/``vit_h`` with a
local checkpoint file (never downloaded), or ``tiny@random`` / ``tiny@FILE`` for tests (a
~0.3M-parameter SAM with the real architecture classes). Masks are thresholded at 0 on the
logits (``SamPredictor``'s ``mask_threshold``), one box per saliency component is sent in one
batched call, the per-box masks are united and the ``top_k`` largest components kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from medkt.errors import ConfigError, WeightsNotFoundError, unknown_name

SAM_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")
SAM_CHECKPOINT_ENV = "MEDKT_SAM_CHECKPOINT"
HOW_TO_GET_SAM = (
    "Download a Segment Anything checkpoint (e.g. sam_vit_h_4b8939.pth or sam_vit_b_01ec64.pth from "
    "the segment-anything README) on a machine with internet access and pass its local path "
    "as sam='vit_h@/path/sam_vit_h_4b8939.pth' (or set MEDKT_SAM_CHECKPOINT)"
)


def build_tiny_sam(img_size: int = 256, seed: int | None = 0):
    """A tiny random SAM built from the real classes (tests, benchmarks, smoke runs)."""
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
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def load_sam(spec: str, device: str | torch.device = "cpu"):
    """``"vit_h@/path/ckpt.pth"`` -> a ``Sam`` in eval mode on ``device`` (``auto``, ``cuda:N``... see
    `medkt.device.resolve_device`; torchrun: this rank's GPU). ``tiny@random`` builds a random tiny SAM."""
    import os

    from medkt.distributed import local_device

    device = local_device(device)  # an unavailable device fails before a large checkpoint is read

    model_type, _, ckpt = str(spec).partition("@")
    model_type = model_type.strip()
    if model_type not in SAM_TYPES:
        raise unknown_name("SAM model type", model_type, SAM_TYPES)
    ckpt = ckpt.strip() or os.environ.get(SAM_CHECKPOINT_ENV, "")
    if model_type == "tiny":
        sam = build_tiny_sam()
        if ckpt and ckpt != "random":
            sam.load_state_dict(_load_state(ckpt))
        return sam.to(device).eval()
    if not ckpt:
        raise WeightsNotFoundError(f"no checkpoint given for SAM {model_type}. {HOW_TO_GET_SAM}")
    if ckpt == "random":
        raise ConfigError("random weights are only available for the 'tiny' SAM (tests); give a checkpoint path")
    from segment_anything import sam_model_registry

    sam = sam_model_registry[model_type](checkpoint=None)
    try:
        sam.load_state_dict(_load_state(ckpt))
    except RuntimeError as exc:
        raise ConfigError(f"SAM checkpoint {ckpt} does not fit model type {model_type!r}: {str(exc).splitlines()[0]}") from None
    return sam.to(device).eval()


def _load_state(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsNotFoundError(f"SAM checkpoint not found: {p}. {HOW_TO_GET_SAM}")
    state = torch.load(p, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def to_rgb_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(H, W)``, ``(H, W, 3)`` or ``(C, H, W)`` image (uint8 or float [0, 1]) -> ``(H, W, 3)`` uint8."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
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

    sam: torch.nn.Module
    multimask_output: bool = False
    top_k: int = 1

    def __post_init__(self) -> None:
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(self.sam)

    @classmethod
    def from_spec(cls, spec: str, device: str = "cpu", **kw) -> "SamSegmenter":
        """Load SAM from a spec (`load_sam`) and wrap it; ``kw`` as the dataclass fields."""
        return cls(load_sam(spec, device=device), **kw)

    @torch.no_grad()
    def segment(self, image: np.ndarray | torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        """Image + boxes ``(K, 4)`` ``[x0, y0, x1, y1]`` in the image's pixels -> bool mask ``(H, W)``.

        No box -> an empty mask (SAM is not run).
        """
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
