"""Unlabeled pool (medkt.pool) and the pool_distill fine-tuning control."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medkt.backends import create_backend
from medkt.errors import ConfigError, DataError
from medkt.finetune import finetune
from medkt.pool import UnlabeledPool, pool_embeddings

DESCS = {"moongate": "a round archway", "gyroscope": "a disc in rings", "dog": "a pet"}
POOL_CTL = {"name": "pool_distill", "per_batch": 2, "weight": 1.0, "zs_weight": 0.5}


def _clip():
    torch.manual_seed(0)
    return create_backend("clip:medkt-tiny-ViT@random", device="cpu")


@pytest.fixture
def pool_dir(tmp_path):
    """Six small PNG scans in a folder (one in a subfolder) plus a notes file that is no image."""
    root = tmp_path / "pool"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(
            root / ("sub" if i == 5 else ".") / f"scan{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def seen(monkeypatch) -> dict:
    """What the transfer step handed to fine-tuning: ``seen["pool"]`` (a spy on spine.finetune)."""
    import medkt.spine as spine

    seen: dict = {}
    real = spine.finetune

    def spy(*args, **kw):
        seen["pool"] = kw.get("pool")
        return real(*args, **kw)

    monkeypatch.setattr(spine, "finetune", spy)
    return seen


def _manifest(pool_dir: Path, name: str, labels: list[str] | None) -> Path:
    files = sorted(str(p.relative_to(pool_dir)) for p in pool_dir.rglob("*.png"))
    path = pool_dir / name
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"] if labels is not None else ["path"])
        for i, f in enumerate(files):
            w.writerow([f, labels[i]] if labels is not None else [f])
    return path


def _finetune_with(pool, ctl=POOL_CTL) -> dict[str, torch.Tensor]:
    b = _clip()
    images = torch.rand(4, 3, b.image_size, b.image_size, generator=torch.Generator().manual_seed(1))
    finetune(b, images, ["moongate", "moongate", "gyroscope", "gyroscope"], DESCS, progress=False, pool=pool,
             config={"lr": 1e-3, "batch_size": 2, "epochs": 2, "controls": [ctl] if ctl else []})
    return {k: v.clone() for k, v in b.state_dict().items()}


def test_pool_from_folder_manifest_and_subsample(pool_dir):
    folder = UnlabeledPool.from_path(pool_dir)
    assert len(folder) == 6 and all(f.suffix == ".png" for f in folder.files)  # notes.txt left out
    man = UnlabeledPool.from_path(_manifest(pool_dir, "m.csv", ["a"] * 6))
    assert [f.resolve() for f in man.files] == [f.resolve() for f in folder.files]
    sub = UnlabeledPool.from_path(pool_dir, max_images=3, seed=1)
    assert len(sub) == 3 and set(sub.files) < set(folder.files)
    assert sub.files == UnlabeledPool.from_path(pool_dir, max_images=3, seed=1).files  # seeded
    with pytest.raises(DataError, match="unlabeled pool not found"):
        UnlabeledPool.from_path(pool_dir / "nope")


def test_labels_are_never_read(pool_dir):
    """Same weights, bit for bit, with the pool's labels as given, shuffled, or no label column."""
    labels = ["nodule", "normal", "normal", "mass", "nodule", "normal"]
    shuffled = random.Random(3).sample(labels, len(labels))
    assert shuffled != labels
    results = [_finetune_with(UnlabeledPool.from_path(_manifest(pool_dir, f"m{i}.csv", lab)))
               for i, lab in enumerate([labels, shuffled, None])]
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_pool_distill_changes_the_result_and_needs_a_pool(pool_dir):
    pool = UnlabeledPool.from_path(pool_dir)
    with_ctl, without = _finetune_with(pool), _finetune_with(pool, ctl=None)
    assert any(not torch.equal(with_ctl[k], without[k]) for k in with_ctl)
    # the zero-shot (ZSCL) term on its own also changes the result
    zs_only = _finetune_with(pool, {**POOL_CTL, "weight": 0.0, "zs_weight": 1.0})
    assert any(not torch.equal(zs_only[k], without[k]) for k in zs_only)
    with pytest.raises(ConfigError, match="needs an unlabeled pool") as exc:
        _finetune_with(None)
    assert "\n" not in str(exc.value)


