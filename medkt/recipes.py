"""Transfer recipes by backend family: the settings a script starts from.

A real model gets the paper's recipe (§4.2: 10 images per concept, 5,000 inversion steps at lr
0.1, fine-tuning with Adam at lr 1e-5 for one epoch; ViLT and CoCa with their own objective and
loss as in the paper). The phantom model shipped with medkt is not a paper model: its own recipe
(``"phantom"``: 16 images, the ``"fast"`` 400-step inversion preset, lr 3e-4 for 10 epochs) is
named explicitly, so it is never mistaken for real-model advice (3e-4 is 30x the paper's MedCLIP
learning rate). The bundles carry the paper's numbers for their models (``jsrt_nodules``,
``rare_concepts_clip``, ``rare_concepts_vilt``, ``coco_captioning_coca``); the
``phantom_nodules`` bundle's measured recipe goes further (residual inversion from normal
phantoms, which a generic script does not have), so ``"phantom"`` keeps the plain settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medkt.backends import BackendSpec
from medkt.errors import unknown_name
from medkt.finetune import FinetuneConfig
from medkt.inversion import InversionConfig


@dataclass(frozen=True)
class Recipe:
    """A named transfer recipe: ``n_images`` per concept and the fields of
    `InversionConfig` / `FinetuneConfig` that
    differ from their (paper) defaults."""

    name: str
    n_images: int
    inversion: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)

    def inversion_config(self, **overrides: Any) -> InversionConfig:
        """The recipe's inversion settings; ``overrides`` set to ``None`` are ignored (so a script
        can pass its optional command-line values straight through)."""
        return InversionConfig.from_dict({**self.inversion, **_given(overrides)})

    def finetune_config(self, **overrides: Any) -> FinetuneConfig:
        """The recipe's fine-tuning settings; ``None`` overrides are ignored."""
        return FinetuneConfig.from_dict({**self.finetune, **_given(overrides)})


def _given(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


#: the named recipes (see the module docstring)
RECIPES: dict[str, Recipe] = {
    "paper": Recipe("paper", 10),
    # ViLT: inversion from N(0, 1) through the 2-way image-text matching head, no affine; weight
    # decay 0.01 (paper §4.2, as the rare_concepts_vilt bundle)
    "paper-vilt": Recipe("paper-vilt", 10, {"objective": "itm", "augmentations": [],
                                        "priors": [{"name": "init", "kind": "normal"}, {"name": "tv", "weight": 0.005}]},
                         {"loss": "itm", "optimizer": {"name": "adamw", "weight_decay": 0.01}}),
    # CoCa: contrastive plus 0.1 x captioning loss (paper §4.2, as the coco_captioning_coca bundle)
    "paper-coca": Recipe("paper-coca", 10, {}, {"loss": "clip+caption"}),
    # the shipped phantom model only (examples/, README "Python API")
    "phantom": Recipe("phantom", 16, {"preset": "fast"}, {"lr": 3e-4, "epochs": 10}),
}

#: backend family -> recipe name; every other family (clip, hf_clip, medclip, plug-ins) gets "paper"
FAMILY_RECIPES: dict[str, str] = {"phantom": "phantom", "vilt": "paper-vilt", "coca": "paper-coca"}


def recipe_defaults(backend: str | BackendSpec) -> Recipe:
    """The recipe a transfer on ``backend`` starts from.

    Args:
        backend: a backend spec (``"medclip:vit@/models/medclip-vit"``) or a recipe name from
            `RECIPES` (``"paper"``, ``"phantom"``, ...).

    Returns:
        the paper's recipe for real model families (ViLT and CoCa: their paper variants), the
        ``"phantom"`` recipe for the shipped phantom model.
    """
    if isinstance(backend, str) and backend in RECIPES:
        return RECIPES[backend]
    if isinstance(backend, str) and ":" not in backend:
        raise unknown_name("recipe or backend spec", backend, list(RECIPES))
    spec = backend if isinstance(backend, BackendSpec) else BackendSpec.parse(backend)
    return RECIPES[FAMILY_RECIPES.get(spec.family, "paper")]


__all__ = ["FAMILY_RECIPES", "RECIPES", "Recipe", "recipe_defaults"]
