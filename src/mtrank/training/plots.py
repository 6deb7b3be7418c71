"""Figures of a training run, drawn with matplotlib's Agg canvas (the optional ``plot`` extra).

The figures are written to files only: no pyplot state is used and the process-wide matplotlib
backend is left unchanged, so plotting from a notebook or a server thread is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# A plot with more steps than this draws every k-th step only, so that a run of millions of steps
# still renders in seconds. 20,000 points are more than the pixels across the figure.
MAX_PLOTTED_STEPS = 20_000


def plot_task_weights(
    steps: Mapping[str, Sequence[float] | np.ndarray],
    task_names: Sequence[str],
    path: Path,
    *,
    title: str | None = None,
) -> Path | None:
    """Save a figure of each task's loss weight (top) and unweighted loss (bottom) per training step.

    Args:
        steps: per-step columns of equal length N, as written to the run's step log:
            ``weight/<task>`` and ``loss/<task>`` for every task, and optionally ``epoch``, whose
            changes are drawn as dotted vertical lines. A missing ``loss/<task>`` leaves that
            task out of the bottom panel. NaN values leave gaps.
        task_names: the tasks to draw, in legend order.
        path: the image file to write; its suffix picks the format (``.png``, ``.svg``, ``.pdf``).
        title: figure title; default none.

    Returns:
        ``path``, or ``None`` when matplotlib is not installed (a warning is logged) or there are no
        steps.

    Raises:
        KeyError: ``steps`` has no ``weight/<task>`` column for a task in ``task_names``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(
            "matplotlib is not installed, so the task weight plot %s was not written; "
            "install it with `pip install 'mtrank[plot]'`",
            path,
        )
        return None

    weights = {task: np.asarray(steps[f"weight/{task}"], dtype=np.float64) for task in task_names}
    num_steps = len(next(iter(weights.values()))) if weights else 0
    if num_steps == 0:
        logger.info("no training steps recorded, so the task weight plot %s was not written", path)
        return None
    stride = max(1, -(-num_steps // MAX_PLOTTED_STEPS))  # ceiling division
    x = np.arange(0, num_steps, stride)

    figure = Figure(figsize=(8.0, 6.0), layout="constrained")
    FigureCanvasAgg(figure)
    weight_axes, loss_axes = figure.subplots(2, 1, sharex=True)
    plotted_losses: list[np.ndarray] = []
    for task in task_names:
        line = weight_axes.plot(x, weights[task][::stride], linewidth=1.0, label=task)[0]
        losses = steps.get(f"loss/{task}")
        if losses is not None:
            values = np.asarray(losses, dtype=np.float64)[::stride]
            loss_axes.plot(x, values, linewidth=0.6, color=line.get_color(), label=task)
            plotted_losses.append(values[np.isfinite(values)])
    weight_axes.set_ylabel("task weight")
    weight_axes.legend(loc="best", fontsize="small")
    loss_axes.set_ylabel("unweighted task loss")
    # Task losses can differ by orders of magnitude, so the axis is logarithmic when all are positive.
    finite_losses = np.concatenate(plotted_losses) if plotted_losses else np.zeros(0)
    if finite_losses.size and bool((finite_losses > 0).all()):
        loss_axes.set_yscale("log")
    step_label = "training step" if stride == 1 else f"training step (every {stride}th drawn)"
    loss_axes.set_xlabel(step_label)

    epochs = steps.get("epoch")
    if epochs is not None:
        epoch_values = np.asarray(epochs)
        for boundary in np.flatnonzero(np.diff(epoch_values)) + 1:
            for axes in (weight_axes, loss_axes):
                axes.axvline(boundary, color="grey", linestyle=":", linewidth=0.6)
    if title:
        figure.suptitle(title)

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
