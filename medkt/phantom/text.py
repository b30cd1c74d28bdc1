"""Captions, prompts and the text-only glossary of the phantom world."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medkt.phantom.world import get_finding, make_phantom

#: name-only caption templates (pretraining and name prompts)
NAME_TEMPLATES = (
    "{name}",
    "a chest x-ray with {name}",
    "chest radiograph showing {name}",
    "an x-ray of the chest with {name}",
    "findings consistent with {name}",
)
#: description caption templates (no name)
DESCRIPTION_TEMPLATES = (
    "{desc}",
    "a chest x-ray showing {desc}",
    "chest radiograph with {desc}",
)
#: name + description templates; the last is the paper's fine-tuning caption form
COMBINED_TEMPLATES = (
    "{name}: {desc}",
    "{desc}, consistent with {name}",
    "a {name} is {desc}",
)
#: templates used for zero-shot name prompts (averaged per class)
EVAL_NAME_TEMPLATES = ("a chest x-ray with {name}", "chest radiograph showing {name}", "{name}")
#: the paper's fine-tuning caption (concept name prepended to its description)
TRANSFER_CAPTION = "a {name} is {desc}"


def name_prompts(names: Sequence[str]) -> dict[str, list[str]]:
    """Class -> name prompts (templates x name)."""
    return {n: [t.format(name=n) for t in EVAL_NAME_TEMPLATES] for n in names}


def sample_descriptions(finding: str, n: int, seed: int, size: int = 64) -> list[str]:
    """``n`` varied attribute descriptions of ``finding`` from freshly drawn attributes.

    Attributes come from drawing phantoms with ``seed`` (the images are discarded), so the
    descriptions cover the finding's natural variety (CuPL-style description ensembles).
    """
    rng = np.random.default_rng([seed, 77])
    out: list[str] = []
    for i in range(n):
        p = make_phantom(finding, seed + 7919, i, size)
        out.append(get_finding(finding).describe(p.attributes, rng))
    return out


def description_prompts(names: Sequence[str], n: int = 12, seed: int = 12345) -> dict[str, list[str]]:
    """Class -> ``n`` description prompts "a chest x-ray showing <description>" (no training)."""
    return {c: [f"a chest x-ray showing {d}" for d in sample_descriptions(c, n, seed)] for c in names}


def caption(name: str, desc: str, rng: np.random.Generator, p_name: float = 0.3, p_desc: float = 0.35) -> str:
    """A random pretraining caption of an image of ``name`` described by ``desc``."""
    u = rng.random()
    if u < p_name:
        t = NAME_TEMPLATES[int(rng.integers(len(NAME_TEMPLATES)))]
        return t.format(name=name)
    if u < p_name + p_desc:
        t = DESCRIPTION_TEMPLATES[int(rng.integers(len(DESCRIPTION_TEMPLATES)))]
        return t.format(desc=desc)
    t = COMBINED_TEMPLATES[int(rng.integers(len(COMBINED_TEMPLATES)))]
    return t.format(name=name, desc=desc)


def glossary_pairs(findings: Sequence[str], n_per_finding: int, seed: int) -> tuple[list[str], list[str], list[int]]:
    """Text-only knowledge: (name sentence, description sentence, class index) pairs.

    Stands in for the language pretraining of a real VLM's text tower: it knows what the *words*
    of every finding (including ones never seen in an image) mean, from definitions and
    descriptions. No images are involved.
    """
    rng = np.random.default_rng([seed, 3])
    a, b, y = [], [], []
    for ci, f in enumerate(findings):
        fd = get_finding(f)
        descs = sample_descriptions(f, n_per_finding, seed + ci)
        for d in descs:
            t = NAME_TEMPLATES[int(rng.integers(len(NAME_TEMPLATES)))]
            a.append(t.format(name=f))
            u = rng.random()
            if u < 0.15 and fd.definition:
                b.append(fd.definition)
            elif u < 0.55:
                b.append(TRANSFER_CAPTION.format(name=f, desc=d))
            else:
                b.append(DESCRIPTION_TEMPLATES[int(rng.integers(len(DESCRIPTION_TEMPLATES)))].format(desc=d))
            y.append(ci)
    return a, b, y
