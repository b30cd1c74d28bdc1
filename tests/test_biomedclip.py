"""BiomedCLIP backend (``biomedclip:vit-b16``, ``clip:hf-hub:...``): built from the local HF cache only.

A tiny random model of BiomedCLIP's architecture classes (open_clip ``CustomTextCLIP`` with a timm
``VisionTransformer`` trunk, ``test_vit``, and a Hugging Face ``BertModel`` text tower through
open_clip's ``HFTextEncoder``) is written into a fake cache in the hub's layout, under the real
repo ids: ``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` in the BiomedCLIP repo,
``config.json`` + ``vocab.txt`` (a tiny WordPiece vocabulary) + ``tokenizer_config.json`` in the
BiomedBERT repo. The oracle is open_clip's own ``create_model_and_transforms("hf-hub:...")`` and
``get_tokenizer`` reading the same files. Networking is blocked (fixtures of test_offline_tags).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_offline_tags import LIMIT_S, _warm_imports, hf_cache, put_in_cache, socket_calls  # noqa: F401

from medkt.backends import create_backend
from medkt.errors import WeightsNotFoundError

REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "with", "and", "breast", "ultrasound",
         "image", "showing", "dark", "mass", "lesion", "tumor", "round", "brain", "mri", "chest", "x", "-", "ray", ".",
         ",", "irregular", "##ly", "shape", "##d", "##s", "margin", "bright", "tissue", "smooth", "normal"]
OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 16,
        # BiomedCLIP: vit_base_patch16_224 at 224 px; test_vit is timm's tiny VisionTransformer (160 px)
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 160},
        "text_cfg": {"hf_model_name": BERT, "hf_tokenizer_name": BERT, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}
BERT_CONFIG = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(VOCAB), "hidden_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
               "max_position_embeddings": 512, "type_vocab_size": 2, "pad_token_id": 0, "hidden_act": "gelu",
               "layer_norm_eps": 1e-12}
TEXTS = ["A breast ultrasound image showing a dark, irregularly shaped mass.", "normal brain mri"]


def _add_text_files(snap, files: dict[str, str]) -> None:
    """Text files into a snapshot made by ``put_in_cache`` (blob + relative symlink, as the hub)."""
    blobs = snap.parent.parent / "blobs"
    for name, text in files.items():
        blob = blobs / f"{snap.name}-{name}"
        blob.write_text(text, encoding="utf-8")
        os.symlink(os.path.relpath(blob, snap), snap / name)


def _model_state(bert_dir, seed: int) -> dict[str, torch.Tensor]:
    """Weights of the tiny BiomedCLIP built directly from open_clip's classes (not via medkt)."""
    from open_clip.model import CustomTextCLIP

    cfg = json.loads(json.dumps(OPEN_CLIP_CONFIG["model_cfg"]))
    cfg["text_cfg"].update(hf_model_name=str(bert_dir), hf_model_pretrained=False)
    torch.manual_seed(seed)
    model = CustomTextCLIP(**cfg)
    with torch.no_grad():  # random LayerNorm affine and logit scale too, so every tensor is checked
        for name, p in model.named_parameters():
            if p.dim() == 1 or name == "logit_scale":
                p.add_(0.1 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fake_biomedclip(hub, with_bert: bool = True, with_weights: bool = True, seed: int = 0):
    """BiomedCLIP + BiomedBERT repos in the cache; returns the weights written."""
    bert_snap = put_in_cache(hub, BERT, {}, commit="b" * 40)
    if with_bert:
        _add_text_files(bert_snap, {"config.json": json.dumps(BERT_CONFIG), "vocab.txt": "\n".join(VOCAB) + "\n",
                                    "tokenizer_config.json": json.dumps({"do_lower_case": True})})
    state = _model_state(bert_snap, seed) if with_bert else {}
    snap = put_in_cache(hub, REPO, {"open_clip_pytorch_model.bin": state} if with_weights else {}, commit="c" * 40)
    _add_text_files(snap, {"open_clip_config.json": json.dumps(OPEN_CLIP_CONFIG)})
    return state


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (190, 230, 3), dtype=np.uint8))  # not square: resize + crop


