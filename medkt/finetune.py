"""Fine-tuning on synthesised images (paper §3.1.2, Eq. 2).

Each image ``x_i`` of concept ``c_i`` is paired with the caption ``"A <name> is <description>"``
(``prepend_name=False`` keeps only the description: the Fig. 5 ablation). The InfoNCE loss is the
cross-entropy of ``logit_scale * cos(f_V(x_i), f_T(caption_j))`` over all captions ``j`` — the
captions of every concept in the run plus ``negative_captions`` (e.g. the evaluation task's other
classes), so a single concept still has negatives. By default only the visual encoder is trained
(``train="text"`` / ``"both"`` reproduce the Fig. 4 ablation). Losses are pluggable
(`register_finetune_loss`).

Device and precision: the model stays where it is (``backend.device``); images, targets and
replay images are moved there batch by batch, so they may live on the CPU. The losses run under
``backend.autocast()`` (bf16/fp16 when the backend was created with that precision) with a loss
scaler for fp16; parameters and optimiser state stay fp32.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from medkt.backends.base import Backend, require_embeddings
from medkt.device import grad_scaler
from medkt.errors import ConfigError
from medkt.infonce import info_nce, infonce_scale
from medkt.progress import Progress
from medkt.registry import Registry
from medkt.validation import OneOf, Range


#: parameter groups fine-tuning can train (``FinetuneConfig.train``)
#: ("concept_tokens": only the new concepts' name-token embeddings, see `medkt.concept_tokens`)
TRAIN_CHOICES = ("visual", "text", "both", "visual+decoder", "concept_tokens")


@dataclass
class FinetuneConfig:
    """Settings of `finetune`; the defaults are the paper's (§4.2, README "Engine defaults").

    Adam (L2 ``weight_decay`` 0.2, ``betas`` (0.9, 0.98), ``eps`` 1e-6) at ``lr`` 1e-5 (set per
    bundle), ``batch_size`` 4, 1 epoch, on the visual encoder only (``train``: ``"text"`` /
    ``"both"`` for the Fig. 4 ablation). Each image is paired with ``caption_template``
    ("A <name> is <description>"; ``prepend_name=False`` keeps only the description, Fig. 5) and
    trained with the InfoNCE ``loss`` at the model's own logit scale (``temperature`` overrides
    it). Replay, distillation, ``train_only``, WiSE-FT, best-epoch selection and LoRA (forgetting
    control) are off by default. Build from a dict with `from_dict`; the field comments
    give the meaning of each option.
    """

    lr: Annotated[float, Range(gt=0, lt=1)] = 1e-5
    weight_decay: Annotated[float, Range(ge=0)] = 0.2
    batch_size: Annotated[int, Range(ge=1)] = 4
    epochs: Annotated[int, Range(ge=1)] = 1
    optimizer: Literal["adam", "adamw"] = "adam"  # "adam" (L2 weight decay, as the paper's code) | "adamw" (decoupled)
    betas: tuple[Annotated[float, Range(ge=0, lt=1)], Annotated[float, Range(ge=0, lt=1)]] = (0.9, 0.98)
    eps: Annotated[float, Range(gt=0)] = 1e-6
    # "visual" | "text" | "both" | "visual+decoder" (CoCa: also the caption decoder) | "concept_tokens"
    # (text side: only the token embeddings of the new concepts' names; medkt.concept_tokens)
    train: Literal[TRAIN_CHOICES] = "visual"
    prepend_name: bool = True
    caption_template: str = "A {name} is {description}"
    loss: Annotated[str, OneOf(loss_names, "finetune loss")] = "infonce"
    temperature: Annotated[float, Range(gt=0)] | None = None  # None: the model's own logit scale
    grad_clip: Annotated[float, Range(gt=0)] | None = None
    shuffle: bool = True
    seed: int = 0
    # --- forgetting control (off by default; see docs/README "forgetting control") -----------
    # replay: each batch also holds ``replay_per_batch`` images of known concepts (passed as
    # ``finetune(..., replay_images=, replay_concepts=)``) with their own captions as targets.
    replay_per_batch: Annotated[int, Range(ge=0)] = 0
    # distillation: 1 - cos(f_V(x), f_V0(x)) on the replay images, toward the frozen start model
    distill_weight: Annotated[float, Range(ge=0)] = 0.0
    # train only parameters whose names contain one of these strings (e.g. the last blocks)
    train_only: list[str] | None = None
    # WiSE-FT: final weights = start + wise_alpha * (fine-tuned - start)
    wise_alpha: Annotated[float, Range(0, 1)] = 1.0
    # model selection with ``finetune(..., select_fn=)`` (higher is better), evaluated every epoch
    keep_best: bool = False
    select_patience: Annotated[int, Range(ge=0)] = 0  # stop after this many epochs without improvement (0 = never)
    # LoRA (medkt.lora.LoraSettings, e.g. {"rank": 8, "alpha": 16}): only low-rank adapters on the
    # trained encoder's Linear/Conv layers train, merged into the weights at the end; None = off
    lora: Any = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, path: str = "finetune") -> "FinetuneConfig":
        """Build from a dict of fields, checked by `medkt.validation` (types, ranges and
        choices are the annotations above; ``path`` names the options in errors)."""
        from medkt.validation import build

        cfg = build(cls, d, path, what="finetune")
        if cfg.train == "concept_tokens" and (cfg.lora is not None or cfg.train_only):
            raise ConfigError(f"{path}#train = 'concept_tokens' trains only the new name's token embeddings; "
                              f"it cannot be combined with lora or train_only (remove them)", key=f"{path}#train")
        if cfg.lora is not None:
            from medkt.lora import LoraSettings

            cfg.lora = LoraSettings.from_dict(cfg.lora)
        return cfg

    def validate(self, path: str = "finetune") -> None:
        """Field types and ranges (the annotations above)."""
        from medkt.validation import check_instance

        check_instance(self, path)


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
def _trainable(backend: Backend, which: str, only: Sequence[str] | None = None) -> list[torch.nn.Parameter]:
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
    if only:
        ids = {id(p) for p in params}
        named = [(n, p) for n, p in backend.named_parameters() if id(p) in ids]
        params = [p for n, p in named if any(s in n for s in only)]
        if not params:
            sample = ", ".join(n for n, _ in named[-6:])
            raise ConfigError(f"train_only {list(only)} matches no {which} parameter; names end with: {sample}")
    return params


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
) -> dict[str, Any]:
    """Fine-tune ``backend`` in place so each image matches its concept's caption.

    Args:
        images: ``(N, C, S, S)`` in [0, 1] (e.g. `InversionResult.images`).
        concepts_of_images: the concept name of each image (length N).
        descriptions: concept -> description (used when ``texts_of_images`` is None).
        negative_captions: extra captions that are never a target (other classes of the task).
        texts_of_images: the description each image was inverted from (defaults to its concept's).
        replay_images / replay_concepts: images of already-known concepts (and their concept
            names, which need an entry in ``descriptions``) mixed into every batch when
            ``config.replay_per_batch > 0`` and/or distilled with ``config.distill_weight``.
        select_fn: called after every epoch, returns a score (higher = better; e.g. accuracy on
            a held-out set of known classes) for ``keep_best`` / ``select_patience``.
        loss_context: passed as ``context=`` to a loss registered with ``uses_context=True``.
        distributed: wrap the loss in ``DistributedDataParallel`` and split every batch across
            the ranks of the process group (see `medkt.distributed`); None = when a group of
            more than one process is initialised. Every rank must call with the same arguments.
    Returns:
        history dict: ``loss`` per step, ``steps``, ``seconds``, ``captions``, ``trainable``.
    """
    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(config)
    cfg.validate()
    if len(images) != len(concepts_of_images) or len(images) == 0:
        raise ConfigError(f"need one concept per image, got {len(images)} images and {len(concepts_of_images)} concepts")
    missing = sorted({c for c in concepts_of_images if c not in descriptions})
    if texts_of_images is None and missing:
        raise ConfigError(f"no description for concept(s) {missing}")

    def desc_of(c: str) -> str:
        d = descriptions[c]
        return d if isinstance(d, str) else d[0]

    img_desc = list(texts_of_images) if texts_of_images is not None else [desc_of(c) for c in concepts_of_images]
    img_caps = [make_caption(c, d, cfg) for c, d in zip(concepts_of_images, img_desc)]
    captions: list[str] = []
    for cap in list(img_caps) + [make_caption(c, desc_of(c), cfg) for c in descriptions] + list(negative_captions):
        if cap not in captions:
            captions.append(cap)
    if len(captions) < 2:
        raise ConfigError("InfoNCE needs at least one negative caption: add another concept or negative_captions "
                          "(e.g. the evaluation task's classes)")
    targets_all = torch.tensor([captions.index(c) for c in img_caps])
    loss_fn = get_finetune_loss(cfg.loss)
    if FINETUNE_LOSSES.meta(cfg.loss, "uses_caption_embeddings", True):
        require_embeddings(backend, f"fine-tuning loss {cfg.loss!r}", "loss 'itm' or 'mlm'")
    if FINETUNE_LOSSES.meta(cfg.loss, "uses_context", False):
        loss_fn = functools.partial(loss_fn, context=loss_context)
    use_replay = replay_images is not None and (cfg.replay_per_batch > 0 or cfg.distill_weight > 0)
    if use_replay:
        if replay_concepts is None or len(replay_concepts) != len(replay_images) or len(replay_images) == 0:
            raise ConfigError("replay needs replay_images and one replay_concepts entry per image")
        miss = sorted({c for c in replay_concepts if c not in descriptions})
        if miss:
            raise ConfigError(f"no description for replay concept(s) {miss}; add them to the descriptions")
        replay_caps = [make_caption(c, desc_of(c), cfg) for c in replay_concepts]
        replay_targets = torch.tensor([captions.index(c) for c in replay_caps])
        backend.eval()
        with backend.autocast():
            teacher = backend.encode_images(replay_images)  # (R, D) on the model's device
    elif cfg.replay_per_batch > 0 or cfg.distill_weight > 0:
        raise ConfigError("replay_per_batch / distill_weight need finetune(..., replay_images=, replay_concepts=)")

    concept_tokens = None
    if cfg.train == "concept_tokens":  # text side: offsets on the new names' token embeddings only
        from medkt.concept_tokens import ConceptTokens

        if _use_distributed(distributed):
            raise ConfigError("finetune.train='concept_tokens' runs in one process (a few offsets train); "
                              "run it without torchrun")
        new = list(dict.fromkeys(concepts_of_images))
        others = [c for c in list(descriptions) + list(replay_concepts or []) if c not in new]
        concept_tokens = ConceptTokens(backend, new, others)
        params = []
    else:
        params = _trainable(backend, cfg.train, cfg.train_only)
    requires = [p.requires_grad for p in backend.parameters()]
    wise_params, lora = params, None
    if concept_tokens is not None:
        params = concept_tokens.parameters()
    if cfg.lora is not None:  # only the adapters train; merged into ``params`` at the end
        from medkt.lora import LoraAdapter, LoraSettings

        lora = LoraAdapter(backend, LoraSettings.from_dict(cfg.lora), params)
        params = lora.parameters()
    train_ids = {id(p) for p in params}
    for p in backend.parameters():
        p.requires_grad_(id(p) in train_ids)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
    caption_emb = None
    if cfg.train == "visual" and FINETUNE_LOSSES.meta(cfg.loss, "uses_caption_embeddings", True):  # text frozen: embed captions once
        with backend.autocast():
            caption_emb = backend.encode_texts(captions)
    device = backend.device
    scaler = grad_scaler(device, backend.precision)  # fp16 only; a pass-through otherwise
    gen = torch.Generator().manual_seed(cfg.seed)
    history: dict[str, Any] = {"loss": [], "captions": captions, "trainable": cfg.train, "select": []}
    start_state = [p.detach().clone() for p in wise_params] if cfg.wise_alpha < 1 else None
    best_score, best_state, since_best = -float("inf"), None, 0
    start = time.perf_counter()
    n = len(images)
    steps_total = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    bar = Progress(steps_total, "fine-tune", unit="step", enabled=progress)
    def batch_loss(batch: torch.Tensor, targets: torch.Tensor, ridx: torch.Tensor | None, weight: float = 1.0) -> torch.Tensor:
        with backend.autocast():
            loss = weight * loss_fn(backend, batch, targets, captions, caption_emb, cfg)
            if ridx is not None and cfg.distill_weight > 0:
                emb = F.normalize(backend.encode_pixels(replay_images[ridx].to(device)).float(), dim=-1)
                loss = loss + cfg.distill_weight * (1 - (emb * teacher[ridx.to(teacher.device)]).sum(-1)).mean()
        return loss.float()

    ddp = _make_ddp(backend, batch_loss) if _use_distributed(distributed) else None
    backend.train()
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen) if cfg.shuffle else torch.arange(n)
            for i in range(0, n, cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                # data is moved to the model batch by batch (indices drawn on the CPU: same on every device)
                batch, targets = images[idx.to(images.device)].to(device), targets_all[idx].to(device)
                ridx = None
                if use_replay:
                    k = max(cfg.replay_per_batch, 1 if cfg.distill_weight > 0 else 0)
                    ridx = torch.randint(0, len(replay_images), (k,), generator=gen)
                    if cfg.replay_per_batch > 0:
                        batch = torch.cat([batch, replay_images[ridx.to(replay_images.device)].to(device)])
                        targets = torch.cat([targets, replay_targets[ridx].to(device)])
                if ddp is not None:  # this rank's share of the batch, weighted so DDP's mean is the global loss
                    loss, loss_log = _ddp_batch_loss(ddp, batch, targets, ridx)
                else:
                    loss = batch_loss(batch, targets, ridx)
                    loss_log = loss
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(opt)  # clip the true gradients (no-op unless fp16)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)  # skips the step if fp16 gradients overflowed
                scaler.update()
                history["loss"].append(float(loss_log.detach()))
                bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
                bar.update(1)
            if select_fn is not None:
                backend.eval()
                score = float(select_fn())
                backend.train()
                history["select"].append(score)
                if score > best_score:
                    best_score, since_best = score, 0
                    if cfg.keep_best:
                        best_state = [p.detach().clone() for p in params]
                else:
                    since_best += 1
                    if cfg.select_patience and since_best >= cfg.select_patience:
                        break
        with torch.no_grad():
            if best_state is not None:
                history["best_epoch"] = int(np.argmax(history["select"])) + 1
                for p, b in zip(params, best_state):
                    p.copy_(b)
            if lora is not None:  # fold the adapters into the weights: the plain module tree is back
                lora.merge()
            if concept_tokens is not None:  # WiSE-FT of the offsets = scaling them
                concept_tokens.merge(cfg.wise_alpha)
            if start_state is not None:  # WiSE-FT weight-space interpolation toward the start
                for p, p0 in zip(wise_params, start_state):
                    p.copy_(p0 + cfg.wise_alpha * (p - p0))
    finally:
        bar.close()
        if lora is not None:  # after an error: drop the adapters unmerged (no-op once merged)
            lora.remove()
        if concept_tokens is not None:
            concept_tokens.remove()
        backend.eval()
        for p, r in zip(backend.parameters(), requires):
            p.requires_grad_(r)
    history["steps"] = len(history["loss"])
    history["seconds"] = time.perf_counter() - start
    return history


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
