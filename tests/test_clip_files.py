"""CLIP weights given as files: each kind of file builds the model open_clip itself builds from it.

The files are written here from tiny random models of open_clip's real ``CLIP`` class, shaped so
that open_clip's OpenAI loader can read them (64-wide towers: it infers heads as width // 64):

* OpenAI's release format: a TorchScript archive with fp16 matrices and the archive-only entries
  ``input_resolution``/``context_length``/``vocab_size`` (``torch.jit.script`` + ``torch.jit.save``);
* a plain state dict taken from that archive (``.pt`` and ``.safetensors``);
* open_clip's own checkpoints: an HF-style model folder (``open_clip_config.json`` + safetensors)
  and an ``open_clip_train`` checkpoint (``{"epoch", "state_dict": {"module.…"}}``).

"Upstream" is open_clip's own model from the same file: ``load_openai_model`` for OpenAI files,
``build_model_from_openai_state_dict`` for a bare OpenAI state dict, ``create_model`` (with the
``-quickgelu`` name, ``local-dir:``, or ``pretrained=file``) for open_clip's. Embeddings must
agree to float rounding; each test also checks that the other activation would be visibly off,
so a wrong choice cannot pass.
"""
from __future__ import annotations

import json
import logging
import zipfile

import pytest
import torch

from medkt.backends import create_backend
from medkt.errors import ConfigError, UnknownNameError

ARCH = "medkt-test-oa"
QUICK_ARCH = ARCH + "-quickgelu"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
TOL = 1e-6


@pytest.fixture(autouse=True)
def tiny_openai_shaped_configs(monkeypatch):
    """``medkt-test-oa`` (GELU) and its ``-quickgelu`` twin in open_clip's registry, for this test only."""
    import open_clip.factory as factory

    from medkt.backends.open_clip_backend import register_medkt_configs

    register_medkt_configs()  # first: it rescans open_clip's configs, which would drop the two below
    monkeypatch.setitem(factory._MODEL_CONFIGS, ARCH, json.loads(json.dumps(CONFIG)))
    monkeypatch.setitem(factory._MODEL_CONFIGS, QUICK_ARCH, {**json.loads(json.dumps(CONFIG)), "quick_gelu": True})


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 32, 32, generator=g), torch.randint(1, 49406, (2, 16), generator=g)


def _max_diff(model_a, model_b) -> float:
    img, tok = _inputs()
    with torch.no_grad():
        d_img = (model_a.encode_image(img) - model_b.encode_image(img)).abs().max()
        d_txt = (model_a.encode_text(tok) - model_b.encode_text(tok)).abs().max()
    return float(max(d_img, d_txt))


def _random_model(quick_gelu: bool, seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(ARCH, force_quick_gelu=quick_gelu).eval()


def write_release_archive(path, quick_gelu: bool = True):
    """A TorchScript archive laid out like OpenAI's release files."""
    from open_clip.model import convert_weights_to_lp

    model = _random_model(quick_gelu)
    convert_weights_to_lp(model)  # OpenAI stores conv/linear/attention/projection weights in fp16
    # OpenAI's causal mask is a plain tensor (not in the state dict); its archive carries these three
    model.attn_mask = model._buffers.pop("attn_mask")
    del model.context_length, model.vocab_size
    for key, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
        model.register_buffer(key, torch.tensor(value))
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def _archive_state_dict(archive) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in torch.jit.load(str(archive)).state_dict().items()}


def _built_with_quick_gelu(backend) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in backend.model.modules())


def _check(name: str, backend, upstream, wrong=None) -> None:
    diff = _max_diff(backend.model, upstream)
    print(f"{name}: max |medkt - open_clip| = {diff:.3g}")  # shown with pytest -s
    assert diff <= TOL, f"{name}: medkt differs from open_clip by {diff}"
    if wrong is not None:  # the other activation on the same weights would be caught
        off = _max_diff(wrong, upstream)
        print(f"{name}: the other activation would differ by {off:.3g}")
        assert off > 1e-4, off


def _same_weights_other_activation(backend, quick_gelu: bool):
    import open_clip

    other = open_clip.create_model(ARCH, force_quick_gelu=quick_gelu).eval()
    other.load_state_dict(backend.model.state_dict())
    return other


