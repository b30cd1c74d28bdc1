"""Backend registry: ``create_backend("family:architecture@weights")``.

* ``family`` picks the adapter (``open_clip``/``clip``, ``hf_clip``, ``medclip``, ``biomedclip``,
  ``phantom``, ``vilt``, ``coca``...).
* ``architecture`` is the model shape (``ViT-B-32``, ``tiny``...).
* ``weights`` (optional) is a local file/folder, an HF-cache repo id, or ``random`` (random
  initialisation, for tests). Without ``@weights`` each family uses its documented default
  (e.g. ``$MEDKT_WEIGHTS``); nothing is ever downloaded.

Built-in families are imported lazily so that ``import medkt`` stays light; a user registers a
new family with `register_backend`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from medkt.backends.base import Backend
from medkt.registry import Registry
from medkt.weights import BackendSpec  # defined there: parsing a spec needs no torch (preflight)

BackendFactory = Callable[..., Backend]

#: backend families: ``factory(architecture, weights, **options) -> Backend``; the model families
#: below are lazy (imported on first use); ``phantom`` registers itself from
#: `medkt.phantom.backend` (entry-point group ``medkt.backends``)
BACKENDS: Registry[BackendFactory] = Registry("backend family", group="medkt.backends")
for _family, _target in {
    "open_clip": "medkt.backends.open_clip_family:create",
    "clip": "medkt.backends.open_clip_family:create",
    "hf_clip": "medkt.backends.hf_clip:create",
    "medclip": "medkt.backends.medclip:create",
    "vilt": "medkt.backends.vilt:create",
    "coca": "medkt.backends.coca:create",
    "biomedclip": "medkt.backends.biomedclip:create",
}.items():
    BACKENDS.register_lazy(_family, _target)


def register_backend(family: str) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator: ``@register_backend("mine") def create(architecture, weights, **kw) -> Backend``
    (registers in `BACKENDS`)."""
    return BACKENDS.register(family)


def list_backends() -> list[str]:
    """Registered backend family names, sorted (built-in and `register_backend` ones)."""
    return sorted(BACKENDS.names())


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
    backend = BACKENDS.get(parsed.family)(parsed.architecture, parsed.weights, **kwargs)
    backend.spec = str(parsed)
    backend.precision = prec
    return backend.to(dev).eval()


__all__ = ["BACKENDS", "Backend", "BackendSpec", "create_backend", "list_backends", "register_backend"]
