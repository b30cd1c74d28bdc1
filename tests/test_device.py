"""Every tensor of the compute paths lives on the model's device (issue 11, item 2).

The model is put on the ``meta`` device, a stand-in for a GPU on this CPU-only machine: any
operation that mixes one of its tensors with a (non-scalar) CPU tensor raises, as it would on
CUDA. :class:`meta_device.MetaHostSyncs` answers host syncs of meta tensors (``.item()``,
``.cpu()``...) with placeholders so the code runs to the end. The numbers are placeholders: these
tests check devices and that nothing raised, never values. Also: ``medkt.device`` resolution.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from meta_device import MetaHostSyncs, assert_on, vilt_visual_embed_full_mask
from medkt.errors import ConfigError

META = "meta"


@pytest.fixture(scope="module")
def clip_meta():
    from medkt.backends import create_backend

    torch.manual_seed(0)
    return create_backend("clip:medkt-tiny-ViT@random", device=META)


def _targets(n: int = 2):
    from medkt.inversion import InversionTarget

    return [InversionTarget("moongate", "a round opening in a stone wall", n),
            InversionTarget("tonometer", "a small medical probe", n)]


# -- the harness itself --------------------------------------------------------------------------
def test_harness_keeps_mixing_errors_and_answers_host_syncs():
    x = torch.ones(2, 3, device=META)
    with MetaHostSyncs() as mode:
        assert float(x.sum()) == 1.0 and x.tolist() == [[1.0] * 3] * 2 and not bool(x.any())
        assert x.cpu().device.type == "cpu" and x.to("cpu", torch.float64).dtype == torch.float64
        assert x.to(META).device.type == META
        with pytest.raises(RuntimeError, match="expected device"):
            x + torch.ones(2, 3)  # a CPU tensor in a meta computation
        assert (torch.ones(2) + 1).tolist() == [2.0, 2.0]  # CPU tensors are untouched
    assert mode.syncs["__float__"] == 1 and mode.syncs["to"] == 1


# -- inversion -----------------------------------------------------------------------------------
INVERSION_CASES = {
    "pixels": {},
    "progressive": {"priors": [{"name": "progressive", "sizes": [16, 32], "steps": [1]}]},
    "contrastive": {"objective": {"name": "contrastive", "negative_texts": ["a photo of a dog.", "a photo of a cat."]}},
    "normal_init_degrade": {"priors": [{"name": "init", "kind": "normal"}], "views": 2,
                            "augmentations": [{"name": "affine"}, {"name": "blur", "sigma": 1.0}, {"name": "noise", "std": 0.05}]},
    "residual": {"priors": [{"name": "init", "kind": "gray"}, {"name": "tv"},
                            {"name": "residual", "size": 8, "max": 0.3, "l1": 0.1, "sign": "positive"}]},
}


@pytest.mark.parametrize("case", list(INVERSION_CASES))
def test_invert_on_model_device(clip_meta, case, tmp_path):
    from medkt.inversion import invert

    cfg = {"steps": 3, "seed": 0, "checkpoint_every": 1, **INVERSION_CASES[case]}
    with MetaHostSyncs():
        res = invert(clip_meta, _targets(), cfg, out_dir=tmp_path, progress=False)
    assert_on(res.images)
    assert res.images.shape == (4, 3, clip_meta.image_size, clip_meta.image_size)
    assert len(res.similarities) == 4 and res.steps_run == [3]


def test_invert_init_images_from_the_cpu(clip_meta):
    from medkt.inversion import invert

    init = torch.rand(3, 3, 20, 20)  # e.g. normal scans loaded from disk: CPU, another size
    with MetaHostSyncs():
        res = invert(clip_meta, _targets(), {"steps": 2, "priors": [{"name": "init", "kind": "images", "jitter": 0.01}]}, progress=False,
                     init_images=init)
    assert_on(res.images)


@pytest.mark.parametrize("priors", [
    [{"name": "feature_stats", "blocks": [-1]}, {"name": "tv"}],
    [{"name": "feature_stats", "gram": True}, {"name": "real_start", "space": "both"}, {"name": "residual", "size": 8}],
    [{"name": "real_start", "weight": 1.0}, {"name": "spectrum"}],
], ids=["feature_stats", "gram+real_start+residual", "real_start+spectrum"])
def test_pool_priors_on_model_device(clip_meta, priors, tmp_path):
    """The pool's scans are decoded on the CPU; its statistics and the priors' terms live on the model's device."""
    from PIL import Image

    from medkt.inversion import invert
    from medkt.pool import UnlabeledPool

    for i in range(3):
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(tmp_path / f"scan{i}.png")
    with MetaHostSyncs():
        res = invert(clip_meta, _targets(), {"steps": 2, "priors": priors}, pool=UnlabeledPool.from_path(tmp_path),
                     progress=False)
    assert_on(res.images)