# -- file kinds ---------------------------------------------------------------------------------
def test_torchscript_release_file_matches_open_clip_openai_loader(tmp_path):
    import open_clip

    archive = write_release_archive(tmp_path / "ViT-tiny.pt")
    backend = create_backend(f"clip:{ARCH}@{archive}")  # the plain name: the archive decides
    assert _built_with_quick_gelu(backend)
    upstream = open_clip.load_openai_model(str(archive), precision="fp32", device="cpu")
    _check("TorchScript archive", backend, upstream, _same_weights_other_activation(backend, False))


def test_gelu_torchscript_archive_keeps_gelu(tmp_path):
    from open_clip.model import build_model_from_openai_state_dict

    archive = write_release_archive(tmp_path / "gelu.pt", quick_gelu=False)
    backend = create_backend(f"clip:{ARCH}@{archive}")
    assert not _built_with_quick_gelu(backend)
    upstream = build_model_from_openai_state_dict(_archive_state_dict(archive), quick_gelu=False).float()
    _check("TorchScript archive, GELU", backend, upstream, _same_weights_other_activation(backend, True))
    with pytest.raises(ConfigError, match="needs GELU.*TorchScript archive"):
        create_backend(f"clip:{QUICK_ARCH}@{archive}")


def test_release_file_in_open_clip_url_cache(tmp_path, monkeypatch):
    """A tag whose file is OpenAI's archive in ``~/.cache/clip`` (open_clip's old URL download)."""
    import open_clip
    from open_clip import pretrained

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    entry = pretrained._pcfg(url="https://openaipublic.invalid/clip/models/x/medkt-oa.pt", quick_gelu=True)
    monkeypatch.setitem(pretrained._PRETRAINED, ARCH, {"openai": entry})
    (tmp_path / ".cache" / "clip").mkdir(parents=True)
    archive = write_release_archive(tmp_path / ".cache" / "clip" / "medkt-oa.pt")
    backend = create_backend(f"clip:{ARCH}@openai")
    upstream = open_clip.load_openai_model(str(archive), precision="fp32", device="cpu")
    _check("TorchScript archive via ~/.cache/clip tag", backend, upstream)


def test_openai_state_dict_pt_matches_open_clip_openai_loader(tmp_path):
    import open_clip

    path = tmp_path / "openai_state.pt"
    torch.save(_archive_state_dict(write_release_archive(tmp_path / "a.pt")), path)
    backend = create_backend(f"clip:{ARCH}@{path}")
    assert _built_with_quick_gelu(backend)
    upstream = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
    _check("OpenAI state dict .pt", backend, upstream, _same_weights_other_activation(backend, False))


def test_openai_state_dict_safetensors(tmp_path):
    from open_clip.model import build_model_from_openai_state_dict
    from safetensors.torch import load_file, save_file

    state = _archive_state_dict(write_release_archive(tmp_path / "a.pt"))
    with_keys = tmp_path / "with_archive_keys.safetensors"
    save_file(state, str(with_keys))
    backend = create_backend(f"clip:{ARCH}@{with_keys}")
    upstream = build_model_from_openai_state_dict(load_file(str(with_keys))).float()
    _check("OpenAI state dict .safetensors", backend, upstream, _same_weights_other_activation(backend, False))

    # converted without the archive entries, the file no longer says: refuse, naming both fixes
    bare = tmp_path / "bare.safetensors"
    save_file({k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}, str(bare))
    with pytest.raises(ConfigError) as err:
        create_backend(f"clip:{ARCH}@{bare}")
    msg = str(err.value)
    assert f"clip:{QUICK_ARCH}@{bare}" in msg and "quick_gelu=False" in msg and "open_clip_config.json" in msg
    assert "\n" not in msg
    # ... and with the -quickgelu name it is open_clip's model of that name
    named = create_backend(f"clip:{QUICK_ARCH}@{bare}")
    _check("-quickgelu architecture named, .safetensors", named, upstream)
    import open_clip

    _check("-quickgelu architecture named vs create_model", named,
           open_clip.create_model(QUICK_ARCH, pretrained=str(bare)).eval())


def test_open_clip_model_folder_reads_its_config(tmp_path):
    """An HF-style open_clip folder: ``open_clip_config.json`` says the activation (both ways)."""
    import open_clip
    from safetensors.torch import save_file

    for quick in (False, True):
        folder = tmp_path / f"repo_{quick}"
        folder.mkdir()
        model = _random_model(quick, seed=3)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**CONFIG, "quick_gelu": quick}}))
        backend = create_backend(f"clip:{ARCH}@{folder}")
        assert _built_with_quick_gelu(backend) == quick
        upstream = open_clip.create_model(f"local-dir:{folder}").eval()
        _check(f"open_clip folder, quick_gelu={quick}", backend, upstream,
               _same_weights_other_activation(backend, not quick))


