"""Fine-tuning on synthesised images (paper §3.1.2, Eq. 2).

Each image ``x_i`` of concept ``c_i`` is paired with the caption ``"A <name> is <description>"``
(``prepend_name=False`` keeps only the description: the Fig. 5 ablation). The InfoNCE loss is the
cross-entropy of ``logit_scale * cos(f_V(x_i), f_T(caption_j))`` over all captions ``j`` — the
captions of every concept in the run plus ``negative_captions`` (e.g. the evaluation task's other
classes), so a single concept still has negatives. By default only the visual encoder is trained
(``train="text"`` / ``"both"`` reproduce the Fig. 4 ablation). Losses are pluggable
(`register_finetune_loss`). Everything else the loop can do — replay, distillation, train_only,
LoRA, concept tokens, WiSE-FT, model selection — is a control (`medkt.finetune_controls`) listed
in ``FinetuneConfig.controls``; the loop itself (`_train`) only draws batches and steps.

Device, precision and DDP (all in `_Step`): the model stays where it is (``backend.device``);
images, targets and replay images are moved there batch by batch, so they may live on the CPU.
The losses run under ``backend.autocast()`` (bf16/fp16 when the backend was created with that
precision) with a loss scaler for fp16; parameters and optimiser state stay fp32.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from medkt.backends.base import Backend, require_embeddings
from medkt.device import grad_scaler
from medkt.errors import ConfigError
from medkt.finetune_controls import FINETUNE_CONTROLS, FinetuneControl, FinetuneRun, build_controls
from medkt.infonce import info_nce, infonce_scale
from medkt.progress import Progress
from medkt.registry import Registry
from medkt.config_model import OneOf, Range, build, config_dataclass, config_path, recheck


#: parameter groups fine-tuning can train (``FinetuneConfig.train``)
#: ("concept_tokens": only the new concepts' name-token embeddings, see `medkt.concept_tokens`)
TRAIN_CHOICES = ("visual", "text", "both", "visual+decoder", "concept_tokens")


@config_dataclass
class OptimizerSettings:
    """The ``optimizer`` group of `FinetuneConfig`: the paper's Adam (L2 weight decay 0.2, betas
    (0.9, 0.98), eps 1e-6); ``grad_clip`` clips the global gradient norm before each step."""

    name: Literal["adam", "adamw"] = "adam"  # "adam" (L2 weight decay, as the paper's code) | "adamw" (decoupled)
    weight_decay: Annotated[float, Range(ge=0)] = 0.2
    betas: tuple[Annotated[float, Range(ge=0, lt=1)], Annotated[float, Range(ge=0, lt=1)]] = (0.9, 0.98)
    eps: Annotated[float, Range(gt=0)] = 1e-6
    grad_clip: Annotated[float, Range(gt=0)] | None = None

    def build(self, params: Sequence[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The torch optimiser over ``params``."""
        cls = torch.optim.AdamW if self.name == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, weight_decay=self.weight_decay, betas=self.betas, eps=self.eps)


def _loss_names() -> list[str]:
    return loss_names()  # defined below, with the losses; looked up at check time


