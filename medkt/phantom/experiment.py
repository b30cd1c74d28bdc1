"""Knowledge transfer in the phantom world: transfer vs placebo vs baselines, over seeds.

One *seed* of an experiment:

1. fresh evaluation phantoms (``eval_per_class`` per class, known + novel findings);
2. zero-shot before transfer with name prompts and CuPL-style description prompts;
3. **transfer**: invert the backend toward the novel finding's description (engine
   `medkt.inversion.invert`), fine-tune the visual encoder (`medkt.finetune.finetune`),
   evaluate;
4. **placebo**: the same fine-tuning recipe on the same number of images that carry no
   information about the finding (plain normal phantoms, or noise) captioned as the finding,
   evaluate. A bias shift toward the new caption raises novel accuracy in both arms; only real
   visual knowledge raises the **AUROC** of the novel-class score (novel vs known images).

Evaluation images are never used for anything but evaluation; recipe research uses a separate
validation seed range (`VAL_SEED_BASE`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medkt.errors import ConfigError
from medkt.phantom.findings import BUILTIN_FINDINGS
from medkt.phantom.metrics import ZeroShotResult, image_embeddings, mean_ci, zero_shot
from medkt.phantom.pool import POOL_SEED_BASE  # noqa: F401  (the pool seed range, next to the others)
from medkt.phantom.text import description_prompts, name_prompts
from medkt.phantom.world import make_dataset

EVAL_SEED_BASE = 900_000  # evaluation phantoms: EVAL_SEED_BASE + seed
VAL_SEED_BASE = 500_000  # validation phantoms for recipe research: VAL_SEED_BASE + seed
TRAIN_SEED_BASE = 100_000  # init / replay / placebo images: TRAIN_SEED_BASE + 10 * seed + k
# unlabeled pools: POOL_SEED_BASE + pool seed (`medkt.phantom.pool`, imported above), disjoint from these three
#: keywords of a recipe's ``pool`` (`medkt.phantom.pool.write_pool`)
POOL_KEYS = frozenset({"size", "prevalence", "seed", "normal_fraction"})


def self_training_picks(rounds: list[dict[str, Any]] | None, pool, novel: str) -> list[dict[str, Any]]:
    """Per self-training round (`medkt.self_training` records): how many pool scans were picked for
    the new finding and how many truly show ``novel``, and how many of the known-class replay
    picks have the class they were picked as (from the pool's truth file, which nothing else reads)."""
    if not rounds:
        return []
    truth = pool.labels()
    out = []
    for k, rd in enumerate(rounds):
        labels = [truth.get(str(Path(e["file"]).resolve()), "?") for e in rd.get("picked", [])]
        known = rd.get("known", [])
        out.append({"round": k, "picked": len(labels), "true_positives": sum(lab == novel for lab in labels),
                    "picked_by_finding": {c: labels.count(c) for c in sorted(set(labels))},
                    "known_picked": len(known),
                    "known_correct": sum(truth.get(str(Path(e["file"]).resolve())) == e["concept"] for e in known),
                    "stopped": rd.get("stopped")})
    return out


@dataclass
class Recipe:
    """One transfer recipe (inversion + fine-tuning + what the placebo uses)."""

    name: str = "recipe"
    n_images: int = 10
    inversion: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    #: known-class phantoms per class available for replay / distillation (0 = none)
    replay_per_class: int = 0
    #: placebo images: "normal" phantoms or "noise" (uniform) captioned as the novel finding
    placebo: str = "normal"
    #: known-class phantoms per class held out for model selection (the ``select`` fine-tuning
    #: control's score = their zero-shot accuracy; no novel-class image is involved)
    select_per_class: int = 0
    #: also replay the inversion's starting images (normal phantoms) captioned as "no finding", so
    #: fine-tuning sees every edited image next to its unedited start (the placebo replays the same
    #: normal phantoms it trains on); needs a ``replay`` fine-tuning control
    replay_init: bool = False
    #: data-free replay (`medkt.forgetting.data_free_replay`): this many images per known
    #: class inverted from "A <class> is <description>" on the start model (no real image of the
    #: class), added to the replay set of both arms; needs a ``replay`` or
    #: ``distill`` fine-tuning control
    data_free_replay: int = 0
    #: overrides of ``inversion`` for the data-free replay images (`medkt.inversion.with_overrides`;
    #: e.g. {"priors": {"residual": {"sign": "any"}}})
    replay_inversion: dict[str, Any] = field(default_factory=dict)
    #: partial-layer inversion (`medkt.partial_inversion`, paper Eq. 4) instead of pixel
    #: inversion: {"top_blocks": k, ...} optimises the features entering the top k blocks from
    #: the normal phantoms' features and fine-tunes only those blocks (``inversion`` is unused;
    #: the placebo trains the top blocks on the un-inverted features); {} = off
    partial: dict[str, Any] = field(default_factory=dict)
    #: unlabeled pool of phantoms (`medkt.phantom.pool.write_pool` keywords: size, prevalence, seed,
    #: normal_fraction), given to the spine as ``transfer(unlabeled=)``; {} = no pool
    pool: dict[str, Any] = field(default_factory=dict)
    #: the spine's ``transfer(self_training=...)`` settings, passed only when non-empty (needs ``pool``);
    #: the arm records each round's picks and how many truly show the finding
    self_training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        """A recipe from its JSON form (unknown options and placebo kinds raise `ConfigError`)."""
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"unknown recipe option(s) {bad}; known: {sorted(known)}")
        r = cls(**copy.deepcopy(d))
        if r.placebo not in ("normal", "noise", "oracle"):
            raise ConfigError(f"placebo must be 'normal', 'noise' or 'oracle' (real novel images: an upper bound "
                              f"for research, not a placebo), got {r.placebo!r}")
        if isinstance(r.data_free_replay, bool) or not isinstance(r.data_free_replay, int) or r.data_free_replay < 0:
            raise ConfigError(f"data_free_replay must be an integer >= 0 (images per known class), got {r.data_free_replay!r}")
        for opt, val in (("pool", r.pool), ("self_training", r.self_training)):
            if not isinstance(val, dict):
                raise ConfigError(f"recipe {opt} must be a dict ({{}} = off), got {val!r}")
        bad_pool = sorted(set(r.pool) - POOL_KEYS)
        if bad_pool:
            raise ConfigError(f"unknown pool option(s) {bad_pool}; known: {sorted(POOL_KEYS)}")
        if r.self_training and not r.pool:
            raise ConfigError('self_training picks scans from an unlabeled pool: set pool, e.g. '
                              '{"size": 500, "prevalence": 0.05}')
        uses_replay = r.replay_per_class or r.replay_init or r.data_free_replay
        if r.partial:
            from medkt.partial_inversion import PartialInversionConfig

            PartialInversionConfig.from_dict(r.partial)
        controls = {c.get("name") for c in r.finetune.get("controls", []) if isinstance(c, dict)}
        if uses_replay and not controls & {"replay", "distill"}:
            # finetune ignores replay images unless one of these is on: say so instead of doing nothing
            raise ConfigError("the recipe builds replay images (replay_per_class / replay_init / data_free_replay) "
                              "but finetune.controls has no 'replay' or 'distill' control: add one, e.g. "
                              '{"name": "replay", "per_batch": 4}')
        return r


