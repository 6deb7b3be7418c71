"""Backbones that turn the shared input into one representation per task.

Shapes used below: B batch, I input width, H expert or bottom output width, E experts, T tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from mtrank.errors import ConfigError
from mtrank.models.mlp import MLP


@dataclass
class BackboneOutput:
    """Per-task inputs for the towers and, for gated backbones, the gate weights.

    Attributes:
        task_inputs: T tensors of shape ``(B, H)``.
        gates: ``(B, T, E)`` gate weights (each row sums to 1), or ``None`` for shared-bottom.
    """

    task_inputs: list[torch.Tensor]
    gates: torch.Tensor | None = None


class Backbone(nn.Module):
    """Interface of a backbone: ``forward(x (B, I)) -> BackboneOutput``."""

    out_dim: int
    num_tasks: int

    def last_shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Return the parameters of the last layer every task shares (GradNorm's W), with names."""
        raise NotImplementedError


def _last_linear_parameters(prefix: str, mlp: MLP) -> list[tuple[str, nn.Parameter]]:
    linears = mlp.linear_layers()
    if not linears:
        raise ConfigError([f"`{prefix}` has no linear layer; give it at least one hidden size"])
    index = next(i for i, m in enumerate(mlp.layers) if m is linears[-1])
    return [(f"{prefix}.layers.{index}.{name}", p) for name, p in linears[-1].named_parameters()]


class SharedBottom(Backbone):
    """One MLP whose output every task tower reads (Caruana 1997).

    Args:
        bottom: the shared MLP, input I, output H.
        num_tasks: T.
    """

    def __init__(self, *, bottom: MLP, num_tasks: int) -> None:
        super().__init__()
        self.bottom = bottom
        self.num_tasks = num_tasks
        self.out_dim = bottom.out_dim

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        shared = self.bottom(x)  # (B, H)
        return BackboneOutput(task_inputs=[shared] * self.num_tasks)

    def last_shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return _last_linear_parameters("backbone.bottom", self.bottom)


class MMoE(Backbone):
    """Multi-gate mixture of experts (Ma et al., KDD 2018), as used by Zhao et al., RecSys 2019.

    Each task t mixes the E shared experts with its own gate, a linear layer plus softmax over the
    input (no batch norm on the gate logits): ``h_t = sum_e softmax(W_t x)_e * expert_e(x)``.

    Args:
        experts: E expert MLPs with equal output width H, built separately so their initial weights
            are independent draws.
        gates: T linear layers mapping I to E.
    """

    def __init__(self, *, experts: Sequence[MLP], gates: Sequence[nn.Linear]) -> None:
        super().__init__()
        widths = {e.out_dim for e in experts}
        if len(widths) != 1:
            raise ConfigError([f"MMoE experts must share one output width, got {sorted(widths)}"])
        for t, gate in enumerate(gates):
            if gate.out_features != len(experts):
                raise ConfigError([f"gate {t} has {gate.out_features} outputs for {len(experts)} experts"])
        self.experts = nn.ModuleList(experts)
        self.gates = nn.ModuleList(gates)
        self.num_tasks = len(gates)
        self.out_dim = widths.pop()

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        expert_out = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, E, H)
        weights = [torch.softmax(gate(x), dim=-1) for gate in self.gates]  # T x (B, E)
        # One mixture per task: a task's input then does not depend on how many tasks there are, so
        # adding a task (e.g. through fine-tuning) leaves the other tasks' scores bit for bit the same.
        mixed = [torch.einsum("be,beh->bh", w, expert_out) for w in weights]  # T x (B, H)
        return BackboneOutput(task_inputs=mixed, gates=torch.stack(weights, dim=1))  # gates: (B, T, E)

    def last_shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        params: list[tuple[str, nn.Parameter]] = []
        for e, expert in enumerate(self.experts):
            params += _last_linear_parameters(f"backbone.experts.{e}", cast(MLP, expert))
        return params


class PLELevel(nn.Module):
    """One extraction level of PLE: task-specific experts, shared experts and their gates.

    Shapes: B batch, Es shared experts, Et experts per task, H expert width, T tasks.

    Args:
        task_experts: T lists of Et expert MLPs.
        shared_experts: Es expert MLPs.
        task_gates: T linear layers over ``Et + Es`` experts.
        shared_gate: a linear layer over ``T * Et + Es`` experts, or ``None`` on the last level.
    """

    def __init__(
        self,
        *,
        task_experts: Sequence[Sequence[MLP]],
        shared_experts: Sequence[MLP],
        task_gates: Sequence[nn.Linear],
        shared_gate: nn.Linear | None,
    ) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(nn.ModuleList(group) for group in task_experts)
        self.shared_experts = nn.ModuleList(shared_experts)
        self.task_gates = nn.ModuleList(task_gates)
        self.shared_gate = shared_gate
        self.out_dim = shared_experts[0].out_dim

    def forward(
        self, task_x: list[torch.Tensor], shared_x: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        shared_out = [expert(shared_x) for expert in self.shared_experts]  # Es x (B, H)
        task_out = [
            [expert(x) for expert in cast(nn.ModuleList, group)]
            for group, x in zip(self.task_experts, task_x, strict=True)
        ]
        outputs, gate_weights = [], []
        for t, gate in enumerate(self.task_gates):
            pool = torch.stack(task_out[t] + shared_out, dim=1)  # (B, Et + Es, H)
            weights = torch.softmax(gate(task_x[t]), dim=-1)  # (B, Et + Es)
            outputs.append(torch.einsum("be,beh->bh", weights, pool))
            gate_weights.append(weights)
        next_shared = None
        if self.shared_gate is not None:
            pool = torch.stack(
                [o for group in task_out for o in group] + shared_out, dim=1
            )  # (B, T*Et + Es, H)
            weights = torch.softmax(self.shared_gate(shared_x), dim=-1)
            next_shared = torch.einsum("be,beh->bh", weights, pool)
        return outputs, next_shared, torch.stack(gate_weights, dim=1)  # gates: (B, T, Et + Es)


class PLE(Backbone):
    """Progressive layered extraction (Tang et al., RecSys 2020): stacked levels of CGC units.

    The returned gates are the last level's task gates, ``(B, T, Et + Es)``, task experts first.
    """

    def __init__(self, *, levels: Sequence[PLELevel]) -> None:
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.num_tasks = len(levels[-1].task_gates)
        self.out_dim = levels[-1].out_dim

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        task_x = [x] * self.num_tasks
        shared_x: torch.Tensor | None = x
        gates = None
        for level in self.levels:
            assert shared_x is not None  # only the last level returns no shared output
            task_x, shared_x, gates = level(task_x, shared_x)
        return BackboneOutput(task_inputs=task_x, gates=gates)

    def last_shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        last = len(self.levels) - 1
        params: list[tuple[str, nn.Parameter]] = []
        last_level = cast(PLELevel, self.levels[last])
        for e, expert in enumerate(last_level.shared_experts):
            params += _last_linear_parameters(f"backbone.levels.{last}.shared_experts.{e}", cast(MLP, expert))
        return params
