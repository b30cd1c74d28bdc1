"""Zero-shot segmentation before/after knowledge transfer (paper Sec. 4.4.1, Tab. 4 / Tab. 7).

For every image: descriptive prompt + CLIP-like backend -> M2IB saliency -> post-processing
(k-means, largest components) -> one box per component -> SAM -> mask -> DSC / NSD / IoU.
The same is run with the original backend ("baseline") and after knowledge transfer
(inversion of the concept descriptions + fine-tuning of the visual encoder with the core engine),
so the table shows what the transfer changed.

Without a SAM checkpoint (``sam: null`` and no ``$MEDKT_SAM_CHECKPOINT``) the pipeline runs in
**saliency-only** mode: the post-processed saliency mask is the prediction; the report and
``results.json`` say so.

Data config (``data``):

    {"manifest": "udiat/manifest.csv",   # medkt manifest rows with a 'mask' column, or
     "images": "dir", "masks": "dir",    # two folders paired by sorted file stem (hard error on mismatch);
                                         # "images" may also be a list of files ("masks": a folder or a parallel list)
     "root": "...", "split": "test", "labels": ["lesion"], "max_images": null,
     "volume": {"labels": [1, 2, 3], "min_pixels": 1, "max_slices": null},  # NIfTI volumes only
     "mask_label": null, "mask_threshold": null}   # label maps / grey probability masks (see read_mask)

NIfTI rows whose image is a 3-D volume are expanded into their axial slices with tumour.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from medkt.errors import ConfigError, DataError
from medkt.pipelines.base import Pipeline, log
from medkt.segmentation.volumes import SliceSample, axial_tumour_slices, is_nifti
from medkt.utils import atomic_write_text
from medkt.config_model import Range, build, check_call, config_dataclass

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")


# -- data ------------------------------------------------------------------------------------------


def _stem(p: Path) -> str:
    n = p.name
    for suf in (".nii.gz",) + IMAGE_SUFFIXES:
        if n.lower().endswith(suf):
            return n[: -len(suf)]
    return p.stem


def read_mask_any(path: Path, label: int | None = None, threshold: float | None = None) -> np.ndarray:
    """Binary mask from PNG/JPEG/DICOM/2-D NIfTI (image files: encodings of
    `medkt.segmentation.metrics.read_mask`, with its ``label`` / ``threshold``)."""
    from medkt.segmentation.metrics import read_mask

    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        return read_mask(path, label=label, threshold=threshold)
    from medkt.data.readers import read_image

    arr = read_image(path)
    return (arr.max(-1) if arr.ndim == 3 else arr) > 0.5


def dicom_spacing(path: Path) -> tuple[float, float] | None:
    """(row, column) pixel spacing in mm of a DICOM file (``PixelSpacing`` or ``ImagerPixelSpacing``), or None."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        sp = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        return (float(sp[0]), float(sp[1])) if sp else None
    except Exception:  # spacing is optional: fall back to pixels
        return None


def _index_folder(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    found = {_stem(p): p for p in sorted(folder.iterdir()) if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)}
    return dict(sorted(found.items()))  # by stem


def _index_files(files: list[str | Path], what: str = "image") -> dict[str, Path]:
    """A list of files -> name -> path, in the given order; names are file stems, or the path
    below the files' common folder (``a__x``) when two files share a stem."""
    paths = [Path(f).expanduser() for f in files]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{what} not found: {p}" if not p.exists() else f"{what} {p} is not a file")
        if not p.name.lower().endswith(IMAGE_SUFFIXES):
            raise DataError(f"{p}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
    names = [_stem(p) for p in paths]
    if len(set(names)) != len(names):
        base = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
        names = [str(p.resolve().relative_to(base).parent / _stem(p)).replace(os.sep, "__") for p in paths]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"the same image is listed twice: {dup[:3]}")
    return dict(zip(names, paths))


