"""Fixed task weights: the loss is a constant weighted sum of the task losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mtrank.balancing.base import LossBalancer, is_finite_number, register_balancer
from mtrank.errors import ConfigError


@register_balancer("fixed")
class FixedBalancer(LossBalancer):
    """Constant weights: ``sum_i w_i * L_i``.

    Shapes: T tasks.

    Args:
        task_names: T unique task names.
        task_types: the type of each task.
        weights: weight per task name; tasks left out get 1.0. Weights must be finite and
            non-negative, and at least one must be positive. A zero weight drops the task from
            training while its loss is still logged.

    Raises:
        ConfigError: a weight names an unknown task or is invalid.

    Example:
        >>> balancer = FixedBalancer(["click", "like"], ["binary", "binary"], weights={"like": 0.5})
        >>> balancer.combine(torch.tensor([0.6, 0.4]))
        tensor(0.8000)
    """

    # Buffer registered in __init__, declared so that type checkers see a tensor, not a module.
    task_weights: torch.Tensor

    def __init__(
        self,
        task_names: Sequence[str],
        task_types: Sequence[str],
        *,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(task_names, task_types)
        given = dict(weights or {})
        problems = [
            f"`weights` names unknown task `{task}`; tasks are: {', '.join(self.task_names)}"
            for task in sorted(set(given) - set(self.task_names))
        ]
        for task, value in given.items():
            if not is_finite_number(value) or value < 0:
                problems.append(f"weight of task `{task}` must be a finite number >= 0, got {value!r}")
        values = [float(given.get(task, 1.0)) for task in self.task_names]
        if not problems and not any(value > 0 for value in values):
            problems.append("at least one task weight must be positive, got all zeros")
        if problems:
            raise ConfigError(problems)
        self.register_buffer("task_weights", torch.tensor(values))

    def combine(
        self,
        losses: torch.Tensor | Sequence[torch.Tensor],
        shared_parameters: Sequence[nn.Parameter] = (),
    ) -> torch.Tensor:
        """Return ``sum_i w_i * L_i`` for the ``(T,)`` losses; see :meth:`LossBalancer.combine`."""
        return self._weighted_sum(losses, self.task_weights)

    def weights(self) -> torch.Tensor:
        """Return the ``(T,)`` fixed weights."""
        return self.task_weights.detach().clone()
