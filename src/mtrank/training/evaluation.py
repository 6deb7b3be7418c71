"""Scoring a whole split and computing per-task metrics from the accumulated predictions."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mtrank.config.loader import default_metrics
from mtrank.config.schema import TaskConfig
from mtrank.data.tensors import EncodedData, iterate_batches
from mtrank.training.losses import to_predictions
from mtrank.training.metrics import compute_task_metrics

logger = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]


@torch.no_grad()
def predict(
    model: nn.Module, data: EncodedData, loss_kinds: Sequence[str], batch_size: int = 8192
) -> np.ndarray:
    """Score every row in eval mode.

    Args:
        model: a :class:`mtrank.models.ranker.MultiTaskRanker`, or a module that wraps one, such as
            a PEFT model. Its forward returns a :class:`mtrank.models.ranker.RankerOutput`.
        data: the rows to score.
        loss_kinds: T loss names, which choose sigmoid or identity per task.
        batch_size: rows per forward pass.

    Returns:
        ``(N, T)`` float64 predictions: probabilities for binary tasks, values for regression tasks.
    """
    was_training = model.training
    model.eval()
    parts = [
        to_predictions(model(batch).logits, loss_kinds).double().numpy()
        for batch in iterate_batches(data, batch_size)
    ]
    model.train(was_training)
    num_tasks = len(loss_kinds)
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, num_tasks))


def evaluate_predictions(
    predictions: np.ndarray,
    data: EncodedData,
    tasks: Sequence[TaskConfig],
    group_column: str | None,
    split: str = "",
) -> Metrics:
    """Compute each task's metrics on the whole split, then their means across tasks under ``mean``.

    Each task is computed on its own column only, so one task's labels never affect another's metrics.
    """
    if data.batch.labels is None:
        raise ValueError("evaluation needs labels; encode the split with labels")
    labels = data.batch.labels.double().numpy()
    mask = data.batch.label_mask.numpy() > 0 if data.batch.label_mask is not None else None
    results: Metrics = {}
    for t, task in enumerate(tasks):
        names = task.metrics if task.metrics is not None else default_metrics(task.type, group_column)
        # Only rows that carry this task's label count for it.
        rows = mask[:, t] if mask is not None else slice(None)
        results[task.name] = compute_task_metrics(
            task.type,
            names,
            labels[rows, t],
            predictions[rows, t],
            data.groups[rows] if data.groups is not None else None,
            task_name=f"{task.name} ({split})" if split else task.name,
        )
    results["mean"] = _means(results)
    return results


def _means(results: Metrics) -> dict[str, float]:
    """Average each metric over the tasks where it is defined, giving NaN only when no task defines it.

    A task whose split has a single label class reports NaN AUC with a warning. Leaving it out of
    the mean keeps early stopping on ``mean/auc`` working for the other tasks.
    """
    collected: dict[str, list[float]] = {}
    for values in results.values():
        for name, value in values.items():
            if not name.endswith("_skipped"):
                collected.setdefault(name, []).append(value)
    means: dict[str, float] = {}
    for name, per_task in collected.items():
        finite = [x for x in per_task if math.isfinite(x)]
        if len(finite) < len(per_task):
            logger.warning(
                "mean/%s averages %d of %d tasks; the others are undefined (NaN)",
                name,
                len(finite),
                len(per_task),
            )
        means[name] = float(np.mean(finite)) if finite else math.nan
    return means


def evaluate_model(
    model: nn.Module,
    data: EncodedData,
    tasks: Sequence[TaskConfig],
    group_column: str | None,
    *,
    batch_size: int = 8192,
    split: str = "",
) -> Metrics:
    """Score ``data`` and compute per-task metrics (see :func:`evaluate_predictions`)."""
    predictions = predict(model, data, [t.loss or "bce" for t in tasks], batch_size)
    return evaluate_predictions(predictions, data, tasks, group_column, split)
