"""Vision splits: an image encoder cut after one block, for M2IB saliency and partial inversion.

A split is part of the backend protocol: a backend that implements
`VisionSplitProvider` returns its own; otherwise the split is looked up
in `VISION_SPLITS` by the class of a module inside the backend (open_clip
``VisionTransformer`` and timm trunks, HF ``CLIPVisionTransformer``, HF ``SwinModel`` as used by
MedCLIP), and `register_vision_split` adds new ones.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medkt.errors import ConfigError
from medkt.registry import Registry

Tensor = torch.Tensor


@dataclass
class VisionSplit:
    """An image encoder cut after block ``layer``.

    Attributes:
        prefix: normalised pixels ``(B, C, S, S)`` -> tokens ``(B, T, D)`` output by block ``layer``.
        suffix: tokens ``(B, T, D)`` -> image embedding ``(B, E)``, equal (up to scale) to the
            backend's ``encode_image``.
        grid: ``(rows, cols)`` of the spatial tokens.
        n_extra_tokens: leading non-spatial tokens (CLS) dropped from the map.
        hook_module: the block whose output is bottlenecked (the naive path hooks it).
        layer: the block index (0-based) and ``num_layers`` the number of blocks.
    """

    prefix: Callable[[Tensor], Tensor]
    suffix: Callable[[Tensor], Tensor]
    grid: tuple[int, int]
    n_extra_tokens: int
    hook_module: nn.Module
    layer: int
    num_layers: int
    description: str = ""


SplitFactory = Callable[[nn.Module, Any, "int | None"], VisionSplit]
#: vision splits by encoder class path ``"module:Class"`` (the class is imported only at lookup, so
#: optional libraries stay optional); later registrations take precedence
VISION_SPLITS: Registry[SplitFactory] = Registry("vision split")


def register_vision_split(class_path: str) -> Callable[[SplitFactory], SplitFactory]:
    """Decorator: ``@register_vision_split("pkg.module:Class") def make(encoder, backend, layer) -> VisionSplit``.

    ``encoder`` is the first module of that class found in the backend, ``layer`` the requested
    block (None = default depth). Later registrations take precedence.
    """

    return VISION_SPLITS.register(class_path)


def default_layer(num_layers: int) -> int:
    """Upstream uses block 9 of 12 (0-based); keep that relative depth for other encoders."""
    return max(0, round(num_layers * 10 / 12) - 1)


def check_layer(layer: int | None, num_layers: int, what: str) -> int:
    """Block index for M2IB in a tower of ``num_layers`` blocks: ``layer`` (negative counts from
    the end) or the upstream-like default depth; out of range is a ConfigError naming ``what``.
    Public for backends that provide their own `VisionSplit`."""
    if layer is None:
        return default_layer(num_layers)
    idx = layer + num_layers if layer < 0 else layer
    if not 0 <= idx < num_layers:
        raise ConfigError(f"M2IB layer {layer} is out of range for {what} with {num_layers} blocks (valid: 0..{num_layers - 1} or negative)")
    return idx


def _find_child_projection(backend: nn.Module, encoder: nn.Module) -> nn.Module | None:
    """The projection applied after ``encoder`` by its parent (HF CLIP ``visual_projection``, MedCLIP ``projection_head``)."""
    for parent in backend.modules():
        children = dict(parent.named_children())
        if any(c is encoder for c in children.values()):
            for name in ("visual_projection", "projection_head", "image_projection", "vision_proj", "proj"):
                mod = children.get(name)
                if isinstance(mod, nn.Module):
                    return mod
    return None


def _class_of(path: str) -> type | None:
    import importlib

    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def get_vision_split(backend: nn.Module, layer: int | None = None) -> VisionSplit:
    """The vision split of a backend at block ``layer`` (None = upstream-like default depth)."""
    from medkt.backends.base import VisionSplitProvider

    if isinstance(backend, VisionSplitProvider):
        return backend.vision_split(layer)
    modules = list(backend.modules())
    for class_path in reversed(VISION_SPLITS.names()):
        factory = VISION_SPLITS.get(class_path)
        cls = _class_of(class_path)
        if cls is None:
            continue
        for m in modules:
            if isinstance(m, cls):
                return factory(m, backend, layer)
    known = ", ".join(reversed(VISION_SPLITS.names()))
    raise ConfigError(
        f"M2IB has no vision split for backend {getattr(backend, 'spec', '') or type(backend).__name__}: none of its "
        f"modules is one of [{known}]. Add one with medkt.backends.vision_split.register_vision_split or let the "
        "backend declare medkt.backends.base.VisionSplitProvider"
    )


# -- built-in splits -------------------------------------------------------------------------------


@register_vision_split("open_clip.transformer:VisionTransformer")
def _open_clip_vit(visual: nn.Module, backend: nn.Module, layer: int | None) -> VisionSplit:
    blocks = visual.transformer.resblocks
    L = check_layer(layer, len(blocks), "open_clip VisionTransformer")
    batch_first = getattr(visual.transformer, "batch_first", True)

    def run(x: Tensor, mods) -> Tensor:
        if not batch_first:
            x = x.transpose(0, 1).contiguous()
        for r in mods:
            x = r(x, attn_mask=None)
        return x if batch_first else x.transpose(0, 1)

    def prefix(pixels: Tensor) -> Tensor:
        return run(visual._embeds(pixels), blocks[: L + 1])

    def suffix(tokens: Tensor) -> Tensor:
        pooled, _ = visual._pool(run(tokens, blocks[L + 1 :]))
        return pooled @ visual.proj if visual.proj is not None else pooled

    gs = visual.grid_size
    if not batch_first:  # the hook sees (T, B, D); keep one layout for the bottleneck
        raise ConfigError("M2IB needs an open_clip VisionTransformer run batch-first (open_clip >= 2.24 default)")
    return VisionSplit(prefix, suffix, (int(gs[0]), int(gs[1])), 1, blocks[L], L, len(blocks), "open_clip ViT")


@register_vision_split("transformers.models.clip.modeling_clip:CLIPVisionTransformer")
def _hf_clip_vit(vm: nn.Module, backend: nn.Module, layer: int | None) -> VisionSplit:
    layers = vm.encoder.layers
    L = check_layer(layer, len(layers), "HF CLIPVisionTransformer")
    proj = _find_child_projection(backend, vm)

    def prefix(pixels: Tensor) -> Tensor:
        h = vm.pre_layrnorm(vm.embeddings(pixels))
        for lyr in layers[: L + 1]:
            h = lyr(h, None, None)[0]
        return h

    def suffix(tokens: Tensor) -> Tensor:
        h = tokens
        for lyr in layers[L + 1 :]:
            h = lyr(h, None, None)[0]
        pooled = vm.post_layernorm(h[:, 0, :])
        return proj(pooled) if proj is not None else pooled

    cfg = vm.config
    g = int(cfg.image_size) // int(cfg.patch_size)
    return VisionSplit(prefix, suffix, (g, g), 1, layers[L], L, len(layers), "HF CLIP ViT")


@register_vision_split("transformers.models.swin.modeling_swin:SwinModel")
def _hf_swin(sm: nn.Module, backend: nn.Module, layer: int | None) -> VisionSplit:
    """Swin (MedCLIP's vision tower): ``layer`` is a flat block index over all stages
    (swin-tiny: depths 2-2-6-2 -> 12 blocks, so layer 9 is the last block of stage 3 on a 14x14 grid)."""
    stages = sm.encoder.layers
    flat = [(s, b) for s, st in enumerate(stages) for b in range(len(st.blocks))]
    L = check_layer(layer, len(flat), "HF SwinModel")
    s_idx, b_idx = flat[L]
    proj = _find_child_projection(backend, sm)
    grid = tuple(int(v) for v in sm.embeddings.patch_grid)
    for _ in range(s_idx):
        grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)

    def prefix(pixels: Tensor) -> Tensor:
        h, dims = sm.embeddings(pixels)
        for st in stages[:s_idx]:
            out = st(h, dims)
            h, dims = out[0], (out[2][-2], out[2][-1])
        for blk in stages[s_idx].blocks[: b_idx + 1]:
            h = blk(h, dims)[0]
        return h

    def suffix(tokens: Tensor) -> Tensor:
        h, dims = tokens, grid
        st = stages[s_idx]
        for blk in st.blocks[b_idx + 1 :]:
            h = blk(h, dims)[0]
        if st.downsample is not None:
            h = st.downsample(h, dims)
            dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        for st in stages[s_idx + 1 :]:
            out = st(h, dims)
            h, dims = out[0], (out[2][-2], out[2][-1])
        seq = sm.layernorm(h)
        pooled = torch.flatten(sm.pooler(seq.transpose(1, 2)), 1) if sm.pooler is not None else seq.mean(1)
        return proj(pooled) if proj is not None else pooled

    return VisionSplit(prefix, suffix, grid, 0, stages[s_idx].blocks[b_idx], L, len(flat), "HF Swin")


@register_vision_split("open_clip.timm_model:TimmModel")
def _open_clip_timm_vit(tm: nn.Module, backend: nn.Module, layer: int | None) -> VisionSplit:
    """open_clip's timm adapter around a timm ``VisionTransformer`` (e.g. BiomedCLIP's ViT-B/16)."""
    trunk = tm.trunk
    if not all(hasattr(trunk, a) for a in ("blocks", "patch_embed", "_pos_embed", "forward_head")):
        raise ConfigError(f"M2IB supports open_clip timm towers that are ViTs; got {type(trunk).__name__}")
    blocks = trunk.blocks
    L = check_layer(layer, len(blocks), f"timm {type(trunk).__name__}")

    def prefix(pixels: Tensor) -> Tensor:
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixels))))
        for blk in blocks[: L + 1]:
            x = blk(x)
        return x

    def suffix(tokens: Tensor) -> Tensor:
        x = tokens
        for blk in blocks[L + 1 :]:
            x = blk(x)
        return tm.head(trunk.forward_head(trunk.norm(x)))

    gs = trunk.patch_embed.grid_size
    n_extra = int(trunk.num_prefix_tokens)  # CLS (+ register) tokens precede the patches
    return VisionSplit(prefix, suffix, (int(gs[0]), int(gs[1])), n_extra, blocks[L], L, len(blocks), "open_clip timm ViT")


__all__ = ["VISION_SPLITS", "VisionSplit", "check_layer", "default_layer", "get_vision_split", "register_vision_split"]
