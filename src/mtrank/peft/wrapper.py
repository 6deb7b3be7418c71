"""The wrapper that replaces a PEFT target module, and the modules it runs.

A method that changes a module's output (adapter, LoRA) replaces each target module with a
:class:`PeftWrapper`. The wrapper keeps the original as ``base_layer`` and one
:class:`InjectedModule` per PEFT set, of which only the active set's runs.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn

from mtrank.errors import ConfigError


class InjectedModule(nn.Module):
    """Trainable module of one PEFT set at one target, run by a :class:`PeftWrapper`.

    Subclasses implement :meth:`forward`, which receives the wrapped base module and its inputs and
    returns what the wrapped module should return while this set is active.
    """

    def forward(self, base_layer: nn.Module, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def merged(self) -> bool:
        """Whether the module's effect is currently folded into the base weights."""
        return False

    def merge(self, base_layer: nn.Module, *, keep_original: bool = True) -> None:
        """Fold the module into ``base_layer``'s weights; only linear methods such as LoRA can."""
        raise ConfigError([f"{type(self).__name__} cannot be merged into the base weights; only LoRA can"])

    def unmerge(self, base_layer: nn.Module) -> None:
        """Undo :meth:`merge`."""
        raise ConfigError([f"{type(self).__name__} cannot be merged into the base weights; only LoRA can"])


class PeftWrapper(nn.Module):
    """Replacement for a target module that runs the active PEFT set's :class:`InjectedModule`.

    With no active set, or an active set that has no module here, :meth:`forward` calls
    ``base_layer`` with the same arguments, so the output is bit for bit the base output.
    Attributes that the wrapper lacks (``out_dim``, ``weight``, ``embedding_dim`` ...) are read from
    ``base_layer``, so code that inspects the original module keeps working. ``isinstance`` checks
    against the original type do not.

    Args:
        base_layer: the module being wrapped; its parameters are left as they are.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.peft_modules = nn.ModuleDict()
        self.active_set: str | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the active set's module around ``base_layer``, or ``base_layer`` alone."""
        module = self.active_module()
        if module is None:
            return self.base_layer(*args, **kwargs)
        return module(self.base_layer, *args, **kwargs)

    def active_module(self) -> InjectedModule | None:
        """Return the active set's module here, or ``None`` when the base layer runs alone."""
        if self.active_set is None or self.active_set not in self.peft_modules:
            return None
        return cast(InjectedModule, self.peft_modules[self.active_set])

    def add_module_for(self, set_name: str, module: InjectedModule) -> None:
        """Register ``module`` as set ``set_name``'s module at this target."""
        if set_name in self.peft_modules:
            raise ConfigError([f"PEFT set `{set_name}` already has a module at this target"])
        self.peft_modules[set_name] = module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "peft_modules"):
                raise
            return getattr(self.base_layer, name)


def unwrap(module: nn.Module) -> nn.Module:
    """Return the original module under any :class:`PeftWrapper`."""
    while isinstance(module, PeftWrapper):
        module = module.base_layer
    return module
