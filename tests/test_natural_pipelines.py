"""The natural-image bundles end to end on tiny random models and tiny data in the real formats."""
from __future__ import annotations

import json

import pytest
import torch

from helpers_natural import write_coco_captions, write_imagenet, write_karpathy, write_rare_concepts

TINY_INV = {"steps": 3, "checkpoint_every": 2, "priors": [{"name": "progressive", "sizes": [32, 64], "steps": [2]}]}
TWO = [{"name": "dog", "description": "a furry pet with a tail", "n_images": 2},
       {"name": "car", "description": "a red road vehicle with wheels", "n_images": 2}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from medkt.data.prepare import prepare
    from medkt.natural.classnames import imagenet100_wnids

    root = tmp_path_factory.mktemp("natural")
    write_rare_concepts(root / "rare", per_concept=2)
    # ImageNet-style val folders of the 100 ImageNet-100 synsets; the CLIP bundle classifies
    # them among all 1000 classes (a subset of the real 50,000-image val set, same layout)
    write_imagenet(root / "imagenet", imagenet100_wnids(), per_class=1)
    f30k = write_karpathy(root / "f30k", "flickr30k", n_test=4, n_train=1)
    coco = write_karpathy(root / "coco", "coco", n_test=3, n_train=1)
    from medkt.data.manifest import read_manifest, write_manifest

    in100 = prepare("imagenet100", root / "imagenet", out=root / "imagenet" / "imagenet100.csv")
    return {
        "root": root,
        # 20 of those images as the CLIP bundle's ImageNet-1k retention set (keeps the test short)
        "imagenet20": write_manifest(read_manifest(in100)[:20], root / "imagenet" / "imagenet_subset.csv"),
        "rare": prepare("rare_concepts", root / "rare"),
        "imagenet100": in100,
        "imagenet100_wnids": imagenet100_wnids(),
        "f30k": f30k,
        "coco": coco,
        "coco_captions": write_coco_captions(root / "coco", coco),
    }


def _run(bundle, overrides, out, config="transfer.json"):
    from medkt.bundles import run_bundle

    torch.manual_seed(0)
    return run_bundle(bundle, overrides, config=config, output=out)


def test_rare_concepts_clip(data, tmp_path):
    from safetensors.torch import load_file

    from medkt.backends import create_backend

    common = {"backend": "clip:medkt-tiny-ViT@random", "rare_concepts_manifest": str(data["rare"]),
              "imagenet_manifest": str(data["imagenet20"]), "inversion": {**TINY_INV, "priors": [{"name": "progressive", "sizes": [16, 32], "steps": [2]}]},
              "templates": ["a photo of a {}.", "itap of a {}."], "finetune#lr": 1e-3}
    res = _run("rare_concepts_clip", common, tmp_path / "run")
    ev = res["evaluations"]
    assert len(ev["rare_concepts"]["before"]["classes"]) == 1003 and len(ev["imagenet"]["before"]["classes"]) == 1000
    assert ev["imagenet"]["after"]["n_images"] == 20
    assert set(ev["rare_concepts"]["after"]["per_class"]) == {"moongate", "tonometer", "gyroscope"}
    assert res["finetune"]["steps"] == 8  # 30 inverted images, batch 4
    tuned = load_file(str(tmp_path / "run" / "finetuned.safetensors"))
    base = create_backend("clip:medkt-tiny-ViT@random").state_dict()
    assert tuned and all("visual" in k for k in tuned) and any(not torch.equal(v, base[k]) for k, v in tuned.items())


@pytest.mark.slow
def test_rare_concepts_clip_text_only_ablation(data, tmp_path):
    from safetensors.torch import load_file

    common = {"backend": "clip:medkt-tiny-ViT@random", "rare_concepts_manifest": str(data["rare"]),
              "imagenet_manifest": str(data["imagenet20"]), "inversion": {**TINY_INV, "priors": [{"name": "progressive", "sizes": [16, 32], "steps": [2]}]},
              "templates": ["a photo of a {}."], "finetune#lr": 1e-3}
    # Fig. 4 ablation config: text encoder trained instead of the visual one
    res = _run("rare_concepts_clip", common, tmp_path / "text_only", config="ablation_text_only.json")
    tuned = load_file(str(tmp_path / "text_only" / "finetuned.safetensors"))
    assert res["finetune"]["steps"] == 8 and tuned and not any(k.startswith("model.visual") for k in tuned)
    settings = json.loads((tmp_path / "text_only" / "settings.json").read_text())
    assert settings["settings"]["finetune"]["train"] == "text"




def test_ablation_configs_layer_on_transfer_json():
    from monai.bundle import ConfigParser

    from medkt.bundles import find_bundle

    cfg_dir = find_bundle("rare_concepts_clip").path / "configs"
    for name, key, value in [("ablation_both.json", "train", "both"), ("ablation_no_name.json", "prepend_name", False),
                             ("ablation_text_only.json", "train", "text")]:
        p = ConfigParser()
        p.read_config([str(cfg_dir / "transfer.json"), str(cfg_dir / name)])
        ft = p.get("finetune")
        assert ft[key] == value and ft["lr"] == 1e-5 and ft["optimizer"]["weight_decay"] == 0.2 and ft["batch_size"] == 4
    p = ConfigParser()
    p.read_config([str(cfg_dir / "transfer.json"), str(cfg_dir / "vit_l14.json")])
    assert p.get("backend") == "clip:ViT-L-14@openai"


def _vilt_overrides(data):
    return {"backend": "vilt:tiny@random", "rare_concepts_manifest": str(data["rare"]),
            "imagenet100_manifest": str(data["imagenet20"]), "inversion": TINY_INV, "finetune#lr": 1e-3,
            "separate_concepts": False, "concepts#0#n_images": 2, "concepts#1#n_images": 2, "concepts#2#n_images": 2}


def test_rare_concepts_vilt_and_explicit_mlm_reuse(data, tmp_path):
    res = _run("rare_concepts_vilt", _vilt_overrides(data), tmp_path / "itm")
    ev = res["evaluations"]
    assert len(ev["rare_concepts"]["before"]["classes"]) == 103 and ev["imagenet100"]["before"]["n_images"] == 20
    assert res["finetune"]["loss"] == "itm" and res["finetune"]["steps"] == 2
    sims = res["inversion"]["per_concept_similarity"]
    assert set(sims) == {"moongate", "tonometer", "gyroscope"} and all(0 < v < 1 for v in sims.values())
    assert (tmp_path / "itm" / "inversion" / "manifest.csv").is_file()
    # Tab. 11 explicit-MLM baseline reusing the ITM run's inverted images
    res = _run("implicit_vilt_mlm", {**_vilt_overrides(data), "images": str(tmp_path / "itm")}, tmp_path / "mlm")
    assert res["images"] == str(tmp_path / "itm") and res["finetune"]["loss"] == "mlm"
    assert res["finetune"]["steps"] == 2


def test_implicit_vilt_mlm_noise(data, tmp_path):
    res = _run("implicit_vilt_mlm", {**_vilt_overrides(data), "concepts#0#n_images": 10}, tmp_path / "run")
    assert res["images"] == "noise" and res["finetune"]["loss"] == "mlm"
    assert res["finetune"]["steps"] == 4  # 10 + 2 + 2 examples, batch 4
    assert res["seconds_inversion"] < 5  # no inversion: noise images


@pytest.mark.slow
def test_rare_concepts_vilt_separate_concepts(data, tmp_path):
    ov = {**_vilt_overrides(data), "separate_concepts": True}
    res = _run("rare_concepts_vilt", ov, tmp_path / "run")
    assert set(res["per_concept"]) == {"moongate", "tonometer", "gyroscope"}
    for name, run in res["per_concept"].items():
        assert run["concepts"] == [name] and run["finetune"]["steps"] == 1
        assert (tmp_path / "run" / "concepts" / name / "inversion" / "grid.png").is_file()


def test_flickr30k_vilt(data, tmp_path):
    ov = {"backend": "vilt:tiny@random", "karpathy_json": str(data["f30k"]), "image_root": str(data["f30k"].parent),
          "baseline_cache": str(tmp_path / "baseline"), "concepts": TWO, "inversion": TINY_INV,
          "finetune#lr": 1e-2, "finetune#batch_size": 2, "scoring#block_size": 3}
    res = _run("flickr30k_vilt", ov, tmp_path / "run")
    assert res["split"] == {"file": str(data["f30k"]), "split": "test", "images": 4, "captions": 20}
    for key in ("recall_before", "recall_after"):
        assert set(res[key]) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"}
    blocks = sorted((tmp_path / "baseline").glob("rows_*.pt"))
    assert [b.name for b in blocks] == ["rows_0000000_0000003.pt", "rows_0000003_0000004.pt"]
    from medkt.checkpoints import load_checkpoint

    before = torch.cat([load_checkpoint(b) for b in blocks])
    after = torch.cat([load_checkpoint(b) for b in sorted((tmp_path / "run" / "scores_after").glob("rows_*.pt"))])
    assert before.shape == after.shape == (4, 20) and not torch.allclose(before, after)  # fine-tuning changed the model
    # a second run (e.g. another learning rate) reuses the baseline scores instead of recomputing them
    stamps = [b.stat().st_mtime_ns for b in blocks]
    res2 = _run("flickr30k_vilt", {**ov, "finetune#lr": 5e-3}, tmp_path / "run2")
    assert [b.stat().st_mtime_ns for b in blocks] == stamps and res2["recall_before"] == res["recall_before"]
    assert "| before |" in (tmp_path / "run" / "report.md").read_text()


def test_coco_captioning_coca(data, tmp_path):
    from safetensors.torch import load_file

    from medkt.natural.captioning import spice_status

    ov = {"backend": "coca:tiny@random", "karpathy_json": str(data["coco"]), "image_root": str(data["coco"].parent),
          "coco_captions_json": str(data["coco_captions"]), "concepts": TWO, "inversion": {"steps": 3},
          "metrics": ["BLEU", "ROUGE_L", "CIDEr", "SPICE"], "generation": {"method": "beam_search", "seq_len": 8, "min_seq_len": 3},
          "finetune#lr": 1e-3, "finetune#batch_size": 2}
    res = _run("coco_captioning_coca", ov, tmp_path / "run")
    for key in ("metrics_before", "metrics_after"):
        m = res[key]
        assert m["n_images"] == 3 and all(isinstance(m[k], float) for k in ("BLEU-4", "ROUGE_L", "CIDEr"))
        if not spice_status()[0]:
            assert m["SPICE"] is None and "stanford-corenlp" in m["unavailable"]["SPICE"]
    caps = json.loads((tmp_path / "run" / "captions_after.json").read_text())
    assert sorted(c["image_id"] for c in caps) == ["100", "101", "102"]
    assert res["finetune"]["loss"] == "clip+caption" and res["finetune"]["caption_weight"] == 0.1
    tuned = load_file(str(tmp_path / "run" / "finetuned.safetensors"))
    assert tuned and not any("text_decoder" in k for k in tuned)
    # Tab. 9 dagger: decoder trained with the visual tower
    res = _run("coco_captioning_coca", ov, tmp_path / "dec", config="decoder_trained.json")
    tuned = load_file(str(tmp_path / "dec" / "finetuned.safetensors"))
    assert res["finetune"]["train_decoder"] and any("text_decoder" in k for k in tuned)