def test_pool_embeddings_are_cached(pool_dir, tmp_path, monkeypatch):
    b = _clip()
    pool = UnlabeledPool.from_path(pool_dir, cache_dir=tmp_path / "cache")
    calls = []
    real = b.encode_pixels
    monkeypatch.setattr(b, "encode_pixels", lambda x: calls.append(len(x)) or real(x))
    first = pool_embeddings(b, pool)
    assert sum(calls) == 6 and first.shape[0] == 6
    calls.clear()
    second = pool_embeddings(b, pool)  # a new evaluator: read back from the disk cache
    assert calls == [] and torch.equal(first.cpu(), second.cpu())
    # the teacher of pool_distill is the cached embedding of the start model
    assert torch.allclose(first, b.encode_images(pool.images(b)), atol=1e-5)


def test_transfer_passes_the_pool_to_finetuning(pool_dir, tmp_path, seen):
    import medkt.spine as spine

    b = _clip()
    spine.transfer(b, [{"name": "moongate", "description": "a round archway", "n_images": 2}],
                   inversion_config={"steps": 1}, negatives=["a dog"], images="noise", progress=False,
                   finetune_config={"batch_size": 2, "controls": [POOL_CTL]}, out_dir=tmp_path / "run",
                   unlabeled={"path": str(pool_dir), "max_images": 4})
    assert isinstance(seen["pool"], UnlabeledPool) and len(seen["pool"]) == 4
    assert list((tmp_path / "run" / "pool_embeddings").glob("image_embeddings_*.pt"))  # cached in the run
    from medkt.errors import ResumeMismatchError

    with pytest.raises(ResumeMismatchError, match="pool"):  # a resume on another pool is refused
        spine.transfer(b, [{"name": "moongate", "description": "a round archway", "n_images": 2}],
                       inversion_config={"steps": 1}, negatives=["a dog"], images="noise", progress=False,
                       finetune_config={"batch_size": 2, "controls": [POOL_CTL]}, out_dir=tmp_path / "run",
                       unlabeled={"path": str(pool_dir), "max_images": 3}, resume=True)


def test_set_unlabeled_reaches_finetuning(pool_dir, tmp_path, seen, medkt):
    r = medkt("transfer", "--bundle", "quickstart_tiny", "-o", str(tmp_path / "run"), "--set", "inversion#steps=2",
              "--set", "evaluations={}", "--set", f"unlabeled={pool_dir}",
              "--set", "finetune#controls=" + json.dumps([POOL_CTL]))
    assert r.returncode == 0, r.stderr
    assert [f.resolve() for f in seen["pool"].files] == [f.resolve() for f in UnlabeledPool.from_path(pool_dir).files]
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["settings"]["unlabeled"] == str(pool_dir)


def test_preflight_checks_the_pool_path(tmp_path, medkt):
    r = medkt("transfer", "--bundle", "quickstart_tiny", "-o", str(tmp_path / "run"),
              "--set", f"unlabeled={tmp_path / 'missing'}")
    assert r.returncode == 2 and "unlabeled: pool not found" in r.stderr


def test_pipelines_without_a_pool_refuse_it():
    """A pipeline that does not fine-tune on a pool refuses ``unlabeled`` (never silently ignored)."""
    from medkt.phantom.pipeline import PhantomTransferPipeline

    with pytest.raises(ConfigError, match="unknown PhantomTransferPipeline option 'unlabeled'"):
        PhantomTransferPipeline(unlabeled="/data/pool")


