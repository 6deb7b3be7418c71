"""Multi-layer perceptron used by experts, towers, the shallow tower and the DHE decoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtrank.models.activations import build_activation


class MLP(nn.Module):
    """Stack of ``Linear -> [BatchNorm] -> activation -> [Dropout]`` blocks.

    Shapes: B batch, I ``in_dim``, O ``out_dim`` (the last hidden size, or ``output_dim`` when given).

    Args:
        in_dim: input width I.
        hidden: hidden layer sizes; may be empty, then the MLP is the identity (or one linear layer
            when ``output_dim`` is set).
        activation: activation name, see :func:`mtrank.models.activations.activation_names`.
        dropout: dropout probability after each hidden activation.
        batch_norm: insert ``BatchNorm1d`` after each hidden linear layer.
        output_dim: when set, a final linear layer without activation maps to this width.

    Example:
        >>> mlp = MLP(8, [16, 4], activation="mish")
        >>> mlp(torch.zeros(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(build_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        self.layers = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, I)`` to ``(B, O)``."""
        return self.layers(x)

    def linear_layers(self) -> list[nn.Linear]:
        """Return the linear layers in order, for GradNorm's shared-layer choice and PEFT targeting."""
        return [m for m in self.layers if isinstance(m, nn.Linear)]