def pair_images(images: str | Path | list[str | Path], masks: str | Path | list[str | Path | None] | None,
                require_masks: bool = True) -> list[tuple[str, Path, Path | None]]:
    """``(name, image, mask or None)`` for a folder or a list of image files and their masks,
    paired by file stem (sorted for folders; upstream zips unsorted listdirs).

    Args:
        images: a folder (its image files by sorted name) or a list of image files (in order).
        masks: a folder of masks with the images' file stems, a list of mask files (or None
            entries) parallel to a list of images, or None (no ground truth).
        require_masks: every image needs a mask (the bundles' evaluation); otherwise an image
            without one is segmented and not scored.
    Raises:
        DataError: a mask in a masks folder with no image in the images folder (a naming
            mistake), a missing mask when ``require_masks``, or unreadable paths.
    """
    listed = not isinstance(images, (str, Path))
    im = _index_files(list(images)) if listed else _index_folder(Path(images))
    if not im:
        raise DataError(f"no images found in {images}" if not listed else "the list of images is empty")
    where = "the listed images" if listed else str(images)
    if masks is None:
        if require_masks:
            raise ConfigError(f"{where}: ground-truth masks are needed here (a masks folder or a manifest with a "
                              "'mask' column)")
        return [(k, v, None) for k, v in im.items()]
    if not isinstance(masks, (str, Path)):
        ml = list(masks)
        if not listed or len(ml) != len(im):
            raise ConfigError(f"a list of masks must be parallel to a list of images: {len(ml)} mask(s) for "
                              f"{len(im) if listed else 'a folder of'} image(s)")
        found = {k: (Path(m).expanduser() if m is not None else None) for k, m in zip(im, ml)}
        for k, m in found.items():
            if m is not None and not m.is_file():
                raise DataError(f"mask of {im[k]} not found: {m}")
    else:
        ma = _index_folder(Path(masks))
        extra = sorted(set(ma) - set(im))
        if extra and not listed:  # a listed subset may leave masks unused; a folder pair may not
            raise DataError(f"images in {images} and masks in {masks} do not match by name: "
                            f"{len(extra)} mask(s) without image (e.g. {extra[:1]})")
        found = {k: ma.get(k) for k in im}
    missing = [k for k, m in found.items() if m is None]
    if missing and require_masks:
        raise DataError(f"images in {where} and masks in {masks if isinstance(masks, (str, Path)) else 'the list'} "
                        f"do not match by name: {len(missing)} image(s) without mask (e.g. {missing[:1]})")
    if missing and len(missing) < len(found):
        log.info("%d of %d image(s) have no ground-truth mask: segmented, not scored", len(missing), len(found))
    elif missing:
        log.warning("none of the %d image(s) has a mask in %s (masks are matched by file name): nothing is scored",
                    len(found), masks if isinstance(masks, (str, Path)) else "the list")
    return [(k, im[k], found[k]) for k in im]


@config_dataclass
class VolumeOptions:
    """``data#volume``: how 3-D NIfTI volumes become 2-D samples (axial slices with tumour)."""

    labels: list[int] | None = None  # label values counted as tumour (None: any non-zero)
    min_pixels: Annotated[int, Range(ge=1)] = 1
    max_slices: Annotated[int, Range(ge=1)] | None = None


@config_dataclass
class SegmentationData:
    """The ``data`` option of `SegmentationTransferPipeline` (module docstring). Mask
    files are read as `medkt.segmentation.metrics.read_mask` says: 0/1 or 0/255 as they
    are; a label map needs ``mask_label``, a grey probability map ``mask_threshold``."""

    manifest: str | None = None
    images: str | list[str] | None = None  # a folder or a list of image files
    masks: str | list[str | None] | None = None  # a folder, or a list parallel to a list of images
    root: str | None = None
    split: str | None = None
    labels: list[str] | None = None  # manifest labels kept
    max_images: Annotated[int, Range(ge=1)] | None = None
    volume: VolumeOptions | None = None
    mask_label: int | None = None
    mask_threshold: Annotated[float, Range(0, 1)] | None = None

    def validate(self, path: str = "data") -> None:
        """Require a ``manifest`` or both ``images`` and ``masks`` folders (`ConfigError` otherwise)."""
        if self.manifest is None and (self.images is None or self.masks is None):
            raise ConfigError(f"{path}: needs 'manifest' or 'images' + 'masks'", key=path)


@config_dataclass
class MetricOptions:
    """The ``metrics`` option: NSD tolerance in ``nsd_unit`` (``mm`` needs the pixel spacing)."""

    nsd_tolerance: Annotated[float, Range(ge=0)] = 2.0
    nsd_unit: Literal["px", "mm"] = "px"


