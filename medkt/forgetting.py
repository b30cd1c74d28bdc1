"""Forgetting control without real data: replay of the *known* classes, inverted from their text.

The paper's setting has no images of the classes the model already knows. To keep them while a
new concept is taught, this module synthesises replay images of the known classes the same way
the new concept's images are made — model inversion toward each known class's description — and
returns them with their class names, ready for `medkt.finetune.finetune`'s
``replay_images`` / ``replay_concepts`` (supervised replay with the ``replay`` control and/or
embedding distillation to the start model with the ``distill`` control). Works with every backend.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from medkt.backends.base import Backend
from medkt.errors import ConfigError

if TYPE_CHECKING:
    from medkt.inversion import InversionConfig


@dataclass
class ReplaySet:
    """Synthetic replay images of known classes: ``images (N, C, S, S)`` in [0, 1], one concept each."""

    images: torch.Tensor
    concepts: list[str]
    similarities: list[float]
    seconds: float = 0.0


def data_free_replay(
    backend: Backend,
    known_descriptions: Mapping[str, str],
    n_per_class: int,
    inversion_config: InversionConfig | dict | None = None,
    *,
    text_template: str = "A {name} is {description}",
    init_images: torch.Tensor | None = None,
    progress: bool = False,
) -> ReplaySet:
    """Invert ``n_per_class`` images per known class from its text (no real image of the class).

    Args:
        backend: the model *before* fine-tuning (its weights are not changed).
        known_descriptions: known class -> description; the inverted text is ``text_template``
            filled with the class name and description (the caption fine-tuning uses), so the
            images sit where the start model puts that class.
        n_per_class: images per known class (>= 1).
        inversion_config: `InversionConfig` (or dict) of the inversion.
        init_images: starting images when the config lists the ``"init"`` prior with kind ``"images"`` (cycled).
    Returns:
        `ReplaySet` with ``len(known_descriptions) * n_per_class`` images, class-major.
    """
    from medkt.inversion import InversionTarget, invert

    if not known_descriptions:
        raise ConfigError("data-free replay needs at least one known class description")
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ConfigError(f"data-free replay needs n_per_class >= 1 images per known class, got {n_per_class!r}")
    if "{name}" not in text_template and "{description}" not in text_template:
        raise ConfigError(f"text_template {text_template!r} uses neither {{name}} nor {{description}}")
    targets = [InversionTarget(c, text_template.format(name=c, description=d), n_per_class)
               for c, d in known_descriptions.items()]
    res = invert(backend, targets, inversion_config, progress=progress, init_images=init_images)
    return ReplaySet(res.images, list(res.concepts), list(res.similarities), res.seconds)
