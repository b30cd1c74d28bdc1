"""Self-training on the unlabeled pool (medkt.self_training), `medkt finetune --unlabeled` and the
forgetting warnings of the transfer reports."""
from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medkt.backends import create_backend
from medkt.errors import ConfigError
from medkt.evaluation import ClassificationResult, forgetting_warnings
from medkt.finetune import make_caption, FinetuneConfig
from medkt.pool import UnlabeledPool
from medkt.self_training import SelfTrainingConfig, as_self_training, pick

CONCEPT = {"name": "moongate", "description": "a round archway", "n_images": 2}
KNOWN = {"dog": "a pet that barks", "gyroscope": "a disc in rings"}
FT = {"batch_size": 2, "lr": 1e-3}


def _clip():
    torch.manual_seed(0)
    return create_backend("clip:medkt-tiny-ViT@random", device="cpu")


@pytest.fixture
def pool_dir(tmp_path):
    """Ten small PNG scans (seeded noise with a bright disc of varying size)."""
    root = tmp_path / "pool"
    root.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    for i in range(10):
        img = rng.integers(0, 120, (24, 24)).astype(np.uint8)
        img[(yy - 12) ** 2 + (xx - 12) ** 2 < (i + 1) ** 2] = 250
        Image.fromarray(img).save(root / f"scan{i:02d}.png")
    return root


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """Every fine-tuning the transfer step runs: images, concepts, replay and controls (a spy on spine.finetune)."""
    import medkt.spine as spine

    seen: list[dict] = []
    real = spine.finetune

    def spy(backend, images, concepts, *args, **kw):
        cfg = args[2] if len(args) > 2 else kw.get("config")
        seen.append({"images": images.clone(), "concepts": list(concepts), "controls": list(cfg.controls),
                     "replay_images": kw.get("replay_images"), "replay_concepts": kw.get("replay_concepts")})
        return real(backend, images, concepts, *args, **kw)

    monkeypatch.setattr(spine, "finetune", spy)
    return seen


def _transfer(pool, st: dict | None, **kw):
    import medkt.spine as spine

    b = _clip()
    r = spine.transfer(b, [CONCEPT], inversion_config={"steps": 1}, images="noise", progress=False,
                       finetune_config=FT, known_descriptions=KNOWN, negatives=[], unlabeled=pool,
                       self_training=st, **kw)
    return b, r


def _manifest(pool_dir: Path, name: str, labels: list[str] | None) -> Path:
    path = pool_dir / name
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"] if labels is not None else ["path"])
        for i, f in enumerate(sorted(pool_dir.glob("*.png"))):
            w.writerow([f.name, labels[i]] if labels is not None else [f.name])
    return path


def test_pick_ranks_by_probability_or_margin_and_guards():
    probs = torch.tensor([[0.50, 0.45, 0.05],   # top caption 0, small margin
                          [0.70, 0.10, 0.20],   # the most probable
                          [0.40, 0.55, 0.05],   # top caption is another: never picked for column 0
                          [0.60, 0.05, 0.35],
                          [0.45, 0.05, 0.50]])
    assert [i for i, _, _ in pick(probs, 0, 2)] == [1, 3]
    assert [i for i, _, _ in pick(probs, 0, 9)] == [1, 3, 0]
    assert [i for i, _, _ in pick(probs, 0, 9, rank_by="margin")] == [1, 3, 0]  # margins .5, .25, .05
    assert [i for i, _, _ in pick(probs, 0, 9, min_confidence=0.55)] == [1, 3]
    assert [i for i, _, _ in pick(probs, 0, 9, exclude={1})] == [3, 0]
    assert pick(probs, 0, 9, min_confidence=1.0) == []
    row, p, m = pick(probs, 0, 1)[0]
    assert (row, p, m) == (1, pytest.approx(0.7), pytest.approx(0.5))
    # margin ranking differs from probability ranking when a runner-up is close
    probs2 = torch.tensor([[0.60, 0.39, 0.01], [0.55, 0.25, 0.20]])  # margins .21, .30
    assert [i for i, _, _ in pick(probs2, 0, 2)] == [0, 1]
    assert [i for i, _, _ in pick(probs2, 0, 2, rank_by="margin")] == [1, 0]


def test_config_is_checked():
    assert as_self_training(None) is None and as_self_training(True) == SelfTrainingConfig()
    assert as_self_training({"rounds": 2}).rounds == 2
    with pytest.raises(ConfigError, match="min_confidence"):
        as_self_training({"min_confidence": 1.5})
    with pytest.raises(ConfigError, match="rank_by"):
        as_self_training({"rank_by": "entropy"})
    with pytest.raises(ConfigError):
        as_self_training({"roundz": 1})