def load_samples(data: dict[str, Any], require_masks: bool = True) -> list[SliceSample]:
    """All 2-D samples of a data config (see module docstring).

    ``images`` may be a folder or a list of image files. With ``require_masks=False`` (the
    `medkt.segment` API) images without a ground-truth mask are kept, their ``mask`` None:
    no masks, a masks folder that lacks some names, manifest rows without a ``mask``; an
    unlabelled NIfTI volume gives every axial slice with image content.
    """
    from medkt.data.readers import read_image

    vol = dict(data.get("volume") or {})
    pairs: list[tuple[str, Path, Path | None]] = []
    if data.get("manifest") is not None:
        from medkt.data.manifest import read_manifest, safe_join

        manifest = Path(data["manifest"])
        root = Path(data.get("root") or manifest.parent)
        rows = read_manifest(manifest, root, split=data.get("split"))
        keep = data.get("labels")
        rows = [r for r in rows if keep is None or r.label in keep]
        for r in rows:
            if r.mask is None and require_masks:
                raise DataError(f"{manifest}: row {r.path!r} has no mask; segmentation needs the 'mask' column")
            pairs.append((_stem(Path(r.path)), safe_join(root, r.path),
                          safe_join(root, r.mask) if r.mask is not None else None))
        names = [p[0] for p in pairs]
        if len(set(names)) != len(names):  # same stem in different folders: use the relative path
            pairs = [(str(Path(r.path).with_suffix("")).replace(os.sep, "__"), a, b) for r, (_, a, b) in zip(rows, pairs)]
    elif data.get("images") is not None and (data.get("masks") is not None or not require_masks):
        pairs = pair_images(data["images"], data.get("masks"), require_masks=require_masks)
    else:
        raise ConfigError(f"data config needs 'manifest' or 'images'+'masks', got keys {sorted(data)}")
    max_images = data.get("max_images")
    samples: list[SliceSample] = []
    for name, img_path, mask_path in pairs:
        if is_nifti(img_path) and _is_volume(img_path):
            samples.extend(axial_tumour_slices(img_path, mask_path, name=name,
                                               labels=tuple(vol["labels"]) if vol.get("labels") else None,
                                               min_pixels=int(vol.get("min_pixels", 1)),
                                               max_slices=vol.get("max_slices")))
        else:
            image = read_image(img_path)
            mask = None
            if mask_path is not None:
                mask = read_mask_any(mask_path, label=data.get("mask_label"), threshold=data.get("mask_threshold"))
                if mask.shape != image.shape[:2]:
                    raise DataError(f"{name}: mask {mask_path} has shape {mask.shape}, image {img_path} has {image.shape[:2]}")
            spacing = dicom_spacing(img_path) if img_path.suffix.lower() == ".dcm" else None
            samples.append(SliceSample(name, image, mask, spacing, str(img_path)))
        if max_images is not None and len(samples) >= int(max_images):
            samples = samples[: int(max_images)]
            break
    if not samples:
        raise DataError("no images to segment (empty manifest, label filter, or no tumour slices)")
    return samples


def _is_volume(path: Path) -> bool:
    import nibabel as nib

    shape = nib.load(str(path)).shape
    return len(shape) >= 3 and shape[2] > 1


# -- one stage: segment every sample -----------------------------------------------------------------


def saliency_for_image(m2ib, image: np.ndarray, prompt: str, seed: int) -> np.ndarray:
    """M2IB saliency of an ``(H, W[, 3])`` [0, 1] image in the image's own geometry.

    The backend sees the image zero-padded to a square and resized (``to_model_pixels``); the
    token map is upsampled to the padded square, cropped back to the image and min-max normalised.
    """
    from medkt.data.images import to_model_pixels
    from medkt.segmentation.m2ib import upsample_normalize

    b = m2ib.backend
    h, w = image.shape[:2]
    x = to_model_pixels(image, size=b.image_size, channels=b.image_channels)
    token_kl = m2ib.explain(x, prompt, seed=seed).token_kl
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant maps are handled by the crop's normalisation
        full = upsample_normalize(token_kl, (s, s))
    crop = full[top : top + h, left : left + w]
    lo, hi = float(crop.min()), float(crop.max())
    return (crop - lo) / (hi - lo) if hi > lo else np.zeros_like(crop)


