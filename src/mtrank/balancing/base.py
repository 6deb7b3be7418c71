"""The interface every loss balancer implements, and the registry that finds balancers by name."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar, get_args

import torch
import torch.distributed as dist
from torch import nn

from mtrank.errors import ConfigError

TaskType = Literal["binary", "regression"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)

BalancerOptimizer = Literal["adam", "sgd"]
BALANCER_OPTIMIZERS: tuple[str, ...] = get_args(BalancerOptimizer)


class LossBalancer(nn.Module):
    """Base class of a method that turns T task losses into the one loss the network minimises.

    Shapes: T tasks.

    A trainer calls ``combine`` once per batch and ``backward`` on its result. After the network
    optimizer's ``step`` it calls ``step`` here, and it calls ``end_epoch`` once per epoch. The
    package docstring shows the full loop. A balancer's own parameters (GradNorm's
    task weights, the log-variances of uncertainty weighting) are updated only by ``step`` with the
    balancer's own ``optimizer``, so the trainer must leave them out of the network optimizer.

    Everything needed to resume, such as the task weights and GradNorm's initial losses, is a
    parameter or buffer, so ``state_dict()`` contains only tensors and can be saved with safetensors.
    The optimizer's state is saved separately through :meth:`optimizer_state_dict`.

    Args:
        task_names: T unique task names, in the order of the loss vector.
        task_types: the type of each task, ``binary`` or ``regression``.

    Raises:
        ConfigError: the names are empty or repeated, or a type is unknown or missing.
    """

    name: ClassVar[str] = ""
    needs_shared_parameters: ClassVar[bool] = False

    def __init__(self, task_names: Sequence[str], task_types: Sequence[str]) -> None:
        super().__init__()
        problems = _validate_tasks(task_names, task_types)
        if problems:
            raise ConfigError(problems)
        self.task_names: list[str] = list(task_names)
        self.task_types: list[str] = list(task_types)
        self.optimizer: torch.optim.Optimizer | None = None
        self._last_losses: torch.Tensor | None = None
        self._last_weights: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        """Number of tasks T."""
        return len(self.task_names)

    def combine(
        self,
        losses: torch.Tensor | Sequence[torch.Tensor],
        shared_parameters: Sequence[nn.Parameter] = (),
    ) -> torch.Tensor:
        """Combine the task losses of one batch into the scalar loss the network backpropagates.

        Args:
            losses: the T unweighted task losses, as a ``(T,)`` tensor or a sequence of T scalar
                tensors, in the order of ``task_names``.
            shared_parameters: the last shared layer W; only balancers with
                ``needs_shared_parameters`` read it.

        Returns:
            A scalar tensor ``()``.

        Raises:
            ValueError: ``losses`` does not hold one scalar per task.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def step(self) -> None:
        """Update the balancer's own parameters; call once after the network optimizer's step.

        The gradients of the balancer's parameters are averaged over processes when
        ``torch.distributed`` is initialised, stepped with ``optimizer`` and then cleared.
        Balancers without parameters do nothing.
        """
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    all_reduce_mean_(parameter.grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._after_optimizer_step()

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        """Record the mean unweighted loss of each task over the finished epoch.

        Only epoch-based methods such as DWA use it; the others only check the shape.

        Args:
            mean_losses: ``(T,)`` mean training loss per task over the epoch.

        Raises:
            ValueError: ``mean_losses`` is not a finite ``(T,)`` tensor.
        """
        self._check_epoch_losses(mean_losses)

    def weights(self) -> torch.Tensor:
        """Return the current task weights, detached.

        Returns:
            ``(T,)`` positive weights; each one multiplies its task's loss in :meth:`combine`.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def last_stats(self) -> dict[str, float]:
        """Return the statistics of the last :meth:`combine` call, for logging.

        Returns:
            ``loss/<task>`` (the unweighted loss) and ``weight/<task>`` (the weight applied) for
            every task, plus method-specific keys; empty before the first ``combine``.
        """
        stats: dict[str, float] = {}
        if self._last_losses is None or self._last_weights is None:
            return stats
        per_task = {"loss": self._last_losses, "weight": self._last_weights, **self._extra_stats()}
        for prefix, values in per_task.items():
            for task, value in zip(self.task_names, values.tolist(), strict=True):
                stats[f"{prefix}/{task}"] = float(value)
        return stats

    def optimizer_state_dict(self) -> dict[str, Any]:
        """Return the state of the balancer's optimizer, empty when it has none."""
        return {} if self.optimizer is None else self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`optimizer_state_dict`."""
        if self.optimizer is not None and state:
            self.optimizer.load_state_dict(dict(state))

    # Helpers for subclasses.

    def _extra_stats(self) -> dict[str, torch.Tensor]:
        """Return method-specific ``(T,)`` statistics keyed by prefix, such as ``gradnorm/target``."""
        return {}

    def _after_optimizer_step(self) -> None:
        """Adjust the parameters after each optimizer step, such as GradNorm's renormalisation."""

    def _record(self, losses: torch.Tensor, weights: torch.Tensor) -> None:
        # Snapshots: later in-place weight updates must not change what last_stats() reports.
        self._last_losses = losses.detach().clone()
        self._last_weights = weights.detach().clone()

    def _weighted_sum(
        self, losses: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        """Return ``sum_i w_i * L_i`` for constant ``(T,)`` weights and record both for :meth:`last_stats`."""
        _, stacked = self._loss_vector(losses)
        weights = weights.to(stacked.dtype)
        self._record(stacked, weights)
        return (weights * stacked).sum()

    def _loss_vector(
        self, losses: torch.Tensor | Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return the losses both as T scalars and stacked as ``(T,)``, after checking their shape."""
        if isinstance(losses, torch.Tensor):
            if losses.shape != (self.num_tasks,):
                raise ValueError(
                    f"`losses` must have shape ({self.num_tasks},), one loss per task of {self.task_names}, "
                    f"got {tuple(losses.shape)}"
                )
            return list(losses.unbind(0)), losses
        scalars = list(losses)
        if len(scalars) != self.num_tasks or any(loss.dim() != 0 for loss in scalars):
            shapes = [tuple(loss.shape) for loss in scalars]
            raise ValueError(
                f"`losses` must be {self.num_tasks} scalar tensors, one per task of {self.task_names}, "
                f"got shapes {shapes}"
            )
        return scalars, torch.stack(scalars)

    def _check_epoch_losses(self, mean_losses: torch.Tensor) -> None:
        if mean_losses.shape != (self.num_tasks,):
            raise ValueError(
                f"`mean_losses` must have shape ({self.num_tasks},), one mean loss per task of "
                f"{self.task_names}, got {tuple(mean_losses.shape)}"
            )
        if not bool(torch.isfinite(mean_losses).all()):
            raise ValueError(
                f"`mean_losses` must be finite, got {mean_losses.tolist()}; training has diverged"
            )


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` in place over all processes; a no-op unless ``torch.distributed`` is initialised.

    Every process must call it at the same point, as with any collective.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def build_balancer_optimizer(
    parameters: Sequence[nn.Parameter], optimizer: str, lr: float
) -> torch.optim.Optimizer:
    """Build the optimizer a balancer uses for its own parameters (the names were validated before)."""
    if optimizer == "sgd":
        return torch.optim.SGD(list(parameters), lr=lr)
    return torch.optim.Adam(list(parameters), lr=lr)


def is_finite_number(value: object) -> bool:
    """Return whether ``value`` is a finite int or float (not a bool, string or tensor)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_optimizer_options(optimizer: str, lr: float, problems: list[str]) -> None:
    """Append a problem for an unknown optimizer name or a learning rate that is not positive."""
    if optimizer not in BALANCER_OPTIMIZERS:
        problems.append(f"`optimizer` must be one of {', '.join(BALANCER_OPTIMIZERS)}, got `{optimizer}`")
    if not (is_finite_number(lr) and lr > 0):
        problems.append(f"`lr` must be a positive number, got {lr!r}")


def _validate_tasks(task_names: Sequence[str], task_types: Sequence[str]) -> list[str]:
    problems: list[str] = []
    names = list(task_names)
    if not names:
        problems.append("a loss balancer needs at least one task, got an empty `task_names`")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"task names must be unique, got repeated {duplicates}")
    if len(task_types) != len(names):
        problems.append(
            f"`task_types` must give one type per task: {len(names)} names, {len(task_types)} types"
        )
    for name, task_type in zip(names, task_types, strict=False):
        if task_type not in TASK_TYPES:
            choices = ", ".join(TASK_TYPES)
            problems.append(f"task `{name}` has unknown type `{task_type}`; choose one of: {choices}")
    return problems


BalancerClass = TypeVar("BalancerClass", bound=type[LossBalancer])
BALANCERS: dict[str, type[LossBalancer]] = {}


def register_balancer(name: str) -> Callable[[BalancerClass], BalancerClass]:
    """Register a :class:`LossBalancer` subclass under ``name`` (a class decorator)."""

    def wrap(cls: BalancerClass) -> BalancerClass:
        cls.name = name
        BALANCERS[name] = cls
        return cls

    return wrap


def balancer_names() -> list[str]:
    """Return the registered balancer names, sorted."""
    return sorted(BALANCERS)


def balancer_option_names(name: str) -> list[str]:
    """Return the keyword options the balancer registered as ``name`` accepts, in signature order.

    Raises:
        ConfigError: the name is not registered.
    """
    cls = _lookup(name)
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_balancer(
    name: str,
    task_names: Sequence[str],
    task_types: Sequence[str],
    options: Mapping[str, Any] | None = None,
) -> LossBalancer:
    """Build a loss balancer from its registered name and options.

    Args:
        name: one of :func:`balancer_names`, in any letter case.
        task_names: T unique task names, in the order of the loss vector.
        task_types: the type of each task, ``binary`` or ``regression``.
        options: the method's keyword options, such as ``{"alpha": 1.5}`` for GradNorm.

    Returns:
        A new balancer on the CPU; move it with ``.to(device)`` like any module.

    Raises:
        ConfigError: the name or an option is unknown, or an option value is invalid; the message
            lists every problem and the accepted choices.

    Example:
        >>> balancer = build_balancer("dwa", ["click", "like"], ["binary", "binary"], {"temperature": 2.0})
        >>> balancer.weights()
        tensor([1., 1.])
    """
    cls = _lookup(name)
    given = dict(options or {})
    accepted = balancer_option_names(name)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        choices = ", ".join(accepted) if accepted else "none"
        raise ConfigError(
            [f"unknown option `{key}` for loss balancer `{cls.name}`; accepted: {choices}" for key in unknown]
        )
    return cls(task_names, task_types, **given)


def _lookup(name: str) -> type[LossBalancer]:
    cls = BALANCERS.get(name.lower())
    if cls is None:
        raise ConfigError([f"unknown loss balancer `{name}`; choose one of: {', '.join(balancer_names())}"])
    return cls