# -- fine-tuning ---------------------------------------------------------------------------------
@pytest.mark.parametrize("train,replay", [("visual", False), ("text", False), ("both", False), ("visual", True)])
def test_finetune_on_model_device(train, replay):
    from medkt.backends import create_backend
    from medkt.finetune import finetune

    torch.manual_seed(0)
    b = create_backend("clip:medkt-tiny-ViT@random", device=META)
    s = b.image_size
    images = torch.rand(4, 3, s, s)  # data on the CPU: moved batch by batch
    kw: dict = {}
    cfg = {"train": train, "batch_size": 2, "epochs": 2, "lr": 1e-3, "optimizer": {"grad_clip": 1.0}}
    if replay:
        kw = {"replay_images": torch.rand(3, 3, s, s), "replay_concepts": ["dog", "cat", "dog"]}
        cfg.update(controls=[{"name": "replay", "per_batch": 2}, {"name": "distill", "weight": 0.5}])
    desc = {"moongate": "a round opening", "tonometer": "a medical probe", "dog": "a pet", "cat": "a small pet"}
    with MetaHostSyncs():
        hist = finetune(b, images, ["moongate", "moongate", "tonometer", "tonometer"], desc,
                        negative_captions=["a photo of a bridge."], config=cfg, progress=False, **kw)
    assert hist["steps"] == 4
    assert_on(list(b.parameters()))


def test_concept_tokens_on_model_device(monkeypatch):
    """The text-side option's offsets, hook and merge run on the model's device. Token ids are host
    values a meta tensor cannot give (placeholders would make every name look alike), so the
    lookup of the names' ids is replaced by fixed ids; the rest is the real code path."""
    import medkt.concept_tokens
    from medkt.backends import create_backend
    from medkt.finetune import finetune

    ids = {"moongate": [1000, 1001], "tonometer": [1002], "dog": [1003], "cat": [1004]}
    monkeypatch.setattr(medkt.concept_tokens, "name_token_ids", lambda backend, name: ids[name])
    torch.manual_seed(0)
    b = create_backend("clip:medkt-tiny-ViT@random", device=META)
    s = b.image_size
    desc = {"moongate": "a round opening", "tonometer": "a medical probe", "dog": "a pet", "cat": "a small pet"}
    with MetaHostSyncs():
        hist = finetune(b, torch.rand(4, 3, s, s), ["moongate", "moongate", "tonometer", "tonometer"], desc,
                        config={"train": "concept_tokens", "batch_size": 2, "epochs": 1, "lr": 1e-2,
                                "caption_template": "a photo of {name}"}, progress=False)
    assert hist["steps"] == 2
    assert_on(list(b.parameters()))
    assert not b.token_embedding()._forward_hooks  # merged: the hook is gone


# -- natural-image backends ----------------------------------------------------------------------
@pytest.fixture
def vilt_meta(monkeypatch):
    """Tiny ViLT on meta; transformers' data-dependent patch selection replaced by its full-mask equivalent."""
    from transformers.models.vilt import modeling_vilt

    from medkt.backends import create_backend

    monkeypatch.setattr(modeling_vilt.ViltEmbeddings, "visual_embed", vilt_visual_embed_full_mask)
    return create_backend("vilt:tiny@random", device=META)