@pytest.fixture
def oracle_cache(hf_cache, monkeypatch):
    """The fake cache, also where transformers looks by default (its default is frozen at import)."""
    import transformers.utils.hub as tf_hub

    monkeypatch.setattr(tf_hub, "TRANSFORMERS_CACHE", str(hf_cache))
    return hf_cache


@pytest.mark.parametrize("spec", ["biomedclip:vit-b16", f"clip:hf-hub:{REPO}"])
def test_embeddings_equal_open_clip_hf_hub(oracle_cache, socket_calls, spec):
    _check_against_open_clip(oracle_cache, socket_calls, spec)


@pytest.mark.slow
@pytest.mark.parametrize("hf_cache", ["HF_HUB_OFFLINE=1"], indirect=True)
def test_embeddings_equal_open_clip_hf_hub_at_real_sizes(oracle_cache, socket_calls, monkeypatch):
    """The same at BiomedCLIP's real sizes (vit_base_patch16_224, BERT-base, 512-d; random weights,
    ~196 M parameters) and M2IB at MedCLIP-SAMv2's block 9 of 12 on the 14 x 14 grid."""
    from medkt.segmentation.m2ib import get_vision_split

    cfg = json.loads(json.dumps(OPEN_CLIP_CONFIG))
    cfg["model_cfg"]["embed_dim"] = 512
    cfg["model_cfg"]["vision_cfg"].update(timm_model_name="vit_base_patch16_224", image_size=224)
    bert = {**BERT_CONFIG, "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072}
    monkeypatch.setattr(sys.modules[__name__], "OPEN_CLIP_CONFIG", cfg)
    monkeypatch.setattr(sys.modules[__name__], "BERT_CONFIG", bert)
    backend = _check_against_open_clip(oracle_cache, socket_calls, "biomedclip:vit-b16")
    assert 190e6 < sum(p.numel() for p in backend.parameters()) < 200e6
    split = get_vision_split(backend, 9)
    assert split.grid == (14, 14) and split.num_layers == 12 and split.hook_module is backend.model.visual.trunk.blocks[9]


def _check_against_open_clip(hub, socket_calls, spec):
    """medkt's backend vs open_clip's own hf-hub path over the same fake cache: equal weights,
    pixels, tokens and embeddings. Returns the backend."""
    import open_clip
    import timm
    from transformers import BertModel

    from medkt.weights import offline

    state = _fake_biomedclip(hub)
    _warm_imports()
    backend = create_backend(spec)
    assert socket_calls == [], f"network was attempted: {socket_calls}"
    assert isinstance(backend.model.visual.trunk, timm.models.vision_transformer.VisionTransformer)
    assert isinstance(backend.model.text.transformer, BertModel)
    got = backend.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items()) and set(got) == set(state)

    with offline():  # the oracle: open_clip's own hub path over the same cache
        ref, _, preprocess = open_clip.create_model_and_transforms(f"hf-hub:{REPO}")
        ref_tok = open_clip.get_tokenizer(f"hf-hub:{REPO}")
    ref.eval()

    img = _image()
    pixels = backend.normalize(backend.load_image(img)[None])
    ref_pixels = preprocess(img)[None]
    assert float((pixels - ref_pixels).abs().max()) == 0.0  # same transform (bicubic short side, crop, CLIP mean/std)

    tokens, ref_tokens = backend.tokenize(TEXTS), ref_tok(TEXTS)
    assert tokens.shape == (2, 256) and torch.equal(tokens, ref_tokens)
    assert int((tokens[0] == VOCAB.index("[UNK]")).sum()) == 0  # WordPiece from vocab.txt ("irregular ##ly")
    with torch.no_grad():
        img_emb, ref_img = backend.encode_pixels(backend.load_image(img)[None]), ref.encode_image(ref_pixels)
        txt_emb, ref_txt = backend.encode_text(tokens), ref.encode_text(ref_tokens)
    d_img, d_txt = float((img_emb - ref_img).abs().max()), float((txt_emb - ref_txt).abs().max())
    print(f"max |medkt - open_clip hf-hub|: image {d_img:.3g}, text {d_txt:.3g}")
    assert d_img == 0.0 and d_txt == 0.0
    assert float(img_emb.abs().max()) > 0 and not torch.allclose(txt_emb[0], txt_emb[1])
    return backend


