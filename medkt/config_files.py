"""Bundle config documents: ``--set`` overrides, JSON files, and where a value came from.

Light (stdlib only): used by the bundle runner (`medkt.bundles`) and by the preflight
(`medkt.preflight`) before torch and MONAI are imported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medkt.errors import ConfigError, MedktError


def parse_override(text: str) -> tuple[str, Any]:
    """``"pipeline#finetune#lr=1e-4"`` (``.`` also accepted as separator) -> (MONAI id, value).

    Values are JSON when they parse as JSON (numbers, true/false, lists, objects), else strings.
    """
    if "=" not in text:
        raise ConfigError(f"bad override {text!r}: expected key=value, e.g. --set pipeline#finetune#lr=1e-4")
    key, _, raw = text.partition("=")
    key = key.strip().replace(".", "#")
    if not key:
        raise ConfigError(f"bad override {text!r}: empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


# -- where a config value came from (for one-line errors) ---------------------------------------
def read_json(path: str | Path) -> Any:
    """A JSON config file; a syntax error is one line ``FILE:LINE:COL: invalid JSON: ...``, and so
    is a key given twice in one object (``json`` would silently keep the last value: a class
    listed twice in a class file, an option set twice in a config)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ConfigError(f"{path}: key {key!r} appears twice in one JSON object (the second value would "
                                  "silently replace the first); keep one", key=key)
            seen[key] = value
        return seen

    try:
        return json.loads(Path(path).read_text(), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read bundle config {path}: {exc.strerror or exc}") from None


def _show_override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _walk(doc: Any, parts: list[str]) -> tuple[bool, Any]:
    for p in parts:
        if isinstance(doc, dict) and p in doc:
            doc = doc[p]
        elif isinstance(doc, list) and p.isdigit() and int(p) < len(doc):
            doc = doc[int(p)]
        else:
            return False, None
    return True, doc


def locate(key: str, files: list[str], overrides: dict[str, Any], flag: str = "--set") -> tuple[str, str | None]:
    """Where config id ``key`` (as a pipeline reports it: ``pipeline#seed``, ``inversion#steps``)
    is set: ``(id the user wrote, "from --set K=V" or "in FILE")``. ``@ref`` links are followed
    (``pipeline#seed`` = ``"@seed"`` -> ``seed``); ids are also tried under ``pipeline#``."""
    docs = []
    for f in files:
        try:
            docs.append((f, json.loads(Path(f).read_text())))
        except (OSError, ValueError):
            continue

    def lookup(parts: list[str]) -> tuple[bool, Any]:
        ident = "#".join(parts)
        if ident in overrides:
            return True, overrides[ident]
        for _, doc in reversed(docs):
            found, value = _walk(doc, parts)
            if found:
                return True, value
        return False, None

    parts = key.split("#")
    if not lookup(parts[:1])[0] and parts[0] != "pipeline" and lookup(["pipeline", parts[0]])[0]:
        parts = ["pipeline", *parts]
    for _ in range(16):  # follow "@id" references
        for i in range(len(parts), 0, -1):
            found, value = lookup(parts[:i])
            if found:
                break
        else:
            break
        if isinstance(value, str) and value.startswith("@") and len(value) > 1:
            parts = value[1:].split("#") + parts[i:]
            continue
        break
    ident = "#".join(parts)
    for o, v in overrides.items():
        if ident == o or ident.startswith(o + "#"):
            shown = _show_override(o, v)
            return ident, f"from --set {shown}" if flag == "--set" else f"from --{shown.replace('=', ' ', 1)}"
    for f, doc in reversed(docs):
        for i in range(len(parts), 0, -1):
            if _walk(doc, parts[:i])[0]:
                return ident, f"in {f}"
    return ident, (f"in {files[-1]}" if files else None)


def attach_source(exc: MedktError, files: list[str], overrides: dict[str, Any], flag: str = "--set") -> None:
    """Name the file or override a `ConfigError` with a ``key`` came from, and rewrite the
    key to the id the user wrote (``pipeline#seed`` -> ``seed``). ``flag``: how overrides were
    given (``"--set"`` for ``medkt``, ``"--"`` for ``monai.bundle run``'s ``--ID VALUE``)."""
    if not isinstance(exc, ConfigError) or not exc.key or exc.source:
        return
    ident, source = locate(exc.key, files, overrides, flag)
    if ident != exc.key and exc.args:
        exc.args = (str(exc.args[0]).replace(exc.key, ident, 1), *exc.args[1:])
        exc.key = ident
    exc.source = source


# -- python -m monai.bundle run: a medkt error is one line, exit code 2 --------------------------


__all__ = ["attach_source", "locate", "parse_override", "read_json"]