@config_dataclass
class FinetuneConfig:
    """Settings of `finetune`; the defaults are the paper's (§4.2, README "Engine defaults").

    ``optimizer`` (`OptimizerSettings`: Adam, weight decay 0.2, betas (0.9, 0.98), eps 1e-6) at
    ``lr`` 1e-5 (set per bundle), ``batch_size`` 4, 1 epoch, on the visual encoder only
    (``train``: ``"text"`` / ``"both"`` for the Fig. 4 ablation). Each image is paired with
    ``caption_template`` ("A <name> is <description>"; ``prepend_name=False`` keeps only the
    description, Fig. 5) and trained with the InfoNCE ``loss`` at the model's own logit scale
    (``temperature`` overrides it). ``controls`` switches on forgetting controls and other loop
    extensions (`FINETUNE_CONTROLS`: replay, distill, pool_distill, train_only, lora, wise, select), each a dict
    ``{"name": ..., <its settings>}``; none by default. Build from a dict with `from_dict`;
    direct construction is checked too (`medkt.config_model`: one `ConfigError` line).
    """

    config_name = "finetune"  # names the options in messages (a class attribute, not a field)

    lr: Annotated[float, Range(gt=0, lt=1)] = 1e-5
    batch_size: Annotated[int, Range(ge=1)] = 4
    epochs: Annotated[int, Range(ge=1)] = 1
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    # "visual" | "text" | "both" | "visual+decoder" (CoCa: also the caption decoder) | "concept_tokens"
    # (text side: only the token embeddings of the new concepts' names; medkt.concept_tokens)
    train: Literal[TRAIN_CHOICES] = "visual"
    prepend_name: bool = True
    caption_template: str = "A {name} is {description}"
    loss: Annotated[str, OneOf(_loss_names, "finetune loss")] = "infonce"
    temperature: Annotated[float, Range(gt=0)] | None = None  # None: the model's own logit scale
    shuffle: bool = True
    seed: int = 0
    # e.g. [{"name": "wise", "alpha": 0.5}, {"name": "replay", "per_batch": 4}] (see FINETUNE_CONTROLS)
    controls: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # pydantic checked the fields; the controls are checked here, so direct construction
        # (``FinetuneConfig(controls=[...])``) fails as early as `from_dict`
        self._check_controls(config_path("finetune"))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, path: str = "finetune") -> "FinetuneConfig":
        """Build from a dict of fields, checked by `medkt.config_model` (types, ranges and
        choices are the annotations above; each control's settings by its class; ``path`` names
        the options in errors)."""
        return build(cls, d, path, what="finetune")

    def validate(self, path: str = "finetune") -> None:
        """Check again (fields code may have set since construction): field types and ranges
        (the annotations above) and every control's settings."""
        recheck(self, path)

    def _check_controls(self, path: str) -> None:
        names = [c.name for c in build_controls(self.controls, path)]
        if self.train == "concept_tokens" and {"lora", "train_only"} & set(names):
            raise ConfigError(f"{path}#train = 'concept_tokens' trains only the new name's token embeddings; "
                              f"it cannot be combined with the lora or train_only controls (remove them)",
                              key=f"{path}#train")


def make_caption(name: str, description: str, config: FinetuneConfig) -> str:
    """``"A moongate is a circular archway..."``; only the description when ``prepend_name`` is off."""
    desc = description.strip()
    if not config.prepend_name:
        return desc[0].upper() + desc[1:] if desc else desc
    first = desc.split()[0] if desc else ""
    if first and not (len(first) > 1 and first.isupper()):  # keep acronyms ("CT", "MRI")
        desc = desc[0].lower() + desc[1:]  # "A nodule is a small..." rather than "...is A small..."
    return config.caption_template.format(name=name, description=desc)


# --- losses ------------------------------------------------------------------------------------
LossFn = Callable[..., torch.Tensor]
#: fine-tuning losses; metadata ``uses_caption_embeddings`` (default True) and ``uses_context``
#: (default False), see `register_finetune_loss`
FINETUNE_LOSSES: Registry[LossFn] = Registry("fine-tuning loss", group="medkt.finetune_losses")


