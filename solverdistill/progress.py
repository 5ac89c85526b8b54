"""Progress on stderr: a rich bar with rate and ETA in a terminal, a plain line every few seconds elsewhere
(CI, a log file), nothing with --quiet."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from rich.console import Console

EVERY_ENV = "SDISTILL_PROGRESS_SECONDS"  # seconds between plain progress lines (default 5)
DEFAULT_EVERY = 5.0


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def plain_every() -> float:
    """Seconds between plain progress lines: $SDISTILL_PROGRESS_SECONDS, else 5 (a bad value is the default)."""
    try:
        return max(0.0, float(os.environ.get(EVERY_ENV, DEFAULT_EVERY)))
    except ValueError:
        return DEFAULT_EVERY


class Bar:
    """Called with the work done since the last call (`bar(n, info=...)`). Nothing is drawn before the first
    call, so an error raised before any work shows no empty `0/N` bar. When the work ends early (early stopping,
    a resumed cache), the bar ends at what was done: its real total."""

    def __init__(self, total: int, label: str, disabled: bool = False, console: Console | None = None) -> None:
        self.total, self.label, self.disabled, self.console = total, label, disabled, console
        self.done, self.info = 0.0, ""
        self._progress: Progress | None = None
        self._plain = False
        self._began = self._last = 0.0

    def __enter__(self) -> Bar:
        self._began = self._last = time.monotonic()
        return self

    def _start(self) -> None:
        terminal = self.console.is_terminal if self.console is not None else False
        if not terminal:
            self._plain = True
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        # The first frame already shows the first tick's work: no empty 0/N frame.
        self._task = self._progress.add_task(self.label, total=self.total, completed=self.done, info=self.info)
        self._progress.start()

    def __call__(self, n: float = 1, info: str | None = None) -> None:
        if self.disabled:
            return
        self.done += n
        if info is not None:
            self.info = info
        if self._progress is None and not self._plain:
            self._start()
            if self._progress is not None:
                return
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **({"info": info} if info is not None else {}))
        elif time.monotonic() - self._last >= plain_every():
            self._line()

    def _line(self, final: bool = False) -> None:
        """One plain line: what, how far, how long, and an estimate of what is left."""
        self._last = now = time.monotonic()
        elapsed = now - self._began
        total = max(self.total, 1)
        text = f"{self.label}: {int(self.done)}/{self.total} ({100 * self.done / total:.0f}%), {clock(elapsed)}"
        if final:
            text += " (done)"
        elif self.done > 0:
            text += f", ~{clock(elapsed * (total - self.done) / self.done)} left"
        if self.info:
            text += f"  {self.info}"
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def __exit__(self, exc_type: Any, *exc: Any) -> bool:
        ok = exc_type is None
        if ok and 0 < self.done < self.total - 1e-6:  # (fractional ticks add up to the total within rounding)
            self.total = round(self.done)  # the work ended early: end the bar at its real total
            if self._progress is not None:
                self._progress.update(self._task, total=self.total)
        if self._progress is not None:
            self._progress.stop()
        elif self._plain and ok:
            self._line(final=True)
        return False