def _to_medclip_samv2_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip names -> the Hugging Face layout MedCLIP-SAMv2 releases its fine-tuned BiomedCLIP in
    (written here from the HF model's module names, independently of medkt's inverse map)."""
    vis = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj", "mlp.fc1": "mlp.fc1",
           "mlp.fc2": "mlp.fc2"}
    txt = {"attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
           "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
           "attention.output.LayerNorm": "layer_norm1", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
           "output.LayerNorm": "layer_norm2"}
    emb = {"word_embeddings": "token_embedding", "position_embeddings": "position_embedding",
           "token_type_embeddings": "token_type_embedding", "LayerNorm": "layer_norm"}
    out = {}
    for k, v in state.items():
        if m := re.match(r"visual\.trunk\.blocks\.(\d+)\.attn\.qkv\.(\w+)$", k):
            for name, part in zip("qkv", v.chunk(3, 0)):
                out[f"vision_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
        elif m := re.match(r"visual\.trunk\.blocks\.(\d+)\.(.+)\.(\w+)$", k):
            out[f"vision_model.encoder.layers.{m[1]}.{vis[m[2]]}.{m[3]}"] = v
        elif k == "visual.trunk.cls_token":
            out["vision_model.embeddings.class_embedding"] = v.reshape(-1)
        elif k == "visual.trunk.pos_embed":
            out["vision_model.embeddings.position_embedding.weight"] = v[0]
        elif m := re.match(r"visual\.trunk\.patch_embed\.proj\.(\w+)$", k):
            out[f"vision_model.embeddings.patch_embedding.{m[1]}"] = v
        elif m := re.match(r"visual\.trunk\.norm\.(\w+)$", k):
            out[f"vision_model.post_layernorm.{m[1]}"] = v
        elif m := re.match(r"visual\.head\.proj\.(\w+)$", k):
            out[f"visual_projection.{m[1]}"] = v
        elif m := re.match(r"text\.transformer\.embeddings\.(\w+)\.(\w+)$", k):
            out[f"text_model.embeddings.{emb[m[1]]}.{m[2]}"] = v
        elif m := re.match(r"text\.transformer\.encoder\.layer\.(\d+)\.(.+)\.(\w+)$", k):
            out[f"text_model.encoder.layers.{m[1]}.{txt[m[2]]}.{m[3]}"] = v
        elif m := re.match(r"text\.proj\.([02])\.(\w+)$", k):
            out[f"text_projection.fc{1 if m[1] == '0' else 2}.{m[2]}"] = v
        else:
            assert k == "logit_scale", k
            out[k] = v
    out["vision_model.embeddings.position_ids"] = torch.arange(v.shape[0])  # a buffer HF models save
    return out


@pytest.mark.parametrize("layout", ["open_clip_train", "medclip_samv2_release", "author_fork", "hub_repo"])
def test_finetuned_checkpoint_by_path_replaces_the_weights(hf_cache, socket_calls, tmp_path, layout):
    hub_state = _fake_biomedclip(hf_cache)
    bert_dir = hf_cache / ("models--" + BERT.replace("/", "--")) / "snapshots" / ("b" * 40)
    tuned = _model_state(bert_dir, seed=1)
    if layout == "open_clip_train":  # open_clip's training script: DDP prefixes under "state_dict"
        path = tmp_path / "epoch_10.pt"
        torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in tuned.items()}}, path)
        spec = f"biomedclip:vit-b16@{path}"
    elif layout == "medclip_samv2_release":  # saliency_maps/model/pytorch_model.bin, given as its folder
        (tmp_path / "model").mkdir()
        torch.save(_to_medclip_samv2_layout(tuned), tmp_path / "model" / "pytorch_model.bin")
        spec = f"biomedclip:vit-b16@{tmp_path / 'model'}"
    elif layout == "author_fork":  # the paper author's transfer scripts: HF layout under "model", with their arguments
        path = tmp_path / "weights.pth"
        torch.save({"epoch": 1, "model": _to_medclip_samv2_layout(tuned), "args": argparse.Namespace(lr=1e-5)}, path)
        spec = f"biomedclip:vit-b16@{path}"
    else:  # a fine-tuned model published as another open_clip hub repo, in the cache
        snap = put_in_cache(hf_cache, "someone/biomedclip-finetuned", {"open_clip_model.safetensors": tuned}, "d" * 40)
        _add_text_files(snap, {"open_clip_config.json": json.dumps(OPEN_CLIP_CONFIG)})
        spec = "biomedclip:vit-b16@someone/biomedclip-finetuned"
    base = create_backend("biomedclip:vit-b16")
    backend = create_backend(spec)
    assert socket_calls == []
    got = backend.model.state_dict()
    assert set(got) == set(tuned)
    for k, v in tuned.items():
        assert torch.equal(got[k], v), k
        assert not torch.equal(got[k], hub_state[k]), k  # every tensor of the file differs from the hub's
    x = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        assert not torch.allclose(backend.encode_pixels(x), base.encode_pixels(x))


def test_checkpoint_of_another_model_is_a_clear_error(hf_cache, tmp_path):
    from medkt.errors import CheckpointError

    _fake_biomedclip(hf_cache)
    path = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError) as err:
        create_backend(f"biomedclip:vit-b16@{path}")
    assert "missing keys" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("missing,names", [
    ("everything", [REPO, f"hf download {REPO} open_clip_config.json open_clip_pytorch_model.bin"]),
    ("weights", [REPO, "open_clip_pytorch_model.bin"]),
    ("text tower", [f"hf download {BERT} config.json vocab.txt"]),
])
def test_missing_cache_fails_fast_in_one_line(hf_cache, socket_calls, missing, names):
    if missing != "everything":
        _fake_biomedclip(hf_cache, with_bert=missing != "text tower", with_weights=missing != "weights")
    _warm_imports()
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        create_backend("biomedclip:vit-b16")
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert elapsed < LIMIT_S, f"took {elapsed:.1f} s"
    assert socket_calls == [], f"network was attempted: {socket_calls}"
    assert "\n" not in msg
    for name in names + ["hf download", "Getting weights", str(hf_cache)]:
        assert name in msg, f"{name!r} not in: {msg}"


def test_m2ib_on_the_timm_trunk(hf_cache):
    """M2IB's timm split reproduces encode_image on BiomedCLIP's tower; bottleneck at a given block."""
    from medkt.segmentation.m2ib import M2IB, M2IBConfig, get_vision_split

    _fake_biomedclip(hf_cache)
    backend = create_backend("biomedclip:vit-b16")
    split = get_vision_split(backend, 4)
    assert split.description == "open_clip timm ViT" and split.grid == (10, 10) and split.n_extra_tokens == 1
    assert split.hook_module is backend.model.visual.trunk.blocks[4]
    x = backend.normalize(torch.rand(2, 3, 160, 160))
    with torch.no_grad():
        torch.testing.assert_close(split.suffix(split.prefix(x)), backend.encode_image(x), rtol=1e-5, atol=1e-5)
    img = torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(0))
    cached = M2IB(backend, M2IBConfig(layer=4, beta=1.0, steps=2, batch_size=2, seed=3)).explain(img, TEXTS[0])
    naive = M2IB(backend, M2IBConfig(layer=4, beta=1.0, steps=2, batch_size=2, seed=3, cache_prefix=False)).explain(img, TEXTS[0])
    assert cached.token_kl.shape == (10, 10) and np.array_equal(cached.token_kl, naive.token_kl)


def test_seg_bundles_default_to_biomedclip():
    """The paper segments with MedCLIP-SAMv2, whose CLIP is BiomedCLIP: the seg_* bundles' default."""
    from medkt.backends import BackendSpec, list_backends

    bundles = sorted((Path(__file__).resolve().parents[1] / "bundles").glob("seg_*/configs/transfer.json"))
    assert len(bundles) == 4
    for cfg in bundles:
        spec = BackendSpec.parse(json.loads(cfg.read_text())["backend"])
        assert (spec.family, spec.architecture) == ("biomedclip", "vit-b16"), cfg
        assert spec.family in list_backends()


