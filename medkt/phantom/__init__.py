"""The phantom world: procedural chest X-ray phantoms, a small CLIP-style model pretrained on
them, and the built-in offline knowledge-transfer demo (bundle ``phantom_nodules``).

Import light: the generator needs numpy/scipy only; the model and experiments import torch.
"""
from __future__ import annotations

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

# lazy (PEP 562): `import medkt.phantom.cli` (every `medkt` command) must not import scipy
_WORLD_NAMES = ('Canvas', 'Finding', 'Phantom', 'PhantomSet', 'get_finding', 'list_findings', 'load_plugins', 'make_dataset', 'make_phantom', 'register_finding', 'unregister_finding')


def __getattr__(name: str):
    if name in _WORLD_NAMES:
        from medkt.phantom import world

        return getattr(world, name)
    if name == "BUILTIN_FINDINGS":
        from medkt.phantom.findings import BUILTIN_FINDINGS

        return BUILTIN_FINDINGS
    raise AttributeError(f"module 'medkt.phantom' has no attribute {name!r}")

