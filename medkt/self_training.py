"""Self-training on an unlabeled pool (LaFTer-style pseudo-labels), a component of the transfer step.

After the first transfer (images inverted from the description -> fine-tuning), the transferred
model scores the pool zero-shot over the fine-tuning captions (the new concepts', the known
classes' and the negatives). Per new concept, its ``per_round`` most confident pool scans
(the model's top caption is the concept's and P(concept) >= ``min_confidence``; ranked by
P(concept) or by its margin over the next caption) become fine-tuning images captioned as the
concept. Per known class, the ``known_per_class`` scans the FROZEN start model is most sure of
(scored over the same captions) become replay images with that class's caption (the ``replay`` control, added when the config
has none). The next round fine-tunes on them with the same configuration and controls.

Each round restarts from the start weights rather than continuing: the picks change what is
learnt, not how long the model trains, so a round costs one fine-tuning's drift from the start
model instead of accumulating one more per round (forgetting grows with every continued
fine-tuning at the same learning rate); the start model also stays the teacher of
``pool_distill`` and of the known picks, and its pool embeddings stay one cache entry.

Labels of the pool are never read (`medkt.pool.UnlabeledPool`). `run_self_training` returns one
record per round (picked files, indices and scores), so a harness that knows the truth can
count true positives. Off unless ``transfer(..., self_training={...})``.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from medkt.errors import ConfigError
from medkt.config_model import Range, build, config_dataclass
from medkt.pool import pick

log = logging.getLogger("medkt")


@config_dataclass
class SelfTrainingConfig:
    """Settings of self-training (``transfer(..., self_training=)``); build from a dict with `from_dict`.

    Attributes:
        rounds: self-training rounds after the first transfer.
        per_round: pool scans picked per new concept and round (at most).
        known_per_class: pool scans per known class picked by the start model as replay (0: none).
        rank_by: ``"probability"`` (P(concept)) or ``"margin"`` (P(concept) minus the next caption's).
        min_confidence: a pick needs P(concept) >= this (a pool without the finding yields few or none).
        keep_inverted: the rounds also fine-tune on the inverted images (else only on the picks).
        replay_per_batch: per-batch count of the replay control added for the known picks when the
            fine-tuning config has none (None: the fine-tuning batch size).
        skip_start_top: known classes; a pool scan the START model scores most likely one of them is
            never picked for a new concept (e.g. ``["no finding"]``: scans the model called normal
            before the transfer, which a token that learnt "normal-looking" would otherwise pick).
    """

    rounds: Annotated[int, Range(ge=1)] = 1
    per_round: Annotated[int, Range(ge=1)] = 16
    known_per_class: Annotated[int, Range(ge=0)] = 4
    rank_by: Literal["probability", "margin"] = "probability"
    min_confidence: Annotated[float, Range(0, 1)] = 0.5
    keep_inverted: bool = True
    replay_per_batch: Annotated[int, Range(ge=1)] | None = None
    skip_start_top: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, path: str = "self_training") -> "SelfTrainingConfig":
        """Build from a dict of fields, checked by `medkt.config_model` (``path`` names them in errors)."""
        return build(cls, dict(d or {}), path, what="self_training")


def as_self_training(spec: SelfTrainingConfig | Mapping[str, Any] | bool | None, *, has_pool: bool | None = None,
                     known: Sequence[str] | None = None) -> SelfTrainingConfig | None:
    """`transfer`'s ``self_training``: None/False = off, True = the defaults, a dict or a config.
    With ``has_pool`` / ``known`` (the known class names) given, also checks that self-training has
    a pool and, for ``known_per_class`` > 0, known classes (before any compute)."""
    if spec is None or spec is False:
        return None
    if spec is True:
        spec = SelfTrainingConfig()
    if not isinstance(spec, (Mapping, SelfTrainingConfig)):
        raise ConfigError(f"self_training = {spec!r}: give a dict of SelfTrainingConfig fields (rounds, per_round, "
                          f"known_per_class, rank_by, min_confidence, ...), true for the defaults, or null")
    cfg = spec if isinstance(spec, SelfTrainingConfig) else SelfTrainingConfig.from_dict(spec)
    if has_pool is False:
        raise ConfigError("self_training needs an unlabeled pool of scan files: transfer(..., unlabeled=PATH) "
                          "or --set unlabeled=PATH")
    if known is not None and cfg.known_per_class and not list(known):
        raise ConfigError(f"self_training.known_per_class = {cfg.known_per_class} needs the known classes: pass "
                          "known_descriptions= (class -> description) to transfer, or set known_per_class to 0")
    unknown = [k for k in cfg.skip_start_top if known is not None and k not in list(known)]
    if unknown:
        raise ConfigError(f"self_training.skip_start_top = {unknown!r}: not known classes; choose among "
                          f"{sorted(known)} (the classes of known_descriptions)")
    return cfg


def pool_probabilities(backend: Any, pool: Any, captions: Sequence[str], scale: float | torch.Tensor) -> torch.Tensor:
    """``(P, K)`` zero-shot probabilities (CPU) of the pool scans over ``captions`` by ``backend``'s
    current weights; the image embeddings come through `medkt.pool.pool_embeddings` (its cache)."""
    from medkt.pool import caption_probabilities, pool_embeddings

    return caption_probabilities(backend, pool_embeddings(backend, pool), captions, scale)


def _entries(picks: Sequence[tuple[int, float, float]], concept: str, files: Sequence[Path]) -> list[dict[str, Any]]:
    return [{"concept": concept, "index": i, "file": str(files[i]), "probability": p, "margin": m}
            for i, p, m in picks]


def _round_inputs(cfg: SelfTrainingConfig, ft_cfg: Any, backend: Any, pool: Any, inv: Any, picked: list[dict],
                  known: list[dict], descriptions: Mapping[str, str],
                  options: Mapping[str, Any]) -> tuple[Any, dict, Any]:
    """(images, fine-tuning options, fine-tuning config) of a round: the inverted images (unless
    ``keep_inverted`` is off) plus the picks captioned as their concept; known picks appended
    to the replay images (a replay control is added when the config has none)."""
    from medkt.inversion import InversionResult

    def load(entries: list[dict]) -> torch.Tensor:
        return torch.stack([backend.load_image(pool.files[e["index"]]) for e in entries])

    new_x = load(picked)
    concepts = [e["concept"] for e in picked]
    texts = [descriptions[c] for c in concepts]
    if cfg.keep_inverted:
        new_x = torch.cat([inv.images.cpu(), new_x.to(inv.images.dtype)])
        concepts, texts = list(inv.concepts) + concepts, list(inv.texts) + texts
    images = InversionResult(new_x, concepts, texts, [float("nan")] * len(new_x))
    opts, run_cfg = dict(options), ft_cfg
    if known:
        kx = load(known)
        old_x, old_c = opts.get("replay_images"), opts.get("replay_concepts")
        opts["replay_images"] = kx if old_x is None else torch.cat([old_x.cpu(), kx.to(old_x.dtype)])
        opts["replay_concepts"] = [*(old_c or []), *(e["concept"] for e in known)]
        if not any(c.get("name") == "replay" for c in ft_cfg.controls):
            run_cfg = copy.deepcopy(ft_cfg)
            per_batch = cfg.replay_per_batch or ft_cfg.batch_size
            run_cfg.controls = [*run_cfg.controls, {"name": "replay", "per_batch": per_batch}]
    return images, opts, run_cfg


#: ``phase(images, options, finetune_config, out_dir or None) -> history``: one fine-tuning
#: (`medkt.spine`'s, with resume and saving)
Phase = Callable[[Any, dict, Any, "Path | None"], dict]


def run_self_training(cfg: SelfTrainingConfig | None, backend: Any, phase: Phase, inv: Any, new_concepts: Sequence[Any],
                      descriptions: Mapping[str, str], negatives: Sequence[str], ft_cfg: Any,
                      options: Mapping[str, Any], out: Path | None) -> tuple[dict, list[dict[str, Any]]]:
    """The first fine-tuning (``phase``) and, with ``cfg``, its self-training rounds.

    Args:
        cfg: the settings; None runs ``phase`` once (no self-training).
        backend: the model, fine-tuned in place; after the last round it holds that round's weights.
        phase: one fine-tuning (see `Phase`); round ``r`` writes to ``out/self_training/round_<r>``.
        inv: the inverted images (`medkt.inversion.InversionResult`) of the first fine-tuning.
        new_concepts: the transferred `medkt.spine.Concept`\\ s.
        descriptions: every concept -> description (new ones and known classes).
        negatives: the fine-tuning's unnamed negative captions (they also compete in the scoring).
        ft_cfg: the `medkt.finetune.FinetuneConfig` (captions, temperature, controls).
        options: the fine-tuning options; ``options["pool"]`` is the `medkt.pool.UnlabeledPool`.
        out: the transfer's output folder (None: nothing written).
    Returns:
        (the last fine-tuning's history, one record per round: ``round``, ``picked`` (concept,
        pool ``index``, ``file``, ``probability``, ``margin``), ``known`` (the same for the replay
        picks), ``finetune`` (steps, losses), ``seconds``, ``weights`` and ``stopped`` (why no
        fine-tuning ran: nothing picked, or the same picks as the round before; else None)).
    """
    if cfg is not None:
        state, start_known, ctx = _prepare(cfg, backend, new_concepts, descriptions, negatives, ft_cfg, options)
    history = phase(inv, dict(options), ft_cfg, out)
    if cfg is None:
        return history, []
    pool, captions, new_cols, scale = ctx
    rounds: list[dict[str, Any]] = []
    for r in range(1, cfg.rounds + 1):
        t = time.perf_counter()
        probs = pool_probabilities(backend, pool, captions, scale)  # the model of the previous round
        picked: list[dict[str, Any]] = []
        for c, col in new_cols.items():
            taken = {e["index"] for e in picked} | state["skip"]
            picked += _entries(pick(probs, col, cfg.per_round, min_confidence=cfg.min_confidence,
                                    rank_by=cfg.rank_by, exclude=taken), c, pool.files)
        record: dict[str, Any] = {"round": r, "picked": picked, "known": [], "finetune": None, "weights": None,
                                  "stopped": None}
        rounds.append(record)
        if not picked:
            record["stopped"] = (f"no pool scan is scored most likely {sorted(new_cols)} with P >= min_confidence "
                                 f"{cfg.min_confidence:g}; the model of the previous round is kept")
            record["seconds"] = time.perf_counter() - t
            log.warning("self-training round %d: %s", r, record["stopped"])
            break
        taken = {e["index"] for e in picked}
        for k, col in start_known.items():
            record["known"] += _entries(pick(state["start_probs"], col, cfg.known_per_class, exclude=taken),
                                        k, pool.files)
        if len(rounds) > 1 and _same_picks(record, rounds[-2]):
            # every round restarts from the start weights: the same picks would give the same model
            record["stopped"] = f"the picks equal round {r - 1}'s; its model is kept"
            record["seconds"] = time.perf_counter() - t
            log.info("self-training round %d: %s", r, record["stopped"])
            break
        backend.load_state_dict(state["weights"])  # restart from the start weights (module docstring)
        images, opts, run_cfg = _round_inputs(cfg, ft_cfg, backend, pool, inv, picked, record["known"], descriptions,
                                              options)
        where = out / "self_training" / f"round_{r}" if out is not None else None
        history = phase(images, opts, run_cfg, where)
        loss = history.get("loss") or [float("nan")]
        record["finetune"] = {"steps": history.get("steps", 0), "first_loss": loss[0], "last_loss": loss[-1],
                              "images": len(images.images),
                              "replay_images": 0 if opts.get("replay_images") is None else len(opts["replay_images"])}
        weights = where / "finetuned.safetensors" if where is not None else None
        record["weights"] = str(weights) if weights is not None and weights.is_file() else None  # save_weights
        record["seconds"] = time.perf_counter() - t
        log.info("self-training round %d: %d pool scan(s) picked for %s, %d known replay scan(s), %.1f s", r,
                 len(picked), sorted(new_cols), len(record["known"]), record["seconds"])
    return history, rounds


def _same_picks(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two round records picked the same scans for the same concepts."""
    return all([(e["concept"], e["index"]) for e in a[key]] == [(e["concept"], e["index"]) for e in b[key]]
               for key in ("picked", "known"))


