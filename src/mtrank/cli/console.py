"""Rich console helpers for the CLI: logging handler, progress bar, metric tables."""

from __future__ import annotations

import logging
import math

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# Markup off: paths and messages may contain brackets; only explicit `markup=True` calls use it.
console = Console(stderr=True, markup=False)
stdout = Console(markup=False)


def setup_logging(verbose: bool, quiet: bool) -> None:
    """Send mtrank's log records to the terminal through rich."""
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    package_logger = logging.getLogger("mtrank")
    # The logger passes INFO on so that a run's log file is complete; the terminal handler filters.
    package_logger.setLevel(min(level, logging.INFO))
    for handler in [h for h in package_logger.handlers if isinstance(h, RichHandler)]:
        package_logger.removeHandler(handler)
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    package_logger.addHandler(handler)
    package_logger.propagate = False


class RichProgress:
    """Progress hook drawing one rich bar per unit of work (an epoch, a scoring pass)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def start(self, description: str, total: int) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._task = None


def metrics_table(title: str, metrics: dict[str, dict[str, float]]) -> Table:
    """Render per-task metrics as a table: one row per task, one column per metric."""
    names: list[str] = []
    for values in metrics.values():
        for name in values:
            if name not in names:
                names.append(name)
    table = Table(title=title)
    table.add_column("task")
    for name in names:
        # Spaces let long names such as gauc_groups_skipped wrap in a narrow terminal instead of being cut.
        table.add_column(name.replace("_", " "), justify="right", overflow="fold")
    for task, values in metrics.items():
        cells = []
        for name in names:
            value = values.get(name)
            if value is None:
                cells.append("")
            elif isinstance(value, float) and math.isnan(value):
                cells.append("nan")
            elif float(value).is_integer() and name.endswith("skipped"):
                cells.append(str(int(value)))
            else:
                cells.append(f"{value:.4f}")
        table.add_row(task, *cells)
    return table
