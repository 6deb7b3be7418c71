"""GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, ICML 2018): balance gradient norms at a shared layer.

Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
Networks", learn task weights w_i so that each task's gradient norm at the last shared layer W
approaches a common norm scaled by how slowly the task trains. At every step t:

    G_i      = || grad_W (w_i * L_i) ||_2
    G_mean   = mean_i G_i
    L~_i     = L_i(t) / L_i(0)
    r_i      = L~_i / mean_j L~_j                (relative inverse training rate)
    L_grad   = sum_i | G_i - G_mean * r_i^alpha |

The target G_mean * r_i^alpha is a constant: no gradient flows through it. The weights follow
grad_w L_grad only, the network follows sum_i w_i * L_i only, and after each update the weights
are renormalised to sum to T. A task that trains slowly (r_i > 1) gets a larger target and so a
larger weight.

Cost: since w_i > 0 and w_i does not enter the network, grad_W (w_i * L_i) = w_i * grad_W L_i and
G_i = w_i * ||grad_W L_i||. So dG_i/dw_i = ||grad_W L_i|| exactly, and no second-order backward
through the network is needed. Each step costs one extra backward per task from its loss to W, and
nothing below W.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from mtrank.balancing.base import (
    LossBalancer,
    all_reduce_mean_,
    build_balancer_optimizer,
    check_optimizer_options,
    is_finite_number,
    register_balancer,
)
from mtrank.errors import ConfigError

logger = logging.getLogger(__name__)

# Asymmetry alpha: Chen et al. 2018 use 1.5 on NYUv2 and 0.12 on their synthetic tasks. Larger
# values push slow tasks harder, and 0 targets equal gradient norms.
GRADNORM_ALPHA = 1.5

# Adam learning rate of the task weights.
# NOTE: 0.025 is our choice; it is not a value confirmed from Chen et al. 2018. Tune it together
# with the network's learning rate.
GRADNORM_LR = 0.025

# Weights are clamped to this floor before renormalisation, so they stay positive (G_i = w_i *
# ||grad_W L_i|| assumes w_i > 0) even after a step that would make one negative.
WEIGHT_FLOOR = 1e-6


@register_balancer("gradnorm")
class GradNormBalancer(LossBalancer):
    """GradNorm task weights, learned to balance the gradient norms at the last shared layer W.

    Shapes: T tasks.

    ``combine(losses, shared_parameters)`` needs W: pass the parameters returned by
    :func:`mtrank.balancing.default_shared_parameters`. It returns ``sum_i w_i * L_i`` with ``w``
    detached, and adds ``grad_w L_grad`` to ``task_weights.grad``. ``step()`` then applies that
    gradient with the balancer's optimizer, clamps the weights to ``WEIGHT_FLOOR`` and rescales them
    to sum to T. L_i(0) is the loss of task i at the first ``combine`` under autograd where that loss
    is positive and finite. Until then the task counts as untrained (L~_i = 1).

    A task whose gradient at W is zero (W is not on its path) gets G_i = 0 and a zero gradient for
    its weight, so only the renormalisation changes that weight, and nothing becomes NaN. Such a
    task is logged once as a warning, because W should be shared by every task.

    Args:
        task_names: T unique task names.
        task_types: the type of each task.
        alpha: the asymmetry alpha >= 0.
        lr: learning rate of the task weights.
        optimizer: ``adam`` or ``sgd``, the optimizer of the task weights.

    Raises:
        ConfigError: an option is invalid.
    """

    needs_shared_parameters = True

    # Buffers registered in __init__, declared so that type checkers see tensors, not modules.
    initial_losses: torch.Tensor
    has_initial_loss: torch.Tensor

    def __init__(
        self,
        task_names: Sequence[str],
        task_types: Sequence[str],
        *,
        alpha: float = GRADNORM_ALPHA,
        lr: float = GRADNORM_LR,
        optimizer: str = "adam",
    ) -> None:
        super().__init__(task_names, task_types)
        problems: list[str] = []
        if not (is_finite_number(alpha) and alpha >= 0):
            problems.append(f"`alpha` must be a finite number >= 0, got {alpha!r}")
        check_optimizer_options(optimizer, lr, problems)
        if problems:
            raise ConfigError(problems)
        self.alpha = float(alpha)
        self.task_weights = nn.Parameter(torch.ones(self.num_tasks))
        self.register_buffer("initial_losses", torch.ones(self.num_tasks))
        self.register_buffer("has_initial_loss", torch.zeros(self.num_tasks, dtype=torch.bool))
        self.optimizer = build_balancer_optimizer([self.task_weights], optimizer, lr)
        self._checked_zero_gradients = False
        self._last_grad_norms: torch.Tensor | None = None
        self._last_targets: torch.Tensor | None = None

    def combine(
        self,
        losses: torch.Tensor | Sequence[torch.Tensor],
        shared_parameters: Sequence[nn.Parameter] = (),
    ) -> torch.Tensor:
        """Return ``sum_i w_i * L_i`` and accumulate ``grad_w L_grad`` into ``task_weights.grad``.

        Pass the losses as a sequence of T scalars where possible. The gradient of one task at W
        then runs back through that task's own tower only. Slicing a stacked ``(T,)`` tensor instead
        runs every tower once per task, with zero gradients for the other tasks.

        Args:
            losses: the T unweighted task losses, ``(T,)`` or T scalars.
            shared_parameters: the parameters of W; the norm G_i is taken over all of them together.

        Returns:
            The scalar ``()`` loss for the network's backward pass. Under ``torch.no_grad`` or with
            losses that need no gradient, only this sum is computed and the weights get no gradient.

        Raises:
            ValueError: ``losses`` does not hold one scalar per task, or ``shared_parameters`` is empty.
        """
        scalars, stacked = self._loss_vector(losses)
        parameters = list(shared_parameters)
        if not parameters:
            raise ValueError(
                "GradNorm needs the parameters of the last shared layer W in `shared_parameters`; "
                "pass [p for _, p in default_shared_parameters(model)]"
            )
        weights = self.task_weights
        if torch.is_grad_enabled() and stacked.requires_grad:
            # The step's losses over all processes (each process contributes its share), for the loss ratios.
            detached = all_reduce_mean_(stacked.detach().clone())
            self._capture_initial_losses(detached)
            grad_norms = self._task_gradient_norms(scalars, parameters)
            self._accumulate_weight_gradient(grad_norms, detached)
        self._record(stacked, weights)
        return (weights.detach().to(stacked.dtype) * stacked).sum()

    def weights(self) -> torch.Tensor:
        """Return the ``(T,)`` task weights w; they are positive and sum to T."""
        return self.task_weights.detach().clone()

    def _capture_initial_losses(self, losses: torch.Tensor) -> None:
        """Store L_i(0) for tasks that have none yet and now have a positive, finite loss."""
        if bool(self.has_initial_loss.all()):
            return
        # Every process reaches this point at the same steps, so the collective is safe.
        losses = all_reduce_mean_(losses.to(self.initial_losses).clone())
        usable = ~self.has_initial_loss & torch.isfinite(losses) & (losses > 0)
        self.initial_losses.copy_(torch.where(usable, losses, self.initial_losses))
        self.has_initial_loss |= usable
        if bool(usable.any()):
            captured = {
                task: round(float(v), 6)
                for task, v, u in zip(self.task_names, losses, usable, strict=True)
                if u
            }
            logger.info("GradNorm initial losses L_i(0): %s", captured)

    def _task_gradient_norms(
        self, scalars: list[torch.Tensor], parameters: list[nn.Parameter]
    ) -> torch.Tensor:
        """Return ``(T,)`` norms ||grad_W L_i||, detached; 0 for a task whose loss does not reach W.

        Under ``torch.distributed`` the per-task gradients at W are averaged over the processes
        before the norms are taken. Each process's losses are scaled to its share of the step's rows,
        so the average is the gradient of the whole step's loss, and every process computes the
        GradNorm of the global batch rather than of its own rows.
        """
        size = sum(parameter.numel() for parameter in parameters)
        device = parameters[0].device
        rows = []
        for loss in scalars:
            if not loss.requires_grad:
                rows.append(torch.zeros(size, device=device))
                continue
            grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (g.detach() if g is not None else torch.zeros_like(p)).float().reshape(-1)
                        for g, p in zip(grads, parameters, strict=True)
                    ]
                )
            )
        task_grads = all_reduce_mean_(torch.stack(rows))  # (T, |W|), the same on every process
        # Squares summed parameter by parameter, in the order of a one-process run before gradients
        # were averaged, so that a single process computes bit for bit what it always did.
        zero = torch.zeros((), device=self.task_weights.device)
        pieces = task_grads.split([parameter.numel() for parameter in parameters], dim=1)
        norms = [
            sum((piece[task].pow(2).sum() for piece in pieces), zero).sqrt().to(zero.device)
            for task in range(len(scalars))
        ]
        grad_norms = torch.stack(norms)
        if not self._checked_zero_gradients:
            self._checked_zero_gradients = True
            unreached = [
                task for task, norm in zip(self.task_names, grad_norms.tolist(), strict=True) if norm == 0
            ]
            if unreached:
                logger.warning(
                    "GradNorm: tasks %s have a zero gradient at the shared layer W; W should be a layer "
                    "that every task's loss depends on",
                    unreached,
                )
        return grad_norms

    def _accumulate_weight_gradient(self, grad_norms: torch.Tensor, losses: torch.Tensor) -> None:
        """Add grad_w L_grad to ``task_weights.grad``, with the per-task target held constant."""
        weights = self.task_weights
        tiny = torch.finfo(torch.float32).tiny
        with torch.enable_grad():
            weighted_norms = weights * grad_norms  # G_i = w_i * ||grad_W L_i||, valid because w_i > 0
            ones = torch.ones_like(self.initial_losses)
            loss_ratios = torch.where(
                self.has_initial_loss, losses.float() / self.initial_losses, ones
            )  # L~_i
            inverse_rates = loss_ratios / loss_ratios.mean().clamp_min(tiny)  # r_i
            targets = (weighted_norms.mean() * inverse_rates.pow(self.alpha)).detach()
            loss_grad = (weighted_norms - targets).abs().sum()
            (weight_grad,) = torch.autograd.grad(loss_grad, weights)
        if weights.grad is None:
            weights.grad = weight_grad.detach()
        else:
            weights.grad.add_(weight_grad.detach())
        self._last_grad_norms = weighted_norms.detach()
        self._last_targets = targets

    def _after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.task_weights.clamp_(min=WEIGHT_FLOOR)
            self.task_weights.mul_(self.num_tasks / self.task_weights.sum())

    def _extra_stats(self) -> dict[str, torch.Tensor]:
        if self._last_grad_norms is None or self._last_targets is None:
            return {}
        return {"gradnorm/grad_norm": self._last_grad_norms, "gradnorm/target": self._last_targets}
