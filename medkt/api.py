"""medkt's public Python API: the names ``import medkt`` gives, documented as stable.

Each step of knowledge transfer is one call and returns one result object with ``to_dict()``
(JSON-ready):

| step | call | result |
|---|---|---|
| model | `create_backend` | `Backend` |
| default settings | `recipe_defaults` (paper recipe; the phantom model's own) | `Recipe` |
| whole transfer | `transfer` | `TransferResult` |
| synthesise images | `invert` | `InversionResult` |
| fine-tune | `fine_tune` | `FinetuneResult` |
| zero-shot classification | `evaluate_zero_shot` | `ClassificationResult` |
| saliency map | `saliency` | ``(H, W)`` array in [0, 1] |
| zero-shot segmentation | `segment` | `SegmentationResult` |
| mask metrics | `score_masks` | `ScoreTable` |
| weights | `save_finetuned` / `load_finetuned` | a safetensors file |

Conventions: images are ``(N, C, S, S)`` float tensors in [0, 1] (``S`` = the backend's input
size) or image files (PNG/JPEG 8/16-bit, DICOM, NIfTI, JSRT ``.IMG``, read by
`medkt.data.readers`); masks are boolean ``(H, W)`` arrays in the image's own geometry;
scores are fractions in [0, 1]. Every function is a thin wrapper of the engine module named in
its docstring; nothing here downloads anything.

Example (the shipped phantom model; change the spec string for a real model):

    import medkt

    backend = medkt.create_backend("phantom:base", device="auto")
    # phantoms/images/<class>/*.png from: medkt phantom export -o phantoms --findings "no finding,nodule"
    classes = {"nodule": ["a chest x-ray with nodule"], "no_finding": ["a chest x-ray with no finding"]}
    ev = medkt.zero_shot_evaluator(backend, "phantoms/images", classes)
    recipe = medkt.recipe_defaults("phantom:base")  # the phantom recipe; the paper's for real models
    result = medkt.transfer(backend, [medkt.Concept("nodule", ["a small round bright spot in the lung"],
                                                    recipe.n_images)],
                            inversion_config=recipe.inversion_config(),
                            finetune_config=recipe.finetune_config(),
                            evaluators={"phantoms": ev}, out_dir="runs/nodule")
    print(result.before["phantoms"].accuracy, "->", result.after["phantoms"].accuracy)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medkt.backends import create_backend, list_backends, register_backend
from medkt.backends.base import Backend
from medkt.errors import ConfigError, DataError
from medkt.evaluation import ClassificationResult, ZeroShotEvaluator
from medkt.finetune import FinetuneConfig, load_finetuned, save_finetuned
from medkt.inversion import InversionConfig, InversionResult
from medkt.pool import UnlabeledPool
from medkt.recipes import Recipe, recipe_defaults
from medkt.segmentation.m2ib import M2IBConfig
from medkt.segmentation.metrics import ScoreTable
from medkt.spine import Concept, TransferResult, parse_concepts, transfer

ImageSet = str | Path | torch.Tensor | Sequence[Any]
ClassPrompts = Mapping[str, Sequence[str] | str] | Sequence[str]


# -- transfer pieces ------------------------------------------------------------------------------


def invert(backend: Backend, concepts: Sequence[Concept | Mapping[str, Any]],
           config: InversionConfig | Mapping[str, Any] | None = None, *, out_dir: str | Path | None = None,
           resume: bool = False, progress: bool = True, init_images: torch.Tensor | None = None,
           unlabeled: str | Path | Mapping[str, Any] | UnlabeledPool | None = None) -> InversionResult:
    """Synthesise ``n_images`` images per concept whose embedding matches its description.

    The inversion step of `transfer` alone (`medkt.spine.synthesize` with
    ``images="inversion"``; engine: `medkt.inversion.invert`). The backend's weights are not
    changed.

    Args:
        backend: any backend with image and text embeddings (or an ITM head).
        concepts: `Concept` objects (name, descriptions, n_images) or their dict form.
        config: `InversionConfig` or a dict of its fields (e.g. ``{"steps": 300}``);
            default the paper's 5,000 steps.
        out_dir: when given, checkpoints, ``images/*.png``, ``grid.png`` and ``manifest.csv`` are
            written there.
        resume: continue from the checkpoints in ``out_dir``.
        init_images: ``(M, C, S, S)`` [0, 1] starting images for ``config.init == "images"``.
        unlabeled: an unlabeled pool of scans for the priors that learn from it (``feature_stats``,
            ``real_start``, ``spectrum``): a folder, a manifest (labels never read), a dict of
            `UnlabeledPool.from_path` arguments with ``path``, or an `UnlabeledPool`.
    Returns:
        `InversionResult`: ``images`` ``(N, C, S, S)`` in [0, 1], the concept and text of
        each image and its final cosine similarity to its text.
    """
    from medkt.spine import as_pool, synthesize

    cfg = config if isinstance(config, InversionConfig) else InversionConfig.from_dict(dict(config or {}))
    pool = as_pool(unlabeled, None) if unlabeled is not None else None
    return synthesize(backend, parse_concepts(concepts), cfg, images="inversion", inversion_dir=out_dir,
                      resume=resume, progress=progress, init_images=init_images, pool=pool)


@dataclass
class FinetuneResult:
    """What `fine_tune` did: the loss per optimiser step and the captions it trained against.

    ``history`` is the engine's record (`medkt.finetune.finetune`): ``loss`` (per step),
    ``steps``, ``seconds``, ``captions`` (targets and negatives), ``trainable``, ``select``.
    """

    history: dict[str, Any]

    @property
    def loss(self) -> list[float]:
        """InfoNCE loss of every optimiser step."""
        return list(self.history.get("loss", []))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: steps, first/last loss, seconds, trained part and captions."""
        loss = self.loss or [float("nan")]
        return {"steps": int(self.history.get("steps", len(self.loss))), "first_loss": loss[0],
                "last_loss": loss[-1], "seconds": float(self.history.get("seconds", 0.0)),
                "trainable": self.history.get("trainable"), "captions": list(self.history.get("captions", []))}


def fine_tune(backend: Backend, images: InversionResult, concepts: Sequence[Concept | Mapping[str, Any]],
             config: FinetuneConfig | Mapping[str, Any] | None = None, *, negatives: Sequence[str] = (),
             progress: bool = True, **options: Any) -> FinetuneResult:
    """Fine-tune ``backend`` in place so each image matches its concept's caption (paper Eq. 2).

    Each image is paired with ``"A <name> is <description>"``; InfoNCE over the captions of all
    ``concepts`` plus ``negatives``. Engine: `medkt.finetune.finetune` (only the visual
    encoder trains by default). Named ``fine_tune`` because ``medkt.finetune`` is that engine
    module.

    Args:
        images: the images to train on with the concept and description of each, e.g. the result
            of `invert` (images ``(N, C, S, S)`` in [0, 1]); each image is captioned with
            its own description (``images.texts``).
        concepts: the concepts of the images; each concept's first description is also a caption
            (a negative for the other concepts' images), as in `transfer`.
        config: `FinetuneConfig` or a dict of its fields (lr, epochs, batch_size, optimizer,
            controls such as ``[{"name": "wise", "alpha": 0.5}]``, ...).
        negatives: captions that are never a target, e.g. the other classes of the task
            (InfoNCE needs at least one other caption).
        options: further keywords of `medkt.finetune.finetune` (``replay_images``,
            ``replay_concepts`` for the replay / distill controls, ``select_fn`` for the select
            control, ``distributed``).
    Returns:
        `FinetuneResult`; save the changed weights with `save_finetuned`.
    """
    from medkt.finetune import finetune as _finetune

    concepts = parse_concepts(concepts)
    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(dict(config or {}))
    descriptions = {c.name: c.description for c in concepts}
    history = _finetune(backend, images.images, images.concepts, descriptions, list(negatives), cfg,
                        texts_of_images=images.texts, progress=progress, **options)
    return FinetuneResult(history)


# -- zero-shot classification ---------------------------------------------------------------------


def _class_prompts(classes: ClassPrompts, templates: Sequence[str] | None) -> dict[str, list[str]]:
    from medkt.pipelines.transfer import class_prompts_of

    if isinstance(classes, Mapping):
        spec: dict[str, Any] = {"classes": {str(c): p for c, p in classes.items()}}
    else:
        spec = {"classes": [str(c) for c in classes], "templates": list(templates or ["{}"])}
    return class_prompts_of(spec)


def zero_shot_evaluator(backend: Backend, images: ImageSet, classes: ClassPrompts, *,
                        labels: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                        root: str | Path | None = None, split: str | None = None, aggregate: str = "mean",
                        batch_size: int = 64, num_workers: int = 0, skip_bad: bool = False,
                        progress: bool = False) -> ZeroShotEvaluator:
    """A reusable zero-shot classifier of a fixed image set (see `evaluate_zero_shot`).

    Pass it to `transfer` as ``evaluators={"name": ev}`` to get before/after results; its
    image embeddings are recomputed only when the weights change.
    """
    prompts = _class_prompts(classes, templates)
    kw = {"aggregate": aggregate, "batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    if isinstance(images, (str, Path)):
        path = Path(images)
        if labels is not None:
            raise ConfigError(f"labels come from {path} (sub-folder names or the manifest's label column); "
                              "pass labels only with a tensor or a list of images")
        if path.is_dir():
            from medkt.data.prepare import prepare_imagefolder

            if root is not None or split is not None or skip_bad:
                raise ConfigError(f"{path} is a folder: root, split and skip_bad apply to a manifest only "
                                  "(build one with 'medkt data prepare imagefolder --root DIR')")

            rows = prepare_imagefolder(path, split=None)
            if not rows:
                raise DataError(f"no images in class sub-folders of {path}; expected {path}/<class>/<image>")
            found = sorted({r.label for r in rows})
            unknown = [lab for lab in found if lab not in prompts]
            if unknown:
                raise DataError(f"{path}: sub-folder(s) {unknown} are not among the classes {list(prompts)}; "
                                "add them to the classes or move them out of the folder")
            return ZeroShotEvaluator(backend, [path / r.path for r in rows], [r.label for r in rows], prompts, **kw)
        if path.is_file():
            from medkt.pipelines.transfer import load_evaluation_set

            spec = {"manifest": str(path), "classes": prompts, "split": split, "skip_bad": skip_bad,
                    "aggregate": aggregate, "batch_size": batch_size, "num_workers": num_workers}
            if root is not None:
                spec["root"] = str(root)
            return load_evaluation_set(backend, path.stem, spec, progress=progress)[0]
        raise DataError(f"{path} is neither a folder of class sub-folders nor a manifest file")
    if labels is None:
        raise ConfigError("labels are required when images is a tensor or a list (one class name per image)")
    return ZeroShotEvaluator(backend, images, list(labels), prompts, **kw)


def evaluate_zero_shot(backend: Backend, images: ImageSet, classes: ClassPrompts, *,
                       labels: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                       root: str | Path | None = None, split: str | None = None, aggregate: str = "mean",
                       batch_size: int = 64, num_workers: int = 0, skip_bad: bool = False,
                       progress: bool = False) -> ClassificationResult:
    """Zero-shot classification accuracy of ``backend`` with its current weights.

    Engine: `medkt.evaluation.ZeroShotEvaluator` (images decoded with the backend's own
    preprocessing, streamed in batches; only embeddings are kept).

    Args:
        images: one of
            * a folder with one sub-folder per class (``DIR/<class>/<image>``, PNG/JPEG/DICOM/...;
              the sub-folder name is the label),
            * a medkt manifest (CSV/JSONL: ``path,label[,mask,split,sha256]``; ``root``, ``split``
              and ``skip_bad`` apply),
            * an ``(N, C, S, S)`` [0, 1] tensor or a list of image paths/arrays, with ``labels``.
        classes: class -> prompts (all classes, in output order), or a list of class names
            turned into prompts with ``templates`` (default: the name itself).
        labels: the class of each image (only with a tensor or a list).
        templates: e.g. ``["a chest x-ray with {}"]`` when ``classes`` is a list of names.
        aggregate: ``"mean"`` (CLIP's prompt-embedding ensemble), ``"mean_similarity"`` or ``"max"``.
    Returns:
        `ClassificationResult`: ``accuracy`` and ``per_class`` (fractions), ``scores``
        ``(N, K)``, ``confusion`` ``(K, K)``, ``auroc(cls)``, ``to_dict()``.
    """
    return zero_shot_evaluator(backend, images, classes, labels=labels, templates=templates, root=root, split=split,
                               aggregate=aggregate, batch_size=batch_size, num_workers=num_workers,
                               skip_bad=skip_bad, progress=progress).evaluate()


# -- segmentation ---------------------------------------------------------------------------------


def _m2ib(backend: Backend, config: M2IBConfig | Mapping[str, Any] | None, seed: int):
    from dataclasses import replace

    from medkt.segmentation.m2ib import M2IB

    cfg = config if isinstance(config, M2IBConfig) else M2IBConfig(**dict(config or {}))
    return M2IB(backend, replace(cfg, seed=seed))


def saliency(backend: Backend, image: str | Path | np.ndarray, prompt: str, *,
             config: M2IBConfig | Mapping[str, Any] | None = None, seed: int = 0) -> np.ndarray:
    """M2IB saliency map of one image for a descriptive ``prompt`` (which pixels the model finds
    the prompt in).

    Engine: `medkt.segmentation.m2ib.M2IB` through
    `medkt.segmentation.pipeline.saliency_for_image` (the image is padded to a square and
    resized for the model; the map is cropped back to the image).

    Args:
        image: an image file or an ``(H, W)`` / ``(H, W, 3)`` array in [0, 1].
        config: `M2IBConfig` or a dict of its fields (``layer``, ``beta``, ``steps``, ...).
    Returns:
        ``(H, W)`` float array in [0, 1] in the image's own geometry.
    """
    from medkt.segmentation.pipeline import saliency_for_image

    return saliency_for_image(_m2ib(backend, config, seed), _read_image(image), prompt, seed)


def _read_image(image: str | Path | np.ndarray) -> np.ndarray:
    if isinstance(image, (str, Path)):
        from medkt.data.readers import read_image

        return read_image(image)
    return np.asarray(image, dtype=np.float32)


@dataclass
class SegmentationResult:
    """Zero-shot segmentation of an image set: per-image predictions and, where ground truth
    exists, scores.

    ``masks``/``saliency``/``boxes`` are keyed by image name (file stem) and cover every image:
    predicted boolean ``(H, W)`` masks, ``(H, W)`` [0, 1] saliency maps and ``(K, 4)``
    ``[x0, y0, x1, y1]`` SAM box prompts in pixels. ``scores`` holds DSC / NSD / IoU (fractions)
    of the images that have a ground-truth mask only (``n_scored`` of ``n_images``).
    ``mode`` is ``"sam"`` or ``"saliency-only"`` (no SAM: the post-processed saliency is the
    prediction). ``images`` / ``truth``: the images as segmented and their masks (None: unlabelled).
    """

    mode: str
    prompt: str
    masks: dict[str, np.ndarray]
    saliency: dict[str, np.ndarray]
    boxes: dict[str, np.ndarray]
    scores: ScoreTable
    seconds_per_image: dict[str, float] = field(default_factory=dict)
    empty_saliency: int = 0
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    truth: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)

    @property
    def n_images(self) -> int:
        """Images segmented."""
        return len(self.masks)

    @property
    def n_scored(self) -> int:
        """Images scored (those with a ground-truth mask)."""
        return len(self.scores)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: mode, prompt, ``n_images``, ``n_scored``, ``unscored`` (names), mean and
        per-image DSC/NSD/IoU of the scored images (``mean`` null when none is), seconds per image
        and stage."""
        table = self.scores.to_dict()
        scored = set(self.scores.names)
        return {"mode": self.mode, "prompt": self.prompt, "n_images": self.n_images, "n_scored": self.n_scored,
                "unscored": [n for n in self.masks if n not in scored],
                "mean": table["mean"] if self.n_scored else None, "per_image": table["per_image"],
                "seconds_per_image": dict(self.seconds_per_image), "empty_saliency": self.empty_saliency}

    def save_masks(self, folder: str | Path) -> Path:
        """Write every predicted mask as ``<name>.png`` (0/255) into ``folder``; returns it."""
        from medkt.segmentation.overlays import save_png

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name, m in self.masks.items():
            save_png(out / f"{name}.png", np.asarray(m, dtype=bool).astype(np.uint8) * 255)
        return out

    def save_saliency(self, folder: str | Path) -> Path:
        """Write every saliency map as ``<name>.png`` (``jet`` colours) into ``folder``; returns it."""
        from medkt.segmentation.overlays import saliency_rgb, save_png

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name, sal in self.saliency.items():
            save_png(out / f"{name}.png", saliency_rgb(sal))
        return out

    def save_overlays(self, folder: str | Path) -> Path:
        """Write ``<name>.png`` per image into ``folder``: the image with its saliency, boxes
        (yellow), predicted outline (green) and true outline (red, where known); returns it."""
        from medkt.segmentation.overlays import overlay_rgb, save_png

        if not self.images:
            raise ConfigError("this result holds no images to draw on (made without them)")
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name, pred in self.masks.items():
            save_png(out / f"{name}.png", overlay_rgb(self.images[name], self.saliency[name], pred, self.boxes[name],
                                                      self.truth.get(name)))
        return out

    def save(self, folder: str | Path) -> Path:
        """Write everything into ``folder``: ``masks/``, ``saliency/``, ``overlays/`` (one PNG per
        image), ``metrics.csv`` (the scored images; only when some are) and ``results.json``
        (`to_dict`); returns the folder."""
        import json

        from medkt.utils import atomic_write_text

        out = Path(folder)
        self.save_masks(out / "masks")
        self.save_saliency(out / "saliency")
        if self.images:
            self.save_overlays(out / "overlays")
        if self.n_scored:
            self.scores.write_csv(out / "metrics.csv")
        atomic_write_text(out / "results.json", json.dumps(self.to_dict(), indent=2, allow_nan=False))
        return out


def _segmentation_data(images: str | Path | Sequence[str | Path],
                       masks: str | Path | Sequence[str | Path | None] | None,
                       root: str | Path | None, split: str | None) -> dict[str, Any]:
    """The ``data`` config of `medkt.segmentation.pipeline.load_samples` for `segment`'s inputs."""
    from medkt.segmentation.pipeline import IMAGE_SUFFIXES

    if not isinstance(images, (str, Path)):
        listed = list(images)
        if masks is not None and not isinstance(masks, (str, Path)):
            masks = [str(m) if m is not None else None for m in masks]
        return {"images": [str(p) for p in listed], "masks": str(masks) if isinstance(masks, (str, Path)) else masks}
    path = Path(images)
    if path.is_dir():
        return {"images": str(path), "masks": None if masks is None else str(masks)}
    if not path.exists():
        raise DataError(f"not found: {path} (expected a folder of images, image files or a manifest)")
    if path.name.lower().endswith(IMAGE_SUFFIXES):  # one image
        if isinstance(masks, (str, Path)) and Path(masks).is_file():
            masks = [str(masks)]
        return {"images": [str(path)], "masks": str(masks) if isinstance(masks, (str, Path)) else masks}
    if masks is not None:
        raise ConfigError(f"{path} is a manifest: its 'mask' column names the masks; drop masks=")
    return {"manifest": str(path), "split": split, **({"root": str(root)} if root is not None else {})}


def segment(backend: Backend, images: str | Path | Sequence[str | Path], prompt: str, *,
            masks: str | Path | Sequence[str | Path | None] | None = None, sam: Any = None,
            saliency_config: M2IBConfig | Mapping[str, Any] | None = None,
            postprocess: Mapping[str, Any] | None = None, nsd_tolerance: float = 2.0, root: str | Path | None = None,
            split: str | None = None, max_images: int | None = None, seed: int = 0, progress: bool = True
            ) -> SegmentationResult:
    """Zero-shot segmentation from a text prompt (MedCLIP-SAMv2 style: M2IB saliency -> k-means
    + largest components -> boxes -> SAM), scored where ground-truth masks exist.

    Engine: `medkt.segmentation.pipeline.load_samples` and
    `medkt.segmentation.pipeline.segment_samples` (what the ``seg_*`` bundles run).

    Args:
        images: a folder of images, a list of image files (or one file), or a medkt manifest
            (``root`` / ``split`` apply; rows without a ``mask`` are unlabelled). NIfTI volumes are
            cut into axial slices: those with a mask, or every slice with anatomy when unlabelled.
        prompt: one descriptive sentence used for every image.
        masks: ground truth, optional: a folder of masks named like the images (images without
            one are segmented, not scored; a mask without an image is an error), or a list
            parallel to a list of images (None entries: unlabelled).
        sam: a SAM checkpoint path (``"/models/sam_vit_b_01ec64.pth"``: the type is read from
            the file), ``"vit_b@PATH"`` (vit_l / vit_h), ``"tiny@random"`` (tests), or a loaded
            `SamSegmenter`; None = saliency-only. A spec is loaded
            on the backend's device.
        saliency_config: `M2IBConfig` or a dict of its fields.
        postprocess: options of `medkt.segmentation.postprocess.postprocess_saliency`
            (``method``, ``n_components``, ...).
        nsd_tolerance: NSD boundary tolerance in pixels.
        max_images: segment only the first N images.
    Returns:
        `SegmentationResult` (``n_scored`` of ``n_images`` scored; ``save(folder)``
        writes masks, saliency maps, overlays, scores).
    """
    from medkt.segmentation.pipeline import load_samples, segment_samples

    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the segmentation prompt must be a non-empty descriptive sentence")
    segmenter = None
    if sam is not None and sam != "":
        from medkt.segmentation.sam import SamSegmenter

        # SAM first: a bad checkpoint fails before any image is read
        segmenter = sam if isinstance(sam, SamSegmenter) else SamSegmenter.from_spec(sam, device=str(backend.device))
    samples = load_samples({**_segmentation_data(images, masks, root, split), "max_images": max_images},
                           require_masks=False)
    cfg = saliency_config if isinstance(saliency_config, M2IBConfig) else M2IBConfig(**dict(saliency_config or {}))
    from dataclasses import asdict

    run = segment_samples(backend, samples, prompt.strip(), asdict(cfg), dict(postprocess or {}), segmenter,
                          {"nsd_tolerance": nsd_tolerance}, seed, progress)
    per = run["per"]
    return SegmentationResult("sam" if segmenter is not None else "saliency-only", prompt.strip(),
                              {n: p["pred"] for n, p in per.items()}, {n: p["saliency"] for n, p in per.items()},
                              {n: p["boxes"] for n, p in per.items()}, run["table"], run["times"],
                              run["empty_saliency"], images={s.name: s.image for s in samples},
                              truth={s.name: s.mask for s in samples})


def score_masks(pred: str | Path | Mapping[str, Any] | np.ndarray, truth: str | Path | Mapping[str, Any] | np.ndarray,
                *, nsd_tolerance: float = 2.0, spacing: Sequence[float] | None = None,
                resize_pred: bool = False) -> ScoreTable:
    """DSC, NSD and IoU of predicted masks against ground truth (fractions in [0, 1]).

    Engine: `medkt.segmentation.metrics` (MONAI metrics; both masks empty scores 1, exactly
    one empty scores 0).

    Args:
        pred, truth: two folders of mask images matched by file name
            (`score_folders`), two dicts name -> ``(H, W)`` mask,
            or two single ``(H, W)`` masks (row name ``"mask"``). Any name in only one of them is
            an error.
        nsd_tolerance: NSD boundary tolerance, pixels (or mm when ``spacing`` is given).
        spacing: pixel size ``(row_mm, col_mm)``.
        resize_pred: nearest-resize predictions to the truth's shape (folders only).
    Returns:
        `ScoreTable`: ``names``, ``rows`` (per-image scores), ``means()``, ``to_csv()``.
    """
    from medkt.segmentation.metrics import score_folders, segmentation_scores

    if isinstance(pred, (str, Path)) and isinstance(truth, (str, Path)):
        return score_folders(pred, truth, nsd_tolerance=nsd_tolerance, spacing=spacing, resize_pred=resize_pred)
    if isinstance(pred, Mapping) and isinstance(truth, Mapping):
        if set(pred) != set(truth):
            raise DataError(f"prediction and truth names differ: only predicted {sorted(set(pred) - set(truth))[:3]}, "
                            f"only in truth {sorted(set(truth) - set(pred))[:3]}")
        pairs = [(n, pred[n], truth[n]) for n in sorted(pred)]
    elif not isinstance(pred, (str, Path, Mapping)) and not isinstance(truth, (str, Path, Mapping)):
        pairs = [("mask", pred, truth)]
    else:
        raise ConfigError("pred and truth must be of the same kind: two folders, two dicts or two arrays")
    table = ScoreTable()
    for name, p, t in pairs:
        table.add(name, segmentation_scores(p, t, nsd_tolerance=nsd_tolerance, spacing=spacing))
    return table


__all__ = [
    "Backend", "ClassificationResult", "Concept", "FinetuneConfig", "FinetuneResult", "InversionConfig",
    "InversionResult", "M2IBConfig", "Recipe", "ScoreTable", "SegmentationResult", "TransferResult",
    "ZeroShotEvaluator", "create_backend", "evaluate_zero_shot", "fine_tune", "invert", "list_backends",
    "load_finetuned", "recipe_defaults", "register_backend", "saliency", "save_finetuned", "score_masks", "segment",
    "transfer", "zero_shot_evaluator",
]
