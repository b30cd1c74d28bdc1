"""Chest X-ray zero-shot prompts and MedCLIP-style prompt scoring.

* `chexpert_class_prompts` -- MedCLIP's CheXpert-5x200c prompts: every combination of a
  severity, a subtype and a location phrase per class (word lists in
  ``medkt/configs/chexpert_prompt_parts.json``, the lists MedCLIP took over from GLoRIA), then
  ``n`` sampled per class. Upstream samples with the unseeded global ``random``; here a
  ``random.Random(seed)`` is used, drawing the classes in the same order, so
  ``random.seed(s)`` + upstream's ``generate_chexpert_class_prompts(n)`` and
  ``chexpert_class_prompts(n, seed=s)`` give the same prompts.
* `medclip_class_scores` -- MedCLIP's ``PromptClassifier``: each class's prompts are
  tokenised together, scored against the image with the clamped logit scale, and reduced with
  the mean (``ensemble=True``) or the max over prompts.
  (`medkt.evaluation.ZeroShotEvaluator` scores with the same semantics as
  ``aggregate="mean_similarity"`` / ``"max"``.)
"""
from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from medkt.backends.base import Backend
from medkt.errors import ConfigError
from medkt.evaluation import aggregate_scores, class_text_embeddings

#: CheXpert competition tasks = the five classes of CheXpert-5x200c, in MedCLIP's order
CHEXPERT_5X200C_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
PROMPT_PARTS_FILE = Path(__file__).resolve().parent / "configs" / "chexpert_prompt_parts.json"


@lru_cache(maxsize=1)
def chexpert_prompt_parts() -> dict[str, list[list[str]]]:
    """class -> ordered phrase lists (MedCLIP's key order per class: e.g. Pleural Effusion puts the
    location list before the subtype list, which changes the prompts' word order)."""
    data = json.loads(PROMPT_PARTS_FILE.read_text())
    return {c: [list(v["words"]) for v in spec["parts"]] for c, spec in data["classes"].items()}


def all_chexpert_prompts(cls: str) -> list[str]:
    """Every severity x subtype x location combination for ``cls`` (upstream order, duplicates kept)."""
    parts = chexpert_prompt_parts()
    if cls not in parts:
        raise ConfigError(f"no CheXpert prompt template for class {cls!r}; known: {list(parts)}")
    # upstream formats f"{a} {b} {c}"; collapsing the blanks of empty phrases does not change the
    # WordPiece tokens, and keeps reports readable
    return [" ".join(" ".join(combo).split()) for combo in itertools.product(*parts[cls])]


def chexpert_class_prompts(n: int | None = 10, seed: int = 0,
                           classes: Sequence[str] = CHEXPERT_5X200C_CLASSES) -> dict[str, list[str]]:
    """``n`` sampled prompts per class (all of them when ``n`` is None or exceeds the count).

    Deterministic by ``seed``; classes are drawn in the order given.
    """
    rng = random.Random(seed)
    out: dict[str, list[str]] = {}
    for c in classes:
        prompts = all_chexpert_prompts(c)
        out[c] = rng.sample(prompts, n) if n is not None and n < len(prompts) else prompts
    return out


# -- MedCLIP PromptClassifier semantics -------------------------------------------------------
def medclip_class_scores(backend: Backend, x01: torch.Tensor, class_prompts: dict[str, Sequence[str]],
                         ensemble: str = "mean") -> torch.Tensor:
    """MedCLIP ``PromptClassifier`` logits ``(B, K)`` for [0, 1] pixels ``(B, C, S, S)``: medkt's
    zero-shot scores (`medkt.evaluation.aggregate_scores`) times the model's temperature.

    ``ensemble="mean"``: mean over a class's prompts of ``logit_scale * cos`` (upstream
    ``ensemble=True``, medkt's ``"mean_similarity"``); ``"max"``: the best prompt (``ensemble=False``).
    """
    if ensemble not in ("mean", "max"):
        raise ConfigError(f"ensemble must be 'mean' or 'max', got {ensemble!r}")
    img = backend.encode_images(x01)
    scores = aggregate_scores(img, class_text_embeddings(backend, class_prompts),
                              "mean_similarity" if ensemble == "mean" else "max")
    return backend.logit_scale.detach().float() * scores


__all__ = [
    "CHEXPERT_5X200C_CLASSES",
    "all_chexpert_prompts",
    "chexpert_class_prompts",
    "chexpert_prompt_parts",
    "class_text_embeddings",
    "medclip_class_scores",
]
