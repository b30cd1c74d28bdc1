"""Tiny synthetic natural-image datasets in the real on-disk formats (for the natural-image tests)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = "a dog cat man woman red blue car sitting on the grass street two people playing with ball".split()


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=85)


def write_rare_concepts(root: Path, concepts=("moongate", "tonometer", "gyroscope"), per_concept: int = 2, seed: int = 0) -> Path:
    """``<root>/<concept>/<concept>_<k>.jpg``."""
    rng = np.random.default_rng(seed)
    for c in concepts:
        for k in range(per_concept):
            _jpeg(root / c / f"{c}_{k:02d}.jpg", rng)
    return root


def write_imagenet(root: Path, wnids: list[str], per_class: int = 1, split: str = "val", seed: int = 1) -> Path:
    """``<root>/<split>/<wnid>/ILSVRC2012_val_<n>.JPEG``."""
    rng = np.random.default_rng(seed)
    n = 0
    for w in wnids:
        for _ in range(per_class):
            n += 1
            _jpeg(root / split / w / f"ILSVRC2012_val_{n:08d}.JPEG", rng, size=(36, 30))
    return root


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 9)))).capitalize() + "."


def write_karpathy(root: Path, name: str = "flickr30k", n_test: int = 4, n_train: int = 2, seed: int = 2) -> Path:
    """``dataset_<name>.json`` (Karpathy format) + images; COCO layout uses ``val2014/`` + cocoid."""
    rng = np.random.default_rng(seed)
    coco = name == "coco"
    images = []
    for i in range(n_test + n_train):
        split = "test" if i < n_test else "train"
        fname = f"COCO_val2014_{100 + i:012d}.jpg" if coco else f"{1000 + i}.jpg"
        folder = "val2014" if coco else "flickr30k-images"
        _jpeg(root / folder / fname, rng, size=(48, 36) if i % 2 else (36, 48))
        rec = {"filename": fname, "imgid": i, "split": split,
               "sentences": [{"raw": _sentence(rng), "tokens": [], "imgid": i, "sentid": 5 * i + j} for j in range(5)],
               "sentids": [5 * i + j for j in range(5)]}
        if coco:
            rec.update(filepath="val2014", cocoid=100 + i)
        images.append(rec)
    path = root / f"dataset_{name}.json"
    path.write_text(json.dumps({"images": images, "dataset": name}))
    return path


def write_coco_captions(root: Path, karpathy_json: Path) -> Path:
    """``annotations/captions_val2014.json`` with the same captions as the Karpathy file."""
    data = json.loads(karpathy_json.read_text())
    imgs, anns = [], []
    for rec in data["images"]:
        imgs.append({"id": rec["cocoid"], "file_name": rec["filename"], "width": 48, "height": 36})
        for s in rec["sentences"]:
            anns.append({"id": s["sentid"], "image_id": rec["cocoid"], "caption": s["raw"]})
    path = root / "annotations" / "captions_val2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": imgs, "annotations": anns}))
    return path
