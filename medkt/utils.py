"""Small shared utilities: seeding, threads, atomic file writes, run-folder locks."""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from collections.abc import Iterator
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
    A read-only, full or over-quota disk is an :class:`~medkt.errors.OutputDiskError` (one line
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


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
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


#: the lock file a process keeps in a run folder while it works in it (:func:`folder_lock`)
LOCK_NAME = ".medkt.lock"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, killed but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) said it exists


def lock_holder(folder: str | Path) -> tuple[int, str] | None:
    """``(pid, host)`` of the live process holding ``folder``'s lock, or None (no lock, or the
    lock of a process that is gone: a stale lock). A lock taken on another host counts as live,
    since its process cannot be checked from here."""
    import socket

    try:
        text = (Path(folder) / LOCK_NAME).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        pid = int(fields.get("pid", ""))
    except ValueError:
        return None  # half-written or foreign: nobody can be shown to hold it
    host = fields.get("host", "")
    if host and host != socket.gethostname():
        return pid, host
    return (pid, host) if _pid_alive(pid) else None


class FolderLock:
    """What :func:`folder_lock` yields: :meth:`release` drops the lock early (before the folder
    is renamed, so the lock file does not travel with it)."""

    def __init__(self, path: Path, owned: bool) -> None:
        self.path, self.owned = path, owned

    def release(self) -> None:
        """Remove the lock file if this process took it (idempotent)."""
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False


def check_unlocked(folder: str | Path, what: str = "run folder") -> None:
    """Raise :class:`~medkt.errors.RunLockedError` naming the pid if a live process (other than
    this one) holds ``folder``'s lock."""
    import socket

    from medkt.errors import RunLockedError

    holder = lock_holder(folder)
    if holder is None or (holder[0] == os.getpid() and holder[1] in ("", socket.gethostname())):
        return
    pid, host = holder
    where = f" on host {host}" if host and host != socket.gethostname() else ""
    raise RunLockedError(f"{what} {folder} is in use by process {pid}{where} (lock file {Path(folder) / LOCK_NAME}); "
                         "wait for it to finish or stop it; if that process is gone, delete the lock file")


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run folder") -> Iterator[FolderLock]:
    """Hold ``folder/.medkt.lock`` (this pid and host) while the block works in ``folder``.

    A second process, ``--resume`` included, gets :class:`~medkt.errors.RunLockedError` naming
    the live pid instead of writing into the same files; the lock of a process that is gone
    (killed, crashed machine) is taken over. Re-entrant within one process.
    """
    import socket

    folder = Path(folder)
    lock = folder / LOCK_NAME
    check_unlocked(folder, what)
    if lock_holder(folder) is not None:  # this process holds it already: re-entrant
        yield FolderLock(lock, owned=False)
        return
    me = f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # stale: take it over (write ours, then make sure ours won a race)
        atomic_write_text(lock, me)
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
    check_unlocked(folder, what)  # another process that took over at the same moment wins
    handle = FolderLock(lock, owned=True)
    try:
        yield handle
    finally:
        handle.release()


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
