"""Class names and prompt templates used by the natural-image experiments (public data).

* ImageNet-1k synsets in class-index order with the readable names of the CLIP repository
  (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``), and the ImageNet-100 subset of CMC
  (Tian et al. 2019) that the paper uses for ViLT (Tab. 1, 11). Only the synset ids are stored
  here (``data/imagenet_wnids.json``); open_clip does not ship them.
* The 80 OpenAI CLIP prompt templates (the "standard ensemble",
  ``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``).
* The 26 "a photo of a {}" style target-caption templates of the paper's CoCa experiments (§8.8).
* The 80 MSCOCO object categories.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


@lru_cache(maxsize=None)
def _wnids() -> dict:
    return json.loads((DATA / "imagenet_wnids.json").read_text())


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 synset ids in class-index order (sorted)."""
    return list(_wnids()["wnids"])


def imagenet_classnames() -> list[str]:
    """Readable class names (CLIP's cleaned list, from open_clip), aligned with `imagenet_wnids`."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_wnid_to_name() -> dict[str, str]:
    """Synset id -> readable class name, for all 1000 ImageNet-1k classes."""
    return dict(zip(imagenet_wnids(), imagenet_classnames(), strict=True))


def imagenet100_wnids() -> list[str]:
    """The CMC ImageNet-100 subset (100 synset ids)."""
    return list(_wnids()["imagenet100_wnids"])


def clip_templates() -> list[str]:
    """The 80 OpenAI CLIP ImageNet templates; ``"{}"`` is replaced by the class name."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    # open_clip stores them as functions of the class name; "{}" turns each back into a format string
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


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
