"""The transfer spine: one step on the model's device, the shared zero-shot scorer, resume of a
finished fine-tuning, and every pipeline composing it."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from meta_device import MetaHostSyncs, vilt_visual_embed_full_mask

ROOT = Path(__file__).resolve().parents[1]
TINY_INV = {"steps": 3, "checkpoint_every": 2}


def test_zero_shot_evaluator_on_model_device(tmp_path, monkeypatch):
    """Paths decoded on the CPU and in-memory CPU pixels are moved to the model's device batch by
    batch; embedding and ITM scoring run there (``meta`` stands in for a GPU)."""
    from PIL import Image
    from transformers.models.vilt import modeling_vilt

    # ViLT's patch sampling has no meta kernel: the full-mask stand-in (tested in test_device.py)
    monkeypatch.setattr(modeling_vilt.ViltEmbeddings, "visual_embed", vilt_visual_embed_full_mask)

    from medkt.backends import create_backend
    from medkt.evaluation import ZeroShotEvaluator

    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 56, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    paths = sorted(tmp_path.glob("*.png"))
    prompts = {"a": ["a photo of a cat.", "a cat"], "b": ["a photo of a dog."]}
    for spec, aggregates in (("clip:medkt-tiny-ViT@random", ("mean", "mean_similarity", "max")),
                             ("vilt:tiny@random", ("mean", "max"))):
        backend = create_backend(spec, device="meta")
        for agg in aggregates:
            for images in (paths, torch.rand(3, 3, backend.image_size, backend.image_size)):
                with MetaHostSyncs():
                    res = ZeroShotEvaluator(backend, images, ["a", "b", "a"], prompts, aggregate=agg,
                                            batch_size=2).evaluate()
                assert res.scores.shape == (3, 2)


def test_transfer_step_resumes_a_finished_finetune(tmp_path, monkeypatch):
    """With resume, a fine-tuning whose outputs were saved whole is read back, not run again, and
    the weights are the ones it saved; changed fine-tuning settings are refused."""
    from medkt.backends import create_backend
    from medkt.errors import MedktError
    from medkt.spine import Concept, transfer

    concepts = [Concept("moongate", ["a circular archway in a garden wall"], 2),
                Concept("gyroscope", ["a spinning disc mounted in rings"], 2)]
    torch.manual_seed(0)
    a = create_backend("clip:medkt-tiny-ViT@random")
    start = {k: v.clone() for k, v in a.state_dict().items()}
    r1 = transfer(a, concepts, inversion_config=TINY_INV, finetune_config={"lr": 1e-3}, out_dir=tmp_path, progress=False)
    assert (tmp_path / "finetuned.safetensors").is_file() and r1.resumed == []
    b = create_backend("clip:medkt-tiny-ViT@random")
    b.load_state_dict(start)
    import medkt.spine as spine

    monkeypatch.setattr(spine, "finetune", lambda *a, **k: pytest.fail("fine-tuning ran again"))
    r2 = transfer(b, concepts, inversion_config=TINY_INV, finetune_config={"lr": 1e-3}, out_dir=tmp_path,
                  resume=True, progress=False)
    assert r2.resumed == ["finetune"] and r2.history["loss"] == r1.history["loss"]
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(MedktError, match="lr"):
        transfer(b, concepts, inversion_config=TINY_INV, finetune_config={"lr": 5e-4}, out_dir=tmp_path,
                 resume=True, progress=False)


def test_transfer_result_to_dict_and_default_negatives():
    from medkt.backends import create_backend
    from medkt.evaluation import ZeroShotEvaluator
    from medkt.spine import Concept, default_negatives, transfer

    torch.manual_seed(0)
    clip = create_backend("clip:medkt-tiny-ViT@random")
    imgs = torch.rand(4, 3, clip.image_size, clip.image_size)
    ev = ZeroShotEvaluator(clip, imgs, ["moongate", "cat", "dog", "cat"],
                           {"moongate": ["a moongate"], "cat": ["a photo of a cat."], "dog": ["a photo of a dog."]})
    assert default_negatives({"x": ev}, {"moongate"}) == ["a photo of a cat.", "a photo of a dog."]
    r = transfer(clip, [{"name": "moongate", "description": "a circular archway", "n_images": 2}],
                 inversion_config=TINY_INV, finetune_config={"lr": 1e-3}, evaluators={"x": ev}, progress=False)
    d = r.to_dict()
    assert d["concepts"] == ["moongate"] and d["finetune"]["loss"] == "infonce" and d["finetune"]["steps"] == 1
    assert set(d["evaluations"]["x"]) == {"before", "after"} and d["evaluations"]["x"]["after"]["n_images"] == 4
    assert len(r.history["captions"]) == 3  # the concept's caption + the two default negatives


def test_no_pipeline_writes_its_own_transfer_sequence():
    """invert()/finetune() are called by the spine (and the engine's own sharding) only: every
    pipeline composes medkt.spine.transfer, so a fix of the sequence lands everywhere."""
    allowed = {"medkt/spine.py", "medkt/distributed.py", "medkt/api.py", "medkt/cli.py", "medkt/forgetting.py"}
    offenders = []
    for path in sorted((ROOT / "medkt").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("invert", "finetune") and rel.startswith(("medkt/pipelines/", "medkt/segmentation/",
                                                                      "medkt/phantom/experiment.py", "medkt/natural/")):
                    offenders.append(f"{rel}:{node.lineno} {name}()")
    assert not offenders, offenders


def test_backends_declare_capabilities_and_engine_does_not_probe():
    from medkt.backends import create_backend
    from medkt.backends.base import Captioner, ImageTextEmbedder, ImageTextMatcher, MaskedLanguageModel

    vilt, coca, clip = (create_backend(s) for s in ("vilt:tiny@random", "coca:tiny@random", "clip:medkt-tiny-ViT@random"))
    assert isinstance(vilt, ImageTextMatcher) and isinstance(vilt, MaskedLanguageModel) and not isinstance(vilt, ImageTextEmbedder)
    assert isinstance(coca, Captioner) and isinstance(coca, ImageTextEmbedder) and not isinstance(coca, ImageTextMatcher)
    assert not isinstance(clip, (ImageTextMatcher, Captioner)) and isinstance(clip, ImageTextEmbedder)
    # no hasattr/getattr probing of backends, configs or pipelines anywhere outside the adapters
    # (which may probe the upstream models they wrap): read from the syntax tree, any quoting
    probed = {"backend", "cfg", "config", "self"}
    offenders = []
    for path in sorted((ROOT / "medkt").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("medkt/backends/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):  # a named attribute
                obj = node.args[0]
                name = obj.id if isinstance(obj, ast.Name) else obj.attr if isinstance(obj, ast.Attribute) else None
                if name in probed:
                    offenders.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, offenders
