"""A minimal progress bar for the EM loop (rich, which PyMC already depends on)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Progress:
    """Context manager; ``update(objective)`` advances one EM iteration."""

    def __init__(self, total: int, enabled: bool = True, label: str = "EM"):
        self._bar = None
        if enabled:
            self._bar = RichProgress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("objective {task.fields[objective]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self._task = self._bar.add_task(label, total=total, objective="-")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def update(self, objective: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, objective=f"{objective:.6f}")

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