def test_needs_a_pool_and_known_classes(pool_dir):
    import medkt.spine as spine

    with pytest.raises(ConfigError, match="needs an unlabeled pool"):
        _transfer(None, {"rounds": 1})
    with pytest.raises(ConfigError, match="known_descriptions"):
        spine.transfer(_clip(), [CONCEPT], inversion_config={"steps": 1}, images="noise", progress=False,
                       finetune_config=FT, negatives=["a dog"], unlabeled=pool_dir, self_training={"known_per_class": 2})


def _expected_picks(pool_dir, k: int, min_confidence: float = 0.0) -> list[int]:
    """The top-``k`` pool scans of the round-0 model, computed here without medkt.self_training:
    the same transfer without self-training, then P(caption) over the fine-tuning captions."""
    b, _ = _transfer(pool_dir, None)
    cfg = FinetuneConfig.from_dict(FT)
    caps = [make_caption(CONCEPT["name"], CONCEPT["description"], cfg)] + [make_caption(c, d, cfg) for c, d in KNOWN.items()]
    pool = UnlabeledPool.from_path(pool_dir)
    img = b.encode_images(pool.images(b))
    txt = b.encode_texts(caps)
    p = F.softmax(float(b.logit_scale.detach()) * img @ txt.t(), dim=-1)
    ok = [i for i in range(len(p)) if int(p[i].argmax()) == 0 and float(p[i, 0]) >= min_confidence]
    return sorted(ok, key=lambda i: -float(p[i, 0]))[:k]


def test_picks_are_the_top_scored_pool_scans(pool_dir, calls):
    expected = _expected_picks(pool_dir, 3)
    assert expected, "the tiny model should call at least one pool scan the new concept"
    calls.clear()
    _, r = _transfer(pool_dir, {"rounds": 1, "per_round": 3, "known_per_class": 1, "min_confidence": 0.0})
    (rnd,) = r.self_training
    assert [e["index"] for e in rnd["picked"]] == expected
    files = UnlabeledPool.from_path(pool_dir).files
    assert [e["file"] for e in rnd["picked"]] == [str(files[i]) for i in expected]
    probs = [e["probability"] for e in rnd["picked"]]
    assert probs == sorted(probs, reverse=True) and all(e["concept"] == "moongate" for e in rnd["picked"])
    # known picks: replay captions of the known classes, never a scan already picked for the new concept
    assert {e["concept"] for e in rnd["known"]} <= set(KNOWN)
    assert not {e["index"] for e in rnd["known"]} & set(expected)
    assert r.summary()["self_training"] == r.self_training
    json.dumps(r.summary())  # JSON-ready


def test_skip_start_top_never_picks_scans_the_start_model_called_a_skipped_class(pool_dir, calls):
    """``skip_start_top``: a scan whose top caption under the START model is a skipped known class
    is never picked, even when the transferred model ranks it first."""
    everything = _expected_picks(pool_dir, 10)
    cfg = FinetuneConfig.from_dict(FT)
    caps = [make_caption(CONCEPT["name"], CONCEPT["description"], cfg)] + [make_caption(c, d, cfg) for c, d in KNOWN.items()]
    start = _clip()
    pool = UnlabeledPool.from_path(pool_dir)
    top = F.softmax(float(start.logit_scale.detach()) * start.encode_images(pool.images(start))
                    @ start.encode_texts(caps).t(), dim=-1).argmax(dim=1)
    known = list(KNOWN)
    skip = next((k for k in known if any(int(top[i]) == 1 + known.index(k) for i in everything)), None)
    assert skip is not None, "the start model should call one of the new concept's candidates a known class"
    skipped = {i for i in range(len(top)) if int(top[i]) == 1 + known.index(skip)}
    expected = [i for i in everything if i not in skipped][:3]
    calls.clear()
    _, r = _transfer(pool_dir, {"rounds": 1, "per_round": 3, "known_per_class": 0, "min_confidence": 0.0,
                                "skip_start_top": [skip]})
    assert [e["index"] for e in r.self_training[0]["picked"]] == expected
    with pytest.raises(ConfigError, match="skip_start_top.*not known classes"):
        _transfer(pool_dir, {"rounds": 1, "skip_start_top": ["unicorn"]})


