"""The phantom world: procedural chest X-ray phantoms, a small CLIP-style model pretrained on
them, and the built-in offline knowledge-transfer demo (bundle ``phantom_nodules``).

Import light: the generator needs numpy/scipy only; the model and experiments import torch.
"""
from __future__ import annotations

from medkt.phantom.world import (
    Canvas,
    Finding,
    Phantom,
    PhantomSet,
    get_finding,
    list_findings,
    load_plugins,
    make_dataset,
    make_phantom,
    register_finding,
    unregister_finding,
)
from medkt.phantom.findings import BUILTIN_FINDINGS

__all__ = [
    "BUILTIN_FINDINGS",
    "Canvas",
    "Finding",
    "Phantom",
    "PhantomSet",
    "get_finding",
    "list_findings",
    "load_plugins",
    "make_dataset",
    "make_phantom",
    "register_finding",
    "unregister_finding",
]
