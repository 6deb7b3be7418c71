"""Per-task losses computed on logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch.nn import functional as F


class TaskLossFunction(Protocol):
    """Loss function over ``(B,)`` model outputs and labels, with the signature of ``F.mse_loss``."""

    def __call__(
        self, input: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean"
    ) -> torch.Tensor: ...


LOSSES: dict[str, TaskLossFunction] = {
    "bce": F.binary_cross_entropy_with_logits,
    "mse": F.mse_loss,
    "huber": F.huber_loss,
}


def task_loss_list(
    logits: torch.Tensor, labels: torch.Tensor, kinds: Sequence[str], mask: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Return each task's mean loss as a separate scalar.

    GradNorm differentiates each task's loss on its own; separate scalars keep each gradient to the
    task's own tower instead of running every tower backward once per task.

    Args:
        logits: ``(B, T)``.
        labels: ``(B, T)``.
        kinds: T loss names.
        mask: optional ``(B, T)`` with 1 where a label is present; a task's loss averages over its
            present labels only, and is 0 (with no gradient) in a batch that has none.
    """
    if mask is None:
        return [LOSSES[kind](logits[:, t], labels[:, t]) for t, kind in enumerate(kinds)]
    losses = []
    for t, kind in enumerate(kinds):
        per_row = LOSSES[kind](logits[:, t], labels[:, t], reduction="none")  # (B,)
        weight = mask[:, t]
        losses.append((per_row * weight).sum() / weight.sum().clamp(min=1.0))
    return losses


def task_losses(logits: torch.Tensor, labels: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
    """Return the mean loss of each task.

    Args:
        logits: ``(B, T)`` model outputs (logits for ``bce`` tasks, values for regression tasks).
        labels: ``(B, T)`` float labels.
        kinds: T loss names from :data:`LOSSES`.

    Returns:
        ``(T,)`` losses, each averaged over the batch.
    """
    return torch.stack(task_loss_list(logits, labels, kinds))


def to_predictions(logits: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
    """Turn ``(B, T)`` logits into predictions: sigmoid probabilities for ``bce`` tasks, values otherwise."""
    if logits.shape[-1] != len(kinds):
        raise ValueError(
            f"the model returns {logits.shape[-1]} task columns but {len(kinds)} loss kinds were given"
        )
    binary = torch.tensor([kind == "bce" for kind in kinds], device=logits.device)
    return torch.where(binary, torch.sigmoid(logits), logits)
