"""Dataset manifests: one CSV (or JSONL) row per image.

Columns: ``path`` (relative to the data root), ``label``, optional ``mask`` (relative path of a
segmentation mask), optional ``split`` and optional ``sha256``. Paths may not escape the root.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medkt.errors import DataError

COLUMNS = ("path", "label", "mask", "split", "sha256")


@dataclass
class ManifestRow:
    """One image of a dataset: its path relative to the data root, its label, and optionally
    its mask path, split and sha256 (see the module docstring)."""

    path: str
    label: str
    mask: str | None = None
    split: str | None = None
    sha256: str | None = None
    #: where the row came from (``"manifest.csv:12"``), for error messages; never written out
    source: str | None = field(default=None, compare=False, repr=False)

    def to_record(self) -> dict[str, str | None]:
        """The row as written to a manifest: ``{column: value or None}`` for `COLUMNS`."""
        return {k: getattr(self, k) for k in COLUMNS}


@dataclass
class ManifestProblem:
    """A row skipped by ``read_manifest(..., skip_bad=True)`` (or by an image loader)."""

    where: str  # "manifest.csv:12"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


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
        text = "".join(json.dumps({k: v for k, v in r.to_record().items() if v is not None}) + "\n" for r in rows)
    else:
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.to_record().items()})
        text = buf.getvalue()
    atomic_write_text(path, text)
    return path


def read_records(path: str | Path, columns: Sequence[str] = ("path", "label")) -> list[dict[str, Any]]:
    """The raw records of a CSV or JSONL manifest (no row checks: `read_manifest` does them); a
    JSONL line that does not parse or a CSV without the ``columns`` (default ``path,label``) is a
    DataError."""
    path = Path(path)
    if path.suffix == ".jsonl":
        raw = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        return raw
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in columns):
            raise DataError(f"{path}: a manifest needs the columns {','.join(columns)} (got {reader.fieldnames})")
        return list(reader)


def read_manifest(
    path: str | Path,
    root: str | Path | None = None,
    *,
    classes: Sequence[str] | None = None,
    split: str | None = None,
    check_files: bool = True,
    skip_bad: bool = False,
    problems: list[ManifestProblem] | None = None,
    verify_hashes: bool = False,
) -> list[ManifestRow]:
    """Read and validate a manifest.

    Args:
        root: data root the relative paths refer to (default: the manifest's folder).
        classes: when given, a label outside it is an error naming the row.
        split: keep only rows of this split.
        check_files: error on rows whose image (or mask) file is missing.
        skip_bad: skip bad rows (missing file, label outside ``classes``, path escaping the
            root, missing fields) instead of raising; each skipped row is appended to
            ``problems`` when a list is given. A class left without rows is still an error.
        verify_hashes: check the ``sha256`` column (when filled) against the files.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}; build one with 'medkt data prepare NAME --root DIR'")
    root = Path(root) if root is not None else path.parent
    names = {f.name for f in fields(ManifestRow)}
    raw = read_records(path)
    rows: list[ManifestRow] = []
    first: dict[tuple[str, str | None], ManifestRow] = {}  # (image, mask) -> its first row
    for i, rec in enumerate(raw, start=2 if path.suffix != ".jsonl" else 1):
        where = f"{path}:{i}: "
        try:
            row = _check_row(rec, names, root, where, classes, split, check_files, verify_hashes)
            if row is not None:
                # the same image twice would be scored twice (and with two labels, contradict itself);
                # one image with two different masks stays allowed (two findings to segment)
                key = (os.path.realpath(root / row.path), row.mask)
                if key in first:
                    other = first[key]
                    labels = "" if other.label == row.label else f" with label {other.label!r}, here {row.label!r}"
                    raise DataError(f"{where}image {row.path} is listed twice (first at {other.source}{labels}); "
                                    "a duplicate would be counted twice: remove one row")
                first[key] = row
                row.source = f"{path}:{i}"
        except DataError as exc:
            if not skip_bad:
                raise
            if problems is not None:
                problems.append(ManifestProblem(f"{path}:{i}", str(exc)[len(where):] if str(exc).startswith(where) else str(exc)))
            continue
        if row is not None:
            rows.append(row)
    if classes is not None:
        present = {r.label for r in rows}
        empty = [c for c in classes if c not in present]
        if empty:
            raise DataError(f"{path}: no rows for class(es) {empty}; every class needs at least one image")
    return rows


def _check_row(rec: dict, names: set[str], root: Path, where: str, classes: Sequence[str] | None,
               split: str | None, check_files: bool, verify_hashes: bool = False) -> ManifestRow | None:
    """One raw record -> a validated row (None when filtered out by ``split``); raises DataError."""
    rec = {k: (v if v not in ("", None) else None) for k, v in rec.items() if k in names and k != "source"}
    if not rec.get("path") or rec.get("label") is None:
        raise DataError(f"{where}row needs a path and a label")
    row = ManifestRow(**rec)
    if split is not None and row.split != split:
        return None
    if classes is not None and row.label not in classes:
        raise DataError(f"{where}label {row.label!r} is not one of the classes {list(classes)}")
    full = safe_join(root, row.path, where=where)
    if check_files and not full.is_file():
        raise DataError(f"{where}file not found: {full}")
    if verify_hashes and row.sha256 and full.is_file() and sha256_file(full) != row.sha256.lower():
        raise DataError(f"{where}sha256 mismatch for {full}: the file differs from the one the manifest was built from")
    if row.mask is not None:
        mfull = safe_join(root, row.mask, where=where)
        if check_files and not mfull.is_file():
            raise DataError(f"{where}mask not found: {mfull}")
    return row


def readable_rows(rows: Sequence[ManifestRow], root: str | Path,
                  load: Callable[[Path], Any]) -> tuple[list[ManifestRow], list[ManifestProblem]]:
    """Decode every row's image once with ``load`` (e.g. ``backend.load_image``): the rows whose
    file is missing or unreadable (a `DataError`) come back as problems naming the row."""
    good, problems = [], []
    for r in rows:
        try:
            load(Path(root) / r.path)
        except DataError as exc:
            problems.append(ManifestProblem(r.source or r.path, str(exc)))
            continue
        good.append(r)
    return good, problems


def write_skipped(path: str | Path, problems: Sequence[ManifestProblem | str]) -> Path:
    """``path`` (e.g. ``RUN/skipped_images.txt``): one skipped image per line, ``where: why``."""
    from medkt.utils import atomic_write_text

    return atomic_write_text(path, "".join(f"{p}\n" for p in problems))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks (the manifest's ``sha256`` column)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