def test_vilt_full_mask_stand_in_equals_transformers():
    from medkt.backends import create_backend

    b = create_backend("vilt:tiny@random")
    emb = b.model.vilt.embeddings
    x = b.normalize(torch.rand(2, 3, 64, 96))
    mask = torch.ones(2, 64, 96, dtype=torch.long)
    ref = emb.visual_embed(x, mask, max_image_length=b.model.config.max_image_length)
    mine = vilt_visual_embed_full_mask(emb, x, mask, max_image_length=b.model.config.max_image_length)
    # transformers visits the (all valid) patches in a random order (multinomial): sort them back
    h, w = ref[2][1]
    order = (ref[2][0][..., 0] * w + ref[2][0][..., 1]).argsort(dim=1)  # (B, P)
    ref_x = torch.cat([ref[0][:, :1], torch.gather(ref[0][:, 1:], 1, order[..., None].expand(-1, -1, ref[0].shape[-1]))], 1)
    torch.testing.assert_close(mine[0], ref_x, rtol=0, atol=0)
    assert torch.equal(mine[1], ref[1]) and mine[2][1] == ref[2][1]
    assert torch.equal(mine[2][0], torch.gather(ref[2][0], 1, order[..., None].expand(-1, -1, 2)))


def test_vilt_itm_inversion_and_finetune(vilt_meta):
    from medkt.finetune import finetune
    from medkt.inversion import invert

    with MetaHostSyncs():
        res = invert(vilt_meta, _targets(1), {"steps": 2, "objective": "itm", "augmentations": [],
                                                  "priors": [{"name": "init", "kind": "normal"}]},
                     progress=False)
        assert_on(res.images)
        hist = finetune(vilt_meta, res.images, res.concepts,
                        {"moongate": "a round opening", "tonometer": "a medical probe"},
                        config={"loss": "itm", "batch_size": 2, "lr": 1e-3}, progress=False)
    assert hist["steps"] == 1


def test_vilt_retrieval_blocks(vilt_meta, tmp_path):
    from medkt.natural.retrieval import PairwiseITMScorer

    images = [torch.rand(3, 64, 64 + 32 * (i % 2)) for i in range(3)]  # loaded on the CPU
    captions = ["a dog on the grass", "a red car", "a cat", "a stone wall"]
    with MetaHostSyncs():
        scores = PairwiseITMScorer(vilt_meta, captions, lambda i: images[i], 3, cache_dir=tmp_path, text_batch_size=3,
                                   block_size=2, progress=False).run()
    assert scores.shape == (3, 4) and scores.device.type == "cpu"  # scores are gathered on the host
    assert len(list(tmp_path.glob("rows_*.pt"))) == 2


@pytest.fixture(scope="module")
def coca_meta():
    from medkt.backends import create_backend

    return create_backend("coca:tiny@random", device=META)


@pytest.mark.parametrize("method", ["beam_search", "top_k"])
def test_coca_caption_generation(coca_meta, method):
    x = torch.rand(2, 3, coca_meta.image_size, coca_meta.image_size)  # CPU pixels, as a data loader gives
    with MetaHostSyncs():
        ids = coca_meta.generate(x, method=method, seq_len=8, min_seq_len=2)
    assert_on(ids)
    assert ids.shape[0] == 2


def test_coca_clip_caption_finetune(coca_meta):
    from medkt.finetune import finetune
    from medkt.natural.objectives import CaptionTargets

    s = coca_meta.image_size
    desc = {"moongate": "a round opening", "tonometer": "a medical probe"}
    targets = CaptionTargets({"A moongate is a round opening": "moongate", "A tonometer is a medical probe": "tonometer"})
    with MetaHostSyncs():
        hist = finetune(coca_meta, torch.rand(2, 3, s, s), ["moongate", "tonometer"], desc,
                        config={"loss": "clip+caption", "batch_size": 2, "lr": 1e-3}, progress=False,
                        loss_context=targets)
    assert hist["steps"] == 1


# -- segmentation --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,cache_prefix", [("clip:medkt-tiny-ViT@random", True),
                                               ("clip:medkt-tiny-ViT@random", False),
                                               ("phantom:tiny@random", True)])
