"""Selection of the last shared layer W, whose gradient norms GradNorm balances."""

from __future__ import annotations

from torch import nn

from mtrank.errors import ConfigError


def default_shared_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Return the parameters of the model's last shared layer W, with their names in the model.

    The model chooses W itself through a method ``last_shared_parameters()`` that returns a
    sequence of ``nn.Parameter``: the last layer whose output every task's loss depends on, such as
    the last linear weights of the experts in MMoE. A model wrapped in ``DistributedDataParallel``
    or ``DataParallel`` is unwrapped first.

    Args:
        model: the multi-task network.

    Returns:
        ``(name, parameter)`` pairs in the order the model returned them, without repeats; names
        are those of ``model.named_parameters()`` on the unwrapped model.

    Raises:
        ConfigError: the model has no ``last_shared_parameters()`` method, or it returned nothing,
            a parameter that is not part of the model, or a frozen parameter.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    module = model.module if isinstance(model, wrappers) else model
    model_name = type(module).__name__
    method = getattr(module, "last_shared_parameters", None)
    if not callable(method):
        raise ConfigError(
            [
                f"GradNorm needs the last shared layer W, but model `{model_name}` has no method "
                "`last_shared_parameters()`; add one that returns the parameters of the last layer shared "
                "by all tasks, or choose another loss balancer"
            ]
        )
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    selected: list[tuple[str, nn.Parameter]] = []
    problems: list[str] = []
    for parameter in method():
        name = names.get(id(parameter))
        if name is None:
            problems.append(
                f"`{model_name}.last_shared_parameters()` returned a {type(parameter).__name__} of shape "
                f"{tuple(getattr(parameter, 'shape', ()))} that is not a parameter of the model"
            )
        elif not parameter.requires_grad:
            problems.append(
                f"shared parameter `{name}` is frozen (requires_grad=False); GradNorm needs its gradient"
            )
        elif all(parameter is not chosen for _, chosen in selected):
            selected.append((name, parameter))
    if not selected and not problems:
        problems.append(f"`{model_name}.last_shared_parameters()` returned no parameters; it must return W")
    if problems:
        raise ConfigError(problems)
    return selected
