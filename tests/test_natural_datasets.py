"""Natural-image data: class lists, ImageNet/RareConcepts folders, Karpathy and COCO caption JSON."""
from __future__ import annotations

import json

import pytest

from helpers_natural import write_coco_captions, write_imagenet, write_karpathy, write_rare_concepts
from medkt.errors import DataError


def test_class_lists_and_templates():
    from medkt.natural import classnames as cn

    wnids, names = cn.imagenet_wnids(), cn.imagenet_classnames()
    assert len(wnids) == 1000 == len(names) and wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert names[0] == "tench" and cn.imagenet_wnid_to_name()["n01440764"] == "tench"
    assert len(cn.imagenet100_wnids()) == 100 and set(cn.imagenet100_wnids()) <= set(wnids)
    t = cn.clip_templates()
    assert len(t) == 80 and all(x.count("{}") == 1 for x in t) and "a photo of a {}." in t
    assert len(cn.COCA_TARGET_TEMPLATES) == 26 and len(set(cn.COCA_TARGET_TEMPLATES)) == 26
    assert len(cn.COCO_CATEGORIES) == 80 and len(set(cn.COCO_CATEGORIES)) == 80
    assert cn.prompts_for(["moongate"], ["a photo of a {}."]) == {"moongate": ["a photo of a moongate."]}


def test_rare_concepts_and_imagenet_preparers(tmp_path):
    from medkt.data.manifest import read_manifest
    from medkt.data.prepare import get_preparer, prepare
    from medkt.natural.classnames import imagenet100_wnids

    write_rare_concepts(tmp_path / "rare", per_concept=2)
    m = prepare("rare_concepts", tmp_path / "rare")
    rows = read_manifest(m, tmp_path / "rare")
    assert sorted({r.label for r in rows}) == ["gyroscope", "moongate", "tonometer"] and len(rows) == 6
    with pytest.raises(DataError, match="not found"):
        get_preparer("rare_concepts")(tmp_path / "rare", concepts=["moongate", "astrolabe"])

    wn = imagenet100_wnids()
    write_imagenet(tmp_path / "in", wn, per_class=2)
    rows = get_preparer("imagenet100")(tmp_path / "in", per_class=1)
    assert len(rows) == 100 and rows[0].path.startswith("val/") and {r.label for r in rows} == set(wn)
    with pytest.raises(DataError, match="missing"):  # ImageNet-1k needs all 1000 synsets
        get_preparer("imagenet")(tmp_path / "in")


def test_karpathy_and_coco_captions(tmp_path):
    from medkt.data.prepare import get_preparer
    from medkt.natural.datasets import read_coco_captions, read_karpathy, with_coco_references

    fl = write_karpathy(tmp_path / "f30k", "flickr30k", n_test=3, n_train=2)
    items = read_karpathy(fl, tmp_path / "f30k", split="test")
    assert len(items) == 3 and all(len(it.captions) == 5 and it.path.is_file() for it in items)
    assert get_preparer("flickr30k")(tmp_path / "f30k")[0].path.startswith("flickr30k-images/")
    with pytest.raises(DataError, match="splits present"):
        read_karpathy(fl, tmp_path / "f30k", split="restval")

    coco = write_karpathy(tmp_path / "coco", "coco", n_test=2, n_train=1)
    items = read_karpathy(coco, tmp_path / "coco")
    assert [it.image_id for it in items] == [100, 101] and items[0].path.parent.name == "val2014"
    caps = write_coco_captions(tmp_path / "coco", coco)
    assert read_coco_captions(caps)[100] == items[0].captions
    assert with_coco_references(items, caps)[1].captions == items[1].captions
    data = json.loads(caps.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 101]
    caps.write_text(json.dumps(data))
    with pytest.raises(DataError, match="101"):
        with_coco_references(items, caps)
    (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000101.jpg").unlink()
    with pytest.raises(DataError, match="image file not found"):
        read_karpathy(coco, tmp_path / "coco")
