"""Dataset preparers: a downloaded dataset folder -> a medkt manifest (``medkt data prepare``).

A preparer is ``fn(root: Path, **options) -> list[ManifestRow]`` registered under a name with
`register_preparer` (`PREPARERS`). Feature areas keep their preparers next to their
code; their modules are entry points of the group ``medkt.dataset_preparers`` (``pyproject.toml``),
imported only when a name is looked up or listed, so ``import medkt`` stays light:

* here: ``jsrt``, ``chexpert_5x200c``, ``imagefolder``;
* `medkt.segmentation.datasets`: UDIAT, BraTS, UnitoChest, SIIM;
* `medkt.natural.datasets`: the natural-image sets.
"""
from __future__ import annotations

import csv
import random
import re
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from medkt.data.manifest import ManifestRow, sha256_file, write_manifest
from medkt.errors import DataError
from medkt.registry import Registry

Preparer = Callable[..., list[ManifestRow]]

#: dataset preparers; feature areas' modules (segmentation, natural) register theirs when the
#: entry-point group ``medkt.dataset_preparers`` is loaded (on the first miss or listing)
PREPARERS: Registry[Preparer] = Registry("dataset", group="medkt.dataset_preparers")



def register_preparer(name: str) -> Callable[[Preparer], Preparer]:
    """Decorator: ``@register_preparer("udiat") def prepare_udiat(root: Path) -> list[ManifestRow]``
    (registers in `PREPARERS`)."""
    return PREPARERS.register(name)


def list_preparers() -> dict[str, str]:
    """name -> first line of the preparer's docstring."""
    return {n: (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "" for n, fn in sorted(PREPARERS.items())}


def get_preparer(name: str) -> Preparer:
    """The preparer registered as ``name`` (importing the feature areas' modules if needed); an
    unknown name is a `ConfigError` listing the known ones."""
    return PREPARERS.get(name)


#: files a preparer passed over as not images (`image_files`), collected by `prepare`
_skipped: ContextVar[list[Path] | None] = ContextVar("medkt_prepare_skipped", default=None)


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted; hidden folders left out), by
    `medkt.data.readers.is_image_file`. The other files (``DICOMDIR``, ``.txt``, hidden
    files ...) are left out and, inside `prepare`, reported as skipped."""
    from medkt.data.readers import is_image_file

    images, collector = [], _skipped.get()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]):
            continue
        if is_image_file(p):
            images.append(p)
        elif collector is not None:
            collector.append(p)
    return images


def prepare(name: str, root: str | Path, out: str | Path | None = None, *, sha256: bool = False,
            skipped: list[Path] | None = None, **options: Any) -> Path:
    """Build the manifest of dataset ``name`` from its downloaded copy under ``root``.

    Args:
        out: manifest path (``.csv`` or ``.jsonl``); default ``<root>/<name>.csv``. Written
            atomically, only after every row was checked.
        sha256: fill the ``sha256`` column (lets ``read_manifest(verify_hashes=True)`` detect
            changed files).
        skipped: when a list is given, the files the preparer passed over as not images
            (``DICOMDIR``, ``.txt``, hidden files) are appended to it.
        options: preparer-specific keywords (e.g. ``seed``, ``n_per_class``).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; pass the folder you downloaded {name!r} into")
    fn = get_preparer(name)
    collected: list[Path] = []
    token = _skipped.set(collected)
    try:
        rows = fn(root, **options)
    finally:
        _skipped.reset(token)
    if skipped is not None:
        skipped.extend(collected)
    if not rows:
        raise DataError(f"no images found for {name!r} under {root}; see data_manifests/ for the expected layout")
    for r in rows:
        full = root / r.path
        if not full.is_file():
            raise DataError(f"{name}: listed image is missing: {full}")
        if sha256:
            r.sha256 = sha256_file(full)
    out = Path(out) if out is not None else root / f"{name}.csv"
    return write_manifest(rows, out)


