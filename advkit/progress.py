"""Progress bars for long work (rich), switched off with one flag."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, status: str = "", steps: int = 1) -> None:
        """Move the bar ``steps`` forward and show ``status`` beside it."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=steps, status=status)


@contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator[_Bar]:
    """A transient rich progress bar on stderr; a no-op when ``enabled`` is False."""
    if not enabled:
        yield _Bar(None, None)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total, status="")
        yield _Bar(progress, task)