@dataclass
class ArmResult:
    """One arm of one seed: zero-shot results with name and description prompts, and its seconds."""

    name: str
    name_prompts: ZeroShotResult
    description_prompts: ZeroShotResult
    seconds_inversion: float = 0.0
    seconds_finetune: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(r: ZeroShotResult, novel: str) -> dict[str, Any]:
    """Novel and known-mean accuracy, overall accuracy, novel AUROC, per-class accuracy and confusion of ``r``."""
    return {
        "novel_accuracy": r.per_class[novel],
        "known_accuracy": r.known_mean([novel]),
        "accuracy": r.accuracy,
        "novel_auroc": r.novel_auroc(novel),
        "per_class": r.per_class,
        "confusion": r.confusion.tolist(),
    }


class PhantomTransferExperiment:
    """Runs transfer + placebo (+ baselines) for one backend and novel finding over seeds.

    Args:
        backend: backend spec (default the shipped phantom model ``phantom:base``).
        novel: the held-out finding to teach.
        description: the novel finding's description (inversion target and caption).
        known_descriptions: known finding -> description (fine-tuning negatives / replay captions).
        classes: evaluation classes (default: the keys of ``known_descriptions`` plus ``novel``,
            so a finding registered as a plugin can be taught without listing the classes; without
            ``known_descriptions``: all built-in findings).
        eval_per_class: evaluation phantoms per class (>= 100 for reported numbers).
        cupl_prompts: descriptions per class for the description-ensemble baseline.
        pool_dir: where the recipes' unlabeled pools are written (default ``~/.cache/medkt/phantom_pools``).
    """

    def __init__(self, backend: str = "phantom:base", novel: str = "nodule", description: str = "",
                 known_descriptions: dict[str, str] | None = None, classes: list[str] | None = None,
                 eval_per_class: int = 100, cupl_prompts: int = 12, image_size: int = 64,
                 split: str = "eval", progress: bool = False, pool_dir: str | Path | None = None):
        self.backend_spec = backend
        self.novel = novel
        if classes:
            self.classes = list(classes)
        elif known_descriptions:
            self.classes = [c for c in known_descriptions if c != novel] + [novel]
        else:
            self.classes = list(BUILTIN_FINDINGS)
        from medkt.phantom.world import get_finding

        for c in self.classes:
            get_finding(c)  # unknown finding -> one-line error naming the registered ones
        if novel not in self.classes:
            raise ConfigError(f"novel finding {novel!r} is not among the evaluation classes {self.classes}")
        if not description.strip():
            raise ConfigError("the novel finding needs a description (the text the model is taught from)")
        self.description = description
        self.known = [c for c in self.classes if c != novel]
        self.known_descriptions = dict(known_descriptions or {})
        missing = [c for c in self.known if c not in self.known_descriptions]
        if missing:
            raise ConfigError(f"known_descriptions is missing {missing}")
        self.eval_per_class = int(eval_per_class)
        self.image_size = image_size
        if split not in ("eval", "val"):
            raise ConfigError(f"split must be 'eval' or 'val', got {split!r}")
        self.split = split
        self.progress = progress
        #: where recipes' unlabeled pools (and their embedding cache) are written once and reused
        self.pool_dir = Path(pool_dir) if pool_dir is not None else Path.home() / ".cache" / "medkt" / "phantom_pools"
        self.name_prompts = name_prompts(self.classes)
        self.desc_prompts = description_prompts(self.classes, cupl_prompts)
        self._replay_cache: dict[tuple, Any] = {}  # data-free replay of the last seed (shared by its arms)
        # pixel inversions of the last seed: recipes that differ only after the inversion reuse its
        # images (the start model, seed, settings and start images are the same); key -> (result, seconds)
        self._inversion_cache: dict[tuple, tuple[Any, float]] = {}

    # -- helpers ----------------------------------------------------------------------------
    def new_backend(self):
        """A fresh copy of the start model."""
        from medkt.backends import create_backend

        return create_backend(self.backend_spec)

    def eval_set(self, seed: int):
        """The evaluation phantoms of ``seed`` (validation or evaluation seed range, by ``split``)."""
        base = EVAL_SEED_BASE if self.split == "eval" else VAL_SEED_BASE
        return make_dataset(self.classes, self.eval_per_class, base + seed, self.image_size)

    def evaluate(self, backend, ds) -> tuple[ZeroShotResult, ZeroShotResult]:
        """Zero-shot results of ``backend`` on ``ds`` with name prompts and with description prompts."""
        x = ds.tensor()
        emb = image_embeddings(backend, x)
        a = zero_shot(backend, x, ds.labels, self.name_prompts, image_emb=emb)
        b = zero_shot(backend, x, ds.labels, self.desc_prompts, image_emb=emb)
        return a, b

    def train_images(self, kind: str, n: int, seed: int, k: int) -> torch.Tensor:
        """``n`` start images from the training seed range: normal phantoms (default), uniform
        ``"noise"`` or real phantoms of the novel finding (``"oracle"``)."""
        if kind == "noise":
            g = torch.Generator().manual_seed(TRAIN_SEED_BASE + 10 * seed + k)
            return torch.rand(n, 1, self.image_size, self.image_size, generator=g)
        if kind == "oracle":  # real novel-finding phantoms from the training seed range (upper bound)
            return make_dataset([self.novel], n, TRAIN_SEED_BASE + 10 * seed + k, self.image_size).tensor()
        return make_dataset(["no finding"], n, TRAIN_SEED_BASE + 10 * seed + k, self.image_size).tensor()

    def replay_set(self, recipe: Recipe, seed: int, backend, init: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor | None, list[str] | None, float]:
        """Replay images + concepts of ``recipe`` for ``seed`` and the seconds spent making them.

        Real known-class phantoms (``replay_per_class``), the inversion's start images as "no
        finding" (``replay_init``) and known classes inverted from their text on ``backend`` (the
        start model; ``data_free_replay``, cached per seed so both arms replay the same images).
        """
        images: list[torch.Tensor] = []
        concepts: list[str] = []
        seconds = 0.0
        if recipe.replay_per_class:
            rs = make_dataset(self.known, recipe.replay_per_class, TRAIN_SEED_BASE + 10 * seed + 2, self.image_size)
            images.append(rs.tensor())
            concepts += list(rs.labels)
        if recipe.replay_init:
            # the inversion's init images (the same normal phantoms, drawn here when not inverted from them)
            starts = init if init is not None else self.train_images("normal", recipe.n_images, seed, 1)
            images.append(starts)
            concepts += ["no finding"] * len(starts)
        if recipe.data_free_replay:
            from medkt.inversion import InversionConfig, with_overrides

            inv_d = {**with_overrides(recipe.inversion, recipe.replay_inversion), "seed": seed + 7919}
            if InversionConfig.from_dict(inv_d).objective_name() == "contrastive":
                inv_d["objective"] = "cosine"  # the contrastive negatives are the novel finding's, not these
            key = (seed, recipe.data_free_replay, repr(sorted(inv_d.items())))
            if key not in self._replay_cache:
                from medkt.forgetting import data_free_replay

                starts = (self.train_images("normal", recipe.data_free_replay * len(self.known), seed, 4)
                          if InversionConfig.from_dict(inv_d).init_kind() == "images" else None)
                self._replay_cache = {key: data_free_replay(
                    backend, {c: self.known_descriptions[c] for c in self.known}, recipe.data_free_replay, inv_d,
                    init_images=starts, progress=self.progress)}
            rs = self._replay_cache[key]
            images.append(rs.images)
            concepts += rs.concepts
            seconds = rs.seconds
        if not images:
            return None, None, seconds
        return torch.cat(images), concepts, seconds

    def descriptions(self) -> dict[str, str]:
        """Finding -> its description, the novel finding first."""
        return {self.novel: self.description, **{c: self.known_descriptions[c] for c in self.known}}

    # -- arms --------------------------------------------------------------------------------
    def run_arm(self, recipe: Recipe, seed: int, ds, *, placebo: bool = False,
                keep_images: bool = False, given_images: torch.Tensor | None = None) -> ArmResult:
        """Transfer (or its placebo) with ``recipe`` on a fresh backend; evaluate on ``ds``.

        ``given_images`` ``(N, 1, S, S)``: fine-tune on these instead of inverting (e.g. images
        inverted with another model: paper §7.3 Q2); the rest of the recipe is unchanged
        (``replay_init`` replays the start images an inversion of this seed would have edited).
        A recipe with a ``pool`` gets its unlabeled pool (`medkt.phantom.pool.write_pool`) as the
        spine's ``unlabeled=`` (both arms: the placebo differs only in its images).
        """
        from medkt.finetune import FinetuneConfig
        from medkt.inversion import InversionConfig
        from medkt.spine import Concept, transfer

        backend = self.new_backend()
        train_backend, split, partial = backend, None, None
        if recipe.partial:  # partial-layer inversion: images are the features entering the top blocks
            from medkt.partial_inversion import FeatureBackend, PartialInversionConfig, split_top

            partial = PartialInversionConfig.from_dict({"seed": seed, **recipe.partial})
            split = split_top(backend, partial.top_blocks)
            train_backend = FeatureBackend(backend, split)
        ft_cfg = FinetuneConfig.from_dict({"seed": seed, **recipe.finetune})
        inv_d = self._inversion_dict(recipe, seed, ft_cfg)
        inv_cfg = InversionConfig.from_dict(inv_d)
        images, init, n, t_inv, extra = self._arm_images(recipe, seed, backend, inv_cfg, split, partial,
                                                         placebo, given_images)
        replay, replay_c, t_replay = self.replay_set(recipe, seed, backend, init)
        if not placebo:
            t_inv += t_replay  # synthesising the replay is part of the transfer's cost
        if replay is not None and split is not None:
            replay = split.features(backend, replay)
        inv_key = None
        if images == "inversion":
            inv_key = (seed, n, repr(sorted(inv_d.items())))
            if inv_key in self._inversion_cache:
                images, cached_seconds = self._inversion_cache[inv_key]
                t_inv += cached_seconds  # the reused inversion's cost still counts toward this recipe's time
        pool_kw, pool = self._pool_options(recipe, extra)
        # the transfer step (medkt.spine): invert (unless given) -> fine-tune; evaluation is the arm's own
        r = transfer(train_backend, [Concept(self.novel, [self.description], n)], inversion_config=inv_cfg,
                     finetune_config=ft_cfg, images=images, negatives=[], evaluate_before=False,
                     known_descriptions={c: self.known_descriptions[c] for c in self.known}, progress=self.progress,
                     init_images=init, finetune_options={"replay_images": replay, "replay_concepts": replay_c,
                                                         "select_fn": self._select_fn(recipe, seed, backend)},
                     **pool_kw)
        hist, t_ft = r.history, r.seconds["finetune"]
        t_inv += r.seconds["inversion"]
        if inv_key is not None and inv_key not in self._inversion_cache:
            self._inversion_cache = {inv_key: (r.images, r.seconds["inversion"])}
        if not placebo:
            extra["inversion_similarity"] = float(np.mean(r.images.similarities))
            if keep_images:  # pixels for the report (partial-layer inversion edits features: its start images)
                extra["images"] = init if partial is not None else r.images.images
                extra["init_images"] = init
                extra["partial"] = partial is not None
        extra["finetune_steps"] = hist["steps"]
        if hist.get("select"):
            extra["select_scores"] = hist["select"]
        extra["finetune_loss_first_last"] = [hist["loss"][0], hist["loss"][-1]]
        if recipe.self_training:  # the spine's picks (TransferResult.self_training), scored with the pool's truth
            extra["self_training"] = self_training_picks(r.self_training, pool, self.novel)
        if keep_images:
            extra["backend"] = backend
        a, b = self.evaluate(backend, ds)
        return ArmResult("placebo" if placebo else recipe.name, a, b, t_inv, t_ft, extra)

    def _inversion_dict(self, recipe: Recipe, seed: int, ft_cfg) -> dict[str, Any]:
        """The inversion settings of ``recipe`` for ``seed`` (a contrastive objective without
        negatives gets the known findings' fine-tuning captions: Eq. 1's negatives)."""
        from medkt.finetune import make_caption

        inv_d = {"seed": seed, **recipe.inversion}
        obj = inv_d.get("objective")
        obj = dict(obj) if isinstance(obj, dict) else {"name": obj}
        if obj["name"] == "contrastive" and not obj.get("negative_texts"):
            inv_d["objective"] = {**obj, "negative_texts": [make_caption(c, self.known_descriptions[c], ft_cfg)
                                                            for c in self.known]}
        return inv_d

    def _arm_images(self, recipe: Recipe, seed: int, backend, inv_cfg, split, partial, placebo: bool,
                    given_images: torch.Tensor | None) -> tuple[Any, torch.Tensor | None, int, float, dict[str, Any]]:
        """What the arm fine-tunes on -> ``(images, init, n, seconds, extra)``: given images, the
        placebo's uninformative images, a partial-layer inversion (run here), or ``"inversion"``
        (the spine inverts from ``init``)."""
        from medkt.inversion import InversionResult

        n, init, t_inv, extra = recipe.n_images, None, 0.0, {}

        def result(x: torch.Tensor, sims: list[float] | None = None) -> InversionResult:
            return InversionResult(x, [self.novel] * len(x), [self.description] * len(x), sims or [float("nan")] * len(x))

        if given_images is not None:
            if placebo or partial is not None:
                raise ConfigError("given_images replaces the inversion of a pixel-space transfer arm; "
                                  "not with placebo=True or a partial-layer recipe")
            if inv_cfg.init_kind() == "images":  # replay_init: the start images an inversion of this seed edits
                init = self.train_images("normal", len(given_images), seed, 1)
            return result(given_images), init, len(given_images), t_inv, extra
        if placebo:
            x = self.train_images(recipe.placebo, n, seed, 1)
            return result(split.features(backend, x) if split is not None else x), None, n, t_inv, extra
        init = (self.train_images("normal", n, seed, 1)
                if inv_cfg.init_kind() == "images" or partial is not None else None)
        if partial is None:
            return "inversion", init, n, t_inv, extra
        from medkt.partial_inversion import invert_features

        t0 = time.perf_counter()
        finv = invert_features(backend, split, self.description, init, partial)
        t_inv = time.perf_counter() - t0
        extra["partial_start_similarity"] = float(np.mean(finv.start_similarities))
        return result(finv.features, list(map(float, finv.similarities))), init, n, t_inv, extra

    def _select_fn(self, recipe: Recipe, seed: int, backend):
        """The ``select`` control's score (known-class phantoms' zero-shot accuracy), or None."""
        if not recipe.select_per_class:
            return None
        sel = make_dataset(self.known, recipe.select_per_class, TRAIN_SEED_BASE + 10 * seed + 3, self.image_size)
        sel_x = sel.tensor()

        def known_accuracy() -> float:
            # 9-way prompts on known images: also catches images lost to the new class
            return zero_shot(backend, sel_x, sel.labels, self.name_prompts).accuracy

        return known_accuracy

    def pool(self, recipe: Recipe):
        """The unlabeled pool of ``recipe`` (written once under ``pool_dir``, then reused), or None."""
        if not recipe.pool:
            return None
        from medkt.phantom.pool import write_pool

        return write_pool(self.pool_dir, self.novel, self.known, image_size=self.image_size, **recipe.pool)

    def _pool_options(self, recipe: Recipe, extra: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The spine's pool keywords of ``recipe`` (``unlabeled=`` its manifest, ``self_training=``
        only when set, so a spine without self-training still runs the other recipes) and the pool."""
        kw: dict[str, Any] = {}
        t0 = time.perf_counter()
        pool = self.pool(recipe)
        if pool is not None:
            extra["seconds_pool_write"] = time.perf_counter() - t0  # ~0 once cached on disk
            # the manifest has only a path column; start-model embeddings cached across seeds and arms
            kw["unlabeled"] = {"path": str(pool.manifest), "cache_dir": str(Path(self.pool_dir) / "embeddings")}
        if recipe.self_training:
            if pool is None:
                raise ConfigError("recipe self_training needs an unlabeled pool: set recipe pool, "
                                  'e.g. {"size": 500, "prevalence": 0.05}')
            kw["self_training"] = dict(recipe.self_training)
        return kw, pool

    def run_seed(self, recipes: dict[str, Recipe], seed: int, placebo_of: str | None = None,
                 keep_images: bool = False) -> dict[str, Any]:
        """Before + every recipe (+ the placebo of ``placebo_of``) for one seed -> summary dict."""
        ds = self.eval_set(seed)
        before_backend = self.new_backend()
        b_name, b_desc = self.evaluate(before_backend, ds)
        out: dict[str, Any] = {"seed": seed, "before": {"name": summarize(b_name, self.novel),
                                                       "description": summarize(b_desc, self.novel)}}
        arms = {}
        for key, rec in recipes.items():
            arm = self.run_arm(rec, seed, ds, keep_images=keep_images)
            arms[key] = arm
            out[key] = {"name": summarize(arm.name_prompts, self.novel),
                        "description": summarize(arm.description_prompts, self.novel),
                        "seconds_inversion": arm.seconds_inversion, "seconds_finetune": arm.seconds_finetune,
                        **{k: v for k, v in arm.extra.items() if k not in ("images", "init_images", "backend")}}
        if placebo_of is not None:
            arm = self.run_arm(recipes[placebo_of], seed, ds, placebo=True)
            arms["placebo"] = arm
            out["placebo"] = {"name": summarize(arm.name_prompts, self.novel),
                              "description": summarize(arm.description_prompts, self.novel),
                              "seconds_finetune": arm.seconds_finetune,
                              **{k: v for k, v in arm.extra.items() if k not in ("images", "init_images", "backend")}}
        out["_objects"] = {"before": (b_name, b_desc), "arms": arms, "eval_set": ds, "before_backend": before_backend}
        return out


def aggregate(per_seed: list[dict[str, Any]], arms: list[str], prompts: str = "name") -> dict[str, Any]:
    """Mean and 95% CI over seeds of novel/known accuracy and novel AUROC for each arm."""
    out: dict[str, Any] = {}
    for arm in ["before", *arms]:
        if arm not in per_seed[0]:
            continue
        rows = [s[arm][prompts] for s in per_seed]
        res = {}
        for k in ("novel_accuracy", "known_accuracy", "accuracy", "novel_auroc"):
            m, h = mean_ci([r[k] for r in rows])
            res[k] = {"mean": m, "ci95": h, "values": [r[k] for r in rows]}
        classes = list(rows[0]["per_class"])
        res["per_class"] = {c: float(np.mean([r["per_class"][c] for r in rows])) for c in classes}
        if arm != "before":
            for k in ("seconds_inversion", "seconds_finetune"):
                vals = [s[arm].get(k, 0.0) for s in per_seed]
                res[k] = {"mean": float(np.mean(vals)), "max": float(np.max(vals))}
        out[arm] = res
    return out
