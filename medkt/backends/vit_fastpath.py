"""Exact, faster CPU paths for open_clip ViTs, and running them at any input resolution.

Measured on ViT-B/32, batch 10 at 224 px, one inversion step (forward + input gradient, 2 threads,
``torch.profiler``; issue 6):

* ``nn.MultiheadAttention(batch_first=True)`` transposes its input to ``(L, N, E)`` before the
  packed in-projection, so ``F.linear`` sees a non-contiguous 3-D tensor and runs as a ``bmm``
  of 50 small ``10 x 768 @ 768 x 2304`` matrices (~100 GFLOP/s) instead of one ``500 x 768``
  matmul (~160 GFLOP/s): ~0.41 s of a 1.5 s step. `fast_mha_forward` does the same maths
  on the contiguous ``(N, L, E)`` tensor and calls ``scaled_dot_product_attention`` directly.
* the patch-embedding ``Conv2d(stride = kernel)``'s input gradient ran at ~13 GFLOP/s
  (0.17 s); a patchify reshape + one matmul is the same linear map.

Both are patched onto the *instances* (``module.forward`` / ``visual._embeds``), so parameter
names, state dicts and checkpoints are unchanged, and the original path is used whenever an
argument the fast path does not handle is given (attention weights, key padding masks, ...).

`vit_embeds` also interpolates the learned position embedding (bicubic, as timm and HF
``interpolate_pos_encoding`` do) when the input is not the model's size, so progressive-resolution
inversion can run the encoder at 64 or 128 px instead of upsampling every step to 224.
"""
from __future__ import annotations

import os
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def fast_mha_forward(
    self: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, None]:
    """``nn.MultiheadAttention.forward`` for batch-first self-attention without returned weights."""
    simple = (
        self.batch_first and query.dim() == 3 and key is query and value is query and key_padding_mask is None
        and not need_weights and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
        and (self.dropout == 0.0 or not self.training) and not is_causal
    )
    if not simple:
        return nn.MultiheadAttention.forward(
            self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
    n, length, embed = query.shape
    heads = self.num_heads
    qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (N, L, 3E), one 2-D matmul
    q, k, v = qkv.view(n, length, 3, heads, embed // heads).permute(2, 0, 3, 1, 4).unbind(0)
    mask = attn_mask
    if mask is not None and mask.dtype == torch.bool:  # MHA: True = masked; SDPA: True = attend
        mask = ~mask
    if mask is not None and mask.dim() == 3:  # MHA's per-sample masks are (N * heads, L, S)
        mask = mask.view(n, heads, *mask.shape[-2:])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, L, E/H)
    out = out.transpose(1, 2).reshape(n, length, embed)
    return F.linear(out, self.out_proj.weight, self.out_proj.bias), None


def vit_embeds(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer._embeds`` with matmul patchify and any input size.

    ``x``: ``(B, 3, H, W)`` normalised pixels; ``H, W`` are cropped down to multiples of the patch
    size (as the strided convolution does). Returns ``(B, 1 + gh * gw, width)`` tokens after
    ``ln_pre``.
    """
    ph, pw = self.conv1.kernel_size
    b, c, h, w = x.shape
    gh, gw = h // ph, w // pw
    x = x[:, :, : gh * ph, : gw * pw]
    patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
    weight = self.conv1.weight
    x = patches @ weight.reshape(weight.shape[0], -1).t()
    if self.conv1.bias is not None:
        x = x + self.conv1.bias
    cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_position_embedding(self.positional_embedding, self.grid_size, (gh, gw)).to(x.dtype)
    x = self.patch_dropout(x)
    return self.ln_pre(x)


def interpolate_position_embedding(
    pos: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """``(1 + gh * gw, D)`` class + grid position embedding resized (bicubic) to ``new_grid``."""
    if tuple(grid) == tuple(new_grid):
        return pos
    cls, rest = pos[:1], pos[1:]
    d = rest.shape[-1]
    rest = rest.reshape(1, grid[0], grid[1], d).permute(0, 3, 1, 2)
    rest = F.interpolate(rest, size=new_grid, mode="bicubic", align_corners=False)
    return torch.cat([cls, rest.permute(0, 2, 3, 1).reshape(-1, d)], dim=0)


def is_patchable_vit(visual: Any) -> bool:
    """True for open_clip ``VisionTransformer``s whose embedding `vit_embeds` reproduces."""
    conv = getattr(visual, "conv1", None)
    return (
        isinstance(conv, nn.Conv2d) and tuple(conv.stride) == tuple(conv.kernel_size) and conv.padding in ((0, 0), 0)
        and conv.groups == 1 and hasattr(visual, "_embeds") and hasattr(visual, "grid_size")
        and getattr(visual, "positional_embedding", None) is not None and visual.positional_embedding.dim() == 2
    )


def enable_fast_paths(module: nn.Module) -> dict[str, int]:
    """Patch every batch-first ``nn.MultiheadAttention`` under ``module`` and, if ``module`` has an
    open_clip ViT tower at ``module.visual`` (or is one), its ``_embeds``. Returns counts."""
    n_attn = 0
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention) and m.batch_first and "forward" not in vars(m):
            m.forward = types.MethodType(fast_mha_forward, m)
            n_attn += 1
    visual = getattr(module, "visual", module)
    n_embed = 0
    if is_patchable_vit(visual) and "_embeds" not in vars(visual):
        visual._embeds = types.MethodType(vit_embeds, visual)
        n_embed = 1
    return {"attention": n_attn, "embeds": n_embed}


def install_fast_paths(backend: nn.Module, model: nn.Module) -> None:
    """`enable_fast_paths` on a backend's ``model`` unless ``MEDKT_FAST_PATHS=0``; records the
    counts in ``backend.fast_paths`` (all 0 when switched off), which its
    `accepts_any_size` reads."""
    if os.environ.get("MEDKT_FAST_PATHS", "1") == "0":
        backend.fast_paths = {"attention": 0, "embeds": 0}
        return
    backend.fast_paths = enable_fast_paths(model)


def disable_fast_paths(module: nn.Module) -> None:
    """Undo `enable_fast_paths` (back to the upstream modules' own methods)."""
    for m in module.modules():
        for name in ("forward", "_embeds"):
            if isinstance(vars(m).get(name), types.MethodType):
                delattr(m, name)
