"""Exception types for user-facing errors.

Every :class:`MedktError` is a mistake the user can fix (bad input, missing file); the CLI prints
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
    """A bad configuration value or override."""


class DataError(MedktError, ValueError):
    """Unreadable image, bad manifest row, label not in the class list..."""


class OutputExistsError(MedktError, FileExistsError):
    """Refusing to overwrite an existing run directory without --overwrite."""


def unknown_name(kind: str, name: str, known: list[str] | tuple[str, ...]) -> UnknownNameError:
    """Build an :class:`UnknownNameError` that lists the known names and a close match."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known)) or '(none)'}")
