"""Captioning metrics through pycocoevalcap scorers (SPICE/METEOR availability handled explicitly)."""
from __future__ import annotations

import pytest

pytest.importorskip("pycocoevalcap")

from medkt.natural import captioning  # noqa: E402
from medkt.natural.captioning import caption_metrics, metrics_table, simple_ptb_tokenize, spice_status  # noqa: E402

REFS = {1: ["a b c d"], 2: ["e f g h"]}
PREDS = {1: "a b x y", 2: "e f z w"}


@pytest.mark.parametrize("java", [True, False])
def test_hand_checked_bleu_rouge(monkeypatch, java):
    if java and not captioning.java_available():
        pytest.skip("no java")
    monkeypatch.setattr(captioning, "java_available", lambda: java)
    # METEOR with Java is slow to start (60 MB paraphrase table): covered by the slow test
    r = caption_metrics(REFS, PREDS, metrics=("BLEU", "ROUGE_L", "CIDEr") + (() if java else ("METEOR",)))
    # 2 of 4 unigrams match in each caption, equal lengths (brevity penalty 1)
    assert r["BLEU-1"] == pytest.approx(0.5, abs=1e-6)
    # bigrams: (a b) of 3 and (e f) of 3 match -> BLEU-2 = sqrt(1/2 * 1/3)
    assert r["BLEU-2"] == pytest.approx((0.5 * 2 / 6) ** 0.5, abs=1e-6)
    # ROUGE-L: LCS 2 of 4 -> P = R = 0.5 -> F = 0.5 for any beta
    assert r["ROUGE_L"] == pytest.approx(0.5, abs=1e-6)
    assert r["CIDEr"] >= 0.0
    assert r["tokenizer"] == ("ptb" if java else "python-fallback")
    if not java:
        assert r["METEOR"] is None and "Java" in r["unavailable"]["METEOR"]


def test_perfect_captions_and_spice_reported_unavailable():
    refs = {i: [f"a photo of a {w} on a table", f"the {w} sits on a wooden table"] for i, w in enumerate(["cup", "bowl", "book"])}
    preds = {i: v[0] for i, v in refs.items()}
    r = caption_metrics(refs, preds, metrics=("BLEU", "CIDEr", "SPICE"))
    assert r["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    ok, reason = spice_status()
    if not ok:  # SPICE without its CoreNLP jars: None + reason, never 0
        assert r["SPICE"] is None and r["unavailable"]["SPICE"] == reason and "stanford-corenlp-3.6.0" in reason
    table = metrics_table(r, r)
    assert "| before | 100.0 |" in table and ("n/a" in table) == (not ok)


def test_bad_inputs():
    from medkt.errors import DataError, UnknownNameError

    with pytest.raises(DataError, match="same image ids"):
        caption_metrics(REFS, {1: "a b"})
    with pytest.raises(UnknownNameError, match="BLEU"):
        caption_metrics(REFS, PREDS, metrics=("BLUE",))


def test_python_fallback_tokenizer():
    assert simple_ptb_tokenize("A Dog, running... on the grass!") == "a dog running on the grass"
    assert simple_ptb_tokenize("The dog's ball") == "the dog 's ball"


@pytest.mark.slow
def test_meteor_runs_with_java():
    if not captioning.java_available():
        pytest.skip("no java")
    r = caption_metrics({1: ["a dog runs on the grass"]}, {1: "a dog runs on the grass"}, metrics=("METEOR",))
    assert r["METEOR"] == pytest.approx(1.0, abs=0.01)