def _relative(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def _find_files(root: Path, pattern: re.Pattern[str]) -> dict[str, Path]:
    """Stem (upper-case) -> path of files whose name matches ``pattern`` anywhere under ``root``."""
    found: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and pattern.fullmatch(p.name):
            found.setdefault(p.name.split(".")[0].upper(), p)
    return found


# -- JSRT -------------------------------------------------------------------------------------
JSRT_LABELS = {"malignant": "lung cancer", "benign": "benign nodule"}


@register_preparer("jsrt")
def prepare_jsrt(root: Path, include_non_nodule: bool = False) -> list[ManifestRow]:
    """JSRT: 154 nodule radiographs (JPCLN*.IMG) labelled 'lung cancer' / 'benign nodule'.

    Labels come from the clinical data file shipped with the database (``CLNDAT_EN.txt``; any
    text file whose lines name ``JPCLNnnn`` together with ``malignant`` or ``benign`` is read).
    Images may be the original raw ``.IMG`` files or converted copies (PNG/JPEG/DICOM) with the
    same stem. ``include_non_nodule`` adds the 93 ``JPCNN*`` images as 'non-nodule'.
    """
    images = _find_files(root, re.compile(r"JPC(LN|NN)\d{3}\.(img|png|jpg|jpeg|dcm)", re.IGNORECASE))
    labels: dict[str, str] = {}
    for txt in sorted(list(root.rglob("*.txt")) + list(root.rglob("*.TXT")) + list(root.rglob("*.csv"))):
        try:
            lines = txt.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = re.search(r"JPCLN\d{3}", line, re.IGNORECASE)
            if not m:
                continue
            words = {w.lower() for w in re.split(r"[\s,;\t]+", line)}
            kind = "malignant" if "malignant" in words else "benign" if "benign" in words else None
            if kind:
                labels.setdefault(m.group(0).upper(), JSRT_LABELS[kind])
    if not images:
        raise DataError(f"no JSRT images (JPCLN001.IMG ...) under {root}; see data_manifests/jsrt.md")
    nodules = sorted(k for k in images if k.startswith("JPCLN"))
    if not labels:
        raise DataError(
            f"{len(nodules)} JSRT nodule images under {root} but no clinical data file (CLNDAT_EN.txt) naming "
            "them benign or malignant; it ships with the JSRT database: put it under the data root"
        )
    unlabelled = [k for k in nodules if k not in labels]
    if unlabelled:
        raise DataError(f"JSRT images without a benign/malignant entry in the clinical data: {unlabelled[:5]}"
                        f"{' ...' if len(unlabelled) > 5 else ''} ({len(unlabelled)} in all)")
    rows = [ManifestRow(_relative(images[k], root), labels[k], split="test") for k in nodules]
    if include_non_nodule:
        rows += [ManifestRow(_relative(images[k], root), "non-nodule", split="test")
                 for k in sorted(images) if k.startswith("JPCNN")]
    return rows


# -- CheXpert-5x200c --------------------------------------------------------------------------
CHEXPERT_FINDINGS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
CHEXPERT_5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


@register_preparer("chexpert_5x200c")
def prepare_chexpert_5x200c(root: Path, n_per_class: int = 200, seed: int = 0, csv_name: str = "train.csv") -> list[ManifestRow]:
    """CheXpert-5x200c: 200 frontal images per class, positive for exactly one of 13 findings.

    The split MedCLIP used was never released (MedCLIP issues #44, #48); this rebuilds it with the
    rule of GLoRIA's ``preprocess_chexpert_5x200_data``, which MedCLIP took over: CheXpert
    ``train.csv``, frontal views, blanks = 0, the class = 1 and every other finding except
    'No Finding' = 0 (uncertain -1 excludes the image), then ``n_per_class`` sampled per class --
    here with a seeded RNG (upstream's sampling is unseeded, so nobody's split is reproducible).
    """
    candidates = [root / csv_name] + sorted(root.glob(f"*/{csv_name}"))
    table = next((c for c in candidates if c.is_file()), None)
    if table is None:
        raise DataError(f"CheXpert {csv_name} not found in {root} or its sub-folders; pass the folder holding "
                        "CheXpert-v1.0(-small)/ (see data_manifests/chexpert_5x200c.md)")
    with table.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        needed = ["Path", "Frontal/Lateral", *[f for f in CHEXPERT_FINDINGS if f != "No Finding"]]
        missing = [c for c in needed if c not in cols]
        if missing:
            raise DataError(f"{table}: not a CheXpert label table, missing columns {missing}")
        records = list(reader)

    def value(rec: dict, col: str) -> float:
        v = (rec.get(col) or "").strip()
        return float(v) if v else 0.0

    others = [f for f in CHEXPERT_FINDINGS if f != "No Finding"]
    rng = random.Random(seed)
    rows: list[ManifestRow] = []
    for cls in CHEXPERT_5:
        pool = [r for r in records if r["Frontal/Lateral"] == "Frontal" and value(r, cls) == 1.0
                and all(value(r, o) == 0.0 for o in others if o != cls)]
        if len(pool) < n_per_class:
            raise DataError(f"{table}: only {len(pool)} frontal images exclusively positive for {cls!r}, "
                            f"{n_per_class} needed")
        for rec in rng.sample(pool, n_per_class):
            rows.append(ManifestRow(_chexpert_relative(rec["Path"], table, root), cls, split="test"))
    return rows


def _chexpert_relative(csv_path: str, table: Path, root: Path) -> str:
    """CheXpert paths start with the dataset folder (``CheXpert-v1.0-small/train/...``): drop that
    first component and resolve against the folder holding the label table (it may be renamed)."""
    p = Path(csv_path)
    full = table.parent / Path(*p.parts[1:]) if len(p.parts) > 1 else table.parent / p
    return _relative(full, root)


# -- generic ----------------------------------------------------------------------------------
@register_preparer("imagefolder")
def prepare_imagefolder(root: Path, split: str | None = None) -> list[ManifestRow]:
    """Any dataset laid out as ROOT/<label>/<image> (PNG, JPEG, DICOM, NIfTI, JSRT .IMG)."""
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in image_files(label_dir):  # not DICOMDIR, .txt, hidden files (reported by prepare)
            rows.append(ManifestRow(_relative(f, root), label_dir.name, split=split))
    return rows


__all__ = ["register_preparer", "list_preparers", "get_preparer", "prepare", "image_files", "prepare_jsrt",
           "prepare_chexpert_5x200c", "prepare_imagefolder"]
