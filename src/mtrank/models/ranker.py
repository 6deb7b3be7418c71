"""The composed multi-task ranker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mtrank.data.tensors import Batch
from mtrank.models.backbones import Backbone
from mtrank.models.mlp import MLP
from mtrank.models.shallow_tower import ShallowTower


@dataclass
class RankerOutput:
    """Logits per task and, for gated backbones, the gate weights.

    Attributes:
        logits: ``(B, T)``, one column per task in config order (probabilities are their sigmoid for
            binary tasks; regression tasks output the value directly).
        gates: ``(B, T, E)`` or ``None``.
        bias_logits: ``(B, Tb)`` shallow-tower logits already added to the biased tasks, or ``None``.
    """

    logits: torch.Tensor
    gates: torch.Tensor | None = None
    bias_logits: torch.Tensor | None = None


class FieldStack(nn.Module):
    """Turn numeric features into per-field vectors so attention can treat them as fields.

    Shapes: B batch, Fn numeric features, D field width. Numeric field j is ``x_j * v_j`` with a
    learned vector ``v_j`` (AutoInt's treatment of numeric fields).
    """

    def __init__(self, num_numeric: int, dim: int) -> None:
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(num_numeric, dim) * 0.01)

    def forward(self, numeric: torch.Tensor) -> torch.Tensor:
        return numeric.unsqueeze(-1) * self.vectors  # (B, Fn, 1) * (Fn, D) -> (B, Fn, D)


class MultiTaskRanker(nn.Module):
    """Feature embeddings -> [field attention] -> backbone -> task towers (+ shallow-tower bias).

    Shapes: B batch, Fc categorical features, Fn numeric features, D embedding width, T tasks,
    Tb tasks that receive the position bias, E experts.

    Args:
        task_names: the T task names, in output column order.
        embeddings: one :class:`mtrank.embeddings.FeatureEmbedding` per categorical feature, in the
            column order of ``Batch.categorical``.
        num_numeric: Fn.
        backbone: shared-bottom, MMoE or PLE.
        towers: T tower MLPs, each ending in one logit.
        interaction: optional field-attention block from ``(B, F, D)`` to ``(B, F, D')``; when given,
            every embedding must have width D and numeric features enter as fields.
        numeric_fields: turns numeric features into fields; required with ``interaction``.
        shallow_tower: optional position-bias tower.
        bias_tasks: names of the tasks whose logit gets the shallow-tower logit.
    """

    # Buffer registered in __init__, declared so that type checkers see a tensor, not a module.
    bias_index: torch.Tensor

    def __init__(
        self,
        *,
        task_names: Sequence[str],
        embeddings: nn.ModuleDict,
        num_numeric: int,
        backbone: Backbone,
        towers: nn.ModuleDict,
        interaction: nn.Module | None = None,
        numeric_fields: FieldStack | None = None,
        shallow_tower: ShallowTower | None = None,
        bias_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.embeddings = embeddings
        self.num_numeric = num_numeric
        self.interaction = interaction
        self.numeric_fields = numeric_fields
        self.backbone = backbone
        self.towers = towers
        self.shallow_tower = shallow_tower
        self.bias_tasks = list(bias_tasks)
        bias_index = [self.task_names.index(name) for name in self.bias_tasks]
        self.register_buffer("bias_index", torch.tensor(bias_index, dtype=torch.int64), persistent=False)

    def embed(self, batch: Batch) -> torch.Tensor:
        """Return the backbone input ``(B, I)`` from the batch's features."""
        vectors = [
            emb(batch.categorical[:, j]) for j, emb in enumerate(self.embeddings.values())
        ]  # Fc x (B, D)
        if self.interaction is None:
            return torch.cat([*vectors, batch.numeric], dim=-1)  # (B, sum D + Fn)
        fields = torch.stack(vectors, dim=1)  # (B, Fc, D)
        if self.numeric_fields is not None and self.num_numeric:
            fields = torch.cat([fields, self.numeric_fields(batch.numeric)], dim=1)  # (B, Fc + Fn, D)
        return self.interaction(fields).flatten(start_dim=1)  # (B, F, D') -> (B, F * D')

    def forward(self, batch: Batch) -> RankerOutput:
        """Score a batch.

        Returns:
            :class:`RankerOutput` with ``logits`` of shape ``(B, T)``.
        """
        # 1. Embed features and mix them into the shared input.
        x = self.embed(batch)
        # 2. Backbone: one representation per task.
        hidden = self.backbone(x)
        # 3. Towers: one logit per task.
        logits = torch.cat(
            [tower(h) for tower, h in zip(self.towers.values(), hidden.task_inputs, strict=True)], dim=-1
        )  # T x (B, 1) -> (B, T)
        # 4. Position bias: add the shallow tower's logit to the chosen tasks.
        bias = None
        device = batch.device
        if (
            self.shallow_tower is not None
            and device is None
            and len(self.shallow_tower.device_embeddings) == 0
        ):
            # A shallow tower without device features needs no device column.
            device = torch.zeros(logits.shape[0], 0, dtype=torch.int64, device=logits.device)  # (B, 0)
        if self.shallow_tower is not None and batch.position is not None and device is not None:
            bias = self.shallow_tower(batch.position, device)  # (B, Tb)
            logits = logits.index_add(1, self.bias_index, bias)
        return RankerOutput(logits=logits, gates=hidden.gates, bias_logits=bias)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Return the parameters of the last layer shared by all tasks (GradNorm's W).

        :func:`mtrank.balancing.default_shared_parameters` calls this and looks up the names itself.
        """
        return [parameter for _name, parameter in self.backbone.last_shared_parameters()]


def tower(in_dim: int, hidden: Sequence[int], *, activation: str, dropout: float = 0.0) -> MLP:
    """Build one task tower: an MLP ending in a single logit."""
    return MLP(in_dim, hidden, activation=activation, dropout=dropout, output_dim=1)
