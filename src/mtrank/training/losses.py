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


def task_losses(logits: torch.Tensor, labels: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
    """Return the mean loss of each task.

    Args:
        logits: ``(B, T)`` model outputs (logits for ``bce`` tasks, values for regression tasks).
        labels: ``(B, T)`` float labels.
        kinds: T loss names from :data:`LOSSES`.

    Returns:
        ``(T,)`` losses, each averaged over the batch.
    """
    return torch.stack([LOSSES[kind](logits[:, t], labels[:, t]) for t, kind in enumerate(kinds)])


def to_predictions(logits: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
    """Turn ``(B, T)`` logits into predictions: sigmoid probabilities for ``bce`` tasks, values otherwise."""
    binary = torch.tensor([kind == "bce" for kind in kinds], device=logits.device)
    return torch.where(binary, torch.sigmoid(logits), logits)