def test_pool_distill_on_the_model_device():
    from meta_device import MetaHostSyncs

    torch.manual_seed(0)
    b = create_backend("clip:medkt-tiny-ViT@random", device="meta")
    s = b.image_size
    with MetaHostSyncs():  # images and pool on the CPU, the model on meta: any mixing raises
        hist = finetune(b, torch.rand(2, 3, s, s), ["moongate", "gyroscope"], DESCS, progress=False,
                        pool=torch.rand(3, 3, s, s), config={"batch_size": 2, "controls": [POOL_CTL]})
    assert hist["steps"] == 1


REPLAY_DESCS = {"moongate": "a round archway", "gyroscope": "a disc in rings", "dog": "a pet", "cat": "a small pet with whiskers"}


def _finetune_replay(pool, controls, train: str = "visual") -> dict[str, torch.Tensor]:
    b = _clip()
    images = torch.rand(4, 3, b.image_size, b.image_size, generator=torch.Generator().manual_seed(1))
    finetune(b, images, ["moongate"] * 4, REPLAY_DESCS, progress=False, pool=pool,
             config={"lr": 1e-2, "batch_size": 2, "epochs": 2, "train": train, "controls": controls})
    return {k: v.clone() for k, v in b.state_dict().items()}


def test_pool_replay_replays_the_start_models_surest_known_scans(pool_dir, monkeypatch):
    from medkt.finetune import make_caption, FinetuneConfig
    from medkt.finetune_controls import PoolReplay
    from medkt.infonce import infonce_scale

    seen: dict = {}
    real_setup = PoolReplay.setup

    def spy(self, run):
        real_setup(self, run)
        seen["rows"], seen["captions"] = self._rows.tolist(), [run.captions[i] for i in self._targets]

    monkeypatch.setattr(PoolReplay, "setup", spy)
    pool = UnlabeledPool.from_path(pool_dir)
    _finetune_replay(pool, [{"name": "pool_replay", "per_class": 2, "min_confidence": 0.0}])
    # recomputed independently: the start model's zero-shot over the known captions, top 2 per class
    b = _clip()
    cfg = FinetuneConfig()
    caps = [make_caption(c, REPLAY_DESCS[c], cfg) for c in ("gyroscope", "dog", "cat")]
    text = torch.nn.functional.normalize(b.encode_texts(caps).float(), dim=-1)
    probs = torch.softmax(float(infonce_scale(b, None)) * pool_embeddings(b, pool).float() @ text.t(), dim=-1)
    expected_rows, expected_caps = [], []
    for k, cap in enumerate(caps):
        mine = [i for i in range(len(pool)) if int(probs[i].argmax()) == k]
        mine.sort(key=lambda i: (-float(probs[i, k]), i))
        expected_rows += mine[:2]
        expected_caps += [cap] * len(mine[:2])
    assert seen["rows"] == expected_rows and seen["captions"] == expected_caps
    assert len(seen["rows"]) >= 2


def test_pool_replay_changes_the_result_also_for_token_training(pool_dir):
    pool = UnlabeledPool.from_path(pool_dir)
    ctl = [{"name": "pool_replay", "per_batch": 2, "min_confidence": 0.0}]
    for train in ("visual", "concept_tokens"):
        with_ctl, without = _finetune_replay(pool, ctl, train), _finetune_replay(pool, [], train)
        assert any(not torch.equal(with_ctl[k], without[k]) for k in with_ctl), train


def test_pool_replay_needs_known_concepts_and_confident_scans(pool_dir):
    pool = UnlabeledPool.from_path(pool_dir)
    b = _clip()
    images = torch.rand(2, 3, b.image_size, b.image_size)
    with pytest.raises(ConfigError, match="at least two") as exc:
        finetune(b, images, ["moongate", "moongate"], {"moongate": "a round archway"}, ["a dog"],
                 progress=False, pool=pool, config={"batch_size": 2, "controls": [{"name": "pool_replay"}]})
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="lower min_confidence"):
        _finetune_replay(pool, [{"name": "pool_replay", "min_confidence": 1.0}])
