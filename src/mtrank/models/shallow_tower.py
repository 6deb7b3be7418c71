"""Position-bias shallow tower (Zhao et al., RecSys 2019, "Recommending What Video to Watch Next").

The shallow tower sees only the display position and the device features. Its logit is added to
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

from mtrank.models.mlp import MLP

MISSING_POSITION_ID = 0  # the same reserved id as mtrank.data.encoders.MISSING_POSITION_ID


class ShallowTower(nn.Module):
    """Small network from (position, device) to one bias logit per biased task.

    Shapes: B batch, Fd device features, Tb biased tasks, P position ids (missing, positions, overflow).

    Args:
        num_position_ids: P.
        device_vocab_sizes: vocabulary size of each device feature.
        embedding_dim: width of the position and device embeddings.
        hidden: hidden sizes of the MLP.
        num_outputs: Tb.
        activation: activation name.
        drop_rate: share of positions set to missing in training mode.
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
        self.position_embedding = nn.Embedding(num_position_ids, embedding_dim)
        self.device_embeddings = nn.ModuleList(nn.Embedding(size, embedding_dim) for size in device_vocab_sizes)
        in_dim = embedding_dim * (1 + len(device_vocab_sizes))
        self.mlp = MLP(in_dim, hidden, activation=activation, output_dim=num_outputs)
        self.drop_rate = drop_rate

    def drop_positions(self, position: torch.Tensor) -> torch.Tensor:
        """Return ``position`` with each entry set to missing with probability ``drop_rate`` (training only)."""
        if not self.training or self.drop_rate <= 0:
            return position
        dropped = torch.rand(position.shape, device=position.device) < self.drop_rate  # (B,)
        return position.masked_fill(dropped, MISSING_POSITION_ID)

    def bias_logits(self, position: torch.Tensor, device: torch.Tensor) -> torch.Tensor:
        """Return ``(B, Tb)`` bias logits for exactly the positions given (no dropping, no masking)."""
        parts = [self.position_embedding(position)]  # (B, D)
        parts += [emb(device[:, j]) for j, emb in enumerate(self.device_embeddings)]  # Fd x (B, D)
        return self.mlp(torch.cat(parts, dim=-1))  # (B, Tb)

    def forward(self, position: torch.Tensor, device: torch.Tensor) -> torch.Tensor:
        """Return ``(B, Tb)`` bias logits: dropped positions in training, missing positions in eval."""
        if self.training:
            position = self.drop_positions(position)
        else:
            position = torch.full_like(position, MISSING_POSITION_ID)
        return self.bias_logits(position, device)
