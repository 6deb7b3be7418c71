"""Dynamic Weight Average (Liu, Johns and Davison, CVPR 2019): weight tasks by how slowly they train.

Liu et al., "End-to-End Multi-Task Learning with Attention", set the weight of task i in epoch t
from the ratio of its last two epoch losses:

    r_i(t-1) = L_i(t-1) / L_i(t-2)
    w_i(t)   = T * exp(r_i(t-1) / Temp) / sum_j exp(r_j(t-1) / Temp)

where L_i is the task's mean training loss over an epoch. The weights are 1 for the first two
epochs, when the ratio is not yet defined. The weights always sum to T.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtrank.balancing.base import LossBalancer, all_reduce_mean_, is_finite_number, register_balancer
from mtrank.errors import ConfigError

# Temperature of the softmax over loss ratios; Liu et al. 2019 use 2. A larger value gives more
# equal weights.
DWA_TEMPERATURE = 2.0


@register_balancer("dwa")
class DWABalancer(LossBalancer):
    """Dynamic Weight Average: weights from the ratio of each task's last two epoch losses.

    Shapes: T tasks.

    The weights change only in :meth:`end_epoch`, which the trainer calls with the mean
    unweighted training loss of each task over the epoch. Under ``torch.distributed`` those means
    are averaged over processes, so every process uses the same weights.

    Args:
        task_names: T unique task names.
        task_types: the type of each task.
        temperature: the softmax temperature Temp.

    Raises:
        ConfigError: the temperature is not positive.
    """

    # Buffers registered in __init__, declared so that type checkers see tensors, not modules.
    task_weights: torch.Tensor
    epoch_losses: torch.Tensor
    epochs_seen: torch.Tensor

    def __init__(
        self,
        task_names: Sequence[str],
        task_types: Sequence[str],
        *,
        temperature: float = DWA_TEMPERATURE,
    ) -> None:
        super().__init__(task_names, task_types)
        if not (is_finite_number(temperature) and temperature > 0):
            raise ConfigError([f"`temperature` must be a positive number, got {temperature!r}"])
        self.temperature = float(temperature)
        self.register_buffer("task_weights", torch.ones(self.num_tasks))
        # Mean loss per task of the last two epochs: row 0 is epoch t-2, row 1 is epoch t-1.
        self.register_buffer("epoch_losses", torch.zeros(2, self.num_tasks))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.int64))

    def combine(
        self,
        losses: torch.Tensor | Sequence[torch.Tensor],
        shared_parameters: Sequence[nn.Parameter] = (),
    ) -> torch.Tensor:
        """Return ``sum_i w_i * L_i`` with this epoch's weights; see :meth:`LossBalancer.combine`."""
        return self._weighted_sum(losses, self.task_weights)

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        """Store the epoch's ``(T,)`` mean losses and compute the next epoch's weights.

        Raises:
            ValueError: ``mean_losses`` is not a finite ``(T,)`` tensor.
        """
        self._check_epoch_losses(mean_losses)
        current = all_reduce_mean_(mean_losses.detach().to(self.epoch_losses).clone())
        self.epoch_losses[0] = self.epoch_losses[1]
        self.epoch_losses[1] = current
        self.epochs_seen += 1
        if int(self.epochs_seen) < 2:
            return
        previous, latest = self.epoch_losses[0], self.epoch_losses[1]
        # A task whose loss was 0 two epochs ago has no defined ratio; treat it as not changing.
        defined = previous > 0
        ratios = torch.where(defined, latest / previous.clamp_min(torch.finfo(previous.dtype).tiny), 1.0)
        self.task_weights.copy_(self.num_tasks * torch.softmax(ratios / self.temperature, dim=0))

    def weights(self) -> torch.Tensor:
        """Return the ``(T,)`` weights of the current epoch."""
        return self.task_weights.detach().clone()
