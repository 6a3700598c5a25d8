"""Progress for long work: a rich bar (bytes, rate, ETA) on a terminal, plain
lines on stderr otherwise, nothing when disabled (e.g. ``--json``)."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import (
    Progress as RichProgress,
)

PLAIN_INTERVAL_S = 5.0


class Progress:
    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self._rich: RichProgress | None = None
        self._task: TaskID | None = None
        self._last = 0.0

    def __enter__(self) -> Progress:
        if self.tty:
            self._rich = RichProgress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.label, total=self.total or None)
        self._start = self._last = time.monotonic()
        return self

    def set_total(self, total: int) -> None:
        self.total = total
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, total=total or None)

    def advance(self, n: int) -> None:
        self.done += n
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, advance=n)
        elif self.enabled:
            t = time.monotonic()
            if t - self._last >= PLAIN_INTERVAL_S:
                self._last = t
                rate = self.done / max(t - self._start, 1e-9)
                pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
                eta = (
                    f", ETA {max(0.0, self.total - self.done) / rate:.0f} s"
                    if rate > 0 and self.total
                    else ""
                )
                print(
                    f"{self.label}: {self.done}/{self.total} bytes{pct}, "
                    f"{rate / 1e6:.1f} MB/s{eta}",
                    file=sys.stderr,
                    flush=True,
                )

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._rich is not None:
            self._rich.stop()
