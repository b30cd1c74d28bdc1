"""Progress of long loops (inversion steps, fine-tuning steps, evaluation batches).

On a terminal: a tqdm bar. Without one (nohup, SLURM, CI logs), where a bar prints nothing
useful: a log line on the ``medkt.progress`` logger every ``$MEDKT_PROGRESS_SECONDS`` seconds
(default 30; 0 = every update) with the count, rate and ETA:

    inversion: 120/600 step (20%), 3.1 step/s, elapsed 38s, ETA 2m35s, sim=0.532

Both end with one INFO line (count, time, rate), so ``run.log`` has every loop's timing.

Usage:

    with Progress(total=steps, desc="fine-tune", enabled=progress) as bar:
        for ...:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

    for row in track(rows, desc="load novel", unit="img"):
        ...
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from medkt.errors import ConfigError

log = logging.getLogger("medkt.progress")

ENV_SECONDS = "MEDKT_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
T = TypeVar("T")


def log_interval() -> float:
    """Seconds between progress lines without a terminal (``$MEDKT_PROGRESS_SECONDS``, default 30)."""
    raw = os.environ.get(ENV_SECONDS, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also catches nan
        raise ConfigError(f"{ENV_SECONDS}={raw!r}: expected a number of seconds >= 0 (e.g. 30)")
    return value


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def format_seconds(s: float) -> str:
    """``75.2`` -> ``'1m15s'``; ``4000`` -> ``'1h06m'``."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counter of a loop's work; a tqdm bar on a terminal, timed log lines otherwise.

    Args:
        total: expected units (None: unknown; no percentage or ETA).
        desc: what is counted, e.g. ``"inversion"``.
        unit: unit name, e.g. ``"step"``, ``"img"``, ``"batch"``.
        enabled: False: count silently (``progress=False`` of the engines).
        every: seconds between log lines without a terminal (default `log_interval`).
        terminal: force the bar (True) or the log lines (False); default: is stderr a terminal.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "step", enabled: bool = True,
                 every: float | None = None, terminal: bool | None = None):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.every = log_interval() if every is None and enabled else (every or 0.0)
        self.n = 0  # units done, including skipped ones
        self._counted = 0  # units done by this process (the rate ignores resumed work)
        self._postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._bar = None
        self._closed = False
        if enabled and (_on_terminal() if terminal is None else terminal):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    # -- counting ------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.n += n
        self._counted += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            if now - self._last >= self.every:
                self._last = now
                log.info("%s", self.line(now))

    def skip(self, n: int) -> None:
        """``n`` units already done before this process started (resumed from a checkpoint)."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the counts (e.g. ``loss="0.123"``)."""
        self._postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    # -- text ----------------------------------------------------------------------------------
    def rate(self, now: float | None = None) -> float:
        """Units per second done by this process so far."""
        dt = (now if now is not None else time.monotonic()) - self._start
        return self._counted / dt if dt > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        """The progress line: count (of total), rate, elapsed time and ETA."""
        now = now if now is not None else time.monotonic()
        rate = self.rate(now)
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}" if self.total else f"{self.desc}: {self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {format_seconds(now - self._start)}")
        if self.total and rate > 0:
            parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        """Remove the bar; log one summary line (count, time, rate)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self.enabled:
            now = time.monotonic()
            log.info("%s: %d %s in %s (%.3g %s/s)%s", self.desc, self._counted, self.unit,
                     format_seconds(now - self._start), self.rate(now), self.unit,
                     f", {self.n - self._counted} resumed from checkpoints" if self.n > self._counted else "")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a `Progress` (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit=unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)


__all__ = ["Progress", "track", "log_interval", "format_seconds", "ENV_SECONDS"]
