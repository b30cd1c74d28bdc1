"""Dataset manifests: one CSV (or JSONL) row per image.

Columns: ``path`` (relative to the data root), ``label``, optional ``mask`` (relative path of a
segmentation mask), optional ``split`` and optional ``sha256``. Paths may not escape the root.
"""
from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medkt.errors import DataError

COLUMNS = ("path", "label", "mask", "split", "sha256")


@dataclass
class ManifestRow:
    path: str
    label: str
    mask: str | None = None
    split: str | None = None
    sha256: str | None = None


def safe_join(root: Path, relative: str, *, where: str = "") -> Path:
    """``root / relative`` that refuses absolute paths and ``..`` escapes."""
    root = Path(root).resolve()
    full = (root / relative).resolve()
    if not full.is_relative_to(root):
        raise DataError(f"{where}path {relative!r} escapes the data root {root}; manifest paths must be relative to it")
    return full


def write_manifest(rows: Iterable[ManifestRow], path: str | Path) -> Path:
    """Write rows as CSV (``.csv``) or JSON lines (``.jsonl``), atomically."""
    from medkt.utils import atomic_write_text

    path = Path(path)
    rows = list(rows)
    if path.suffix == ".jsonl":
        text = "".join(json.dumps({k: v for k, v in asdict(r).items() if v is not None}) + "\n" for r in rows)
    else:
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
        text = buf.getvalue()
    atomic_write_text(path, text)
    return path


def read_manifest(
    path: str | Path,
    root: str | Path | None = None,
    *,
    classes: Sequence[str] | None = None,
    split: str | None = None,
    check_files: bool = True,
) -> list[ManifestRow]:
    """Read and validate a manifest.

    Args:
        root: data root the relative paths refer to (default: the manifest's folder).
        classes: when given, a label outside it is an error naming the row.
        split: keep only rows of this split.
        check_files: error on rows whose image (or mask) file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}; build one with 'medkt data prepare NAME --root DIR'")
    root = Path(root) if root is not None else path.parent
    names = {f.name for f in fields(ManifestRow)}
    raw: list[dict] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
    else:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "path" not in reader.fieldnames or "label" not in reader.fieldnames:
                raise DataError(f"{path}: a manifest needs the columns path,label (got {reader.fieldnames})")
            raw = list(reader)
    rows: list[ManifestRow] = []
    for i, rec in enumerate(raw, start=2 if path.suffix != ".jsonl" else 1):
        where = f"{path}:{i}: "
        rec = {k: (v if v not in ("", None) else None) for k, v in rec.items() if k in names}
        if not rec.get("path") or rec.get("label") is None:
            raise DataError(f"{where}row needs a path and a label")
        row = ManifestRow(**rec)
        if split is not None and row.split != split:
            continue
        if classes is not None and row.label not in classes:
            raise DataError(f"{where}label {row.label!r} is not one of the classes {list(classes)}")
        full = safe_join(root, row.path, where=where)
        if check_files and not full.is_file():
            raise DataError(f"{where}file not found: {full}")
        if row.mask is not None:
            mfull = safe_join(root, row.mask, where=where)
            if check_files and not mfull.is_file():
                raise DataError(f"{where}mask not found: {mfull}")
        rows.append(row)
    if classes is not None:
        present = {r.label for r in rows}
        empty = [c for c in classes if c not in present]
        if empty:
            raise DataError(f"{path}: no rows for class(es) {empty}; every class needs at least one image")
    return rows


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
