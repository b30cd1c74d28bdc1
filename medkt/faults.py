"""Fault injection for the kill-and-resume tests: die like ``kill -9`` at a named point.

``MEDKT_FAULT_AT=NAME`` makes the process SIGKILL itself the first time it reaches
``fault_point(NAME)``; ``MEDKT_FAULT_AT=NAME:N`` on the N-th time. Nothing is flushed or
cleaned up, exactly as when the machine or the scheduler kills a job. Without the variable a
fault point costs one environment lookup.

Points in medkt: ``"inversion"`` (after each inversion checkpoint is saved), ``"results"``
(`medkt.pipelines.base.Pipeline.run`, after ``results.json`` is written and before the
run folder is renamed), and in `medkt.spine` ``"after_inversion"``, ``"finetune"``,
``"evaluation"``.
"""
from __future__ import annotations

import os
import signal

ENV = "MEDKT_FAULT_AT"
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL if ``$MEDKT_FAULT_AT`` selects this visit of ``name``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == (int(nth) if nth else 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # no SIGKILL on Windows


__all__ = ["fault_point", "ENV"]
