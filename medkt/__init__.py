"""medkt: teach vision-language models new visual concepts from text alone.

``import medkt`` gives the stable public API of `medkt.api` (see its table): create a
backend, run the transfer step, invert, fine-tune, evaluate zero-shot, compute saliency, segment,
score masks, save and load fine-tuned weights:

    import medkt

    backend = medkt.create_backend("phantom:base")
    # phantoms/images/<class>/*.png from: medkt phantom export -o phantoms --findings "no finding,nodule"
    result = medkt.evaluate_zero_shot(backend, "phantoms/images", {"nodule": ["a chest x-ray with nodule"],
                                                                   "no_finding": ["a normal chest x-ray"]})

The names load on first use (module ``__getattr__``), so ``import medkt`` itself imports neither
torch nor any model code: the command line answers quickly. The algorithm
(`medkt.inversion`, `medkt.finetune`, `medkt.evaluation`, `medkt.spine`)
talks only to the backend protocol in `medkt.backends.base`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # = pyproject.toml; sub-packages read the installed version (importlib.metadata)

#: the public names, all defined in `medkt.api`
__all__ = [
    "Backend", "ClassificationResult", "Concept", "FinetuneConfig", "FinetuneResult", "InversionConfig",
    "InversionResult", "M2IBConfig", "Recipe", "ScoreTable", "SegmentationResult", "TransferResult",
    "ZeroShotEvaluator", "create_backend", "evaluate_zero_shot", "fine_tune", "invert", "list_backends",
    "load_finetuned", "recipe_defaults", "register_backend", "saliency", "save_finetuned", "score_masks", "segment",
    "transfer", "zero_shot_evaluator",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from medkt.api import (  # noqa: F401
        Backend, ClassificationResult, Concept, FinetuneConfig, FinetuneResult, InversionConfig, InversionResult,
        M2IBConfig, Recipe, ScoreTable, SegmentationResult, TransferResult, ZeroShotEvaluator, create_backend,
        evaluate_zero_shot, fine_tune, invert, list_backends, load_finetuned, recipe_defaults, register_backend,
        saliency, save_finetuned, score_masks, segment, transfer, zero_shot_evaluator,
    )


def __getattr__(name: str) -> Any:
    # PEP 562: resolve a public name on first access. Submodules (medkt.inversion, ...) are not
    # in __all__ and keep resolving through the normal import system.
    if name in __all__:
        from medkt import api

        value = getattr(api, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'medkt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
