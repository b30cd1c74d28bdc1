"""Small shared utilities: seeding, threads, atomic file writes, run-folder locks."""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded the same way."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``), else
    by the classic set-and-restore."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over ``path``.

    The file gets the mode a plain ``open(path, "w")`` would give (``0o666`` minus the umask):
    ``mkstemp`` creates its temp files ``0o600``, which made results unreadable to a group.
    A read-only, full or over-quota disk is an `OutputDiskError` (one line
    naming the file); the previous content of ``path`` is left as it was.
    """
    from medkt.errors import disk_error

    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):  # a full disk may still allow the unlink; never mask exc
                Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and (err := disk_error(exc, path)) is not None:
            raise err from None
        raise
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """Lines of a GitHub Markdown table (the one table renderer of medkt's reports).

    Args:
        header: column titles.
        rows: one sequence of cells per row (``str()`` of each).
        align: one letter per column, ``"l"`` or ``"r"`` (right-aligned numbers); missing = left.
    """
    sep = ["---:" if align[i:i + 1] == "r" else "---" for i in range(len(header))]
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(sep) + "|",
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """`atomic_write_text` of ``obj`` as indented JSON (tensors, arrays and paths converted)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported (this module stays light)
    if torch is not None and isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class _OnceFilter:
    """A logging filter that lets each distinct message through once per process."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def filter(self, record: Any) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def log_once(logger_name: str) -> None:
    """Show each message of logger ``logger_name`` once per process (e.g. MONAI's
    "nvImageCodec is not available" warning, logged again by every ``LoadImage`` it builds)."""
    import logging

    lg = logging.getLogger(logger_name)
    if not any(isinstance(f, _OnceFilter) for f in lg.filters):
        lg.addFilter(_OnceFilter())
