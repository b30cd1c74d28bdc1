"""Run a model on the ``meta`` device as a stand-in for a GPU on a CPU-only machine.

A meta tensor has a shape, a dtype and a device but no data, so every kernel runs instantly and
torch raises "Tensor on device cpu is not on the expected device meta!" whenever an operation
mixes a meta tensor with a CPU tensor that is not a 0-dim scalar, exactly as it does for CUDA.
What a meta tensor cannot do is hand its values to Python: ``.item()``, ``float(t)``,
``.tolist()``, ``.cpu()``, ``.numpy()``... The :class:`MetaHostSyncs` mode turns those host
syncs *of meta tensors* into placeholder values (ones of the right shape and dtype, ``False``)
so that control flow continues; CPU tensors and every other operation run unchanged, so any
cpu/meta mixing still raises.

Usage::

    backend = create_backend("clip:medkt-tiny-ViT@random", device="meta")
    with MetaHostSyncs() as mode:
        result = invert(backend, targets, cfg, progress=False)
    assert result.images.device.type == "meta"
    assert mode.syncs["item"] > 0          # how many host syncs were answered with placeholders

The placeholders are values, not results: check devices, shapes and that the code ran, never
the numbers.
"""
from __future__ import annotations

import collections
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: Tensor methods that copy values to the host
_SCALAR = {"item", "__float__", "__int__", "__index__", "__bool__", "__complex__"}
_TO_HOST = {"cpu", "numpy", "__array__", "tolist", "__format__"}


def _is_meta(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _placeholder(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor shaped like ``t`` (its dtype unless ``dtype`` is given): ones, False for bools.

    Ones rather than zeros: data-dependent sizes (``int(lengths.max().clamp(min=1))``) stay valid;
    False for bools: guards such as ``if torch.isnan(x).any(): raise`` pass.
    """
    dtype = dtype or t.dtype
    return torch.zeros(t.shape, dtype=dtype) if dtype == torch.bool else torch.ones(t.shape, dtype=dtype)


class _MetaScalars(TorchDispatchMode):
    """Kernel-level reads of one value (``aten._local_scalar_dense``, e.g. inside ``F.interpolate``
    given tensor sizes) of meta tensors -> the placeholder value."""

    def __init__(self, syncs: collections.Counter) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        if func is torch.ops.aten._local_scalar_dense.default and _is_meta(args[0]):
            self.syncs["_local_scalar_dense"] += 1
            return _placeholder(args[0]).reshape(-1)[0].item()
        return func(*args, **(kwargs or {}))


class MetaHostSyncs(TorchFunctionMode):
    """Inside this mode, host syncs of meta tensors return placeholders (see module docstring).

    Boolean-mask indexing of meta tensors (``x[mask]``, a data-dependent shape) assumes every
    element is selected (torch's ``meta_nonzero_assume_all_nonzero``).

    Attributes:
        syncs: count of placeholder answers by method name (``item``, ``cpu``, ``to``...).
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: collections.Counter[str] = collections.Counter()
        self._scalars = _MetaScalars(self.syncs)
        self._nonzero_flag: bool | None = None

    def __enter__(self):
        from torch.fx.experimental import _config

        self._nonzero_flag = _config.meta_nonzero_assume_all_nonzero
        _config.meta_nonzero_assume_all_nonzero = True
        self._scalars.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        from torch.fx.experimental import _config

        try:
            return super().__exit__(*exc)
        finally:
            self._scalars.__exit__(*exc)
            _config.meta_nonzero_assume_all_nonzero = self._nonzero_flag

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and _is_meta(args[0]):
            t = args[0]
            if name in _SCALAR:
                self.syncs[name] += 1
                value = _placeholder(t).reshape(-1)[0] if t.numel() else torch.zeros((), dtype=t.dtype)
                return {"__float__": float, "__int__": int, "__index__": int, "__bool__": bool,
                        "__complex__": complex}.get(name, lambda v: v.item())(value)
            if name in _TO_HOST:
                self.syncs[name] += 1
                ph = _placeholder(t)
                if name == "cpu":
                    return ph
                if name in ("numpy", "__array__"):
                    return ph.numpy()
                if name == "tolist":
                    return ph.tolist()
                return format(ph.item() if ph.numel() == 1 else ph.tolist(), *args[1:])
            if name == "to":
                device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
                if device is not None and device.type != "meta":
                    self.syncs["to"] += 1
                    return _placeholder(t, dtype)
        return func(*args, **kwargs)


def vilt_visual_embed_full_mask(self, pixel_values, pixel_mask, max_image_length=200):
    """``ViltEmbeddings.visual_embed`` for an all-ones ``pixel_mask`` (what medkt passes) without
    data-dependent shapes: transformers' version selects valid patches with ``nonzero``/``unique``/
    ``multinomial``, which a meta tensor cannot run. Same result when every patch is valid and
    ``max_image_length`` keeps them all (checked against the original in tests/test_device.py);
    the pixel mask still takes part, so a mask on another device than the pixels raises.
    """
    import torch.nn.functional as F

    x = self.patch_embeddings(pixel_values)
    x_mask = F.interpolate(pixel_mask[:, None, :, :].float(), size=(x.shape[2], x.shape[3])).long()
    batch_size, num_channels, height, width = x.shape
    patch_dim = self.config.image_size // self.config.patch_size
    spatial_pos = self.position_embeddings[:, 1:, :].transpose(1, 2).view(1, num_channels, patch_dim, patch_dim)
    pos_embed = F.interpolate(spatial_pos, size=(height, width), mode="bilinear", align_corners=True)
    pos_embed = pos_embed.expand(batch_size, -1, -1, -1).flatten(2).transpose(1, 2)
    x = (x * x_mask).flatten(2).transpose(1, 2)  # the mask multiplies: a device mismatch raises
    ii, jj = torch.meshgrid(torch.arange(height, device=x.device), torch.arange(width, device=x.device), indexing="ij")
    patch_index = torch.stack([ii, jj], -1).flatten(0, 1)[None].expand(batch_size, -1, -1)
    x_mask = x_mask.flatten(1)
    cls_tokens = self.cls_token.expand(batch_size, -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    pos_embed = torch.cat((self.position_embeddings[:, 0, :][:, None, :].expand(batch_size, -1, -1), pos_embed), dim=1)
    x = self.dropout(x + pos_embed)
    x_mask = torch.cat([torch.ones(x_mask.shape[0], 1).to(x_mask), x_mask], dim=1)
    return x, x_mask, (patch_index, (height, width))


def assert_on(x: Any, device_type: str = "meta") -> None:
    """Every tensor in ``x`` (nested lists/tuples/dicts) is on ``device_type``."""
    if isinstance(x, torch.Tensor):
        assert x.device.type == device_type, f"tensor of shape {tuple(x.shape)} is on {x.device}, not {device_type}"
    elif isinstance(x, dict):
        for v in x.values():
            assert_on(v, device_type)
    elif isinstance(x, (list, tuple)):
        for v in x:
            assert_on(v, device_type)


__all__ = ["MetaHostSyncs", "assert_on", "vilt_visual_embed_full_mask"]
