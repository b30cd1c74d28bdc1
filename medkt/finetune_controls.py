"""Fine-tuning controls: everything `medkt.finetune.finetune` can do beyond the paper's plain loop.

A control is a small class with its own settings (a `medkt.config_model.config_dataclass`: its settings are checked) and
a few hooks with no-op defaults, called by the loop at fixed points:

* `setup` — check inputs, prepare (e.g. the distillation teacher embeddings);
* `trainable` — choose or wrap the trainable parameters (train_only, LoRA, concept tokens) or
  remember them (WiSE-FT's start weights);
* `extend_batch` — add images and targets to a batch (replay), or draw per-batch data (pool_distill);
* `loss_term` — add a term to the batch loss, under the model's autocast (distillation);
* `after_epoch` — look at the model after every epoch; returning True stops training (selection);
* `finish` — under ``no_grad`` after the last epoch: restore the best epoch, merge adapters,
  interpolate weights;
* `cleanup` — always, also after an error (drop unmerged adapters / hooks).

Why hooks on a base class rather than MONAI/ignite event handlers: the loop is ~30 lines of plain
torch (no ignite ``Engine``), several hooks return values the loop uses (parameters, a batch, a
loss term, "stop"), and the order in which controls compose matters for the numbers (LoRA merges
before WiSE-FT interpolates the merged weights), which an explicit ``order`` states in one place:
`trainable` runs in ascending ``order``, `finish` in descending ``order`` (the last wrapper is
unwrapped first).

Controls are registered once in `FINETUNE_CONTROLS` (entry-point group ``medkt.finetune_controls``
for plug-ins) and switched on by ``FinetuneConfig.controls``: ``[{"name": "wise", "alpha": 0.5}]``.
Data a control needs that is not a setting (replay images, the selection score) stays a
`finetune` argument and reaches the controls through `FinetuneRun`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from medkt.errors import ConfigError, unknown_name
from medkt.lora import LoraSettings
from medkt.registry import Registry
from medkt.config_model import Range, build, child, config_dataclass


@dataclass
class FinetuneRun:
    """What the controls of one `finetune` call may read (and, for ``params``, replace)."""

    backend: Any
    config: Any  # FinetuneConfig
    captions: list[str]  # every caption of the run (targets index into it)
    caption_of: Callable[[str], str]  # concept -> its caption
    new_concepts: list[str]
    known_concepts: list[str]
    replay_images: torch.Tensor | None = None
    replay_concepts: Sequence[str] | None = None
    select_fn: Callable[[], float] | None = None
    distributed: bool = False
    params: list[torch.nn.Parameter] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)
    replay_targets: torch.Tensor | None = None
    #: unlabeled pool (`medkt.pool.UnlabeledPool` or an ``(P, C, S, S)`` [0,1] tensor) for "pool_distill"
    pool: Any = None
    pool_images: torch.Tensor | None = None
    pool_teacher: torch.Tensor | None = None  # (P, D) normalised embeddings of the start model

    def require_pool(self, control: str) -> None:
        """Decode the pool once and embed it with the (still frozen) start model: through the
        evaluation embedding cache for an `UnlabeledPool`, directly for a tensor."""
        if self.pool_images is not None:
            return
        if self.pool is None:
            raise ConfigError(f"the {control!r} fine-tuning control needs an unlabeled pool: finetune(..., pool=) "
                              f"or transfer(..., unlabeled=PATH) / --set unlabeled=PATH")
        self.backend.eval()
        if isinstance(self.pool, torch.Tensor):
            if len(self.pool) == 0:
                raise ConfigError(f"the {control!r} control got an empty pool")
            self.pool_images = self.pool
            with self.backend.autocast():
                self.pool_teacher = self.backend.encode_images(self.pool)
            return
        from medkt.pool import pool_embeddings

        self.pool_images = self.pool.images(self.backend)
        self.pool_teacher = pool_embeddings(self.backend, self.pool)

    def require_replay(self, control: str) -> None:
        """Check ``replay_images`` / ``replay_concepts`` once and compute their caption targets."""
        if self.replay_targets is not None:
            return
        imgs, concepts = self.replay_images, self.replay_concepts
        if imgs is None:
            raise ConfigError(f"the {control!r} fine-tuning control needs finetune(..., replay_images=, replay_concepts=)")
        if concepts is None or len(concepts) != len(imgs) or len(imgs) == 0:
            raise ConfigError("replay needs replay_images and one replay_concepts entry per image")
        caps = [self.caption_of(c) for c in concepts]
        self.replay_targets = torch.tensor([self.captions.index(c) for c in caps])
        self.backend.eval()


class FinetuneControl:
    """Base class of the fine-tuning controls: every hook is a no-op (see the module docstring).

    Subclasses are dataclasses whose fields are their settings; ``name`` is filled in by
    `build_controls` from the registry name.
    """

    #: position when controls compose: `trainable` ascending, `finish` descending
    order: ClassVar[int] = 50
    #: replay indices this control needs drawn per batch (the loop draws the largest count once)
    replay_draw: ClassVar[int] = 0
    name: ClassVar[str] = ""

    def setup(self, run: FinetuneRun) -> None:
        """Check inputs and prepare, before the trainable parameters are chosen."""

    def trainable(self, run: FinetuneRun, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """The parameters to train (default: ``params`` unchanged)."""
        return params

    def extend_batch(self, run: FinetuneRun, batch: torch.Tensor, targets: torch.Tensor,
                     ridx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch and its caption targets (``ridx``: this batch's replay indices, or None)."""
        return batch, targets

    def loss_term(self, run: FinetuneRun, ridx: torch.Tensor | None) -> torch.Tensor | None:
        """A term added to the batch loss (None = nothing), computed under the model's autocast."""
        return None

    def after_epoch(self, run: FinetuneRun) -> bool:
        """Called after every epoch (model in eval mode); True stops training."""
        return False

    def finish(self, run: FinetuneRun) -> None:
        """After training, under ``torch.no_grad``."""

    def cleanup(self, run: FinetuneRun) -> None:
        """Always called last, also after an error."""