def test_second_round_finetunes_on_the_picked_images(pool_dir, calls, tmp_path):
    b, r = _transfer(pool_dir, {"rounds": 1, "per_round": 3, "known_per_class": 2, "min_confidence": 0.0},
                     out_dir=tmp_path / "run")
    assert len(calls) == 2
    first, second = calls
    rnd = r.self_training[0]
    picked = [e["index"] for e in rnd["picked"]]
    pool = UnlabeledPool.from_path(pool_dir)
    n_inv = len(first["images"])
    # the round keeps the inverted images and adds the picked scans, captioned as the new concept
    assert torch.equal(second["images"][:n_inv], first["images"])
    assert torch.equal(second["images"][n_inv:], torch.stack([b.load_image(pool.files[i]) for i in picked]))
    assert second["concepts"] == first["concepts"] + ["moongate"] * len(picked)
    # the known picks are replay images with their classes, through an added replay control
    assert rnd["known"] and second["replay_concepts"] == [e["concept"] for e in rnd["known"]]
    assert torch.equal(second["replay_images"], torch.stack([b.load_image(pool.files[e["index"]]) for e in rnd["known"]]))
    assert [c["name"] for c in second["controls"]] == ["replay"] and not first["controls"]
    assert (tmp_path / "run" / "self_training" / "round_1" / "finetuned.safetensors").is_file()
    assert rnd["weights"].endswith("round_1/finetuned.safetensors") and rnd["finetune"]["steps"] > 0


def test_each_round_restarts_from_the_start_weights(pool_dir, calls, monkeypatch):
    """The weights a round starts from are the start model's, not the previous round's."""
    import medkt.spine as spine

    start = {k: v.clone() for k, v in _clip().state_dict().items()}
    seen_start = []
    real = spine.finetune

    def spy(backend, *a, **kw):
        seen_start.append(all(torch.equal(v, start[k]) for k, v in backend.state_dict().items()))
        return real(backend, *a, **kw)

    monkeypatch.setattr(spine, "finetune", spy)
    st = {"rounds": 2, "per_round": 2, "known_per_class": 0, "min_confidence": 0.0}
    _, r = _transfer(pool_dir, st)
    # here round 2 picks what round 1 did: from the same start weights that is the same model, so it stops
    first, second = ([e["index"] for e in rnd["picked"]] for rnd in r.self_training)
    assert first == second and seen_start == [True, True]
    assert r.self_training[1]["stopped"] == "the picks equal round 1's; its model is kept"
    import medkt.self_training as mst

    seen_start.clear()
    monkeypatch.setattr(mst, "_same_picks", lambda a, b: False)  # force a second round
    _transfer(pool_dir, st)
    assert seen_start == [True, True, True]


def test_pool_labels_never_change_the_picks(pool_dir):
    labels = ["moongate", "dog", "dog", "gyroscope", "moongate", "dog", "dog", "gyroscope", "dog", "dog"]
    shuffled = random.Random(3).sample(labels, len(labels))
    assert shuffled != labels
    st = {"rounds": 1, "per_round": 3, "known_per_class": 1, "min_confidence": 0.0}
    rounds = [_transfer(_manifest(pool_dir, f"m{i}.csv", lab), st)[1].self_training for i, lab in
              enumerate([labels, shuffled, None])]
    picks = [[{k: v for k, v in rnd.items() if k != "seconds"} for rnd in rr] for rr in rounds]  # wall time varies
    assert picks[0] == picks[1] == picks[2] and picks[0][0]["picked"] and picks[0][0]["known"]


def test_min_confidence_one_picks_nothing_and_says_so(pool_dir, calls, caplog):
    with caplog.at_level(logging.WARNING, logger="medkt"):
        b, r = _transfer(pool_dir, {"rounds": 2, "per_round": 3, "min_confidence": 1.0})
    (rnd,) = r.self_training  # no second round after an empty one
    assert rnd["picked"] == [] and rnd["finetune"] is None
    assert "no pool scan is scored most likely ['moongate'] with P >= min_confidence 1;" in rnd["stopped"]
    assert rnd["stopped"] in caplog.text
    assert len(calls) == 1  # only the first transfer fine-tuned


def test_cli_finetune_passes_the_pool(tmp_path, pool_dir, medkt, monkeypatch):
    import medkt.finetune as ft

    inv = tmp_path / "inv"
    r = medkt("invert", "--backend", "clip:medkt-tiny-ViT@random", "--concept", "moongate=a round archway",
              "--concept", "gyroscope=a disc in rings", "--n-images", "1", "--steps", "1", "--output", str(inv))
    assert r.returncode == 0, r.stderr
    seen = {}
    real = ft.finetune
    monkeypatch.setattr(ft, "finetune", lambda *a, **kw: seen.update(pool=kw.get("pool")) or real(*a, **kw))
    r = medkt("finetune", "--backend", "clip:medkt-tiny-ViT@random", "--images", str(inv / "manifest.csv"),
              "--output", str(tmp_path / "w.safetensors"), "--unlabeled", str(pool_dir),
              "--set", 'controls=[{"name": "pool_distill", "per_batch": 2}]')
    assert r.returncode == 0, r.stderr
    assert isinstance(seen["pool"], UnlabeledPool) and len(seen["pool"]) == 10
    r = medkt("finetune", "--backend", "clip:medkt-tiny-ViT@random", "--images", str(inv / "manifest.csv"),
              "--output", str(tmp_path / "w2.safetensors"), "--unlabeled", str(tmp_path / "missing"))
    assert r.returncode == 2 and "unlabeled pool not found" in r.stderr


