"""The progress bar of every operator command (ingest, index builds, evaluation): one shape.

Disabled, it is a silent stand-in with the same methods, so callers never branch on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress


def progress_bar(enabled: bool = True, *, console: Any = None, note: bool = False) -> Progress:
    """Spinner, description, bar, done/total, elapsed, remaining; `note`: a free-text column
    (each task then passes `note=` to add_task/update)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if note:
        columns.append(TextColumn("{task.fields[note]}"))
    return Progress(*columns, console=console, disable=not enabled, transient=False)