def segment_samples(backend, samples: list[SliceSample], prompt: str, m2ib_cfg: dict, post_cfg: dict,
                    sam_segmenter, metric_cfg: dict, seed: int, progress: bool = True) -> dict[str, Any]:
    """Run saliency -> post-processing -> SAM (or saliency-only) -> metrics on every sample.

    Samples without a mask are segmented and not scored: their ``per[name]["scores"]`` is None
    and the ``table`` holds the scored ones only.
    """
    from medkt.segmentation.m2ib import M2IB, M2IBConfig
    from medkt.segmentation.metrics import ScoreTable, segmentation_scores
    from medkt.segmentation.postprocess import EmptySaliencyWarning, postprocess_saliency

    m2ib = M2IB(backend, M2IBConfig(**{"seed": seed, **m2ib_cfg}))
    table = ScoreTable()
    per: dict[str, dict[str, Any]] = {}
    times = {"saliency": [], "postprocess": [], "sam": [], "metrics": []}
    n_empty = 0
    tol = float(metric_cfg.get("nsd_tolerance", 2.0))
    unit = metric_cfg.get("nsd_unit", "px")
    from medkt.progress import track

    for smp in track(samples, "segment", unit="img", enabled=progress):
        t0 = time.perf_counter()
        sal = saliency_for_image(m2ib, smp.image, prompt, seed)
        t1 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EmptySaliencyWarning)
            post = postprocess_saliency(sal, **post_cfg)
        if any(issubclass(w.category, EmptySaliencyWarning) for w in caught):
            n_empty += 1
            log.warning("%s: empty saliency mask; predicting an empty mask", smp.name)
        t1b = time.perf_counter()
        pred = sam_segmenter.segment(smp.image, post.boxes) if sam_segmenter is not None else post.mask
        t2 = time.perf_counter()
        scores = None
        if smp.mask is not None:  # unlabelled images are segmented, not scored
            spacing = smp.spacing if unit == "mm" else None
            if unit == "mm" and smp.spacing is None:
                raise ConfigError(f"nsd_unit 'mm' needs the pixel spacing, unknown for {smp.name} (use 'px')")
            scores = segmentation_scores(pred, smp.mask, nsd_tolerance=tol, spacing=spacing)
            table.add(smp.name, scores)
            times["metrics"].append(time.perf_counter() - t2)
        per[smp.name] = {"saliency": sal, "boxes": post.boxes, "pred": pred, "scores": scores}
        times["saliency"].append(t1 - t0)
        times["postprocess"].append(t1b - t1)
        times["sam"].append(t2 - t1b)  # 0 in saliency-only mode
    return {"table": table, "per": per, "times": {k: float(np.mean(v)) if v else 0.0 for k, v in times.items()},
            "empty_saliency": n_empty}


# -- the pipeline ------------------------------------------------------------------------------------