# --- forgetting warnings -----------------------------------------------------------------------
def test_forgetting_warning_exactly_above_ten_points():
    before = {"atelectasis": 0.69, "edema": 0.50, "effusion": 0.40, "nodule": 0.30}
    after = {"atelectasis": 0.0, "edema": 0.40, "effusion": 0.295, "nodule": 0.0}
    w = forgetting_warnings(before, after, new=["nodule"])
    # edema fell exactly 10 points: no warning; effusion 10.5: warned; nodule is the new class
    assert w == ["WARNING: known class 'atelectasis' fell 69.0 -> 0.0 % (-69.0 points)",
                 "WARNING: known class 'effusion' fell 40.0 -> 29.5 % (-10.5 points)"]
    assert forgetting_warnings(before, before) == []
    assert forgetting_warnings({"a": 0.5}, {"a": 0.39}, where="retention") == [
        "WARNING: known class 'a' (retention) fell 50.0 -> 39.0 % (-11.0 points)"]


def _result(per_class: dict[str, float]) -> ClassificationResult:
    return ClassificationResult(list(per_class), [], [], np.zeros((0, len(per_class))),
                                float(np.mean(list(per_class.values()))), dict(per_class))


def test_transfer_report_and_results_warn_at_the_top(tmp_path):
    from medkt.inversion import InversionConfig, InversionResult
    from medkt.pipelines.transfer import write_report
    from medkt.spine import TransferResult

    before = {"retention": _result({"atelectasis": 0.69, "edema": 0.5, "moongate": 0.1})}
    after = {"retention": _result({"atelectasis": 0.0, "edema": 0.45, "moongate": 0.9})}
    inv = InversionResult(torch.zeros(1, 3, 4, 4), ["moongate"], ["a round archway"], [0.3])
    r = TransferResult(inv, {"loss": [1.0, 0.5], "steps": 2}, before, after)
    results = {**r.summary(), "evaluations": {"retention": {"info": {}}}}
    assert results["warnings"] == ["WARNING: known class 'atelectasis' fell 69.0 -> 0.0 % (-69.0 points)"]
    pipe = SimpleNamespace(bundle_name="demo", backend_spec="clip:x", seed=0, inv_cfg=InversionConfig(),
                           ft_cfg=FinetuneConfig())
    report = write_report(tmp_path, pipe, results, before, after).read_text().splitlines()
    assert report[0].startswith("# ") and "atelectasis' fell 69.0 -> 0.0 %" in report[2]
    # no drop: no warning line
    calm = TransferResult(inv, {"loss": [1.0], "steps": 1}, before, before)
    assert calm.summary()["warnings"] == []


def test_bundle_set_self_training(pool_dir, tmp_path, medkt):
    st = {"known_per_class": 0, "min_confidence": 0.0, "per_round": 2}
    r = medkt("transfer", "--bundle", "quickstart_tiny", "-o", str(tmp_path / "run"), "--set", "inversion#steps=2",
              "--set", "evaluations={}", "--set", f"unlabeled={pool_dir}", "--set", f"self_training={json.dumps(st)}")
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    (rnd,) = results["self_training"]
    per_concept = {c: sum(e["concept"] == c for e in rnd["picked"]) for c in results["concepts"]}
    assert set(per_concept.values()) == {2} and rnd["finetune"]["steps"] > 0 and results["warnings"] == []
    assert (tmp_path / "run" / "self_training" / "round_1" / "finetuned.safetensors").is_file()
    r = medkt("transfer", "--bundle", "quickstart_tiny", "-o", str(tmp_path / "run2"),
              "--set", f"self_training={json.dumps(st)}")
    assert r.returncode == 2 and "self_training needs an unlabeled pool" in r.stderr


def test_resume_reads_the_rounds_back(pool_dir, tmp_path, calls):
    st = {"rounds": 1, "per_round": 2, "known_per_class": 1, "min_confidence": 0.0}
    b1, r1 = _transfer(pool_dir, st, out_dir=tmp_path / "run")
    calls.clear()
    b2, r2 = _transfer(pool_dir, st, out_dir=tmp_path / "run", resume=True)
    assert calls == []  # both fine-tunings (first transfer and round 1) read back, not run
    strip = [[{k: v for k, v in rnd.items() if k != "seconds"} for rnd in r.self_training] for r in (r1, r2)]
    assert strip[0] == strip[1]
    assert all(torch.equal(v, b2.state_dict()[k]) for k, v in b1.state_dict().items())  # the round-1 weights