def test_open_clip_train_checkpoint_with_declared_activation(tmp_path):
    import open_clip

    model = _random_model(False, seed=4)
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    with pytest.raises(ConfigError, match="does not say"):
        create_backend(f"clip:{ARCH}@{path}")
    backend = create_backend(f"clip:{ARCH}@{path}", quick_gelu=False)
    upstream = open_clip.create_model(ARCH, pretrained=str(path)).eval()
    _check("open_clip_train checkpoint, quick_gelu=False", backend, upstream,
           _same_weights_other_activation(backend, True))


def test_declarations_that_contradict_the_file_or_each_other(tmp_path):
    archive = write_release_archive(tmp_path / "a.pt")
    with pytest.raises(ConfigError, match="needs QuickGELU.*quick_gelu=False"):
        create_backend(f"clip:{ARCH}@{archive}", quick_gelu=False)
    with pytest.raises(ConfigError, match="contradicts the architecture"):
        create_backend(f"clip:{QUICK_ARCH}@{archive}", quick_gelu=False)
    with pytest.raises(ConfigError, match="true or false"):
        create_backend(f"clip:{ARCH}@{archive}", quick_gelu="yes")


def test_architecture_without_quickgelu_weights_needs_no_declaration(tmp_path, tiny_clip):
    """open_clip knows no QuickGELU weights of medkt-tiny-ViT: its config (GELU) decides, as before."""
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    backend = create_backend(f"clip:medkt-tiny-ViT@{path}")
    assert not _built_with_quick_gelu(backend)


# -- messages -----------------------------------------------------------------------------------
def test_zip_archive_is_named_not_called_truncated(tmp_path):
    import medkt.backends.medclip as mk

    release = tmp_path / "medclip-vit-pretrained.zip"
    with zipfile.ZipFile(release, "w") as zf:
        zf.writestr("medclip-vit/pytorch_model.bin", b"weights")
    with pytest.raises(ConfigError) as err:
        create_backend(f"medclip:vit@{release}")  # before the tokenizer is looked for
    msg = str(err.value)
    assert "zip archive" in msg and "unzip" in msg and "medclip-vit/pytorch_model.bin" in msg and "truncated" not in msg
    with pytest.raises(ConfigError, match="zip archive"):
        mk.load_medclip_checkpoint(mk.MedCLIPModel(mk.ARCHITECTURES["tiny"], vocab_size=300), release)
    with pytest.raises(ConfigError, match="zip archive.*unzip"):
        create_backend(f"clip:{ARCH}@{release}")


def test_tokenizer_hint_names_a_key_the_bundles_accept():
    """The hint's bundle key is ``backend_options#tokenizer`` (a bare ``tokenizer`` key is refused by
    --set); --set accepts a new field only inside an existing dict, so every bundle that has
    ``backend_options`` must hold a dict there. Bundles without it get the other two ways."""
    from pathlib import Path

    import medkt.backends.medclip as mk

    hint = mk.HOW_TO_GET_TOKENIZER
    assert "--set backend_options#tokenizer=DIR" in hint and f"${mk.TOKENIZER_ENV}=DIR" in hint
    assert "bundle key 'tokenizer'" not in hint
    bundles = Path(mk.__file__).resolve().parents[2] / "bundles"
    configs = [json.loads(p.read_text()) for p in bundles.glob("*/configs/transfer.json")]
    with_options = [c for c in configs if "backend_options" in c]
    assert any(str(c.get("backend", "")).startswith("medclip:") for c in with_options)
    assert all(isinstance(c["backend_options"], dict) for c in with_options)


def test_coca_random_init_notice_only_when_random(tmp_path, caplog):
    import open_clip

    from medkt.backends.coca import register_tiny_configs

    register_tiny_configs()
    path = tmp_path / "coca.pt"
    torch.save(open_clip.create_model("coca_tiny").state_dict(), path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_backend(f"coca:tiny@{path}")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        create_backend("coca:tiny@random")  # true there: keep it
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


@pytest.mark.parametrize("spec,close", [("clip:ViT-B-32@opena", "openai"),
                                        ("coca:coca_ViT-B-32@laion2b_s13b_b9k", "laion2b_s13b_b90k")])
def test_misspelt_tag_gets_the_closest_one(spec, close):
    with pytest.raises(UnknownNameError, match=f"Did you mean '{close}'") as err:
        create_backend(spec)
    assert "Known tags" in str(err.value) and "\n" not in str(err.value)