def _prepare(cfg: SelfTrainingConfig, backend: Any, new_concepts: Sequence[Any], descriptions: Mapping[str, str],
             negatives: Sequence[str], ft_cfg: Any, options: Mapping[str, Any]) -> tuple[dict, dict, tuple]:
    """Before the first fine-tuning: the start weights (CPU copy), the start model's probabilities of
    the pool over the captions and the scoring set-up ``(pool, captions, new columns, scale)``."""
    from medkt.backends.base import require_embeddings
    from medkt.finetune import make_caption
    from medkt.infonce import infonce_scale
    from medkt.pool import UnlabeledPool

    require_embeddings(backend, "self-training", "no self_training")
    pool = options.get("pool")
    new = [c.name for c in new_concepts]
    known = [k for k in descriptions if k not in new]
    as_self_training(cfg, has_pool=isinstance(pool, UnlabeledPool), known=known)
    known_caps = [make_caption(k, descriptions[k], ft_cfg) for k in known]
    new_caps = [make_caption(c.name, c.description, ft_cfg) for c in new_concepts]
    extra = [n for n in dict.fromkeys(negatives) if n not in new_caps + known_caps]
    captions = new_caps + known_caps + extra
    scale = float(infonce_scale(backend, ft_cfg.temperature))
    state: dict[str, Any] = {"weights": {k: v.detach().to("cpu", copy=True) for k, v in backend.state_dict().items()}}
    start_known: dict[str, int] = {}
    state["skip"] = set()
    if cfg.known_per_class or cfg.skip_start_top:  # scored over every caption, so one known class still has competitors
        state["start_probs"] = pool_probabilities(backend, pool, captions, scale)
        skip_cols = torch.tensor([len(new) + known.index(k) for k in cfg.skip_start_top], dtype=torch.long)
        top = state["start_probs"].argmax(dim=1)
        state["skip"] = set(torch.nonzero(torch.isin(top, skip_cols)).flatten().tolist())
    if cfg.known_per_class:
        start_known = {k: len(new) + i for i, k in enumerate(known)}
    return state, start_known, (pool, captions, {c: i for i, c in enumerate(new)}, scale)


__all__ = ["SelfTrainingConfig", "as_self_training", "pool_probabilities", "run_self_training"]