def register_finetune_loss(name: str, uses_caption_embeddings: bool = True,
                           uses_context: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator registering a loss in `FINETUNE_LOSSES`: ``fn(backend, images (B,C,S,S)
    [0,1], targets (B,) caption indices, captions list[str], caption_emb (K,D) normalised or None,
    config) -> loss``. ``caption_emb`` is computed once when the text encoder is frozen and the
    loss was registered with ``uses_caption_embeddings=True``; otherwise it is None (e.g. ViLT's
    ITM loss reads captions). A loss registered with ``uses_context=True`` also gets
    ``context=`` the ``loss_context`` given to `finetune` (e.g. the caption targets of
    CoCa's captioning loss)."""
    return FINETUNE_LOSSES.register(name, uses_caption_embeddings=uses_caption_embeddings, uses_context=uses_context)


def loss_names() -> list[str]:
    """Names of the registered fine-tuning losses (built-in plug-ins such as ViLT's "itm"/"mlm" and
    CoCa's "clip+caption" included: their module is loaded on this first lookup)."""
    return FINETUNE_LOSSES.names()


def get_finetune_loss(name: str) -> LossFn:
    """The registered loss ``name`` (`FINETUNE_LOSSES`)."""
    return FINETUNE_LOSSES.get(name)


def encode_captions(backend: Backend, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Normalised caption embeddings with gradients (for text fine-tuning)."""
    out = [backend.encode_text(backend.tokenize(list(captions[i : i + batch_size]))).float()
           for i in range(0, len(captions), batch_size)]
    return F.normalize(torch.cat(out), dim=-1)


@register_finetune_loss("infonce")
def infonce_loss(backend: Backend, images: torch.Tensor, targets: torch.Tensor, captions: Sequence[str],
                 caption_emb: torch.Tensor | None, config: FinetuneConfig) -> torch.Tensor:
    """Paper Eq. 2: cross-entropy of ``scale * cos(image, caption)`` logits ``(B, K)`` against the
    caption index ``targets`` ``(B,)``; ``scale`` is ``1 / temperature`` or the model's logit scale."""
    img = F.normalize(backend.encode_pixels(images).float(), dim=-1)
    txt = caption_emb if caption_emb is not None else encode_captions(backend, captions)
    return info_nce(img, txt, infonce_scale(backend, config.temperature), targets)


# --- main --------------------------------------------------------------------------------------
def _trainable(backend: Backend, which: str) -> list[torch.nn.Parameter]:
    """The parameters of parameter group ``which`` (`TRAIN_CHOICES`; "concept_tokens": none here,
    its control supplies the offsets)."""
    params: list[torch.nn.Parameter] = []
    if which in ("visual", "both", "visual+decoder"):
        params += list(backend.visual_parameters())
    if which == "visual+decoder":
        from medkt.backends.base import Captioner

        if not isinstance(backend, Captioner):
            raise ConfigError(f"train='visual+decoder' needs a captioning backend (CoCa), got {backend.family!r}")
        params += list(backend.decoder_parameters())
    if which in ("text", "both"):
        params += list(backend.text_parameters())
    return params


def _captions(cfg: FinetuneConfig, images: torch.Tensor, concepts_of_images: Sequence[str],
              descriptions: Mapping[str, Any], negative_captions: Sequence[str],
              texts_of_images: Sequence[str] | None) -> tuple[list[str], torch.Tensor, Callable[[str], str]]:
    """(every caption of the run, each image's caption index, concept -> caption), checked."""
    if len(images) != len(concepts_of_images) or len(images) == 0:
        raise ConfigError(f"need one concept per image, got {len(images)} images and {len(concepts_of_images)} concepts")
    missing = sorted({c for c in concepts_of_images if c not in descriptions})
    if texts_of_images is None and missing:
        raise ConfigError(f"no description for concept(s) {missing}")

    def desc_of(c: str) -> str:
        d = descriptions[c]
        return d if isinstance(d, str) else d[0]

    def caption_of(c: str) -> str:
        if c not in descriptions:
            raise ConfigError(f"no description for replay concept(s) {[c]}; add them to the descriptions")
        return make_caption(c, desc_of(c), cfg)

    img_desc = list(texts_of_images) if texts_of_images is not None else [desc_of(c) for c in concepts_of_images]
    img_caps = [make_caption(c, d, cfg) for c, d in zip(concepts_of_images, img_desc)]
    captions = list(dict.fromkeys(img_caps + [caption_of(c) for c in descriptions] + list(negative_captions)))
    if len(captions) < 2:
        raise ConfigError("InfoNCE needs at least one negative caption: add another concept or negative_captions "
                          "(e.g. the evaluation task's classes)")
    return captions, torch.tensor([captions.index(c) for c in img_caps]), caption_of


def _controls(cfg: FinetuneConfig, select_fn: Callable[[], float] | None) -> list[FinetuneControl]:
    """The config's controls, plus concept tokens (``train``) and score-only selection (a
    ``select_fn`` without a select control), sorted by ``order``."""
    controls = build_controls(cfg.controls)
    implied = ["concept_tokens"] if cfg.train == "concept_tokens" else []
    if select_fn is not None and not any(c.name == "select" for c in controls):
        implied.append("select")
    for name in implied:
        controls.append(FINETUNE_CONTROLS.get(name)())
        controls[-1].name = name
    return sorted(controls, key=lambda c: c.order)


def finetune(
    backend: Backend,
    images: torch.Tensor,
    concepts_of_images: Sequence[str],
    descriptions: dict[str, str] | dict[str, list[str]],
    negative_captions: Sequence[str] = (),
    config: FinetuneConfig | dict | None = None,
    texts_of_images: Sequence[str] | None = None,
    progress: bool = True,
    replay_images: torch.Tensor | None = None,
    replay_concepts: Sequence[str] | None = None,
    select_fn: Callable[[], float] | None = None,
    distributed: bool | None = None,
    loss_context: Any = None,
    pool: Any = None,
) -> dict[str, Any]:
    """Fine-tune ``backend`` in place so each image matches its concept's caption.

    Args:
        images: ``(N, C, S, S)`` in [0, 1] (e.g. `InversionResult.images`).
        concepts_of_images: the concept name of each image (length N).
        descriptions: concept -> description (used when ``texts_of_images`` is None).
        negative_captions: extra captions that are never a target (other classes of the task).
        config: `FinetuneConfig` or a dict of its fields; ``controls`` switch on replay,
            distillation, LoRA, WiSE-FT, ... (`medkt.finetune_controls`).
        texts_of_images: the description each image was inverted from (defaults to its concept's).
        replay_images / replay_concepts: images of already-known concepts (and their concept
            names, which need an entry in ``descriptions``) for the "replay" and "distill" controls.
        select_fn: called after every epoch, returns a score (higher = better; e.g. accuracy on
            a held-out set of known classes) recorded in ``history["select"]`` and used by the
            "select" control (``keep_best`` / ``patience``).
        loss_context: passed as ``context=`` to a loss registered with ``uses_context=True``.
        pool: an unlabeled pool (`medkt.pool.UnlabeledPool` or a ``(P, C, S, S)`` [0,1] tensor)
            for the "pool_distill" control; unused by the other controls.
        distributed: wrap the loss in ``DistributedDataParallel`` and split every batch across
            the ranks of the process group (see `medkt.distributed`); None = when a group of
            more than one process is initialised. Every rank must call with the same arguments.
    Returns:
        history dict: ``loss`` per step, ``steps``, ``seconds``, ``captions``, ``trainable``.
    """
    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(config)
    cfg.validate()
    captions, targets_all, caption_of = _captions(cfg, images, concepts_of_images, descriptions,
                                                  negative_captions, texts_of_images)
    run = FinetuneRun(backend, cfg, captions, caption_of, list(dict.fromkeys(concepts_of_images)), list(descriptions),
                      replay_images, replay_concepts, select_fn, _use_distributed(distributed),
                      history={"loss": [], "captions": captions, "trainable": cfg.train, "select": []}, pool=pool)
    return _run(run, _controls(cfg, select_fn), images, targets_all, loss_context, progress)


def _run(run: FinetuneRun, controls: list[FinetuneControl], images: torch.Tensor, targets_all: torch.Tensor,
         loss_context: Any, progress: bool) -> dict[str, Any]:
    """Set up the controls and trainable parameters, train, finish; always clean up and restore
    ``requires_grad``."""
    backend, cfg = run.backend, run.config
    requires = [p.requires_grad for p in backend.parameters()]
    start = time.perf_counter()
    bar = Progress(cfg.epochs * -(-len(images) // cfg.batch_size), "fine-tune", unit="step", enabled=progress)
    try:
        for c in controls:
            c.setup(run)
        run.params = _trainable(backend, cfg.train)
        for c in controls:
            run.params = c.trainable(run, run.params)
        train_ids = {id(p) for p in run.params}
        for p in backend.parameters():
            p.requires_grad_(id(p) in train_ids)
        step = _Step(run, controls, loss_context)
        _train(run, controls, step, images, targets_all, bar)
        with torch.no_grad():
            for c in reversed(controls):
                c.finish(run)
    finally:
        bar.close()
        for c in reversed(controls):
            c.cleanup(run)
        backend.eval()
        for p, r in zip(backend.parameters(), requires):
            p.requires_grad_(r)
    run.history["steps"] = len(run.history["loss"])
    run.history["seconds"] = time.perf_counter() - start
    return run.history


def _train(run: FinetuneRun, controls: Sequence[FinetuneControl], step: "_Step", images: torch.Tensor,
           targets_all: torch.Tensor, bar: Progress) -> None:
    """The epochs: shuffled batches (+ the controls' replay), one optimiser step each."""
    cfg, backend, n = run.config, run.backend, len(images)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_replay = max([c.replay_draw for c in controls], default=0)
    backend.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen) if cfg.shuffle else torch.arange(n)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            # data is moved to the model batch by batch (indices drawn on the CPU: same on every device)
            batch, targets = images[idx.to(images.device)].to(backend.device), targets_all[idx].to(backend.device)
            ridx = torch.randint(0, len(run.replay_images), (n_replay,), generator=gen) if n_replay else None
            for c in controls:
                batch, targets = c.extend_batch(run, batch, targets, ridx)
            run.history["loss"].append(step(batch, targets, ridx))
            bar.set_postfix(loss=f"{run.history['loss'][-1]:.3f}")
            bar.update(1)
        backend.eval()
        stop = [c.after_epoch(run) for c in controls]
        backend.train()
        if any(stop):
            break


class _Step:
    """One optimiser step, with distributed data parallel and precision in one place: the batch
    loss (the loss plus the controls' terms) runs under ``backend.autocast()`` (bf16/fp16 when the
    backend was created with that precision), inside DDP's forward when distributed; fp16 uses a
    loss scaler; ``optimizer.grad_clip`` clips the true (unscaled) global gradient norm."""

    def __init__(self, run: FinetuneRun, controls: Sequence[FinetuneControl], loss_context: Any):
        cfg, backend = run.config, run.backend
        self.run, self.controls = run, controls
        self.loss_fn = get_finetune_loss(cfg.loss)
        uses_emb = FINETUNE_LOSSES.meta(cfg.loss, "uses_caption_embeddings", True)
        if uses_emb:
            require_embeddings(backend, f"fine-tuning loss {cfg.loss!r}", "loss 'itm' or 'mlm'")
        if FINETUNE_LOSSES.meta(cfg.loss, "uses_context", False):
            self.loss_fn = functools.partial(self.loss_fn, context=loss_context)
        self.opt = cfg.optimizer.build(run.params, cfg.lr)
        self.caption_emb = None
        if cfg.train == "visual" and uses_emb:  # text frozen: embed captions once
            with backend.autocast():
                self.caption_emb = backend.encode_texts(run.captions)
        self.scaler = grad_scaler(backend.device, backend.precision)  # fp16 only; a pass-through otherwise
        self.ddp = _make_ddp(backend, self.batch_loss) if run.distributed else None

    def batch_loss(self, batch: torch.Tensor, targets: torch.Tensor, ridx: torch.Tensor | None,
                   weight: float = 1.0) -> torch.Tensor:
        """The loss of one batch (``weight``: this rank's share under DDP)."""
        run = self.run
        with run.backend.autocast():
            loss = weight * self.loss_fn(run.backend, batch, targets, run.captions, self.caption_emb, run.config)
            for c in self.controls:
                term = c.loss_term(run, ridx)  # None: no term (e.g. distill without replay indices)
                if term is not None:
                    loss = loss + term
        return loss.float()

    def __call__(self, batch: torch.Tensor, targets: torch.Tensor, ridx: torch.Tensor | None) -> float:
        """Backward and step on one batch; returns the (global) batch loss."""
        if self.ddp is not None:  # this rank's share of the batch, weighted so DDP's mean is the global loss
            loss, loss_log = _ddp_batch_loss(self.ddp, batch, targets, ridx)
        else:
            loss = loss_log = self.batch_loss(batch, targets, ridx)
        clip = self.run.config.optimizer.grad_clip
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if clip:
            self.scaler.unscale_(self.opt)  # clip the true gradients (no-op unless fp16)
            torch.nn.utils.clip_grad_norm_(self.run.params, clip)
        self.scaler.step(self.opt)  # skips the step if fp16 gradients overflowed
        self.scaler.update()
        return float(loss_log.detach())


# --- distributed data parallel (see medkt.distributed) -----------------------------------------
def _use_distributed(flag: bool | None) -> bool:
    from medkt import distributed as mdist

    if flag is None:
        return mdist.world_size() > 1
    if flag and not mdist.is_initialized():
        raise ConfigError("finetune(distributed=True) needs a process group: launch with torchrun "
                          "(medkt.distributed.init_from_env)")
    return bool(flag) and mdist.world_size() > 1


class _LossModule(torch.nn.Module):
    """Runs the whole batch loss inside DDP's forward, so any loss (and the backend's hooks) is covered."""

    def __init__(self, backend: Backend, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.backend = backend
        self._fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._fn(*args, **kwargs)


def _make_ddp(backend: Backend, fn: Callable[..., torch.Tensor]) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    dev = backend.device
    # find_unused_parameters: a trainable parameter a loss does not reach must not stall the reduction
    return DistributedDataParallel(_LossModule(backend, fn), device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=True)


def _ddp_batch_loss(ddp: torch.nn.Module, batch: torch.Tensor, targets: torch.Tensor,
                    ridx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's weighted loss for backward, the global batch loss for the history).

    Rank r takes a contiguous share of n_r of the n images and scales its mean loss by
    ``n_r * world / n``; DDP averages gradients over ranks, which gives the gradient of the
    single-process batch mean. A rank without images runs one image with weight 0 (DDP needs
    every rank in every step). The distillation term (on the shared replay indices) is the same
    on every rank, so the average keeps it unchanged.
    """
    import torch.distributed as dist

    from medkt import distributed as mdist

    world, n = mdist.world_size(), len(batch)
    share = mdist.local_share(n)
    n_local = share.stop - share.start
    if n_local == 0:
        loss = ddp(batch[:1], targets[:1], ridx, 0.0)
    else:
        loss = ddp(batch[share], targets[share], ridx, n_local * world / n)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return loss, total / world


def save_finetuned(backend: Backend, path: str | Path, which: str = "visual", metadata: dict[str, str] | None = None) -> Path:
    """Save the fine-tuned parameters (``which`` = visual | text | both | all | concept_tokens: the
    token-embedding matrix) as safetensors."""
    from safetensors.torch import save

    from medkt.utils import atomic_write_bytes

    if which == "all":
        tensors = dict(backend.state_dict())
    else:
        ids = ({id(backend.token_embedding().weight)} if which == "concept_tokens"
               else {id(p) for p in _trainable(backend, which)})
        tensors = {k: v for k, v in backend.state_dict(keep_vars=True).items() if id(v) in ids}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"medkt_spec": backend.spec, "which": which, **(metadata or {})}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def check_weights_file(path: str | Path) -> Path:
    """``path`` must be a safetensors file (as `save_finetuned` writes); only its header is
    read, so this is cheap enough to run before a model is built. Returns the path."""
    from safetensors import safe_open

    from medkt.errors import WeightsNotFoundError

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"fine-tuned weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError (or OSError) on a foreign file
        reason = " ".join(str(exc).split())[:80]
        raise ConfigError(f"{path} is not a safetensors file ({reason}); --weights takes the .safetensors file "
                          "written by `medkt finetune` or a run's finetuned.safetensors") from None
    return path


def _read_finetuned(backend: Backend, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `save_finetuned` file, checked against ``backend``'s names and shapes."""
    from safetensors.torch import load_file

    path = check_weights_file(path)
    tensors = load_file(str(path))
    own = backend.state_dict()
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise ConfigError(f"{path} does not match backend {backend.spec}: unknown keys {unknown[:3]}...")
    bad = [k for k, v in tensors.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(f"{path} does not match backend {backend.spec}: shape mismatch for {bad[:3]}")
    return tensors


def weights_difference(backend: Backend, path: str | Path) -> dict[str, Any]:
    """How far the weights in ``path`` are from ``backend``'s current ones (e.g. the base model):
    ``tensors`` in the file, ``changed_tensors``, ``changed_values`` (elements that differ) and
    ``max_abs_change``. Zero changed values means loading the file changes nothing."""
    own = backend.state_dict()
    changed_t, changed_v, max_abs = 0, 0, 0.0
    tensors = _read_finetuned(backend, path)
    for k, v in tensors.items():
        diff = (v.to(own[k].device, own[k].dtype) != own[k])
        n = int(diff.sum())
        if n:
            changed_t += 1
            changed_v += n
            max_abs = max(max_abs, float((v.float().cpu() - own[k].float().cpu()).abs().max()))
    return {"tensors": len(tensors), "changed_tensors": changed_t, "changed_values": changed_v,
            "values": int(sum(v.numel() for v in tensors.values())), "max_abs_change": max_abs}


def load_finetuned(backend: Backend, path: str | Path) -> Backend:
    """Load parameters saved by `save_finetuned` into ``backend`` (strict on names/shapes)."""
    backend.load_state_dict(_read_finetuned(backend, path), strict=False)
    return backend
