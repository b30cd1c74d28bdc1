"""Unlabeled phantom pools and the pool protocol harness (medkt/phantom/pool.py, benchmarks/phantom_pool)."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from medkt.errors import ConfigError

KNOWN = ["no finding", "cardiomegaly", "pleural effusion", "edema", "consolidation", "atelectasis",
         "pneumothorax", "mass"]
TOKENS_2STEP = {"train": "concept_tokens", "batch_size": 2, "lr": 0.05, "epochs": 2, "caption_template": "{name}",
                "optimizer": {"name": "adam", "weight_decay": 0.0}, "controls": []}


def _digest(ds) -> str:
    return hashlib.sha256(ds.images.tobytes() + ds.masks.tobytes()).hexdigest()


def test_new_finding_is_registered_and_leaves_every_other_finding_unchanged():
    from medkt.phantom import BUILTIN_FINDINGS, list_findings, make_dataset, make_phantom
    from medkt.phantom.findings import (DEFINITIONS, EXTRA_HELD_OUT, FINAL_EVAL_FINDINGS, describe_hiatal_hernia,
                                        draw_hiatal_hernia)
    from medkt.phantom.world import get_finding, register_finding, unregister_finding

    name = "hiatal hernia"
    assert name in FINAL_EVAL_FINDINGS and name in list_findings() and name not in BUILTIN_FINDINGS
    assert name in get_finding(name).definition
    for i in range(4):
        p = make_phantom(name, 3, i)
        assert p.mask.any() and "hernia" not in p.describe(i).lower() and "hiatal" not in p.describe(i).lower()
    # a distinct image: the bubble darkens the heart region compared with the same anatomy without it
    assert make_phantom(name, 3, 0).image.mean() != make_phantom("no finding", 3, 0).image.mean()
    old = list(BUILTIN_FINDINGS) + list(EXTRA_HELD_OUT)
    with_it = _digest(make_dataset(old, 2, 900_000))
    unregister_finding(name)
    try:
        assert name not in list_findings()
        assert _digest(make_dataset(old, 2, 900_000)) == with_it  # registering it changes no other image
    finally:
        register_finding(name, draw_hiatal_hernia, describe_hiatal_hernia, definition=DEFINITIONS[name], overwrite=True)
    # no shipped model's pretraining draws or names it
    from benchmarks.common import ROOT

    for cfg in (ROOT / "medkt" / "assets" / "phantom").glob("pretrain_config*.json"):
        assert name not in json.loads(cfg.read_text()).get("findings", BUILTIN_FINDINGS), cfg


def test_pool_prevalence_seeds_manifest_and_truth(tmp_path):
    from medkt.phantom import experiment as E
    from medkt.phantom.pool import MAX_POOL_SEED, POOL_SEED_BASE, pool_composition, write_pool

    counts = pool_composition(500, 0.05, "nodule", KNOWN)
    assert sum(counts.values()) == 500 and counts["nodule"] == 25 and counts["no finding"] == 200
    assert max(counts[c] for c in KNOWN[1:]) - min(counts[c] for c in KNOWN[1:]) <= 1
    assert "nodule" not in pool_composition(500, 0.0, "nodule", KNOWN)
    # the pool seed range is disjoint from the evaluation, validation and training ranges
    pool_range = range(POOL_SEED_BASE, POOL_SEED_BASE + MAX_POOL_SEED)
    for lo, hi in ((E.EVAL_SEED_BASE, E.EVAL_SEED_BASE + MAX_POOL_SEED), (E.VAL_SEED_BASE, E.VAL_SEED_BASE + MAX_POOL_SEED),
                   (E.TRAIN_SEED_BASE, E.TRAIN_SEED_BASE + 10 * MAX_POOL_SEED + 10)):
        assert hi <= pool_range.start or lo >= pool_range.stop
    pool = write_pool(tmp_path, "nodule", KNOWN, size=40, prevalence=0.1)
    with open(pool.manifest) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path"] and all(len(r) == 1 for r in rows) and len(rows) == 41  # no label column
    assert not any(c.replace(" ", "_") in "".join(r[0] for r in rows[1:]) for c in KNOWN + ["nodule"])
    assert pool.truth.parent != pool.manifest.parent  # the truth is not next to the pool's files
    labels = pool.labels()
    assert len(labels) == 40 and sum(v == "nodule" for v in labels.values()) == 4
    assert sum(v == "no finding" for v in labels.values()) == 16
    # cached: a second call reuses the files; the 0 % pool has no novel scan
    mtime = pool.manifest.stat().st_mtime_ns
    assert write_pool(tmp_path, "nodule", KNOWN, size=40, prevalence=0.1).manifest.stat().st_mtime_ns == mtime
    zero = write_pool(tmp_path, "nodule", KNOWN, size=40, prevalence=0.0)
    assert zero.manifest != pool.manifest and "nodule" not in zero.labels().values()
    with pytest.raises(ConfigError, match="pool seed"):
        write_pool(tmp_path, "nodule", KNOWN, size=4, seed=MAX_POOL_SEED)


def test_recipe_pool_and_self_training_options():
    from medkt.phantom.experiment import Recipe

    r = Recipe.from_dict({"pool": {"size": 50, "prevalence": 0.05}, "self_training": {"rounds": 1}})
    assert r.pool == {"size": 50, "prevalence": 0.05} and r.self_training == {"rounds": 1}
    assert Recipe.from_dict({}).pool == {} and Recipe.from_dict({}).self_training == {}
    with pytest.raises(ConfigError, match="pool must be a dict"):
        Recipe.from_dict({"pool": 500})
    with pytest.raises(ConfigError, match="pool option"):
        Recipe.from_dict({"pool": {"sise": 50}})
    with pytest.raises(ConfigError, match="self_training"):
        Recipe.from_dict({"self_training": {"rounds": 1}})


def _pool_experiment(tmp_path):
    from medkt.phantom.experiment import PhantomTransferExperiment

    from benchmarks.common import bundle_config

    cfg = bundle_config("phantom_nodules")
    return PhantomTransferExperiment("phantom:base", "nodule", cfg["description"], cfg["known_descriptions"],
                                     eval_per_class=3, split="val", pool_dir=tmp_path / "pools")


def _pool_recipe(**over):
    from medkt.phantom.experiment import Recipe

    d = {"n_images": 2, "inversion": {"steps": 2, "priors": [{"name": "init", "kind": "images"}]},
         "finetune": {"lr": 1e-3, "epochs": 2, "batch_size": 2, "controls": [
             {"name": "pool_distill", "per_batch": 4, "weight": 5.0, "zs_weight": 5.0}]},
         "pool": {"size": 12, "prevalence": 0.25}}
    d.update(over)
    return Recipe.from_dict(d)


def test_pool_labels_absent_or_shuffled_cannot_change_a_run(tmp_path):
    exp = _pool_experiment(tmp_path)
    ds = exp.eval_set(0)
    rec = _pool_recipe()
    pool = exp.pool(rec)

    def run():
        return exp.run_arm(rec, 0, ds).name_prompts.probs

    scores = run()
    # the same files with their true labels, then shuffled labels, as a label column
    truth = json.loads(pool.truth.read_text())["files"]
    rng = np.random.default_rng(0)
    for labels in (list(truth.values()), list(rng.permutation(list(truth.values())))):
        pool.manifest.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in zip(truth, labels)))
        assert np.array_equal(run(), scores)
    # the pool is read at all: another pool (other scans) changes the fine-tuned model
    other = exp.run_arm(_pool_recipe(pool={"size": 12, "prevalence": 0.25, "seed": 1}), 0, ds)
    assert not np.array_equal(other.name_prompts.probs, scores)


def test_self_training_picks_are_passed_through_and_counted(tmp_path, monkeypatch):
    import medkt.spine as spine

    exp = _pool_experiment(tmp_path)
    st = {"rounds": 1, "per_round": 3, "known_per_class": 1, "min_confidence": 0.0}
    # a strong visual step (lr 5e-3, no control): the new name becomes the top caption of some pool scans
    rec = _pool_recipe(finetune={"lr": 5e-3, "epochs": 5, "batch_size": 2, "controls": []}, self_training=st)
    pool = exp.pool(rec)
    truth = {Path(f).name: c for f, c in pool.labels().items()}
    seen = {}
    real = spine.transfer

    def spy(*a, **kw):
        seen["kw"] = kw
        seen["result"] = real(*a, **kw)
        return seen["result"]

    monkeypatch.setattr(spine, "transfer", spy)
    arm = exp.run_arm(rec, 0, exp.eval_set(0))
    assert seen["kw"]["self_training"] == st and seen["kw"]["unlabeled"]["path"] == str(pool.manifest)
    rounds = seen["result"].self_training
    picked = [truth[Path(e["file"]).name] for e in rounds[0]["picked"]]
    known = [(truth[Path(e["file"]).name], e["concept"]) for e in rounds[0]["known"]]
    counted = arm.extra["self_training"][0]
    assert counted["picked"] == len(picked) >= 1
    assert counted["true_positives"] == picked.count("nodule")
    assert counted["picked_by_finding"] == {c: picked.count(c) for c in set(picked)}
    assert counted["known_picked"] == len(known) and counted["known_correct"] == sum(t == c for t, c in known)


def test_harness_quick_run_writes_summary_and_targets(tmp_path, capsys):
    from benchmarks.phantom_pool import TARGETS, main, recipe_table, report

    out = tmp_path / "pool.json"
    main(["--quick", "--split", "val", "--seeds", "1", "--findings", "nodule", "--backend", "shipped",
          "--recipes", "tokens_bare,data_free", "--placebo", "tokens_bare", "--oracle", "tokens_bare",
          "--eval-per-class", "3", "--pool-dir", str(tmp_path / "pools"), "--out", str(out)])
    d = json.loads(out.read_text())
    s = d["models"]["shipped"]["findings"]["nodule"]["summary"]["tokens_bare"]
    for key in ("novel_gain", "known_loss", "max_class_drop", "auroc_before", "auroc_after", "placebo_auroc",
                "oracle_auroc_gain", "oracle_reach", "seconds", "targets"):
        assert key in s, key
    assert set(s["targets"]) == set(TARGETS) and s["targets"]["auroc_over_placebo"]["pass"] is not None
    assert "data_free" in d["selection_score"] and d["chosen"]["recipe"] == "tokens_bare"  # data_free is never chosen
    text = capsys.readouterr().out
    assert "| model | finding | recipe |" in text and "novel accuracy +30 points" in text
    # the data-free twin is the chosen pool recipe without anything that reads the pool
    t = recipe_table(0.0)
    assert "pool" not in t["data_free"] and t["pool_distill"]["pool"]["prevalence"] == 0.0
    assert not [c for c in t["data_free"]["finetune"]["controls"] if c["name"] == "pool_distill"]
    plot = tmp_path / "frontier.png"
    merged = report([out], plot)
    assert plot.stat().st_size > 0 and "nodule" in merged["models"]["shipped"]["findings"]
