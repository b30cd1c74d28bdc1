"""Pipelines of the paper's natural-image experiments (ViLT and CoCa; CLIP uses TransferPipeline).

* `ITMTransferPipeline` - knowledge transfer into ViLT with ITM inversion, ITM (or MLM)
  fine-tuning and zero-shot classification by ITM scores (Tab. 1 ViLT rows, Tab. 11). With
  ``images="noise"`` the fine-tuning images are N(0, 1) noise instead of inversions: implicit
  transfer with MLM (§8.9).
* `RetrievalTransferPipeline` - transfer on the 80 COCO concepts, then text/image recall@K
  on the Flickr30k Karpathy test split before and after (Tab. 5, 8).
* `CaptioningTransferPipeline` - transfer into CoCa with ``1*L_CLIP + 0.1*L_cap``, then
  captions on the MSCOCO Karpathy test split scored with pycocoevalcap before and after (Tab. 9).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medkt.backends.base import Captioner, ImageTextMatcher
from medkt.checkpoints import weights_fingerprint
from medkt.errors import ConfigError
from medkt.pipelines.base import Pipeline, log
from medkt.pipelines.transfer import TransferPipeline, write_report
from medkt.inversion import inversion_summary
from medkt.spine import TransferStep
from medkt.utils import atomic_write_json, atomic_write_text

#: ViLT's transfer defaults (paper §4.4.2): ITM inversion from N(0, 1) without augmentation, ITM fine-tuning
ITM_INVERSION_DEFAULTS = {"objective": "itm", "augmentations": [],
                          "priors": [{"name": "init", "kind": "normal"}, {"name": "tv", "weight": 0.005}]}
ITM_FINETUNE_DEFAULTS = {"loss": "itm", "optimizer": {"weight_decay": 0.01}}


class ZeroShotTransferPipeline(TransferPipeline):
    """`TransferPipeline` whose evaluation sets may list classes without images (the 1000
    ImageNet classes the RareConcepts images are classified among, paper Tab. 1). Used by the
    ``rare_concepts_clip`` bundle."""

    kind = "transfer"
    allow_missing_classes = True


class ITMTransferPipeline(TransferPipeline):
    """`TransferPipeline` for image-text-matching models (ViLT).

    Differences: evaluation sets are classified by ITM scores (default template
    ``"a photo of a {}."``: every class prompt costs one forward pass per image); inversion uses
    the ``"itm"`` objective; reported similarities are ITM match probabilities.

    Args:
        images: ``"inversion"`` (explicit transfer), ``"noise"`` (implicit transfer, with
            ``finetune.loss="mlm"``), an earlier run's ``inversion/manifest.csv`` or its run folder
            (all ``inversion/manifest.csv`` below it; images are picked by concept name).
        separate_concepts: transfer each concept on its own, starting from the original weights
            each time (the paper's per-concept rows of Tab. 1 and 11); "before" is evaluated once.
    """

    kind = "itm_transfer"
    scoring = "itm"
    allow_missing_classes = True
    inversion_defaults = ITM_INVERSION_DEFAULTS
    finetune_defaults = ITM_FINETUNE_DEFAULTS

    def __init__(self, backend: str, concepts: list[dict[str, Any]], images: str = "inversion",
                 separate_concepts: bool = False, **kw: Any):
        super().__init__(backend, concepts, **kw)
        if images not in ("inversion", "noise") and not Path(images).exists():
            raise ConfigError(f"images must be 'inversion', 'noise', an inversion manifest.csv or a run folder holding "
                              f"inversion/manifest.csv files; got {images!r}")
        for name, spec in self.evaluations.items():
            if spec.get("source") == "inversion":
                raise ConfigError("ITM pipelines evaluate on real images: give a 'manifest' for every evaluation set")
        self.images = images
        self.separate_concepts = bool(separate_concepts)
        self.settings.update(images=images, separate_concepts=self.separate_concepts)

    def build_evaluator(self, backend: Any, name: str, spec: dict[str, Any], out: Path | None = None):
        return super().build_evaluator(backend, name, {"templates": ["a photo of a {}."], **spec}, out)

    def _run(self, out: Path) -> dict[str, Any]:
        from medkt.evaluation import before_after_table, transfer_warnings, warnings_block

        backend = self.create_backend(self.backend_spec, **self.backend_options)
        log.info("backend %s: %s", self.backend_spec, backend.describe())
        evaluators, eval_info = self.build_evaluators(backend, out)
        base = {"backend": self.backend_spec, "images": self.images, "separate_concepts": self.separate_concepts}
        common = dict(evaluators=evaluators, negatives=self.negative_captions, images=self.images,
                      resume=self.resume, progress=self.progress, save_weights=self.save_weights)
        if not self.separate_concepts:
            r = self.step.run(backend, out_dir=out, **common)
            results = {**base, **r.summary(), "evaluations": {
                n: {"info": eval_info[n], "before": r.before[n].to_dict(), "after": r.after[n].to_dict()}
                for n in evaluators}}
            write_report(out, self, results, r.before, r.after)
            return results
        original = {k: v.detach().clone() for k, v in backend.state_dict().items()}
        before = {n: ev.evaluate() for n, ev in evaluators.items()}
        runs: dict[str, Any] = {}
        lines = [f"- backend: `{self.backend_spec}`; images: {self.images}; each concept transferred on its own "
                 f"(fine-tuning: {self.ft_cfg.loss}, lr {self.ft_cfg.lr})", ""]
        warnings: list[str] = []
        for c in self.concepts:
            backend.load_state_dict(original)
            sub = out / "concepts" / c.name.replace("/", "_").replace(" ", "_")
            r = self.step.run(backend, concepts=[c], out_dir=sub, before=before, **common)
            runs[c.name] = {**r.summary(), "evaluations": {n: r.after[n].to_dict() for n in evaluators}}
            warnings += transfer_warnings(before, r.after, {c.name}, where=f"after teaching {c.name!r}")
            lines += [f"## {c.name}", "", f"![inverted images](concepts/{sub.name}/inversion/grid.png)", ""]
            lines += [before_after_table(before[n], r.after[n], title=n) for n in evaluators]
        results = {**base, "warnings": warnings, "concepts": [c.name for c in self.concepts],
                   "evaluations_before": {n: {"info": eval_info[n], "before": before[n].to_dict()} for n in evaluators},
                   "per_concept": runs}
        lines = [f"# Knowledge transfer report{': ' + self.bundle_name if self.bundle_name else ''}", "",
                 *warnings_block(warnings), *lines]
        atomic_write_text(out / "report.md", "\n".join(lines) + "\nAll numbers: `results.json`.\n")
        return results


class _CaptionedSplit:
    """Shared settings of the Karpathy-split pipelines."""

    #: official COCO captions file for the references (captioning only)
    coco_captions_json: Path | None = None

    def _load_split(self) -> list:
        from medkt.natural.datasets import read_karpathy, with_coco_references

        items = read_karpathy(self.karpathy_json, self.image_root, split=self.split, limit=self.limit)
        if self.coco_captions_json:
            items = with_coco_references(items, self.coco_captions_json)
        return items


class RetrievalTransferPipeline(_CaptionedSplit, Pipeline):
    """Knowledge transfer into ViLT, evaluated by zero-shot retrieval on a Karpathy split.

    Args:
        backend: ITM backend spec (``vilt:b32@...``).
        concepts: the transfer concepts (80 COCO categories with descriptions in the bundle).
        karpathy_json / image_root / split / limit: evaluation split (``limit`` = first N images).
        text_batch_size / block_size / score: see `PairwiseITMScorer`.
        baseline_cache: folder for the "before" score blocks, reusable across runs (the baseline
            does not depend on the transfer settings); default: inside the run folder.
        evaluate_before: score the unmodified model too (off: only "after").
    """

    kind = "retrieval_transfer"

    def __init__(self, backend: str, concepts: list[dict[str, Any]], karpathy_json: str, image_root: str,
                 inversion: dict | None = None, finetune: dict | None = None, split: str = "test",
                 limit: int | None = None, text_batch_size: int = 64, block_size: int = 8, score: str = "match_logit",
                 baseline_cache: str | None = None, evaluate_before: bool = True, negative_captions: list[str] | None = None,
                 save_weights: bool = True, ks: tuple[int, ...] = (1, 5, 10), **kw: Any):
        super().__init__(**kw, backend=backend, concepts=concepts, inversion=inversion, finetune=finetune,
                         karpathy_json=karpathy_json, image_root=image_root, split=split, limit=limit,
                         text_batch_size=text_batch_size, block_size=block_size, score=score,
                         baseline_cache=baseline_cache, evaluate_before=evaluate_before)
        self.backend_spec = backend
        self.step = TransferStep(concepts, inversion, finetune, seed=self.seed,
                                 inversion_defaults=ITM_INVERSION_DEFAULTS, finetune_defaults=ITM_FINETUNE_DEFAULTS)
        self.concepts, self.inv_cfg, self.ft_cfg = self.step.concepts, self.step.inversion, self.step.finetune
        self.karpathy_json, self.image_root, self.split, self.limit = Path(karpathy_json), Path(image_root), split, limit
        self.text_batch_size, self.block_size, self.score = int(text_batch_size), int(block_size), score
        self.baseline_cache = Path(baseline_cache) if baseline_cache else None
        self.evaluate_before = bool(evaluate_before)
        self.negative_captions = list(negative_captions or [])
        self.save_weights = save_weights
        self.ks = tuple(int(k) for k in ks)

    def _recall(self, backend: Any, items: list, cache: Path, tag: str) -> tuple[dict[str, float], torch.Tensor]:
        from medkt.natural.retrieval import PairwiseITMScorer, recall_at_k

        captions = [c for it in items for c in it.captions]
        caption_image = [i for i, it in enumerate(items) for _ in it.captions]
        scorer = PairwiseITMScorer(
            backend, captions, lambda i: backend.load_image_native(items[i].path), len(items), cache_dir=cache,
            text_batch_size=self.text_batch_size, block_size=self.block_size, score=self.score,
            identity=[self.backend_spec, tag], image_keys=[str(it.path) for it in items], progress=self.progress)
        scores = scorer.run()
        return recall_at_k(scores, caption_image, self.ks), scores

    def _run(self, out: Path) -> dict[str, Any]:
        from medkt.natural.retrieval import retrieval_table

        backend = self.create_backend(self.backend_spec)
        if not isinstance(backend, ImageTextMatcher):
            raise ConfigError(f"retrieval transfer needs an ITM backend (ViLT), got {self.backend_spec!r}")
        items = self._load_split()
        n_caps = sum(len(it.captions) for it in items)
        log.info("%s split %s: %d images, %d captions -> %d ITM pairs per evaluation", self.karpathy_json.name,
                 self.split, len(items), n_caps, len(items) * n_caps)
        before = None
        if self.evaluate_before:
            before, _ = self._recall(backend, items, self.baseline_cache or out / "scores_before",
                                     f"before:{weights_fingerprint(backend)[:16]}")
        r = self.step.run(backend, negatives=self.negative_captions, out_dir=out, resume=self.resume,
                          progress=self.progress, save_weights=self.save_weights)
        inv, history = r.images, r.history
        t_inv, t_ft = r.seconds["inversion"], r.seconds["finetune"]
        after, _ = self._recall(backend, items, out / "scores_after", f"after:{weights_fingerprint(backend)[:16]}")
        results = {
            "backend": self.backend_spec, "split": {"file": str(self.karpathy_json), "split": self.split,
                                                    "images": len(items), "captions": n_caps},
            "concepts": [c.name for c in self.concepts], "inversion": inversion_summary(inv),
            "finetune": {"loss": self.ft_cfg.loss, "lr": self.ft_cfg.lr, "batch_size": self.ft_cfg.batch_size,
                         "steps": history["steps"], "first_loss": history["loss"][0], "last_loss": history["loss"][-1]},
            "seconds_inversion": t_inv, "seconds_finetune": t_ft,
            "recall_before": before, "recall_after": after,
        }
        table = retrieval_table(before or after, after if before else None, self.ks)
        atomic_write_text(out / "report.md", "\n".join([
            f"# Retrieval after knowledge transfer{': ' + self.bundle_name if self.bundle_name else ''}", "",
            f"- backend: `{self.backend_spec}`; {len(self.concepts)} concepts, {len(inv.images)} inverted images",
            f"- fine-tuning: loss {self.ft_cfg.loss}, lr {self.ft_cfg.lr}, batch {self.ft_cfg.batch_size}, "
            f"{history['steps']} steps, {t_ft:.1f} s; inversion {t_inv:.1f} s",
            f"- evaluation: {self.karpathy_json.name} split '{self.split}', {len(items)} images x {n_caps} captions "
            f"(score: {self.score})", "", "Recall in % (TR = image->text, IR = text->image):", "", table,
            "![inverted images](inversion/grid.png)", ""]))
        return results


class CaptioningTransferPipeline(_CaptionedSplit, Pipeline):
    """Knowledge transfer into CoCa with ``clip_weight*L_CLIP + caption_weight*L_cap``, scored by
    captioning metrics on a Karpathy split before and after.

    Args:
        backend: ``coca:coca_ViT-B-32@laion2b_s13b_b90k`` (or the mscoco-finetuned tag).
        clip_weight / caption_weight: lambda_1, lambda_2 (paper: 1, 0.1); ``finetune.loss`` must be
            ``"clip+caption"`` (``"infonce"`` reproduces Tab. 9's rows without L_cap).
        train_decoder: fine-tune the caption decoder too (Tab. 9, dagger).
        coco_captions_json: optional official ``captions_val2014.json`` for the references
            (default: the Karpathy file's sentences, the same captions).
        generation: options of `CocaBackend.generate` (default open_clip's beam search).
        metrics: pycocoevalcap metrics (``BLEU, METEOR, ROUGE_L, CIDEr, SPICE``).
    """

    kind = "captioning_transfer"

    def __init__(self, backend: str, concepts: list[dict[str, Any]], karpathy_json: str, image_root: str,
                 inversion: dict | None = None, finetune: dict | None = None, clip_weight: float = 1.0,
                 caption_weight: float = 0.1, train_decoder: bool = False, coco_captions_json: str | None = None,
                 split: str = "test", limit: int | None = None, generation: dict | None = None,
                 metrics: list[str] | None = None, batch_size: int = 16, evaluate_before: bool = True,
                 templates: list[str] | None = None, save_weights: bool = True, **kw: Any):
        from medkt.natural.captioning import METRICS

        super().__init__(**kw, backend=backend, concepts=concepts, inversion=inversion, finetune=finetune,
                         clip_weight=clip_weight, caption_weight=caption_weight, train_decoder=train_decoder,
                         karpathy_json=karpathy_json, image_root=image_root, coco_captions_json=coco_captions_json,
                         split=split, limit=limit, generation=generation, metrics=metrics, batch_size=batch_size)
        self.backend_spec = backend
        finetune = dict(finetune or {})
        if train_decoder:  # the bundle's switch (Tab. 9 dagger) selects the visual tower + caption decoder
            if finetune.get("train", "visual") not in ("visual", "visual+decoder"):
                raise ConfigError(f"train_decoder=true trains the visual tower and the decoder; finetune.train "
                                  f"{finetune['train']!r} contradicts it")
            finetune["train"] = "visual+decoder"
        self.step = TransferStep(concepts, inversion, finetune, seed=self.seed, finetune_defaults={"loss": "clip+caption"})
        self.concepts, self.inv_cfg, self.ft_cfg = self.step.concepts, self.step.inversion, self.step.finetune
        self.clip_weight, self.caption_weight = float(clip_weight), float(caption_weight)
        if self.clip_weight < 0 or self.caption_weight < 0:
            raise ConfigError("clip_weight and caption_weight must be >= 0")
        self.train_decoder = bool(train_decoder)
        self.karpathy_json, self.image_root = Path(karpathy_json), Path(image_root)
        self.coco_captions_json = Path(coco_captions_json) if coco_captions_json else None
        self.split, self.limit = split, limit
        self.generation = dict(generation or {})
        self.metrics = list(metrics or METRICS)
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ConfigError(f"unknown captioning metric(s) {bad}; known: {list(METRICS)}")
        self.batch_size = int(batch_size)
        self.evaluate_before = bool(evaluate_before)
        self.templates = templates
        self.save_weights = save_weights

    def _captions(self, backend: Any, items: list, path: Path) -> dict[str, str]:
        """image id -> generated caption; cached in ``path`` (reused on --resume)."""
        if self.resume and path.is_file():
            return {r["image_id"]: r["caption"] for r in json.loads(path.read_text())}
        from medkt.progress import Progress

        preds: dict[str, str] = {}
        with Progress(len(items), "captioning", unit="img", enabled=self.progress) as bar:
            for i in range(0, len(items), self.batch_size):
                chunk = items[i : i + self.batch_size]
                x = torch.stack([backend.load_image(it.path) for it in chunk])
                for it, cap in zip(chunk, backend.caption(x, **self.generation)):
                    preds[str(it.image_id)] = cap
                bar.update(len(chunk))
        atomic_write_json(path, [{"image_id": k, "caption": v} for k, v in preds.items()])
        return preds

    def _score(self, items: list, preds: dict[str, str]) -> dict[str, Any]:
        from medkt.natural.captioning import caption_metrics

        refs = {str(it.image_id): it.captions for it in items}
        return caption_metrics(refs, preds, metrics=self.metrics)

    def _run(self, out: Path) -> dict[str, Any]:
        from medkt.finetune import make_caption
        from medkt.natural.captioning import metrics_table
        from medkt.natural.objectives import CaptionTargets

        backend = self.create_backend(self.backend_spec)
        if not isinstance(backend, Captioner):
            raise ConfigError(f"captioning transfer needs a captioning backend (CoCa), got {self.backend_spec!r}")
        items = self._load_split()
        before = self._score(items, self._captions(backend, items, out / "captions_before.json")) if self.evaluate_before else None

        concept_of = {make_caption(c.name, d, self.ft_cfg): c.name for c in self.concepts for d in c.descriptions}
        kw = {} if self.templates is None else {"templates": list(self.templates)}
        targets = CaptionTargets(concept_of, clip_weight=self.clip_weight, caption_weight=self.caption_weight, **kw)
        r = self.step.run(backend, negatives=[], out_dir=out, resume=self.resume, progress=self.progress,
                          save_weights=self.save_weights, finetune_options={"loss_context": targets})
        inv, history = r.images, r.history
        after = self._score(items, self._captions(backend, items, out / "captions_after.json"))
        results = {
            "backend": self.backend_spec,
            "split": {"file": str(self.karpathy_json), "split": self.split, "images": len(items)},
            "concepts": [c.name for c in self.concepts], "inversion": inversion_summary(inv),
            "finetune": {"loss": self.ft_cfg.loss, "lr": self.ft_cfg.lr, "clip_weight": self.clip_weight,
                         "caption_weight": self.caption_weight, "train_decoder": self.train_decoder,
                         "steps": history["steps"], "first_loss": history["loss"][0], "last_loss": history["loss"][-1]},
            "generation": self.generation or {"method": "beam_search"},
            "seconds_inversion": r.seconds["inversion"], "seconds_finetune": r.seconds["finetune"],
            "metrics_before": before, "metrics_after": after,
        }
        atomic_write_text(out / "report.md", "\n".join([
            f"# Captioning after knowledge transfer{': ' + self.bundle_name if self.bundle_name else ''}", "",
            f"- backend: `{self.backend_spec}`; {len(self.concepts)} concepts, {len(inv.images)} inverted images",
            f"- fine-tuning: {self.ft_cfg.loss} ({self.clip_weight} x CLIP + {self.caption_weight} x caption), lr "
            f"{self.ft_cfg.lr}, decoder {'trained' if self.train_decoder else 'frozen'}, {history['steps']} steps",
            f"- evaluation: {self.karpathy_json.name} split '{self.split}', {len(items)} images", "",
            "Metrics (x100, pycocoevalcap):", "", metrics_table(before or after, after if before else None),
            "Captions: `captions_before.json`, `captions_after.json`.", ""]))
        return results


__all__ = ["ZeroShotTransferPipeline", "ITMTransferPipeline", "RetrievalTransferPipeline", "CaptioningTransferPipeline"]
