"""Run folders: the checks before a run touches one, and the lock a process holds while it works in one.

Light (stdlib only), so the preflight (`medkt.preflight`) runs the same checks as
`medkt.pipelines.base.Pipeline.run` before torch is imported.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from medkt.errors import ConfigError, MedktError, OutputExistsError, RunLockedError


def staging_dir(output_dir: str | Path) -> Path:
    """``<output_dir>.partial``: where a run writes (and keeps its checkpoints) until it succeeds."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".partial")


def check_output(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse an existing ``output_dir`` without ``overwrite``."""
    if Path(output_dir).exists() and not overwrite:
        raise OutputExistsError(f"output folder {output_dir} already exists; choose another --output or pass --overwrite")


def check_staging(output_dir: str | Path, resume: bool, restart: bool) -> None:
    """Refuse to touch an interrupted run's staging folder unless told what to do with it."""
    staging = staging_dir(output_dir)
    if resume and restart:
        raise ConfigError("--resume and --restart contradict each other: --resume continues the interrupted run "
                          f"in {staging}, --restart discards it; pass one")
    if staging.exists() and not (resume or restart):
        raise OutputExistsError(
            f"{staging} holds an interrupted run (with its checkpoints); rerun with --resume to "
            "continue it, or with --restart to discard it and start over")


def run_folder_problems(output_dir: str | Path, overwrite: bool, resume: bool, restart: bool) -> list[MedktError]:
    """Every reason not to start a run in ``output_dir``, in the order `Pipeline.run` checks
    them: a live process holding the staging folder, the output folder, the staging folder."""
    out: list[MedktError] = []
    for check in (lambda: check_unlocked(staging_dir(output_dir)), lambda: check_output(output_dir, overwrite),
                  lambda: check_staging(output_dir, resume, restart)):
        try:
            check()
        except MedktError as exc:
            out.append(exc)
            if isinstance(exc, RunLockedError):
                break  # a live run: the other checks would only describe its files
    return out


#: the lock file a process keeps in a run folder while it works in it (`folder_lock`)
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
    """What `folder_lock` yields: `release` drops the lock early (before the folder
    is renamed, so the lock file does not travel with it)."""

    def __init__(self, path: Path, owned: bool) -> None:
        self.path, self.owned = path, owned

    def release(self) -> None:
        """Remove the lock file if this process took it (idempotent)."""
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False


def check_unlocked(folder: str | Path, what: str = "run folder") -> None:
    """Raise `RunLockedError` naming the pid if a live process (other than
    this one) holds ``folder``'s lock."""
    import socket

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

    A second process, ``--resume`` included, gets `RunLockedError` naming
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
    from medkt.utils import atomic_write_text  # numpy comes with it: only when a lock is taken

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


__all__ = ["LOCK_NAME", "FolderLock", "check_output", "check_staging", "check_unlocked", "folder_lock", "lock_holder",
           "run_folder_problems", "staging_dir"]
