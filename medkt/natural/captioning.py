"""Captioning metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr and (maybe) SPICE.

``COCOEvalCap.evaluate()`` always runs SPICE, whose first use downloads Stanford CoreNLP 3.6.0
(impossible offline), so the scorers are called one by one here. A metric that cannot run is
reported as ``None`` with the reason in ``unavailable`` - never as 0:

* PTB tokenisation and METEOR need Java (``java`` on PATH). Without Java, METEOR is unavailable
  and captions are tokenised by `simple_ptb_tokenize` (lower-case, PTB-like splitting,
  the same punctuation removal); results then say ``"tokenizer": "python-fallback"``.
* SPICE runs only when ``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar``
  are already in pycocoevalcap's ``spice/lib`` folder (copy them there from the CoreNLP
  2015-12-09 zip); it also needs Java and ~8 GB of heap.
"""
from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
#: punctuation tokens pycocoevalcap's PTBTokenizer removes
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def java_available() -> bool:
    """A ``java`` executable is on PATH (METEOR and the PTB tokenizer of pycocoevalcap need it)."""
    return shutil.which("java") is not None


def spice_status() -> tuple[bool, str]:
    """(available, reason) for SPICE without triggering its download."""
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap.spice.spice")
    if spec is None or spec.origin is None:
        return False, "pycocoevalcap is not installed (pip install pycocoevalcap)"
    lib = Path(spec.origin).parent / "lib"
    need = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    missing = [p.name for p in need if not p.is_file()]
    if missing:
        return False, (f"SPICE needs Stanford CoreNLP 3.6.0 jars ({', '.join(missing)}) in {lib}; pycocoevalcap would "
                       "download them on first use, which medkt never does - copy them there from "
                       "stanford-corenlp-full-2015-12-09.zip to enable SPICE")
    if not java_available():
        return False, "SPICE needs Java (java not found on PATH)"
    return True, ""


def simple_ptb_tokenize(text: str) -> str:
    """Python stand-in for the PTB tokenizer: lower-case, split off punctuation, drop the
    punctuation tokens pycocoevalcap drops. Used only when Java is missing."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"([.,!?;:()\[\]{}\"])", r" \1 ", text)
    text = re.sub(r"(\w)'(s|re|ve|ll|d|m|t)\b", r"\1 '\2", text)
    toks = [t for t in text.split() if t not in PTB_PUNCTUATION and t not in {"(", ")", "[", "]", "{", "}", '"'}]
    return " ".join(toks)


def _tokenize(refs: Mapping[Any, Sequence[str]], preds: Mapping[Any, str]) -> tuple[dict, dict, str]:
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
        res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
        return gts, res, "ptb"
    gts = {k: [simple_ptb_tokenize(c) for c in v] for k, v in refs.items()}
    res = {k: [simple_ptb_tokenize(preds[k])] for k in refs}
    return gts, res, "python-fallback"


def caption_metrics(references: Mapping[Any, Sequence[str]], predictions: Mapping[Any, str],
                    metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Corpus-level captioning metrics.

    Args:
        references: image id -> reference captions (5 on COCO).
        predictions: image id -> one generated caption (same ids).
        metrics: subset of ``BLEU, METEOR, ROUGE_L, CIDEr, SPICE``.
    Returns:
        ``{"BLEU-1".."BLEU-4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}`` as fractions (pycocoevalcap
        scale; papers print x100), a metric that could not run as ``None``, ``"unavailable":
        {metric: reason}``, ``"tokenizer"``, ``"n_images"``.
    """
    from medkt.errors import DataError

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        from medkt.errors import unknown_name

        raise unknown_name("captioning metric", unknown[0], list(METRICS))
    if set(references) != set(predictions):
        missing = sorted(set(references) - set(predictions), key=str)[:5]
        extra = sorted(set(predictions) - set(references), key=str)[:5]
        raise DataError(f"references and predictions must cover the same image ids (missing {missing}, extra {extra})")
    if not references:
        raise DataError("no captions to evaluate")
    empty = [k for k, v in references.items() if not v]
    if empty:
        raise DataError(f"image(s) {empty[:5]} have no reference captions")
    gts, res, tokenizer = _tokenize(references, predictions)
    out: dict[str, Any] = {"tokenizer": tokenizer, "n_images": len(references), "unavailable": {}}
    if "BLEU" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for i, v in enumerate(bleu, start=1):
            out[f"BLEU-{i}"] = float(v)
    if "METEOR" in metrics:
        if java_available():
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            try:
                out["METEOR"] = float(scorer.compute_score(gts, res)[0])
            finally:
                _close_meteor(scorer)
        else:
            out["METEOR"] = None
            out["unavailable"]["METEOR"] = "METEOR needs Java (java not found on PATH)"
    if "ROUGE_L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider

        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in metrics:
        ok, reason = spice_status()
        if ok:
            try:
                from pycocoevalcap.spice.spice import Spice

                out["SPICE"] = float(Spice().compute_score(gts, res)[0])
            except Exception as exc:  # the Java side fails in many environment-specific ways
                out["SPICE"] = None
                out["unavailable"]["SPICE"] = f"SPICE failed: {type(exc).__name__}: {exc}"
        else:
            out["SPICE"] = None
            out["unavailable"]["SPICE"] = reason
    return out


def _close_meteor(scorer: Any) -> None:
    """Stop the METEOR Java subprocess (pycocoevalcap only does it in ``__del__``)."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    try:
        with scorer.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()
    except Exception:  # already gone
        pass


def metrics_table(before: Mapping[str, Any], after: Mapping[str, Any] | None = None,
                  keys: Sequence[str] = ("BLEU-4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")) -> str:
    """Markdown table in the paper's scale (x100); unavailable metrics print as 'n/a'."""

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    keys = [k for k in keys if k in before or (after is not None and k in after)]  # requested metrics only
    from medkt.utils import markdown_table

    rows = [["before", *(fmt(before.get(k)) for k in keys)]]
    if after is not None:
        rows.append(["after", *(fmt(after.get(k)) for k in keys)])
    lines = markdown_table(["model", *keys], rows, "l" + "r" * len(keys))
    notes = {**before.get("unavailable", {}), **((after or {}).get("unavailable", {}))}
    text = "\n".join(lines) + "\n"
    for m, reason in notes.items():
        text += f"\n- {m} unavailable: {reason}"
    return text + ("\n" if notes else "")


__all__ = ["caption_metrics", "metrics_table", "spice_status", "java_available", "simple_ptb_tokenize"]
