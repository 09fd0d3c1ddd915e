"""Progress for long loops: counts, rate and ETA in the log, plus an optional callback for UIs (Prefect)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ProgressCallback = Callable[[int, int], None]


def _fmt_seconds(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class Progress:
    """`update(n)` after each unit of work; logs at most every `every_s` seconds and always at the end."""

    total: int
    what: str
    logger: logging.Logger
    callback: ProgressCallback | None = None
    every_s: float = 10.0
    done: int = 0
    _start: float = field(default_factory=time.perf_counter)
    _last_log: float = 0.0

    def update(self, n: int = 1, **extra: object) -> None:
        self.done += n
        now = time.perf_counter()
        if self.callback is not None:
            self.callback(self.done, self.total)
        if now - self._last_log >= self.every_s or self.done >= self.total:
            self._last_log = now
            self.logger.info(self.line(now, **extra))

    def line(self, now: float | None = None, **extra: object) -> str:
        elapsed = (now or time.perf_counter()) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        tail = "".join(f" {k}={v}" for k, v in extra.items())
        eta_s = _fmt_seconds(eta) if eta == eta else "?"
        return f"{self.what}: {self.done}/{self.total} ({rate:.2f}/s, ETA {eta_s}){tail}"
