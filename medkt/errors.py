"""Exception types for user-facing errors.

Every `MedktError` is a mistake the user can fix (bad input, missing file); the CLI prints
its message on one line and exits with code 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class MedktError(Exception):
    """Base class of user-fixable errors (CLI exit code 2)."""


class WeightsNotFoundError(MedktError, FileNotFoundError):
    """A local weights file/folder is missing; medkt never downloads weights by itself."""


class UnknownNameError(MedktError, KeyError):
    """An unknown registry name (backend, bundle, finding, dataset...)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ConfigError(MedktError, ValueError):
    """A bad configuration value or override.

    ``key``: the config path it is about (MONAI id, ``#``-separated), when known; ``source``: where
    the value came from (a bundle config file, ``--set ...``), added by whoever knows it
    (`medkt.bundles.run_bundle`) and shown at the end of the message.
    """

    def __init__(self, message: str = "", *, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg} ({self.source})" if self.source else msg


class DataError(MedktError, ValueError):
    """Unreadable image, bad manifest row, label not in the class list..."""


class OutputExistsError(MedktError, FileExistsError):
    """Refusing to overwrite an existing run directory without --overwrite."""


class OutputDiskError(MedktError, OSError):
    """The output disk refused a write: read-only, full or over quota. Files written before are
    intact (every medkt file is written to a temp file and renamed), so the run can be resumed."""


class RunLockedError(MedktError):
    """Another live process works in the run folder (its pid is in the folder's lock file)."""


class ResumeMismatchError(MedktError, ValueError):
    """``--resume`` with settings or targets other than the ones the checkpoints were made with."""


class CheckpointError(MedktError):
    """A checkpoint file is corrupt, truncated or not a medkt checkpoint."""


class PreflightError(MedktError):
    """Several problems found before a run started (`medkt.preflight`), one per line; the
    CLI prints each as its own ``error:`` line. A single problem is raised as itself instead."""

    def __init__(self, problems: list[MedktError]):
        self.problems = list(problems)
        super().__init__("\n".join(" ".join(str(p).split()) for p in self.problems))


#: errno values of an output disk that cannot take a write (read-only, full, over quota)
DISK_ERRNOS = frozenset(e for e in ("EROFS", "ENOSPC", "EDQUOT") if hasattr(__import__("errno"), e))


def disk_error(exc: OSError, path: object) -> OutputDiskError | None:
    """A one-line `OutputDiskError` for an ``OSError`` of a read-only / full disk, else None."""
    import errno

    name = errno.errorcode.get(exc.errno or -1, "")
    if name not in DISK_ERRNOS:
        return None
    what = {"EROFS": "the file system is read-only", "ENOSPC": "no space left on the device",
            "EDQUOT": "disk quota exceeded"}[name]
    return OutputDiskError(f"cannot write {path}: {what} ({name}); files written before are intact: free space or "
                           "choose a writable output folder, then rerun (with --resume to continue a run)")


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """``" Did you mean 'steps'?"`` when a known name is close to ``name``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name(kind: str, name: str, known: list[str] | tuple[str, ...]) -> UnknownNameError:
    """Build an `UnknownNameError` that lists the known names and a close match."""
    hint = did_you_mean(name, known)
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known)) or '(none)'}")