class SegmentationTransferPipeline(Pipeline):
    """MedCLIP-SAMv2-style zero-shot segmentation, baseline and after knowledge transfer.

    Args:
        backend: backend spec (any family with an M2IB vision split).
        data: data config (module docstring).
        prompt: the descriptive prompt given to M2IB (same for every image: no label leak).
        concepts: ``[{"name", "description", "n_images"}]`` transferred to the visual encoder.
        negative_captions: fine-tuning negatives (other findings of the modality).
        inversion / finetune: `InversionConfig` /
            `FinetuneConfig` options (``finetune.lr`` = Tab. 7's lr).
        m2ib: `M2IBConfig` options (layer, beta, steps, ...).
        postprocess: `postprocess_saliency` options.
        sam: a SAM checkpoint path (``/models/sam_vit_b_01ec64.pth``: the type is read from the
            file) or ``vit_h@PATH`` (vit_b/vit_l; ``tiny@...`` for tests), see
            `medkt.segmentation.sam`; None -> ``$MEDKT_SAM_CHECKPOINT``, else saliency-only.
            Checked before any folder is made and loaded before the backend.
        sam_model_type: the type the checkpoint must have (``vit_b``/``vit_l``/``vit_h``); None
            (default) reads it from the file. A contradiction is an error naming the file's type.
        sam_options: ``multimask_output`` (False), ``top_k`` (1).
        metrics: ``nsd_tolerance`` (2.0) and ``nsd_unit`` (``"px"``, or ``"mm"`` when spacing is known).
        stages: ``["baseline", "transfer"]`` (default) or one of them.
        unlabeled: an unlabeled pool of scans of the modality for the transfer (``--set unlabeled=PATH``:
            a folder or a manifest whose labels are never read; `medkt.spine.transfer`): the pool
            inversion priors and fine-tuning controls read it.
        self_training: self-training rounds on the pool (`medkt.self_training`; needs ``unlabeled``).
        save_masks: write predicted and true masks as PNG (``masks/<stage>/``, ``masks/gt/``).
    """

    kind = "segmentation_transfer"

    def __init__(self, backend: str, data: SegmentationData, prompt: str, concepts: list[dict[str, Any]] | None = None,
                 negative_captions: list[str] | None = None, inversion: dict | None = None, finetune: dict | None = None,
                 m2ib: dict | None = None, postprocess: dict | None = None, sam: str | None = None,
                 sam_model_type: str | None = None, sam_options: dict | None = None, metrics: MetricOptions | None = None,
                 stages: list[str] | None = None, save_masks: bool = True, unlabeled: str | dict[str, Any] | None = None,
                 self_training: dict[str, Any] | None = None, **kw: Any):
        super().__init__(**kw, backend=backend, data=data, prompt=prompt, concepts=concepts,
                         negative_captions=negative_captions, inversion=inversion, finetune=finetune, m2ib=m2ib,
                         postprocess=postprocess, sam=sam, sam_model_type=sam_model_type, sam_options=sam_options,
                         metrics=metrics, stages=stages, **({"unlabeled": unlabeled} if unlabeled is not None else {}),
                         **({"self_training": self_training} if self_training is not None else {}))
        from medkt.segmentation.m2ib import M2IBConfig
        from medkt.spine import TransferStep
        from medkt.segmentation.postprocess import postprocess_saliency

        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("the segmentation prompt must be a non-empty descriptive sentence")
        self.backend_spec = backend
        self.data = dict(data)
        self.prompt = prompt.strip()
        self.stages = list(stages or ["baseline", "transfer"])
        bad = [s for s in self.stages if s not in ("baseline", "transfer")]
        if bad or not self.stages:
            raise ConfigError(f"stages must be a non-empty subset of ['baseline', 'transfer'], got {self.stages}")
        if (unlabeled is not None or self_training is not None) and "transfer" not in self.stages:
            raise ConfigError("unlabeled / self_training feed the transfer stage: add \"transfer\" to stages or drop them")
        self.step = (TransferStep(concepts or [], inversion, finetune, seed=self.seed, unlabeled=unlabeled,
                                  self_training=self_training) if "transfer" in self.stages else None)
        self.negative_captions = list(negative_captions or [])
        self.m2ib_cfg = dict(m2ib or {})
        # options are checked (unknown keys, types, ranges) before any compute, each by its declaration
        build(M2IBConfig, self.m2ib_cfg, "m2ib")
        self.post_cfg = dict(postprocess or {})
        check_call(postprocess_saliency, self.post_cfg, "postprocess", skip=("saliency",))
        postprocess_saliency(np.eye(4), **self.post_cfg)  # value rules of the post-processing itself
        from medkt.segmentation.sam import SAM_CHECKPOINT_ENV, SamSegmenter, resolve_sam_spec

        self.sam_spec = sam or os.environ.get(SAM_CHECKPOINT_ENV, "").strip() or None
        self.sam_model_type = sam_model_type
        if self.sam_spec:
            resolve_sam_spec(self.sam_spec, sam_model_type)  # an unknown or contradicting type name fails here

        check_call(SamSegmenter, sam_options or {}, "sam_options", skip=("sam",))
        self.sam_options = {"multimask_output": False, "top_k": 1, **(sam_options or {})}
        self.metric_cfg = {"nsd_tolerance": 2.0, "nsd_unit": "px", **(metrics or {})}  # checked by MetricOptions
        self.save_masks = bool(save_masks)

    def validate(self) -> None:
        """Check the SAM checkpoint (file, SAM layout, type) before any folder or model: about a
        second, where loading the backend first took ~20 s to reach a SAM error."""
        super().validate()
        if self.sam_spec:
            from medkt.segmentation.sam import inspect_sam

            inspect_sam(self.sam_spec, self.sam_model_type)

    @property
    def mode(self) -> str:
        """``"sam"`` when a SAM checkpoint is set, else ``"saliency-only"`` (saliency masks are the predictions)."""
        return "sam" if self.sam_spec else "saliency-only"

    def _run(self, out: Path) -> dict[str, Any]:
        from medkt.segmentation.sam import SamSegmenter

        from medkt.distributed import local_device

        # SAM first: a wrong checkpoint fails before the (slower) backend and the data are loaded
        segmenter = (SamSegmenter.from_spec(self.sam_spec, device=local_device(self.device),
                                            model_type=self.sam_model_type, **self.sam_options)
                     if self.sam_spec else None)
        if segmenter is None:
            log.warning("no SAM checkpoint: running SALIENCY-ONLY (post-processed saliency masks are the predictions)")
        samples = load_samples(self.data)
        log.info("%d image(s) to segment; mode: %s", len(samples), self.mode)
        backend = self.create_backend(self.backend_spec)
        self.sam_type = segmenter.model_type if segmenter is not None else None
        stage_runs: dict[str, dict[str, Any]] = {}
        results: dict[str, Any] = {"backend": self.backend_spec, "mode": self.mode, "sam": self.sam_spec,
                                   "sam_model_type": self.sam_type, "prompt": self.prompt, "n_images": len(samples),
                                   "stages": {}}

        def run_stage(stage: str) -> None:
            t = time.perf_counter()
            r = segment_samples(backend, samples, self.prompt, self.m2ib_cfg, self.post_cfg, segmenter,
                                self.metric_cfg, self.seed, self.progress)
            stage_runs[stage] = r
            r["table"].write_csv(out / f"metrics_{stage}.csv")
            if self.save_masks:
                self._write_masks(out / "masks" / stage, {n: p["pred"] for n, p in r["per"].items()})
            results["stages"][stage] = {"mean": r["table"].means(), "std": _stds(r["table"]),
                                        "seconds_per_image": r["times"], "empty_saliency": r["empty_saliency"],
                                        "seconds": time.perf_counter() - t}

        if "baseline" in self.stages:
            run_stage("baseline")
        if "transfer" in self.stages:
            results["transfer"] = self._transfer(backend, out)
            run_stage("transfer")
        if self.save_masks:
            self._write_masks(out / "masks" / "gt", {s.name: s.mask for s in samples})
        results["overlays"] = write_overlays(out / "overlays", samples, stage_runs)
        if "baseline" in stage_runs and "transfer" in stage_runs:
            mb, mt = results["stages"]["baseline"]["mean"], results["stages"]["transfer"]["mean"]
            results["delta"] = {k: mt[k] - mb[k] for k in mb}
        atomic_write_text(out / "metrics.md", self._table(results))
        atomic_write_text(out / "report.md", self._report(results))
        return results

    def _transfer(self, backend, out: Path) -> dict[str, Any]:
        r = self.step.run(backend, negatives=self.negative_captions, out_dir=out, resume=self.resume,
                          progress=self.progress, save_weights=False)
        s = r.summary()
        return {"inversion": s["inversion"], "finetune_lr": self.step.finetune.lr, "finetune_steps": s["finetune"]["steps"],
                "finetune_loss": [s["finetune"]["first_loss"], s["finetune"]["last_loss"]],
                "seconds_inversion": s["seconds_inversion"], "seconds_finetune": s["seconds_finetune"]}

    @staticmethod
    def _write_masks(folder: Path, masks: dict[str, np.ndarray]) -> None:
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        for name, m in masks.items():
            Image.fromarray(np.asarray(m, bool).astype(np.uint8) * 255).save(folder / f"{name}.png")

    def _table(self, results: dict[str, Any]) -> str:
        unit = self.metric_cfg["nsd_unit"]
        tol = self.metric_cfg["nsd_tolerance"]
        from medkt.utils import markdown_table

        keys = ("dsc", "nsd", "iou")
        rows = [[stage, *(f"{100 * r['mean'][k]:.2f} ± {100 * r['std'][k]:.2f}" for k in keys)]
                for stage, r in results["stages"].items()]
        if "delta" in results:
            rows.append(["change", *(f"{100 * results['delta'][k]:+.2f}" for k in keys)])
        return "\n".join(markdown_table(["stage", "DSC (%)", f"NSD@{tol:g}{unit} (%)", "IoU (%)"], rows)) + "\n"

    def _report(self, results: dict[str, Any]) -> str:
        mode = f"SAM ({results['sam_model_type']}, box prompts)" if self.sam_spec else \
            "**SALIENCY ONLY** (no SAM checkpoint: the post-processed saliency mask is the prediction)"
        lines = [f"# Zero-shot segmentation{': ' + self.bundle_name if self.bundle_name else ''}", "",
                 f"- backend: `{self.backend_spec}`", f"- mode: {mode}", f"- prompt: \"{self.prompt}\"",
                 f"- images: {results['n_images']}", f"- M2IB: {self.m2ib_cfg or 'defaults'}; post-processing: "
                 f"{self.post_cfg or 'k-means, 1 component'}", ""]
        if "transfer" in results:
            t = results["transfer"]
            lines += [f"- transfer: {', '.join(c.name for c in self.step.concepts)}; inversion {self.step.inversion.steps} steps "
                      f"({t['seconds_inversion']:.1f} s), fine-tuning lr {t['finetune_lr']:g}, {t['finetune_steps']} steps "
                      f"({t['seconds_finetune']:.1f} s)", ""]
        lines += ["## Metrics (mean ± std over images)", "", self._table(results),
                  "Empty ground truth and empty prediction count as 1.0; exactly one empty counts as 0.", ""]
        for stage, r in results["stages"].items():
            tt = r["seconds_per_image"]
            lines.append(f"- {stage}: per image saliency {tt['saliency']:.3f} s, post-processing {tt['postprocess']:.3f} s, "
                         f"SAM {tt['sam']:.3f} s, metrics {tt['metrics']:.3f} s; empty saliency masks: {r['empty_saliency']}")
        lines += ["", "## Best and worst cases", ""]
        for kind, info in results["overlays"].items():
            lines.append(f"### {kind}: {info['name']} (DSC {100 * info['dsc']:.1f}%)\n\n![{kind}]({info['file']})\n")
        lines.append("Per-image scores: `metrics_<stage>.csv`; all numbers: `results.json`.")
        return "\n".join(lines) + "\n"


