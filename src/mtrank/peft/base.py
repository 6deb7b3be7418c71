"""The base class every PEFT method implements, its options, and the registry that finds methods by name.

A PEFT *set* is one named group of trainable modules, such as the LoRA matrices for a new scenario.
Methods that change a module's output (adapter, LoRA) replace each target module with a
:class:`~mtrank.peft.wrapper.PeftWrapper` holding one module per set. Only the active set runs, so
several sets can share a target, and a model with no active set computes exactly what the base model
computes. Methods that feed the base model from outside (prefix-tuning) return a
:class:`StandalonePeftModule` instead, which the manager keeps beside the base model and attaches
while its set is active.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import nn

from mtrank.errors import ConfigError
from mtrank.peft.targets import TargetSite
from mtrank.peft.wrapper import InjectedModule, PeftWrapper


class StandalonePeftModule(nn.Module):
    """PEFT set module kept outside the base model, attached to it only while its set is active."""

    def activate(self) -> None:  # pragma: no cover - abstract
        """Attach to the base model so that its forward uses this module."""
        raise NotImplementedError

    def deactivate(self) -> None:  # pragma: no cover - abstract
        """Detach from the base model, which then computes exactly the base outputs again."""
        raise NotImplementedError


def ensure_wrapper(site: TargetSite) -> PeftWrapper:
    """Return the wrapper at ``site``, replacing the module there with a new wrapper if needed."""
    if isinstance(site.module, PeftWrapper):
        return site.module
    wrapper = PeftWrapper(site.module)
    setattr(site.parent, site.attribute, wrapper)
    site.module = wrapper
    return wrapper


@dataclasses.dataclass
class MethodOptions:
    """Base class of a method's options; subclasses are dataclasses with a default for every field."""

    def problems(self) -> list[str]:
        """Return one message per invalid option value; empty when all are valid."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


class PeftMethod(ABC):
    """Base class of a PEFT method: it builds and injects one set's modules into a base model.

    Subclasses set ``name`` (the registry key), ``options_class`` and, where the method has a
    natural default, ``default_targets``.

    Args:
        options: option values by name; missing ones take the defaults of ``options_class``.

    Raises:
        ConfigError: an option is unknown or invalid; every problem is listed.
    """

    name: ClassVar[str]
    options_class: ClassVar[type[MethodOptions]] = MethodOptions
    default_targets: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = parse_options(self.name, self.options_class, options or {})

    def accepts(self, module: nn.Module) -> bool:
        """Check whether the method can target ``module`` (already unwrapped from any PEFT wrapper)."""
        return True

    def check_model(self, model: nn.Module) -> None:  # noqa: B027 - optional hook, most methods accept any model
        """Raise :class:`ConfigError` when the method cannot work on ``model`` at all."""

    def inject(self, set_name: str, sites: list[TargetSite], model: nn.Module) -> StandalonePeftModule | None:
        """Insert set ``set_name``'s modules at ``sites`` of ``model``.

        The default builds every site's module first, so an invalid target leaves the model
        unchanged, and then wraps each site and adds the module to its wrapper.

        Returns:
            A module that the manager keeps outside the base model, or ``None`` when every module of
            the set lives in the wrappers.
        """
        modules = [self.build_module(site, model) for site in sites]
        for site, module in zip(sites, modules, strict=True):
            ensure_wrapper(site).add_module_for(set_name, module)
        return None

    def build_module(self, site: TargetSite, model: nn.Module) -> InjectedModule:
        """Build the set's module for one target."""
        raise NotImplementedError(f"PEFT method `{self.name}` must implement build_module or inject")


def parse_options(method: str, options_class: type[MethodOptions], values: Mapping[str, Any]) -> Any:
    """Build and validate ``options_class`` from ``values``.

    Raises:
        ConfigError: unknown option names and invalid values, all listed together.
    """
    allowed = [field.name for field in dataclasses.fields(options_class)]
    problems = [
        f"unknown option `{key}` for PEFT method `{method}`; allowed: {', '.join(allowed) or 'none'}"
        for key in values
        if key not in allowed
    ]
    if problems:
        raise ConfigError(problems)
    options = options_class(**dict(values))
    problems = [f"PEFT method `{method}`: {problem}" for problem in options.problems()]
    if problems:
        raise ConfigError(problems)
    return options


def check_int(name: str, value: Any, minimum: int) -> list[str]:
    """Return a problem message unless ``value`` is an int (not bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return [f"option `{name}` must be an integer >= {minimum}, got {value!r}"]
    return []


def check_probability(name: str, value: Any) -> list[str]:
    """Return a problem message unless ``value`` is a number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        return [f"option `{name}` must be a number in [0, 1), got {value!r}"]
    return []


def check_positive_number(name: str, value: Any) -> list[str]:
    """Return a problem message unless ``value`` is a finite number above zero."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        return [f"option `{name}` must be a finite number > 0, got {value!r}"]
    return []


PEFT_METHODS: dict[str, type[PeftMethod]] = {}


def register_peft_method(name: str) -> Callable[[type[PeftMethod]], type[PeftMethod]]:
    """Register a :class:`PeftMethod` subclass under ``name`` (a class decorator)."""

    def wrap(cls: type[PeftMethod]) -> type[PeftMethod]:
        cls.name = name
        PEFT_METHODS[name] = cls
        return cls

    return wrap


def peft_method_names() -> list[str]:
    """Return the registered PEFT method names, sorted."""
    return sorted(PEFT_METHODS)


def build_peft_method(name: str, options: Mapping[str, Any] | None = None) -> PeftMethod:
    """Build a registered PEFT method with its options.

    Args:
        name: a registered name such as ``adapter``, ``lora`` or ``prefix``.
        options: method options; see each method's options class.

    Raises:
        ConfigError: the method is unknown, or an option is unknown or invalid.
    """
    cls = PEFT_METHODS.get(name)
    if cls is None:
        raise ConfigError([f"unknown PEFT method `{name}`; choose one of: {', '.join(peft_method_names())}"])
    return cls(options)


def count_parameters(parameters: list[nn.Parameter]) -> int:
    """Return the number of scalar values in ``parameters``."""
    return sum(parameter.numel() for parameter in parameters)


def move_like(module: nn.Module, *references: nn.Module) -> nn.Module:
    """Move ``module`` to the device and dtype of the first parameter found in ``references``, in order."""
    for reference in references:
        for parameter in reference.parameters():
            return module.to(device=parameter.device, dtype=parameter.dtype)
    return module
