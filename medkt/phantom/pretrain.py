"""Pretrain PhantomCLIP on the phantom world with selected findings held out.

    python -m medkt.phantom.pretrain --config medkt/assets/phantom/pretrain_config.json \
        --out medkt/assets/phantom/phantom_clip.safetensors

Design (why, in short; details in the model card):

* **Attribute-grounded captions.** Every image gets captions mixing its finding's name and a
  description generated from the attributes actually drawn (size, shape, margin, brightness,
  count, location), so attribute words are grounded in pixels across findings.
* **Text that knows the words.** A text-only glossary loss aligns every finding's name with its
  definitions/descriptions, *including held-out findings* (no held-out image is ever drawn):
  this stands in for the language knowledge a real VLM's text tower brings.
* **Perceptually aligned image features.** Adversarial examples (one FGSM step with random
  start, L-inf ``adv_eps``) on a fraction of each batch, Gaussian noise and blur: a robust
  encoder's input gradients look like image structure, so inversion produces images that share
  features with real findings instead of imperceptible adversarial patterns.
* Multi-positive InfoNCE: identical captions within a batch (e.g. "mass") are not negatives.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medkt.phantom.findings import BUILTIN_FINDINGS


@dataclass
class PretrainConfig:
    """Pretraining settings of a phantom model (the JSON files in ``medkt/assets/phantom/``)."""

    seed: int = 0
    data_seed: int = 1000
    eval_seed: int = 900001
    held_out: tuple[str, ...] = ("nodule",)
    findings: tuple[str, ...] = BUILTIN_FINDINGS
    n_per_class: int = 2500
    captions_per_image: int = 4
    image_size: int = 64
    steps: int = 3000
    batch_size: int = 96
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 150
    adv_eps: float = 2.0 / 255
    adv_fraction: float = 0.5
    noise_std: float = 0.03
    blur_p: float = 0.3
    affine_deg: float = 6.0
    affine_translate: float = 0.05
    affine_scale: tuple[float, float] = (0.92, 1.08)
    glossary_weight: float = 0.5
    glossary_per_finding: int = 400
    glossary_batch: int = 64
    threads: int = 2
    model: dict = field(default_factory=dict)
    eval_per_class: int = 100
    save_every: int = 200

    @classmethod
    def load(cls, path: str | Path) -> "PretrainConfig":
        """Read a JSON config; unknown keys raise `ConfigError`."""
        d = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            from medkt.errors import ConfigError

            raise ConfigError(f"unknown pretraining option(s) {sorted(bad)} in {path}; known: {sorted(known)}")
        d = {k: (tuple(v) if isinstance(v, list) and k != "model" else v) for k, v in d.items()}
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# augmentation (batched, torch)
# ----------------------------------------------------------------------------------------------
def augment(x: torch.Tensor, cfg: PretrainConfig, g: torch.Generator) -> torch.Tensor:
    """Random affine, exposure jitter, blur and noise on ``(B, 1, S, S)`` [0,1] images."""
    B = x.shape[0]
    ang = (torch.rand(B, generator=g) * 2 - 1) * math.radians(cfg.affine_deg)
    sc = cfg.affine_scale[0] + torch.rand(B, generator=g) * (cfg.affine_scale[1] - cfg.affine_scale[0])
    tr = (torch.rand(B, 2, generator=g) * 2 - 1) * cfg.affine_translate * 2
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tr[:, 0]], 1), torch.stack([sin, cos, tr[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = 0.9 + 0.2 * torch.rand(B, 1, 1, 1, generator=g)
    off = (torch.rand(B, 1, 1, 1, generator=g) * 2 - 1) * 0.04
    x = x * gain + off
    blur = torch.rand(B, generator=g) < cfg.blur_p
    if blur.any():
        k = torch.tensor([0.2, 0.6, 0.2])
        k2 = (k[:, None] * k[None, :])[None, None]
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k2)
    sigma = torch.rand(B, 1, 1, 1, generator=g) * cfg.noise_std
    x = x + sigma * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def multi_positive_infonce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where ``pos[i, j]`` marks positive pairs (rows normalised)."""
    t = pos.float()
    li = -(t / t.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    lt = -(t.T / t.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (li + lt) / 2


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def build_data(cfg: PretrainConfig, progress: bool = True):
    """The pretraining set: uint8 images of the known findings, labels, caption tokens per image,
    glossary token pairs (held-out findings included: text only), the known findings and captions."""
    from medkt.phantom.model import tokenize
    from medkt.phantom.text import caption, glossary_pairs
    from medkt.phantom.world import get_finding, make_dataset

    known = [f for f in cfg.findings if f not in cfg.held_out]
    ds = make_dataset(known, cfg.n_per_class, cfg.data_seed, cfg.image_size, progress=progress)
    rng = np.random.default_rng([cfg.data_seed, 11])
    caps = []
    for lab, attrs in zip(ds.labels, ds.attributes):
        fd = get_finding(lab)
        caps.extend(caption(lab, fd.describe(attrs, rng), rng) for _ in range(cfg.captions_per_image))
    ctx = cfg.model.get("context_length", 32)
    tokens = tokenize(caps, ctx).view(len(ds), cfg.captions_per_image, -1).to(torch.int32)
    ga, gb, gy = glossary_pairs(list(cfg.findings), cfg.glossary_per_finding, cfg.data_seed + 5)
    gloss = (tokenize(ga, ctx).to(torch.int32), tokenize(gb, ctx).to(torch.int32), torch.tensor(gy))
    images = torch.from_numpy((ds.images * 255 + 0.5).astype(np.uint8))[:, None]
    labels = torch.tensor([known.index(l) for l in ds.labels])
    return images, labels, tokens, gloss, known, caps


def _param_groups(model, wd: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if n == "text.token.weight":
            continue  # sparse gradients: SparseAdam (see train)
        if p.ndim < 2 or "norm" in n or "token" in n or n.endswith("pos") or "logit_scale" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def evaluate(model, cfg: PretrainConfig, n_per_class: int | None = None) -> dict:
    """Zero-shot accuracy per class (name prompts and description prompts) on fresh phantoms."""
    from medkt.phantom.backend import PhantomBackend
    from medkt.phantom.metrics import zero_shot
    from medkt.phantom.text import description_prompts, name_prompts
    from medkt.phantom.world import make_dataset

    n = n_per_class or cfg.eval_per_class
    ds = make_dataset(list(cfg.findings), n, cfg.eval_seed, cfg.image_size)
    be = PhantomBackend(model).eval()
    x = ds.tensor()
    out = {}
    for kind, prompts in (("name", name_prompts(cfg.findings)), ("description", description_prompts(cfg.findings))):
        r = zero_shot(be, x, ds.labels, prompts)
        out[kind] = {
            "accuracy": r.accuracy,
            "known_mean": r.known_mean(cfg.held_out),
            "held_out_mean": r.novel_mean(cfg.held_out) if cfg.held_out else None,
            "held_out_auroc": {h: r.novel_auroc(h) for h in cfg.held_out},
            "per_class": r.per_class,
            "confusion": r.confusion.tolist(),
        }
    out["eval_seed"], out["eval_per_class"] = cfg.eval_seed, n
    return out


def _lr_at(cfg: PretrainConfig, s: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if s < cfg.warmup:
        return cfg.lr * (s + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def _fgsm(model, x: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor, cfg: PretrainConfig, g: torch.Generator,
          mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``x`` with its first ``adv_fraction`` replaced by FGSM examples (random start, L-inf
    ``adv_eps``) against the current contrastive loss, text side detached."""
    n_adv = int(round(cfg.adv_fraction * cfg.batch_size)) if cfg.adv_eps > 0 else 0
    if not n_adv:
        return x
    with torch.no_grad():
        te = F.normalize(model.encode_text(tok), dim=-1)
    xa = (x[:n_adv] + (torch.rand(x[:n_adv].shape, generator=g) * 2 - 1) * cfg.adv_eps).clamp(0, 1)
    xa.requires_grad_(True)
    ie = F.normalize(model.encode_image((xa - mean) / std), dim=-1)
    la = model.logit_scale.exp().detach() * ie @ te.T
    loss_a = -(pos[:n_adv].float() / pos[:n_adv].sum(1, keepdim=True) * la.log_softmax(1)).sum(1).mean()
    (grad,) = torch.autograd.grad(loss_a, xa)
    return torch.cat([(xa + 1.25 * cfg.adv_eps * grad.sign()).clamp(0, 1).detach(), x[n_adv:]])


def _batch_loss(model, mcfg, images: torch.Tensor, tokens: torch.Tensor, gloss: tuple, cfg: PretrainConfig,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One random batch's (loss, contrastive term, glossary term or None, logit scale)."""
    idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
    ci = torch.randint(0, cfg.captions_per_image, (cfg.batch_size,), generator=g)
    tok = tokens[idx, ci]
    x = augment(images[idx].float() / 255.0, cfg, g)
    # identical captions are positives of each other (e.g. two "mass" name captions)
    pos = (tok[:, None, :] == tok[None, :, :]).all(-1)
    x = _fgsm(model, x, tok, pos, cfg, g, mcfg.mean, mcfg.std)
    ie = F.normalize(model.encode_image((x - mcfg.mean) / mcfg.std), dim=-1)
    te = F.normalize(model.encode_text(tok), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    loss_c = multi_positive_infonce(scale * ie @ te.T, pos)
    if cfg.glossary_weight <= 0:
        return loss_c, loss_c, None, scale
    ga, gb, gy = gloss
    gi = torch.randint(0, len(gy), (cfg.glossary_batch,), generator=g)
    ea = F.normalize(model.encode_text(ga[gi]), dim=-1)
    eb = F.normalize(model.encode_text(gb[gi]), dim=-1)
    loss_g = multi_positive_infonce(scale * ea @ eb.T, gy[gi][:, None] == gy[gi][None, :])
    return loss_c + cfg.glossary_weight * loss_g, loss_c, loss_g, scale


def train(cfg: PretrainConfig, out: Path, progress: bool = True) -> dict:
    """Pretrain a `PhantomCLIP` with ``cfg``, save it to ``out`` (+ JSON side-car) and return the metadata."""
    from medkt.phantom.model import PhantomCLIP, PhantomCLIPConfig, save_checkpoint
    from medkt.progress import Progress

    torch.set_num_threads(cfg.threads)
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    images, labels, tokens, gloss, known, _ = build_data(cfg, progress)
    t_data = time.time() - t_start
    mcfg = PhantomCLIPConfig.from_dict({"image_size": cfg.image_size, **cfg.model})
    model = PhantomCLIP(mcfg)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    # the 49k-row BPE token table: only rows in the batch get gradients (dense Adam on it cost
    # more than the whole image tower)
    opt_tok = torch.optim.SparseAdam([model.text.token.weight], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    g = torch.Generator().manual_seed(cfg.seed)
    history = []
    bar = Progress(cfg.steps, "pretrain", unit="step", enabled=progress)
    model.train()
    t_loop = time.time()
    for step in range(cfg.steps):
        for pg in opt.param_groups + opt_tok.param_groups:
            pg["lr"] = _lr_at(cfg, step)
        loss, loss_c, loss_g, scale = _batch_loss(model, mcfg, images, tokens, gloss, cfg, g)
        opt.zero_grad(set_to_none=True)
        opt_tok.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for n, p in model.named_parameters() if n != "text.token.weight"], 1.0)
        opt.step()
        opt_tok.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": float(loss.detach()), "contrastive": float(loss_c.detach()),
                   "lr": _lr_at(cfg, step), "logit_scale": float(scale.detach()),
                   "seconds": round(time.time() - t_start, 1)}
            if loss_g is not None:
                rec["glossary"] = float(loss_g.detach())
            history.append(rec)
            bar.set_postfix(loss=f"{float(loss_c.detach()):.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            # a salvageable snapshot (no evaluation) in case a long run is interrupted
            save_checkpoint(model, out.with_name(out.stem + ".partial.safetensors"),
                            {"pretrain_config": asdict(cfg), "step": step + 1, "history": history})
        bar.update(1)
    bar.close()
    t_train = time.time() - t_loop
    model.eval()
    t0 = time.time()
    ev = evaluate(model, cfg)
    meta = {"pretrain_config": asdict(cfg), "known_findings": known, "held_out": list(cfg.held_out),
            "seconds_data": round(t_data, 1), "seconds_train": round(t_train, 1),
            "seconds_total": round(time.time() - t_start, 1), "seconds_eval": round(time.time() - t0, 1),
            "threads": cfg.threads, "machine": f"{platform.machine()} {os.cpu_count()} cpu",
            "torch": torch.__version__, "history": history, "zero_shot": ev}
    save_checkpoint(model, out, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    """``python -m medkt.phantom.pretrain --config CFG --out OUT.safetensors``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="JSON with PretrainConfig fields")
    ap.add_argument("--out", required=True, help="output .safetensors (a .json sidecar is written next to it)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps")
    ap.add_argument("--model-card", default=None, help="write MODEL_CARD.md here")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress lines when not on a terminal
    cfg = PretrainConfig.load(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    meta = train(cfg, Path(args.out))
    if args.model_card:
        from medkt.phantom.card import write_model_card

        write_model_card(Path(args.out), Path(args.model_card))
    print(json.dumps({k: meta[k] for k in ("seconds_total", "seconds_train")}, indent=1))
    print(json.dumps({k: {kk: v[kk] for kk in ("accuracy", "known_mean", "held_out_mean", "held_out_auroc")}
                      for k, v in meta["zero_shot"].items() if isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