def _stds(table) -> dict[str, float]:
    if not table.rows:
        return {k: float("nan") for k in ("dsc", "nsd", "iou")}
    return {k: float(np.std([r[k] for r in table.rows])) for k in ("dsc", "nsd", "iou")}


def write_overlays(folder: Path, samples: list[SliceSample], stage_runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Best and worst image (by DSC of the last stage): image, saliency, boxes, prediction, truth; a row per stage."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from medkt.utils import atomic_write_bytes

    if not stage_runs:
        return {}
    last = list(stage_runs)[-1]
    table = stage_runs[last]["table"]
    order = sorted(range(len(table.names)), key=lambda i: (table.rows[i]["dsc"], table.names[i]))
    picks = {"best": table.names[order[-1]], "worst": table.names[order[0]]}
    by_name = {s.name: s for s in samples}
    out: dict[str, Any] = {}
    for kind, name in picks.items():
        smp = by_name[name]
        img = smp.image if smp.image.ndim == 2 else smp.image.mean(-1)
        fig, axes = plt.subplots(len(stage_runs), 5, figsize=(12, 2.9 * len(stage_runs)), squeeze=False)
        for row, (stage, run) in enumerate(stage_runs.items()):
            p = run["per"][name]
            panels = [("image", img, None), ("saliency", img, p["saliency"]), ("boxes", img, None),
                      (f"prediction (DSC {100 * p['scores']['dsc']:.1f})", p["pred"], None), ("ground truth", smp.mask, None)]
            for col, (title, base, heat) in enumerate(panels):
                ax = axes[row, col]
                ax.imshow(base, cmap="gray", vmin=0, vmax=1)
                if heat is not None:
                    ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
                if col == 2:
                    for x0, y0, x1, y1 in p["boxes"]:
                        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
                ax.set_title(f"{stage}: {title}" if col == 0 else title, fontsize=8)
                ax.axis("off")
        fig.suptitle(f"{kind}: {name}", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        path = atomic_write_bytes(folder / f"{kind}_{name}.png", buf.getvalue())
        # relative to the run folder (the staging folder is renamed at the end)
        out[kind] = {"name": name, "file": f"{folder.name}/{path.name}", "dsc": table.rows[table.names.index(name)]["dsc"]}
    return out
