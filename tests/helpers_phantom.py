"""Shared test set-ups: tiny random backends and a tiny phantom experiment on the shipped model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
#: the demo bundle's configuration (novel finding, description, known descriptions, recipe)
PHANTOM_BUNDLE = json.loads((ROOT / "bundles" / "phantom_nodules" / "configs" / "transfer.json").read_text())


def tiny_backend(spec: str):
    """A backend built with a fixed torch seed (random weights are the same in every test)."""
    from medkt.backends import create_backend

    torch.manual_seed(0)
    return create_backend(spec)


def tiny_images(backend, n: int = 4) -> torch.Tensor:
    """``(n, C, S, S)`` seeded random pixels in [0, 1] at the backend's input size."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, backend.image_channels, backend.image_size, backend.image_size, generator=g)


def tiny_phantom_experiment():
    """The demo bundle's experiment on ``phantom:base`` at toy size: ``(experiment, validation set of
    2 phantoms per class, recipe dict with 2 images, 2 inversion steps and 1 fine-tuning epoch)``."""
    from medkt.phantom.experiment import PhantomTransferExperiment

    b = PHANTOM_BUNDLE
    exp = PhantomTransferExperiment("phantom:base", b["novel"], b["description"], b["known_descriptions"],
                                    eval_per_class=2, split="val", cupl_prompts=2)
    r = json.loads(json.dumps(b["recipe"]))
    r["n_images"], r["inversion"]["steps"] = 2, 2
    r["finetune"] = {**r["finetune"], "epochs": 1}
    return exp, exp.eval_set(0), r
