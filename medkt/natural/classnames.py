"""Class names and prompt templates used by the natural-image experiments (public data).

* ImageNet-1k synsets in class-index order with the readable names of the CLIP repository, and
  the ImageNet-100 subset of CMC (Tian et al. 2019) that the paper uses for ViLT (Tab. 1, 11).
* The 80 OpenAI CLIP prompt templates (the "standard ensemble").
* The 26 "a photo of a {}" style target-caption templates of the paper's CoCa experiments (§8.8).
* The 80 MSCOCO object categories.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


@lru_cache(maxsize=None)
def _imagenet() -> dict:
    return json.loads((DATA / "imagenet.json").read_text())


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 synset ids in class-index order (sorted)."""
    return [c["wnid"] for c in _imagenet()["classes"]]


def imagenet_classnames() -> list[str]:
    """Readable class names (CLIP's cleaned list), aligned with :func:`imagenet_wnids`."""
    return [c["name"] for c in _imagenet()["classes"]]


def imagenet_wnid_to_name() -> dict[str, str]:
    return {c["wnid"]: c["name"] for c in _imagenet()["classes"]}


def imagenet100_wnids() -> list[str]:
    """The CMC ImageNet-100 subset (100 synset ids)."""
    return list(_imagenet()["imagenet100_wnids"])


def imagenet100_classnames() -> list[str]:
    names = imagenet_wnid_to_name()
    return [names[w] for w in imagenet100_wnids()]


@lru_cache(maxsize=None)
def _templates() -> tuple[str, ...]:
    return tuple(json.loads((DATA / "clip_templates.json").read_text())["templates"])


def clip_templates() -> list[str]:
    """The 80 OpenAI CLIP ImageNet templates; ``"{}"`` is replaced by the class name."""
    return list(_templates())


#: Paper §8.8: target captions for CoCa's captioning loss, one drawn at random per sample/step.
COCA_TARGET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "itap of a {}.",
    "a photo of the large {}.",
)

#: The 80 MSCOCO object categories (instances annotations, in category-id order).
COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


def prompts_for(classes: list[str], templates: list[str] | None = None) -> dict[str, list[str]]:
    """class -> ``[template.format(class) for template]`` (default: the 80 CLIP templates)."""
    templates = clip_templates() if templates is None else templates
    return {c: [t.format(c) for t in templates] for c in classes}


@lru_cache(maxsize=None)
def _coco_concepts() -> tuple[tuple[str, str], ...]:
    data = json.loads((DATA / "coco_concepts.json").read_text())["concepts"]
    return tuple((c["name"], c["description"]) for c in data)


def coco_concepts(n_images: int = 10) -> list[dict]:
    """The 80 COCO categories as transfer concepts ``{"name", "description", "n_images"}`` with
    medkt's own short visual descriptions (edit or replace them in a bundle config)."""
    return [{"name": n, "description": d, "n_images": n_images} for n, d in _coco_concepts()]


def concept_names(concepts: list[dict]) -> list[str]:
    """``[c["name"] for c in concepts]`` (for bundle expressions)."""
    return [str(c["name"]) for c in concepts]