#: fine-tuning controls by name (``FinetuneConfig.controls``)
FINETUNE_CONTROLS: Registry[type[FinetuneControl]] = Registry("fine-tuning control", group="medkt.finetune_controls")


def build_controls(specs: Sequence[Mapping[str, Any]], path: str = "finetune") -> list[FinetuneControl]:
    """Control objects from ``[{"name": ..., **settings}]`` (checked; one-line errors naming the
    entry, e.g. ``finetune#controls#0``), sorted by ``order``."""
    out: list[FinetuneControl] = []
    for i, spec in enumerate(specs):
        where = child(child(path, "controls"), i)
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"{where} = {spec!r}: expected an object with a \"name\" (one of "
                              f"{', '.join(FINETUNE_CONTROLS.names())}) and that control's settings", key=where)
        name = spec["name"]
        if name not in FINETUNE_CONTROLS:
            err = unknown_name("fine-tuning control", name, FINETUNE_CONTROLS.names())
            raise ConfigError(f"{where}#name: {err}", key=child(where, "name"))
        if FINETUNE_CONTROLS.meta(name, "via_train"):
            raise ConfigError(f"{where}: the {name!r} control is switched on by finetune.train = {name!r}; "
                              f"remove it from controls", key=where)
        if name in [c.name for c in out]:
            raise ConfigError(f"{where}: control {name!r} is listed twice; keep one", key=where)
        ctl = build(FINETUNE_CONTROLS.get(name), {k: v for k, v in spec.items() if k != "name"}, where, what=name)
        ctl.name = name
        out.append(ctl)
    return sorted(out, key=lambda c: c.order)


def register_control(name: str, **meta: Any) -> Callable[[type[FinetuneControl]], type[FinetuneControl]]:
    """Class decorator: register a `FinetuneControl` subclass (a dataclass) as ``name``."""
    return FINETUNE_CONTROLS.register(name, **meta)


