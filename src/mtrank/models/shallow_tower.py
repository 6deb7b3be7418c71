"""Position-bias shallow tower (Zhao et al., RecSys 2019, "Recommending What Video to Watch Next").

The shallow tower reads only the display position and the device features. Its logit is added to
the main tower's logit of the chosen tasks while training, so the main towers learn relevance with
the position effect explained away. While training, a share ``drop_rate`` of positions is replaced
by the missing id so the model cannot lean on position alone; in eval mode every position is
replaced by the missing id, so scores are exactly invariant to the position supplied, while the
device still contributes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtrank.errors import ConfigError
from mtrank.models.mlp import MLP

MISSING_POSITION_ID = 0  # the same reserved id as mtrank.data.encoders.MISSING_POSITION_ID
# Standard deviation of the initial position and device embeddings. torch's default N(0, 1) gives
# every position a random offset of about one logit, which a short run does not remove. On a
# 200k-impression simulated log, a run early-stopped after one epoch kept a bias that was not
# monotone in position (Spearman 0.64-0.77 per device against the truth). With 0.01 the untrained
# tower is nearly constant, so the order of the learned biases comes from the clicks
# (measurements in docs/position-bias.md).
EMBEDDING_INIT_STD = 0.01


class ShallowTower(nn.Module):
    """Small network from (position, device) to one bias logit per biased task.

    Shapes: B batch, Fd device features (may be 0), D embedding width, Tb biased tasks,
    P position ids (missing, positions, overflow).

    Args:
        num_position_ids: P, at least 2 (the missing id and one position).
        device_vocab_sizes: vocabulary size of each device feature; empty when the log has none.
        embedding_dim: D, width of the position and device embeddings.
        hidden: hidden sizes of the MLP; empty makes the tower linear in the embeddings.
        num_outputs: Tb.
        activation: activation name.
        drop_rate: share of positions set to missing in training mode, in ``[0, 1]``.

    Raises:
        ConfigError: a size is not positive or ``drop_rate`` is outside ``[0, 1]``.

    Example:
        >>> tower = ShallowTower(
        ...     num_position_ids=12, device_vocab_sizes=[5], embedding_dim=4, hidden=[16], num_outputs=1
        ... ).eval()
        >>> tower(torch.tensor([1, 7]), torch.tensor([[2], [2]])).shape
        torch.Size([2, 1])
    """

    def __init__(
        self,
        *,
        num_position_ids: int,
        device_vocab_sizes: Sequence[int],
        embedding_dim: int,
        hidden: Sequence[int],
        num_outputs: int,
        activation: str = "relu",
        drop_rate: float = 0.1,
    ) -> None:
        super().__init__()
        _validate_inputs(num_position_ids, device_vocab_sizes, embedding_dim, num_outputs, drop_rate)
        self.position_embedding = nn.Embedding(num_position_ids, embedding_dim)
        self.device_embeddings = nn.ModuleList(
            nn.Embedding(size, embedding_dim) for size in device_vocab_sizes
        )
        for embedding in (self.position_embedding, *self.device_embeddings):
            nn.init.normal_(embedding.weight, mean=0.0, std=EMBEDDING_INIT_STD)
        in_dim = embedding_dim * (1 + len(device_vocab_sizes))
        self.mlp = MLP(in_dim, hidden, activation=activation, output_dim=num_outputs)
        self.drop_rate = drop_rate

    def drop_positions(self, position: torch.Tensor) -> torch.Tensor:
        """Return ``position`` with each entry set to missing with probability ``drop_rate`` in training."""
        if not self.training or self.drop_rate <= 0:
            return position
        dropped = torch.rand(position.shape, device=position.device) < self.drop_rate  # (B,)
        return position.masked_fill(dropped, MISSING_POSITION_ID)

    def bias_logits(self, position: torch.Tensor, device: torch.Tensor) -> torch.Tensor:
        """Return ``(B, Tb)`` bias logits for exactly the positions given (no dropping, no masking).

        Args:
            position: ``(B,)`` int64 position ids.
            device: ``(B, Fd)`` int64 device ids; ``(B, 0)`` when there are no device features.
        """
        parts = [self.position_embedding(position)]  # (B, D)
        parts += [emb(device[:, j]) for j, emb in enumerate(self.device_embeddings)]  # Fd x (B, D)
        return self.mlp(torch.cat(parts, dim=-1))  # (B, (1 + Fd) * D) -> (B, Tb)

    def forward(self, position: torch.Tensor, device: torch.Tensor) -> torch.Tensor:
        """Return ``(B, Tb)`` bias logits: dropped positions in training, missing positions in eval."""
        if self.training:
            position = self.drop_positions(position)
        else:
            position = torch.full_like(position, MISSING_POSITION_ID)
        return self.bias_logits(position, device)


def _validate_inputs(
    num_position_ids: int,
    device_vocab_sizes: Sequence[int],
    embedding_dim: int,
    num_outputs: int,
    drop_rate: float,
) -> None:
    problems = []
    if num_position_ids < 2:
        problems.append(
            f"`num_position_ids` must be at least 2 (missing and one position), got {num_position_ids}"
        )
    problems += [
        f"`device_vocab_sizes[{j}]` must be positive, got {size}"
        for j, size in enumerate(device_vocab_sizes)
        if size < 1
    ]
    if embedding_dim < 1:
        problems.append(f"`embedding_dim` must be positive, got {embedding_dim}")
    if num_outputs < 1:
        problems.append(
            f"`num_outputs` must be positive, got {num_outputs}; list at least one binary task in "
            "`model.position_bias.tasks`"
        )
    if not 0.0 <= drop_rate <= 1.0:
        problems.append(f"`drop_rate` must be in [0, 1], got {drop_rate}")
    if problems:
        raise ConfigError(problems, source="ShallowTower")