@pytest.mark.parametrize("hf_cache", ["HF_HUB_OFFLINE=1"], indirect=True)
def test_breast_bundle_runs_with_its_default_backend(hf_cache, socket_calls, tmp_path, monkeypatch):
    """seg_breast_ultrasound with no backend override: biomedclip:vit-b16 from the (fake) cache,
    through inversion, fine-tuning, M2IB on the timm trunk and the metrics (saliency-only)."""
    from test_segmentation_bundles import TINY, make_udiat

    from medkt.bundles import run_bundle
    from medkt.data.prepare import prepare

    _fake_biomedclip(hf_cache)
    monkeypatch.delenv("MEDKT_SAM_CHECKPOINT", raising=False)
    root = make_udiat(tmp_path / "udiat", n=1)
    prepare("udiat", root)
    cfg = json.loads((Path(__file__).parent.parent / "bundles" / "seg_breast_ultrasound" / "configs" / "transfer.json").read_text())
    concepts = [{**c, "n_images": TINY["concepts_n"]} for c in cfg["concepts"]]
    # test_vit has 6 blocks: the bundle's block 9 is BiomedCLIP's (12 blocks), None = the same relative depth
    results = run_bundle("seg_breast_ultrasound", {
        "data_root": str(root), "data": {**cfg["data"], "max_images": 1}, "sam": None, "inversion": TINY["inversion"],
        "m2ib": {**cfg["m2ib"], **TINY["m2ib"], "layer": None}, "concepts": concepts}, output=tmp_path / "run")
    assert socket_calls == []
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert "biomedclip:vit-b16" in json.dumps(settings)
    assert results["n_images"] == 1 and set(results["stages"]) == {"baseline", "transfer"}


@pytest.mark.parametrize("hf_cache", ["HF_HUB_OFFLINE=1"], indirect=True)
@pytest.mark.parametrize("cache_prefix", [True, False])
def test_on_the_model_device(hf_cache, cache_prefix):
    """Device-agnostic, on the meta stand-in for a GPU: tokens, both towers and M2IB on the model's device."""
    from meta_device import MetaHostSyncs

    from medkt.segmentation.m2ib import M2IB, M2IBConfig

    _fake_biomedclip(hf_cache)
    backend = create_backend("biomedclip:vit-b16", device="meta")
    assert backend.tokenize(TEXTS).device.type == "meta"
    img = torch.rand(3, 160, 160)  # a CPU image, as the pipeline passes it
    with MetaHostSyncs(), pytest.warns(RuntimeWarning, match="constant"):  # placeholder KL is all zeros
        assert backend.encode_texts(TEXTS).device.type == "meta"
        assert backend.encode_images(img[None]).shape == (1, 16)
        sal = M2IB(backend, M2IBConfig(layer=4, steps=2, batch_size=2, cache_prefix=cache_prefix,
                                       verify_split=False)).saliency(img, TEXTS[0])
    assert sal.shape == (160, 160)
