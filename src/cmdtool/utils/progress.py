"""Progress reporting for long passes. The library is silent by default; the CLI passes a rich reporter."""

from __future__ import annotations

import contextlib
import time


class NullProgress:
    """Reports nothing. Every long-running library call accepts ``progress=`` of this shape."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None, unit: str = "rows"):
        yield NullTask()

    def note(self, message: str) -> None:  # informational line (skipped files, choices made)
        pass


class NullTask:
    def advance(self, amount: float = 1, nbytes: int = 0) -> None:
        pass


class RichProgress(NullProgress):
    """A rich progress bar per task with rate and MB/s; notes go to stderr.

    ``enabled=False`` silences everything; ``bars=False`` keeps the notes but draws no bars (a log file or a pipe
    would otherwise get the bar's final line)."""

    def __init__(self, console=None, enabled: bool = True, bars: bool = True):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.bars = bars

    @contextlib.contextmanager
    def task(self, description: str, total: float | None, unit: str = "rows"):
        if not (self.enabled and self.bars):
            yield NullTask()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as bar:
            handle = _RichTask(bar, bar.add_task(description, total=total, rate=""), unit)
            yield handle

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[dim]{message}[/dim]", highlight=False)


class _RichTask:
    def __init__(self, bar, task_id, unit: str):
        self.bar, self.task_id, self.unit = bar, task_id, unit
        self.start = time.perf_counter()
        self.count = 0.0
        self.nbytes = 0

    def advance(self, amount: float = 1, nbytes: int = 0) -> None:
        self.count += amount
        self.nbytes += nbytes
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = f"{self.count / elapsed:,.1f} {self.unit}/s"
        if self.nbytes:
            rate += f"  {self.nbytes / elapsed / 1e6:,.0f} MB/s"
        self.bar.update(self.task_id, advance=amount, rate=rate)
