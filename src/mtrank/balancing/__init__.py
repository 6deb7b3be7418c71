"""Loss balancers: turn the T task losses of a batch into the one loss the network minimises.

Methods, each in its own file and registered by name:

- ``fixed``: constant weights per task (default 1.0 each).
- ``uncertainty``: Kendall et al. (CVPR 2018), learned log-variances s_i, not clamped.
- ``dwa``: Dynamic Weight Average, Liu et al. (CVPR 2019), weights from epoch loss ratios.
- ``gradnorm``: Chen et al. (ICML 2018), weights that balance gradient norms at the last shared layer.

Interface (:class:`LossBalancer`, an ``nn.Module``; T tasks):

- ``build_balancer(name, task_names, task_types, options) -> LossBalancer``; ``task_types`` are
  ``"binary"`` or ``"regression"``, ``options`` are the method's keyword options. Unknown names and
  options raise :class:`~mtrank.errors.ConfigError` with the accepted choices.
- ``combine(losses, shared_parameters=()) -> Tensor ()``: ``losses`` are the unweighted task
  losses, ``(T,)`` or a sequence of T scalars; the result is the loss to backpropagate.
- ``step()``: after the network optimizer's step; updates the balancer's own parameters.
- ``end_epoch(mean_losses)``: once per epoch with the ``(T,)`` mean training loss per task.
- ``weights() -> Tensor (T,)``; ``last_stats() -> dict[str, float]`` with ``loss/<task>``,
  ``weight/<task>`` and, for GradNorm, ``gradnorm/grad_norm/<task>`` and ``gradnorm/target/<task>``.
- ``needs_shared_parameters``: True for GradNorm, which needs the last shared layer W from
  :func:`default_shared_parameters`.

A trainer uses it like this; the balancer's parameters stay out of the network optimizer::

    balancer = build_balancer("gradnorm", ["click", "like"], ["binary", "binary"], {"alpha": 1.5})
    shared = [p for _, p in default_shared_parameters(model)] if balancer.needs_shared_parameters else []
    optimizer = torch.optim.Adam(model.parameters())
    for batch in loader:
        losses = [loss_fn(logits[task], labels[task]) for task in tasks]  # T scalars
        total = balancer.combine(losses, shared)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        balancer.step()
    balancer.end_epoch(epoch_mean_losses)

For a checkpoint, ``balancer.state_dict()`` contains tensors only (safetensors can store it), and
``balancer.optimizer_state_dict()`` contains the state of its optimizer.
"""

from mtrank.balancing.base import (
    BALANCERS,
    TASK_TYPES,
    LossBalancer,
    TaskType,
    balancer_names,
    balancer_option_names,
    build_balancer,
    register_balancer,
)
from mtrank.balancing.dwa import DWABalancer
from mtrank.balancing.fixed import FixedBalancer
from mtrank.balancing.gradnorm import GradNormBalancer
from mtrank.balancing.shared_layer import default_shared_parameters
from mtrank.balancing.uncertainty import UncertaintyBalancer

__all__ = [
    "BALANCERS",
    "TASK_TYPES",
    "DWABalancer",
    "FixedBalancer",
    "GradNormBalancer",
    "LossBalancer",
    "TaskType",
    "UncertaintyBalancer",
    "balancer_names",
    "balancer_option_names",
    "build_balancer",
    "default_shared_parameters",
    "register_balancer",
]
