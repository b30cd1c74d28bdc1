"""Readers and manifest preparers for the natural-image datasets.

On-disk formats (see ``data_manifests/{rare_concepts,imagenet,flickr30k,coco}.md``):

* **RareConcepts** - one folder per concept: ``<root>/<concept>/*.jpg`` (moongate, tonometer,
  gyroscope; 10 images each in the paper).
* **ImageNet** - the usual ``<root>/<split>/<wnid>/*.JPEG`` folders (``val`` re-organised into
  synset folders, as torchvision's ``ImageFolder`` expects). Labels are synset ids; readable
  names come from `medkt.natural.classnames`.
* **Karpathy split JSON** - ``dataset_flickr30k.json`` / ``dataset_coco.json``:
  ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}], "cocoid"?}]}``.
* **COCO captions JSON** - ``annotations/captions_val2014.json``:
  ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medkt.data.manifest import ManifestRow
from medkt.data.prepare import register_preparer
from medkt.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
RARE_CONCEPTS = ("moongate", "tonometer", "gyroscope")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# -- classification folders ------------------------------------------------------------------
@register_preparer("rare_concepts")
def prepare_rare_concepts(root: Path, concepts: Sequence[str] | None = None) -> list[ManifestRow]:
    """RareConcepts: ``<root>/<concept>/*.jpg``, label = folder name (moongate, tonometer, gyroscope).

    ``concepts`` restricts/orders the folders; by default every sub-folder with images is used.
    """
    root = Path(root)
    folders = [root / c for c in concepts] if concepts else sorted(p for p in root.iterdir() if p.is_dir())
    missing = [f.name for f in folders if not f.is_dir()]
    if missing:
        raise DataError(f"RareConcepts folder(s) {missing} not found under {root}; expected <root>/<concept>/*.jpg")
    rows = [ManifestRow(p.relative_to(root).as_posix(), f.name, split="test") for f in folders for p in _images_in(f)]
    empty = [f.name for f in folders if not _images_in(f)]
    if empty and concepts:
        raise DataError(f"RareConcepts concept folder(s) {empty} under {root} hold no images")
    return rows


def _imagenet_rows(root: Path, split: str, wnids: Sequence[str], per_class: int | None) -> list[ManifestRow]:
    base = Path(root) / split if (Path(root) / split).is_dir() else Path(root)
    present = [w for w in wnids if (base / w).is_dir()]
    if not present:
        raise DataError(
            f"no ImageNet synset folders (e.g. {wnids[0]}/) under {base}; expected <root>/{split}/<wnid>/*.JPEG "
            "(reorganise the flat val folder into synset folders first; see data_manifests/imagenet.md)"
        )
    missing = [w for w in wnids if w not in present]
    if missing:
        raise DataError(f"{len(missing)} ImageNet synset folder(s) missing under {base}, e.g. {missing[:3]}")
    rows = []
    for w in wnids:
        files = _images_in(base / w)
        if not files:
            raise DataError(f"ImageNet folder {base / w} holds no images")
        for p in files[:per_class] if per_class else files:
            rows.append(ManifestRow(p.relative_to(root).as_posix(), w, split=split))
    return rows


@register_preparer("imagenet")
def prepare_imagenet(root: Path, split: str = "val", per_class: int | None = None) -> list[ManifestRow]:
    """ImageNet-1k: ``<root>/<split>/<wnid>/*.JPEG`` -> label = synset id (1000 classes).

    ``per_class`` keeps the first N files (sorted) of each class for a quicker retention check.
    """
    from medkt.natural.classnames import imagenet_wnids

    return _imagenet_rows(Path(root), split, imagenet_wnids(), per_class)


@register_preparer("imagenet100")
def prepare_imagenet100(root: Path, split: str = "val", per_class: int | None = None) -> list[ManifestRow]:
    """ImageNet-100 (CMC subset of 100 synsets) from ImageNet-1k folders; label = synset id."""
    from medkt.natural.classnames import imagenet100_wnids

    return _imagenet_rows(Path(root), split, imagenet100_wnids(), per_class)


# -- captioned images ------------------------------------------------------------------------
@dataclass
class CaptionedImage:
    """One image of a retrieval/captioning split with its reference captions."""

    image_id: int | str
    path: Path
    captions: list[str] = field(default_factory=list)


def _find_image(root: Path, rec: dict) -> Path:
    name = rec.get("filename") or rec.get("file_name")
    if not name:
        raise DataError(f"Karpathy record without 'filename': {str(rec)[:120]}")
    candidates = []
    if rec.get("filepath"):
        candidates.append(root / rec["filepath"] / name)
    candidates += [root / name, root / "images" / name, root / "flickr30k-images" / name]
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def read_karpathy(json_path: str | Path, image_root: str | Path, split: str = "test",
                  limit: int | None = None, check_files: bool = True) -> list[CaptionedImage]:
    """Images of one split of a Karpathy ``dataset_*.json`` with their raw sentences.

    Image files are looked up at ``<image_root>/<filepath>/<filename>`` (COCO: ``val2014/``),
    ``<image_root>/<filename>``, ``<image_root>/images/`` or ``<image_root>/flickr30k-images/``.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise DataError(f"Karpathy split file not found: {json_path} (dataset_flickr30k.json / dataset_coco.json)")
    try:
        data = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{json_path} is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{json_path}: not a Karpathy split file (no top-level 'images' list)")
    out: list[CaptionedImage] = []
    for i, rec in enumerate(data["images"]):
        if rec.get("split") != split:
            continue
        caps = [s.get("raw") or " ".join(s.get("tokens", [])) for s in rec.get("sentences", [])]
        caps = [c.strip() for c in caps if c and c.strip()]
        if not caps:
            raise DataError(f"{json_path}: image {rec.get('filename')} has no sentences")
        image_id = rec.get("cocoid", rec.get("imgid", i))
        path = _find_image(image_root, rec)
        if check_files and not path.is_file():
            raise DataError(f"{json_path}: image file not found: {path} (is --image-root the folder holding the images?)")
        out.append(CaptionedImage(image_id, path, caps))
        if limit and len(out) >= limit:
            break
    if not out:
        splits = sorted({r.get("split") for r in data["images"]} - {None})
        raise DataError(f"{json_path}: no images in split {split!r} (splits present: {splits})")
    return out


def read_coco_captions(json_path: str | Path) -> dict[int, list[str]]:
    """COCO captions annotations (``captions_val2014.json``) -> image id -> captions."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"COCO captions file not found: {json_path}")
    data = json.loads(json_path.read_text())
    if "annotations" not in data:
        raise DataError(f"{json_path}: not a COCO captions file (no 'annotations')")
    out: dict[int, list[str]] = {}
    for a in data["annotations"]:
        out.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
    return out


def with_coco_references(items: list[CaptionedImage], captions_json: str | Path) -> list[CaptionedImage]:
    """Replace the Karpathy sentences by the official COCO captions of the same image ids."""
    refs = read_coco_captions(captions_json)
    missing = [it.image_id for it in items if int(it.image_id) not in refs]
    if missing:
        raise DataError(f"{captions_json}: no captions for image id(s) {missing[:5]} of the split")
    return [CaptionedImage(it.image_id, it.path, refs[int(it.image_id)]) for it in items]


def _karpathy_preparer(default_json: str):
    def prep(root: Path, split: str = "test", json_name: str = default_json) -> list[ManifestRow]:
        root = Path(root)
        candidates = [root / json_name, *sorted(root.rglob(json_name))]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise DataError(f"{json_name} (Karpathy split) not found under {root}")
        items = read_karpathy(path, root, split=split)
        return [ManifestRow(it.path.relative_to(root).as_posix(), str(it.image_id), split=split) for it in items]

    return prep


prepare_flickr30k = register_preparer("flickr30k")(_karpathy_preparer("dataset_flickr30k.json"))
prepare_flickr30k.__doc__ = "Flickr30k Karpathy split (dataset_flickr30k.json + flickr30k-images/): label = image id."
prepare_coco_karpathy = register_preparer("coco_karpathy")(_karpathy_preparer("dataset_coco.json"))
prepare_coco_karpathy.__doc__ = "MSCOCO Karpathy split (dataset_coco.json + val2014/): label = COCO image id."


__all__ = ["CaptionedImage", "read_karpathy", "read_coco_captions", "with_coco_references", "prepare_rare_concepts",
           "prepare_imagenet", "prepare_imagenet100", "RARE_CONCEPTS"]