# --- built-in controls ---------------------------------------------------------------------------
@register_control("train_only")
@config_dataclass
class TrainOnly(FinetuneControl):
    """Train only the parameters whose names contain one of ``patterns`` (e.g. the last blocks)."""

    patterns: list[str] = field(default_factory=list)
    order: ClassVar[int] = 10

    def trainable(self, run: FinetuneRun, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        ids = {id(p) for p in params}
        named = [(n, p) for n, p in run.backend.named_parameters() if id(p) in ids]
        kept = [p for n, p in named if any(s in n for s in self.patterns)]
        if not kept:
            sample = ", ".join(n for n, _ in named[-6:])
            raise ConfigError(f"train_only {list(self.patterns)} matches no {run.config.train} parameter; "
                              f"names end with: {sample}")
        return kept


@register_control("concept_tokens", via_train=True)
@config_dataclass
class ConceptTokensControl(FinetuneControl):
    """``train = "concept_tokens"``: only offsets on the new names' token embeddings train
    (`medkt.concept_tokens`); merged into the embedding table at the end."""

    order: ClassVar[int] = 20
    _tokens = None  # the ConceptTokens of a run, made by trainable() (not a setting)

    def setup(self, run: FinetuneRun) -> None:
        if run.distributed:
            raise ConfigError("finetune.train='concept_tokens' runs in one process (a few offsets train); "
                              "run it without torchrun")

    def trainable(self, run: FinetuneRun, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        from medkt.concept_tokens import ConceptTokens

        others = [c for c in run.known_concepts + list(run.replay_concepts or []) if c not in run.new_concepts]
        self._tokens = ConceptTokens(run.backend, run.new_concepts, others)
        return self._tokens.parameters()

    def finish(self, run: FinetuneRun) -> None:
        self._tokens.merge()  # a WiSE-FT control (order 30) has already scaled the offsets

    def cleanup(self, run: FinetuneRun) -> None:
        if self._tokens is not None:
            self._tokens.remove()


@register_control("wise")
@config_dataclass
class Wise(FinetuneControl):
    """WiSE-FT: final weights = start + ``alpha`` * (fine-tuned - start), on the trained weights
    (after LoRA's merge; on the learned offsets of concept tokens)."""

    alpha: Annotated[float, Range(0, 1)] = 0.5
    order: ClassVar[int] = 30

    def trainable(self, run: FinetuneRun, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        self._params = params
        self._start = [p.detach().clone() for p in params] if self.alpha < 1 else None
        return params

    def finish(self, run: FinetuneRun) -> None:
        if self._start is not None:
            for p, p0 in zip(self._params, self._start):
                p.copy_(p0 + self.alpha * (p - p0))


@register_control("lora")
@config_dataclass
class Lora(LoraSettings, FinetuneControl):
    """LoRA (`medkt.lora`, via peft): only low-rank adapters on the trained encoder's Linear/Conv
    layers train, merged into the weights at the end. Settings: those of `medkt.lora.LoraSettings`
    (rank, alpha, dropout, target_modules), given flat: ``{"name": "lora", "rank": 4, "alpha": 8}``."""

    order: ClassVar[int] = 40
    _adapter = None  # the LoraAdapter of a run, made by trainable() (not a setting)

    def trainable(self, run: FinetuneRun, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        from medkt.lora import LoraAdapter

        self._adapter = LoraAdapter(run.backend, self, params)
        return self._adapter.parameters()

    def finish(self, run: FinetuneRun) -> None:
        self._adapter.merge()  # the plain module tree is back

    def cleanup(self, run: FinetuneRun) -> None:
        if self._adapter is not None:  # after an error: drop unmerged (no-op once merged)
            self._adapter.remove()


@register_control("replay")
@config_dataclass
class Replay(FinetuneControl):
    """Each batch also holds ``per_batch`` images of known concepts (``finetune(..., replay_images=,
    replay_concepts=)``) with their own captions as targets."""

    per_batch: Annotated[int, Range(ge=1)] = 4
    order: ClassVar[int] = 50

    @property
    def replay_draw(self) -> int:  # type: ignore[override]
        return self.per_batch

    def setup(self, run: FinetuneRun) -> None:
        run.require_replay(self.name)

    def extend_batch(self, run: FinetuneRun, batch: torch.Tensor, targets: torch.Tensor,
                     ridx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = run.replay_images
        idx = ridx[: self.per_batch]
        return (torch.cat([batch, x[idx.to(x.device)].to(batch.device)]),
                torch.cat([targets, run.replay_targets[idx].to(targets.device)]))


@register_control("distill")
@config_dataclass
class Distill(FinetuneControl):
    """``weight`` * (1 - cos(f_V(x), f_V0(x))) on the batch's replay images, toward the frozen start
    model (with a replay control on the same replay images; else one replay image per batch)."""

    weight: Annotated[float, Range(gt=0)] = 1.0
    order: ClassVar[int] = 60
    replay_draw: ClassVar[int] = 1

    def setup(self, run: FinetuneRun) -> None:
        run.require_replay(self.name)
        with run.backend.autocast():
            self._teacher = run.backend.encode_images(run.replay_images)  # (R, D) on the model's device

    def loss_term(self, run: FinetuneRun, ridx: torch.Tensor | None) -> torch.Tensor | None:
        if ridx is None:
            return None
        backend, teacher = run.backend, self._teacher
        emb = F.normalize(backend.encode_pixels(run.replay_images[ridx].to(backend.device)).float(), dim=-1)
        return self.weight * (1 - (emb * teacher[ridx.to(teacher.device)]).sum(-1)).mean()


@register_control("pool_distill")
@config_dataclass
class PoolDistill(FinetuneControl):
    """Forgetting control on an unlabeled pool (``finetune(..., pool=)``): each batch also draws
    ``per_batch`` pool images (a generator seeded by ``finetune.seed``) and adds ``weight`` *
    (1 - cos(f_V(x), f_V0(x))) toward the frozen start model's embeddings (computed once, through
    the evaluation embedding cache for a pool of files); with ``zs_weight`` > 0 also ``zs_weight`` *
    KL(p0 || p) between the start and current zero-shot distributions of the pool images over the
    known concepts' captions (all captions when every concept is new), as ZSCL does for CLIP. The
    captions are embedded once by the start model (a fixed target even when text trains)."""

    per_batch: Annotated[int, Range(ge=1)] = 4
    weight: Annotated[float, Range(ge=0)] = 1.0
    zs_weight: Annotated[float, Range(ge=0)] = 0.0
    order: ClassVar[int] = 65

    def setup(self, run: FinetuneRun) -> None:
        from medkt.backends.base import require_embeddings

        require_embeddings(run.backend, "the 'pool_distill' fine-tuning control", "the replay control")
        run.require_pool(self.name)
        self._gen = torch.Generator().manual_seed(int(run.config.seed))
        self._pidx: torch.Tensor | None = None
        self._zs = None
        if self.zs_weight > 0:
            known = [run.caption_of(c) for c in run.known_concepts if c not in run.new_concepts]
            caps = list(dict.fromkeys(known)) if len(known) >= 2 else run.captions
            with torch.no_grad(), run.backend.autocast():
                text = F.normalize(run.backend.encode_texts(caps).float(), dim=-1)
            from medkt.infonce import infonce_scale

            scale = infonce_scale(run.backend, run.config.temperature)
            teacher = run.pool_teacher.to(text.device).float()
            self._zs = (text, scale, F.softmax(scale * teacher @ text.t(), dim=-1))

    def extend_batch(self, run: FinetuneRun, batch: torch.Tensor, targets: torch.Tensor,
                     ridx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # the draw happens here, once per batch outside the (DDP) loss: every rank draws the same
        self._pidx = torch.randint(0, len(run.pool_images), (self.per_batch,), generator=self._gen)
        return batch, targets

    def loss_term(self, run: FinetuneRun, ridx: torch.Tensor | None) -> torch.Tensor | None:
        backend, idx = run.backend, self._pidx
        x = run.pool_images[idx.to(run.pool_images.device)].to(backend.device)
        emb = F.normalize(backend.encode_pixels(x).float(), dim=-1)
        teacher = run.pool_teacher[idx.to(run.pool_teacher.device)].to(emb.device)
        term = self.weight * (1 - (emb * teacher).sum(-1)).mean()
        if self._zs is not None:
            text, scale, p0 = self._zs
            logp = F.log_softmax(scale * emb @ text.t().to(emb.device), dim=-1)
            term = term + self.zs_weight * F.kl_div(logp, p0[idx.to(p0.device)].to(emb.device), reduction="batchmean")
        return term


@register_control("pool_replay")
@config_dataclass
class PoolReplay(FinetuneControl):
    """Forgetting control on an unlabeled pool (``finetune(..., pool=)``) that needs no labels: the
    frozen start model scores the pool over the known concepts' captions (every caption of the run
    that is not a new concept's: known concepts and negatives) and keeps, per caption, its
    ``per_class`` surest scans (top caption, probability >= ``min_confidence``); each
    batch also holds ``per_batch`` of them with that caption as the target. Against the new
    concept's caption in the same softmax, they teach it not to claim real scans of what the model
    already knows (which an inverted image alone cannot), also when only its token embeddings train."""

    per_batch: Annotated[int, Range(ge=1)] = 4
    per_class: Annotated[int, Range(ge=1)] = 16
    min_confidence: Annotated[float, Range(0, 1)] = 0.5
    order: ClassVar[int] = 55

    def setup(self, run: FinetuneRun) -> None:
        from medkt.backends.base import require_embeddings
        from medkt.infonce import infonce_scale
        from medkt.pool import caption_probabilities, pick

        require_embeddings(run.backend, "the 'pool_replay' fine-tuning control", "the replay control")
        run.require_pool(self.name)
        # every caption that is not a new concept's: known concepts' captions and the negatives
        new = {run.caption_of(c) for c in run.new_concepts}
        caps = [c for c in dict.fromkeys(run.captions) if c not in new]
        if len(caps) < 2:
            raise ConfigError("the 'pool_replay' fine-tuning control replays pool scans of known concepts and needs at "
                              f"least two of their captions, this run has {len(caps)}: pass known_descriptions or "
                              "negative captions (or remove the control)")
        probs = caption_probabilities(run.backend, run.pool_teacher, caps, infonce_scale(run.backend, run.config.temperature))
        rows, targets = [], []
        for k, cap in enumerate(caps):
            chosen = [r for r, _, _ in pick(probs, k, self.per_class, min_confidence=self.min_confidence)]
            rows += chosen
            targets += [run.captions.index(cap)] * len(chosen)
        if not rows:
            raise ConfigError(f"the 'pool_replay' control found no pool scan the start model assigns to a known concept "
                              f"with probability >= {self.min_confidence}: lower min_confidence")
        self._rows = torch.tensor(rows)
        self._targets = torch.tensor(targets)
        self._gen = torch.Generator().manual_seed(int(run.config.seed) + 1)

    def extend_batch(self, run: FinetuneRun, batch: torch.Tensor, targets: torch.Tensor,
                     ridx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        j = torch.randint(0, len(self._rows), (self.per_batch,), generator=self._gen)
        x = run.pool_images[self._rows[j].to(run.pool_images.device)].to(batch.device, batch.dtype)
        return torch.cat([batch, x]), torch.cat([targets, self._targets[j].to(targets.device)])


@register_control("select")
@config_dataclass
class Select(FinetuneControl):
    """Model selection with ``finetune(..., select_fn=)`` (higher is better), scored after every
    epoch into ``history["select"]``: ``keep_best`` restores the best epoch's weights, ``patience``
    stops after that many epochs without improvement (0 = never). Added with its defaults (scores
    only) when `finetune` gets a ``select_fn`` and no select control is listed."""

    keep_best: bool = False
    patience: Annotated[int, Range(ge=0)] = 0
    order: ClassVar[int] = 70

    def setup(self, run: FinetuneRun) -> None:
        if run.select_fn is None:
            raise ConfigError("the 'select' fine-tuning control needs finetune(..., select_fn=) (a score, higher = better)")
        self._best, self._best_state, self._since = -float("inf"), None, 0

    def after_epoch(self, run: FinetuneRun) -> bool:
        score = float(run.select_fn())
        run.history["select"].append(score)
        if score > self._best:
            self._best, self._since = score, 0
            if self.keep_best:
                self._best_state = [p.detach().clone() for p in run.params]
            return False
        self._since += 1
        return bool(self.patience and self._since >= self.patience)

    def finish(self, run: FinetuneRun) -> None:
        if self._best_state is not None:
            run.history["best_epoch"] = int(np.argmax(run.history["select"])) + 1
            for p, b in zip(run.params, self._best_state):
                p.copy_(b)


__all__ = ["FINETUNE_CONTROLS", "ConceptTokensControl", "Distill", "FinetuneControl", "FinetuneRun", "Lora",
           "PoolDistill", "PoolReplay", "Replay", "Select", "TrainOnly", "Wise", "build_controls", "register_control"]
