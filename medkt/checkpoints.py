"""Checkpoints that can be trusted on resume: settings records and self-checking files.

Two guarantees:

* **Resume never mixes runs.** `guard_resume` records the settings and targets that shape
  a phase's result in ``<folder>/<phase>.settings.json``; resuming with different ones raises
  `ResumeMismatchError` with a one-line diff of what changed
  (``inversion.lr: 0.1 -> 0.05; concept 'x' description changed``). Every checkpoint written
  with `save_checkpoint` can carry the digest of those settings
  (`settings_digest`), so a stray file from another run is refused too.
* **A damaged checkpoint is named, never half-read.** `save_checkpoint` writes atomically
  (temp file + fsync + rename) a small header (magic, payload length, SHA-256) in front of the
  ``torch.save`` payload; `load_checkpoint` checks all three, so a truncated or corrupted
  file is a `CheckpointError` naming the path and the fix. (``torch.load``
  alone does not notice flipped bytes inside a tensor.) Files without the header (medkt before
  this format) are read with ``torch.load`` as before.

A settings dict is any JSON-able mapping. Two keys are diffed specially: ``"concepts"``
(``name -> {"descriptions": [...], "n_images": [...]}``, see `concept_settings`) gives
``concept 'x' description changed`` rather than both long texts; everything else is compared
leaf by leaf under dotted keys (``inversion.lr``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medkt.errors import CheckpointError, ResumeMismatchError

log = logging.getLogger("medkt")

_MAGIC = b"MEDKTCK1"
_HEADER = struct.Struct(">8sQ32s")  # magic, payload length (bytes), sha256(payload)


# --- settings records ----------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """JSON round trip: tuples -> lists, paths -> str, so recorded and new settings compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def settings_digest(settings: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``settings``."""
    return hashlib.sha256(json.dumps(_plain(settings), sort_keys=True).encode()).hexdigest()


def weights_fingerprint(module: Any) -> str:
    """SHA-256 (hex) of a model's weights: every ``state_dict`` entry's name and float32 values, in
    name order (the key of caches and records that must change when any weight changes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def concept_settings(targets: Iterable[Any]) -> dict[str, dict[str, list]]:
    """``[InversionTarget(concept, text, n_images)]`` -> ``{concept: {"descriptions", "n_images"}}``
    (the form `describe_changes` reports per concept)."""
    out: dict[str, dict[str, list]] = {}
    for t in targets:
        c = out.setdefault(str(t.concept), {"descriptions": [], "n_images": []})
        c["descriptions"].append(str(t.text))
        c["n_images"].append(int(t.n_images))
    return out


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """One line listing what differs between two settings dicts ('' when they are equal)."""
    old, new = _plain(old), _plain(new)
    parts: list[str] = []
    oc, nc = old.pop("concepts", None) or {}, new.pop("concepts", None) or {}
    for name in [*oc, *(n for n in nc if n not in oc)]:
        if name not in nc:
            parts.append(f"concept {name!r} removed")
        elif name not in oc:
            parts.append(f"concept {name!r} added")
        else:
            if oc[name].get("descriptions") != nc[name].get("descriptions"):
                parts.append(f"concept {name!r} description changed")
            if oc[name].get("n_images") != nc[name].get("n_images"):
                parts.append(f"concept {name!r} n_images: {_short(oc[name].get('n_images'))} -> "
                             f"{_short(nc[name].get('n_images'))}")
    fo, fn = _flatten(old), _flatten(new)
    for key in [*fo, *(k for k in fn if k not in fo)]:
        if key not in fn:
            parts.append(f"{key}: {_short(fo[key])} -> (unset)")
        elif key not in fo:
            parts.append(f"{key}: (unset) -> {_short(fn[key])}")
        elif fo[key] != fn[key]:
            parts.append(f"{key}: {_short(fo[key])} -> {_short(fn[key])}")
    return "; ".join(parts)


def settings_path(folder: str | Path, phase: str) -> Path:
    """Where ``phase``'s settings are recorded in a run folder (``<phase>.settings.json``)."""
    return Path(folder) / f"{phase}.settings.json"


def guard_resume(folder: str | Path, phase: str, settings: dict[str, Any], resume: bool) -> None:
    """Record or check the settings that shape ``phase``'s result, before the phase runs.

    Fresh run (``resume=False``): (re)write ``<folder>/<phase>.settings.json`` atomically.
    Resume: if a record exists and differs, raise `ResumeMismatchError` with the diff;
    if none exists (nothing was checkpointed yet), write it.
    """
    from medkt.utils import atomic_write_json

    path = settings_path(folder, phase)
    new = _plain(settings)
    if resume and path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"settings record {path} is unreadable ({exc}); it tells which settings the "
                                  f"{phase} checkpoints were made with: rerun with --restart to start over") from None
        diff = describe_changes(old, new)
        if diff:
            raise ResumeMismatchError(
                f"cannot resume {phase} in {Path(folder)}: its checkpoints were made with other settings ({diff}); "
                "rerun with the original settings, or with --restart (without --resume) to start over")
        return
    atomic_write_json(path, new)


# --- checkpoint files ----------------------------------------------------------------------------
def save_checkpoint(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, behind a length + SHA-256 header."""
    import torch

    from medkt.utils import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return atomic_write_bytes(path, _HEADER.pack(_MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload)


def load_checkpoint(path: str | Path, digest: str | None = None) -> Any:
    """Read a checkpoint written by `save_checkpoint` (tensors only, ``weights_only``).

    ``digest``: when given, the checkpoint's ``"settings_digest"`` entry must equal it (a
    file left by a run with other settings raises `ResumeMismatchError`).
    Raises `CheckpointError` naming ``path`` when it is truncated, corrupt or unreadable.
    """
    import torch

    path = Path(path)
    fix = ("delete it to redo that part from the previous checkpoint, or rerun with --restart "
           "(without --resume) to start over")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror or exc})") from None
    if data[: len(_MAGIC)] == _MAGIC:
        if len(data) < _HEADER.size:
            raise CheckpointError(f"checkpoint {path} is truncated (header incomplete); {fix}")
        _, length, sha = _HEADER.unpack_from(data)
        payload = data[_HEADER.size:]
        if len(payload) != length:
            raise CheckpointError(f"checkpoint {path} is truncated ({len(payload)} of {length} bytes); {fix}")
        if hashlib.sha256(payload).digest() != sha:
            raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch); {fix}")
    elif data[:2] == b"PK":  # a plain torch.save zip (medkt before checksummed checkpoints)
        payload = data
    else:
        what = "empty" if not data else "not a medkt checkpoint"
        raise CheckpointError(f"checkpoint {path} is {what} (truncated or overwritten?); {fix}")
    try:
        obj = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/ValueError/EOFError/pickle errors on damage
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); {fix}") from None
    if digest is not None:
        found = obj.get("settings_digest") if isinstance(obj, dict) else None
        if found != digest:
            why = ("has no settings record (older medkt), so it cannot be checked against this run"
                   if found is None else "was made with other settings than this run's")
            raise ResumeMismatchError(f"checkpoint {path} {why}; delete it, or rerun with --restart "
                                      "(without --resume) to start over")
    return obj


__all__ = ["guard_resume", "describe_changes", "settings_digest", "concept_settings", "settings_path",
           "save_checkpoint", "load_checkpoint"]
