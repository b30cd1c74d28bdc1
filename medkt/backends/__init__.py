"""Backend registry: ``create_backend("family:architecture@weights")``.

* ``family`` picks the adapter (``open_clip``/``clip``, ``hf_clip``, ``medclip``, ``phantom``,
  ``vilt``, ``coca``...).
* ``architecture`` is the model shape (``ViT-B-32``, ``tiny``...).
* ``weights`` (optional) is a local file/folder, an HF-cache repo id, or ``random`` (random
  initialisation, for tests). Without ``@weights`` each family uses its documented default
  (e.g. ``$MEDKT_WEIGHTS``); nothing is ever downloaded.

Built-in families are imported lazily so that ``import medkt`` stays light; a user registers a
new family with `register_backend`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from medkt.backends.base import Backend
from medkt.errors import ConfigError, unknown_name

BackendFactory = Callable[..., Backend]

# family -> "module:function" (lazy) or a factory callable (registered at run time)
_REGISTRY: dict[str, str | BackendFactory] = {
    "open_clip": "medkt.backends.open_clip_backend:create",
    "clip": "medkt.backends.open_clip_backend:create",
    "hf_clip": "medkt.backends.hf_clip:create",
    "medclip": "medkt.backends.medclip:create",
    "phantom": "medkt.backends.phantom:create",
    "vilt": "medkt.backends.vilt:create",
    "coca": "medkt.backends.coca:create",
}


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec ``family:architecture[@weights]``.

    ``family`` is the registered adapter name, ``architecture`` the model shape, ``weights`` a local
    path, an HF-cache repo id, ``random``, or ``None`` for the family's default.
    """

    family: str
    architecture: str
    weights: str | None

    @classmethod
    def parse(cls, spec: str) -> "BackendSpec":
        """``"clip:ViT-B-32@/path"`` -> ``BackendSpec("clip", "ViT-B-32", "/path")``."""
        if not isinstance(spec, str) or ":" not in spec:
            raise ConfigError(
                f"bad backend spec {spec!r}: expected 'family:architecture[@weights]', "
                "e.g. 'clip:ViT-B-32@/models/clip-b32.pt' or 'hf_clip:tiny@random'"
            )
        family, rest = spec.split(":", 1)
        arch, _, weights = rest.partition("@")
        if not family or not arch:
            raise ConfigError(f"bad backend spec {spec!r}: family and architecture must be non-empty")
        return cls(family.strip(), arch.strip(), weights.strip() or None)

    def __str__(self) -> str:
        return f"{self.family}:{self.architecture}" + (f"@{self.weights}" if self.weights else "")


def register_backend(family: str) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator: ``@register_backend("mine") def create(architecture, weights, **kw) -> Backend``."""

    def deco(factory: BackendFactory) -> BackendFactory:
        _REGISTRY[family] = factory
        return factory

    return deco


def list_backends() -> list[str]:
    """Registered backend family names, sorted (built-in and `register_backend` ones)."""
    return sorted(_REGISTRY)


def _factory(family: str) -> BackendFactory:
    if family not in _REGISTRY:
        raise unknown_name("backend family", family, list(_REGISTRY))
    entry = _REGISTRY[family]
    if isinstance(entry, str):
        module, _, func = entry.partition(":")
        entry = getattr(importlib.import_module(module), func)
        _REGISTRY[family] = entry
    return entry


def create_backend(spec: str | BackendSpec, device: str | torch.device = "cpu", precision: str = "fp32",
                   **kwargs) -> Backend:
    """Build a backend from its spec string; the model is returned in eval mode on ``device``.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``
            (see `medkt.device.resolve_device`). Under torchrun, ``auto``/``cuda`` is the
            local rank's GPU (`medkt.distributed.local_device`).
        precision: ``auto|fp32|bf16|fp16`` for the forward passes run under
            ``backend.autocast()`` (`medkt.device.resolve_precision`); weights stay fp32.
    """
    from medkt.device import resolve_precision
    from medkt.distributed import local_device

    dev = local_device(device)  # validate before building a large model
    prec = resolve_precision(precision, dev)
    parsed = spec if isinstance(spec, BackendSpec) else BackendSpec.parse(spec)
    backend = _factory(parsed.family)(parsed.architecture, parsed.weights, **kwargs)
    backend.spec = str(parsed)
    backend.precision = prec
    return backend.to(dev).eval()


__all__ = ["Backend", "BackendSpec", "create_backend", "list_backends", "register_backend"]
