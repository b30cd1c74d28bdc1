"""Pretrained tags and HF-cache repo ids resolve from the local Hugging Face cache only.

Networking is blocked inside each test (``socket.connect``/``getaddrinfo``/``create_connection``
raise and count their calls). Each case runs twice: with ``HF_HUB_OFFLINE=1`` and without it
(a user's shell; ``huggingface_hub.constants.HF_HUB_OFFLINE`` is what the hub consults, so it is
set to what a process started in that environment would hold). A missing tag must fail (in under
10 s: the slow test) with a one-line :class:`WeightsNotFoundError` naming the file and repo to fetch, and no
socket call; a tag whose file is in a fake cache (real layout: ``models--ORG--NAME/refs/main``,
``snapshots/<commit>/<file>`` symlinked to ``blobs/``) must load that file - the one ``refs/main``
points to, not a newer snapshot folder.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from medkt.backends import create_backend
from medkt.errors import WeightsNotFoundError

LIMIT_S = 10.0


def _warm_imports() -> None:
    """Import the libraries before the clock starts: the limit is about hub retries, and a cold
    ``import open_clip`` alone takes 20 s on a loaded 2-core machine (3 s idle)."""
    import open_clip  # noqa: F401
    from transformers import CLIPImageProcessor, CLIPModel  # noqa: F401

    import medkt.backends.coca  # noqa: F401
    import medkt.backends.hf_clip  # noqa: F401
    import medkt.backends.open_clip_backend  # noqa: F401


@pytest.fixture
def socket_calls(monkeypatch):
    """Block the network for this test; the list records every attempt."""
    calls: list[str] = []

    def refuse(name):
        def _refuse(*args, **kwargs):
            calls.append(name)
            raise OSError(f"network blocked by the test ({name})")

        return _refuse

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return calls


@pytest.fixture(params=["HF_HUB_OFFLINE=1", "online environment"])
def hf_cache(request, monkeypatch, tmp_path):
    """An empty HF cache under tmp_path; HF_HOME/HF_HUB_CACHE point at it."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    hub = home / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    offline = request.param == "HF_HUB_OFFLINE=1"
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if offline:
            monkeypatch.setenv(key, "1")
        else:
            monkeypatch.delenv(key, raising=False)
    # what a process started in that environment holds: the hub's flag (read at import), its
    # HTTP session (built with an offline adapter or not, then cached) and transformers' copy
    import transformers.utils.hub as tf_hub
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(tf_hub, "_is_offline_mode", offline, raising=False)
    reset_sessions()
    yield hub
    reset_sessions()  # the next test gets a session for its own setting


def put_in_cache(hub, repo_id: str, files: dict[str, object], commit: str, ref: bool = True):
    """Write ``files`` (name -> state dict) as huggingface_hub does: blobs + snapshot symlinks."""
    from safetensors.torch import save_file

    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, state in files.items():
        blob = repo / "blobs" / f"{commit}-{name}"
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in state.items()}, str(blob))
        else:
            torch.save(state, blob)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snap


#: (spec, what its error must name)
MISSING_TAGS = [
    # the default of the rare_concepts_clip and chexpert_clip_out_of_domain bundles
    ("clip:ViT-B-32@openai", ["timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"]),
    ("coca:coca_ViT-B-32@laion2b_s13b_b90k", ["laion/CoCa-ViT-B-32-laion2B-s13B-b90k", "open_clip_model.safetensors"]),
    ("coca:coca_ViT-B-32@mscoco_finetuned_laion2b_s13b_b90k",
     ["laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k", "open_clip_pytorch_model.bin"]),
    ("hf_clip:openai/clip-vit-base-patch32", ["openai/clip-vit-base-patch32", "hf download"]),
]


@pytest.mark.parametrize("spec,names", MISSING_TAGS)
def test_missing_tag_fails_naming_the_file(hf_cache, socket_calls, spec, names):
    # no socket call is what rules out hub retries; their wall-clock cost is the slow test below
    with pytest.raises(WeightsNotFoundError) as err:
        create_backend(spec)
    msg = str(err.value)
    assert socket_calls == [], f"network was attempted: {socket_calls}"
    assert "\n" not in msg
    for name in names + ["Getting weights", str(hf_cache)]:
        assert name in msg, f"{name!r} not in: {msg}"


def _register_tag(monkeypatch, architecture: str, tag: str, repo_id: str, **cfg):
    """A pretrained tag in open_clip's own registry pointing at ``repo_id`` (as the real ones do)."""
    from open_clip import pretrained

    entry = pretrained._pcfg(hf_hub=repo_id + "/", **cfg)
    monkeypatch.setitem(pretrained._PRETRAINED, architecture, {tag: entry})


@pytest.mark.parametrize("family,architecture", [("clip", "medkt-tiny-ViT"), ("coca", "coca_tiny")])
def test_cached_tag_loads_the_file_refs_main_points_to(hf_cache, socket_calls, monkeypatch, family, architecture):
    import open_clip

    from medkt.backends.coca import register_tiny_configs
    from medkt.backends.open_clip_backend import register_medkt_configs

    register_medkt_configs()
    register_tiny_configs()
    repo = f"medkt-test/{architecture}"
    _register_tag(monkeypatch, architecture, "medkt_test", repo, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                  std=(0.25, 0.25, 0.25))
    torch.manual_seed(1)
    wanted = {k: v.clone() for k, v in open_clip.create_model(architecture).state_dict().items()}
    torch.manual_seed(2)
    other = open_clip.create_model(architecture).state_dict()
    put_in_cache(hf_cache, repo, {"open_clip_model.safetensors": wanted}, commit="a" * 40)
    newer = put_in_cache(hf_cache, repo, {"open_clip_model.safetensors": other}, commit="b" * 40, ref=False)
    os.utime(newer, (time.time() + 100, time.time() + 100))  # newest by file time, but not the ref

    backend = create_backend(f"{family}:{architecture}@medkt_test")
    assert socket_calls == [], f"network was attempted: {socket_calls}"
    got = backend.model.state_dict()
    for k, v in wanted.items():
        assert torch.equal(got[k], v), k
    # what the tag implies beyond its file: its preprocessing
    assert backend.model.visual.preprocess_cfg["interpolation"] == "bilinear"
    assert tuple(backend.mean) == (0.5, 0.5, 0.5) and tuple(backend.std) == (0.25, 0.25, 0.25)


def test_repo_id_resolves_to_the_ref_not_the_newest_snapshot(hf_cache, socket_calls):
    from medkt.weights import hf_cache_snapshot, resolve_weights

    put_in_cache(hf_cache, "org/model", {"pytorch_model.bin": {"w": torch.zeros(1)}}, commit="c" * 40)
    newer = put_in_cache(hf_cache, "org/model", {"pytorch_model.bin": {"w": torch.ones(1)}}, commit="d" * 40, ref=False)
    os.utime(newer, (time.time() + 100, time.time() + 100))
    assert hf_cache_snapshot("org/model").name == "c" * 40
    path = resolve_weights("org/model", what="test", how_to_get="-", filenames=("pytorch_model.bin",))
    assert torch.load(path, weights_only=True)["w"].item() == 0.0
    assert socket_calls == []


@pytest.mark.slow  # a wall-clock bound: meaningful only on an idle machine, so not in the default suite
@pytest.mark.parametrize("spec,names", MISSING_TAGS)
def test_missing_tag_fails_fast(hf_cache, socket_calls, spec, names):
    _warm_imports()
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError):
        create_backend(spec)
    assert time.perf_counter() - t0 < LIMIT_S, f"took {time.perf_counter() - t0:.1f} s"
