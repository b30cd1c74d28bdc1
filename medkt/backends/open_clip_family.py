"""The ``clip`` / ``open_clip`` family: an open_clip model name, or an open_clip hub repo.

``clip:ViT-B-32@...`` builds a named open_clip architecture (`medkt.backends.open_clip_backend`);
``clip:hf-hub:ORG/REPO[@weights]`` an open_clip hub model from the local HF cache
(`medkt.backends.biomedclip`, which builds on the former: this dispatcher keeps the two
modules free of an import cycle).
"""
from __future__ import annotations

from typing import Any

from medkt.backends.base import Backend

HUB_PREFIX = "hf-hub:"


def create(architecture: str, weights: str | None, **kwargs: Any) -> Backend:
    """Build a ``clip``/``open_clip`` backend (see the module docstring)."""
    if architecture.startswith(HUB_PREFIX):  # an open_clip hub repo, read from the local HF cache
        from medkt.backends.biomedclip import create_from_hub

        return create_from_hub(architecture[len(HUB_PREFIX):], weights, **kwargs)
    from medkt.backends.open_clip_backend import create as create_named

    return create_named(architecture, weights, **kwargs)