def test_m2ib_saliency(spec, cache_prefix):
    from medkt.backends import create_backend
    from medkt.segmentation.m2ib import M2IB, M2IBConfig

    b = create_backend(spec, device=META)
    img = torch.rand(b.image_channels, b.image_size, b.image_size)  # CPU image
    with MetaHostSyncs(), pytest.warns(RuntimeWarning, match="constant"):  # placeholder KL is all zeros
        sal = M2IB(b, M2IBConfig(steps=2, batch_size=2, cache_prefix=cache_prefix, verify_split=False)).saliency(
            img, "a round lesion")
    assert sal.shape == (b.image_size, b.image_size)


def test_sam_prediction():
    from medkt.segmentation.sam import SamSegmenter

    seg = SamSegmenter.from_spec("tiny@random", device=META, multimask_output=True)
    img = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    with MetaHostSyncs():
        mask = seg.segment(img, np.array([[5, 5, 20, 20], [25, 10, 45, 30]], np.float32))
    assert mask.shape == (40, 50) and mask.dtype == bool


# -- medkt.device ---------------------------------------------------------------------------------
def test_resolve_device_and_precision(monkeypatch):
    from medkt.device import resolve_device, resolve_precision

    assert resolve_device("cpu").type == "cpu" and resolve_device("meta").type == "meta"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available.*available here: cpu.*--device"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp32", "meta") == "fp32"
    with pytest.raises(ConfigError, match="fp16.*CUDA.*bf16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")


def test_resolve_cuda_when_present(monkeypatch):
    """Without a GPU here: fake one to check auto -> cuda, bf16 by default, torchrun -> the local rank's GPU."""
    from medkt import distributed as mdist
    from medkt.device import resolve_device, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="4 CUDA device"):
        resolve_device("cuda:4")
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("fp16", torch.device("cuda", 0)) == "fp16"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert mdist.local_device("auto") == torch.device("cuda", 2)
    assert mdist.local_device("cuda") == torch.device("cuda", 2)
    assert mdist.local_device("cpu") == torch.device("cpu")


def test_init_from_env_uses_gloo_for_a_cpu_model_on_a_gpu_node(monkeypatch):
    """torchrun on a GPU node with the model on the CPU: gloo, not NCCL (NCCL cannot move CPU tensors)."""
    import torch.distributed as dist

    from medkt import distributed as mdist

    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.setdefault("backend", backend))
    monkeypatch.setattr(mdist, "is_initialized", lambda: False)
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    assert mdist.init_from_env(device="cpu") and calls == {"backend": "gloo"}
    calls.clear()
    assert mdist.init_from_env(device="auto") and calls == {"set_device": torch.device("cuda", 1), "backend": "nccl"}


def test_create_backend_device_and_precision():
    from medkt.backends import create_backend

    b = create_backend("clip:medkt-tiny-ViT@random", device="cpu", precision="bf16")
    assert b.device.type == "cpu" and b.precision == "bf16"
    assert create_backend("clip:medkt-tiny-ViT@random").precision == "fp32"  # the default is unchanged
    with b.autocast():
        emb = b.encode_pixels(torch.rand(1, 3, b.image_size, b.image_size))
    assert emb.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16"):
        create_backend("clip:medkt-tiny-ViT@random", precision="fp16")


# -- command line ------------------------------------------------------------------------------------
def test_cli_device_and_precision_options(tmp_path, monkeypatch, capsys):
    from conftest import run_medkt_in_process

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["invert", "--backend", "clip:medkt-tiny-ViT@random", "-c", "moongate=a round opening", "--n-images", "1",
            "--steps", "2", "--checkpoint-every", "0"]
    code, io = run_medkt_in_process(monkeypatch, capsys, *base, "-o", str(tmp_path / "a"), "--device", "cuda")
    assert code == 2 and "CUDA is not available" in io.err and "--device" in io.err
    code, io = run_medkt_in_process(monkeypatch, capsys, *base, "-o", str(tmp_path / "b"), "--precision", "fp16")
    assert code == 2 and "bf16" in io.err
    code, io = run_medkt_in_process(monkeypatch, capsys, *base, "-o", str(tmp_path / "c"), "--device", "cpu",
                                    "--precision", "bf16")
    assert code == 0, io.err
    assert (tmp_path / "c" / "manifest.csv").is_file()
