"""Per-task losses computed on logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

LOSSES = {
    "bce": F.binary_cross_entropy_with_logits,
    "mse": F.mse_loss,
    "huber": F.huber_loss,
}


def task_loss_list(logits: torch.Tensor, labels: torch.Tensor, kinds: Sequence[str]) -> list[torch.Tensor]:
    """Return each task's mean loss as a separate scalar.

    GradNorm differentiates each task's loss on its own; separate scalars keep each gradient to the
    task's own tower instead of running every tower backward once per task.
    """
    return [LOSSES[kind](logits[:, t], labels[:, t]) for t, kind in enumerate(kinds)]


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
