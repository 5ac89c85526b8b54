"""A small wrapper over rich's progress bar: rate and ETA on stderr, silent with --quiet."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from rich.console import Console


class Bar:
    def __init__(self, total: int, label: str, disabled: bool = False, console: Console | None = None) -> None:
        self.total, self.label, self.disabled, self.console = total, label, disabled, console
        self._progress = None

    def __enter__(self) -> Bar:
        if not self.disabled:
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
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, info="")
        return self

    def __call__(self, n: int = 1, info: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **({"info": info} if info is not None else {}))

    def __exit__(self, *exc: Any) -> bool:
        if self._progress is not None:
            self._progress.stop()
        return False
