"""Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018): learn each task's noise level.

Kendall et al., "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
Semantics", derive the weights from each task's homoscedastic noise sigma_i. Their joint loss for a
regression and a classification task (their Eq. 10) is

    1 / (2 sigma_1^2) * L_1  +  1 / sigma_2^2 * L_2  +  log sigma_1  +  log sigma_2,

and they train s_i = log sigma_i^2 for numerical stability. With log sigma_i = s_i / 2 this is,
per task:

    regression:  0.5 * exp(-s_i) * L_i + 0.5 * s_i
    binary:            exp(-s_i) * L_i + 0.5 * s_i

The classification form is their approximation for a softmax (or sigmoid) with a learned
temperature. s_i is not clamped: setting the derivative to zero gives s_i* = log(L_i) for regression
and log(2 * L_i) for binary tasks, so a task whose loss falls below 1 (regression) or 0.5 (binary)
needs a negative s_i, and a lower bound on s_i would stop its weight from adapting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtrank.balancing.base import (
    LossBalancer,
    build_balancer_optimizer,
    check_optimizer_options,
    is_finite_number,
    register_balancer,
)
from mtrank.errors import ConfigError

# Adam learning rate of the log-variances. Kendall et al. train them with the network's optimizer;
# NOTE: 0.01 is our choice, so that s_i can move by several units within a few thousand steps.
UNCERTAINTY_LR = 0.01

# Factor on exp(-s_i) * L_i: 1 / (2 sigma^2) for a Gaussian likelihood, 1 / sigma^2 for a
# classification likelihood with temperature (Kendall et al. 2018, Eq. 10).
PRECISION_FACTORS = {"regression": 0.5, "binary": 1.0}


@register_balancer("uncertainty")
class UncertaintyBalancer(LossBalancer):
    """Homoscedastic uncertainty weighting with a learned log-variance s_i per task.

    Shapes: T tasks.

    ``combine`` returns ``sum_i c_i * exp(-s_i) * L_i + 0.5 * s_i`` with c_i = 0.5 for regression and
    1 for binary tasks. Its backward pass fills the gradient of ``log_variances``, which ``step``
    applies with the balancer's own optimizer. ``weights()`` returns ``c_i * exp(-s_i)``.

    Args:
        task_names: T unique task names.
        task_types: the type of each task; it selects the form of the loss above.
        lr: learning rate of the log-variances.
        optimizer: ``adam`` or ``sgd``, the optimizer of the log-variances.
        initial_log_variance: s_i at the start, for every task; 0 means sigma_i = 1.

    Raises:
        ConfigError: an option is invalid.
    """

    # Buffer registered in __init__, declared so that type checkers see a tensor, not a module.
    precision_factors: torch.Tensor

    def __init__(
        self,
        task_names: Sequence[str],
        task_types: Sequence[str],
        *,
        lr: float = UNCERTAINTY_LR,
        optimizer: str = "adam",
        initial_log_variance: float = 0.0,
    ) -> None:
        super().__init__(task_names, task_types)
        problems: list[str] = []
        check_optimizer_options(optimizer, lr, problems)
        if not is_finite_number(initial_log_variance):
            problems.append(f"`initial_log_variance` must be a finite number, got {initial_log_variance!r}")
        if problems:
            raise ConfigError(problems)
        self.log_variances = nn.Parameter(torch.full((self.num_tasks,), float(initial_log_variance)))
        factors = [PRECISION_FACTORS[task_type] for task_type in self.task_types]
        self.register_buffer("precision_factors", torch.tensor(factors))
        self.optimizer = build_balancer_optimizer([self.log_variances], optimizer, lr)

    def combine(
        self,
        losses: torch.Tensor | Sequence[torch.Tensor],
        shared_parameters: Sequence[nn.Parameter] = (),
    ) -> torch.Tensor:
        """Return ``sum_i c_i * exp(-s_i) * L_i + 0.5 * s_i``; see :meth:`LossBalancer.combine`."""
        _, stacked = self._loss_vector(losses)
        log_variances = self.log_variances
        weights = self.precision_factors * torch.exp(-log_variances)
        self._record(stacked, weights)
        return (weights * stacked + 0.5 * log_variances).sum()

    def weights(self) -> torch.Tensor:
        """Return the ``(T,)`` weights ``c_i * exp(-s_i)``."""
        return (self.precision_factors * torch.exp(-self.log_variances)).detach()

    def _extra_stats(self) -> dict[str, torch.Tensor]:
        return {"uncertainty/log_variance": self.log_variances.detach()}
