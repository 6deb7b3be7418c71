"""Manage named PEFT sets on a frozen base model: inject, switch, merge, count and collect parameters.

Typical fine-tuning run::

    peft = PeftModel(ranker)                      # freezes every base parameter
    peft.inject("new_scenario", "lora", ["experts.*.layers.*"], {"rank": 4})
    peft.add_trainable_module("new_scenario", "towers.new_task", new_tower)   # optional
    optimizer = torch.optim.Adam(peft.trainable_parameters())
    peft.train()                                  # base norm layers stay in eval mode
    ...
    save_peft_set(peft, "new_scenario", run_dir / "peft", base_run=base_run_id)

Frozen base, in detail: every parameter outside the active set has ``requires_grad=False``, and
:meth:`PeftModel.train` keeps every base layer with running statistics (batch norm) in eval mode,
so the base's weights and buffers stay bit for bit what they were. Base dropout still follows the
train/eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtrank.errors import ConfigError
from mtrank.peft.base import StandalonePeftModule, build_peft_method, count_parameters
from mtrank.peft.targets import find_site, iter_sites, resolve_targets
from mtrank.peft.wrapper import InjectedModule, PeftWrapper, unwrap

logger = logging.getLogger(__name__)

# Set names become keys of nn.ModuleDict and parts of file names.
SET_NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@dataclasses.dataclass
class PeftSetSpec:
    """Everything needed to rebuild a PEFT set's modules on a fresh base model.

    Attributes:
        name: the set's name.
        method: registered method name.
        targets: the target patterns as given.
        options: the method's options, defaults filled in.
        resolved_targets: names of the modules the patterns selected.
        trainable_modules: names of base-model modules trained with the set (a new task tower).
        prefix_collapsed: for ``prefix``, whether the reparameterisation was collapsed.
    """

    name: str
    method: str
    targets: list[str]
    options: dict[str, Any]
    resolved_targets: list[str]
    trainable_modules: list[str] = dataclasses.field(default_factory=list)
    prefix_collapsed: bool = False


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Sizes of a PEFT set and of the frozen base, in scalar values."""

    trainable: int
    base: int

    @property
    def percent_of_base(self) -> float:
        """Trainable values as a percentage of the base model's."""
        return 100.0 * self.trainable / self.base if self.base else float("inf")


class PeftModel(nn.Module):
    """A frozen base model plus any number of named PEFT sets, at most one active.

    ``forward`` calls the base model, so a ``PeftModel`` replaces the ranker in training and
    scoring. Attributes it lacks are read from the base model. With no active set (:meth:`disable`)
    the outputs are bit for bit those of the base model, except after :meth:`merge_lora` with
    ``keep_original=False``.

    Construction freezes every parameter of ``base_model`` (``requires_grad=False``).

    Args:
        base_model: the trained model to fine-tune; modified in place by injection.

    Example:
        >>> from mtrank.models.mlp import MLP
        >>> peft = PeftModel(MLP(4, [8], output_dim=1))
        >>> _ = peft.inject("demo", "adapter", ["layers.1"], {"bottleneck": 2})
        >>> peft.parameter_counts().trainable
        42
    """

    def __init__(self, base_model: nn.Module) -> None:
        if isinstance(base_model, PeftModel):
            raise ConfigError(["the model is already a PeftModel; inject new sets into it directly"])
        super().__init__()
        self.base_model = base_model
        self.standalone_modules = nn.ModuleDict()
        self._specs: dict[str, PeftSetSpec] = {}
        self._active: str | None = None
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)

    # ----------------------------------------------------------------------------------------------
    # Forwarding to the base model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the base model with the active set in effect."""
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "standalone_modules"):
                raise
            return getattr(self.base_model, name)

    # ----------------------------------------------------------------------------------------------
    # Sets

    @property
    def active_set(self) -> str | None:
        """Name of the active set, or ``None`` when the base model runs alone."""
        return self._active

    def set_names(self) -> list[str]:
        """Return the names of all injected sets, in injection order."""
        return list(self._specs)

    def spec(self, name: str) -> PeftSetSpec:
        """Return the description of set ``name``.

        Raises:
            ConfigError: there is no such set.
        """
        spec = self._specs.get(name)
        if spec is None:
            known = ", ".join(self._specs) or "none"
            raise ConfigError([f"no PEFT set named `{name}`; injected sets: {known}"])
        return spec

    def match_targets(
        self, method: str, targets: Sequence[str] | None = None, options: Mapping[str, Any] | None = None
    ) -> list[str]:
        """Return the names of the modules :meth:`inject` would target, without changing the model.

        Raises:
            ConfigError: as :meth:`inject`.
        """
        peft_method = build_peft_method(method, options)
        patterns = self._patterns_for(peft_method.name, peft_method.default_targets, targets)
        peft_method.check_model(self.base_model)
        sites = resolve_targets(self.base_model, patterns, peft_method.accepts, peft_method.name)
        return [site.name for site in sites]

    def inject(
        self,
        name: str,
        method: str,
        targets: Sequence[str] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        activate: bool = True,
    ) -> PeftSetSpec:
        """Add a new PEFT set and its modules to the base model.

        Args:
            name: the set's name, e.g. ``"new_scenario"``; letters, digits, ``_`` and ``-``, starting
                with a letter.
            method: ``adapter``, ``lora``, ``prefix`` or another registered method.
            targets: glob or ``re:`` patterns over module names, see :mod:`mtrank.peft.targets`;
                ``None`` takes the method's default (only ``prefix`` has one: every field-attention
                block).
            options: method options, see the method's options class.
            activate: make the new set the active one.

        Returns:
            The set's description.

        Raises:
            ConfigError: the name is invalid or taken, the method or an option is invalid, or a
                pattern selects nothing the method can target.
        """
        self._check_new_name(name)
        peft_method = build_peft_method(method, options)
        patterns = self._patterns_for(peft_method.name, peft_method.default_targets, targets)
        peft_method.check_model(self.base_model)
        sites = resolve_targets(self.base_model, patterns, peft_method.accepts, peft_method.name)
        standalone = peft_method.inject(name, sites, self.base_model)
        if standalone is not None:
            self.standalone_modules[name] = standalone
        spec = PeftSetSpec(
            name=name,
            method=peft_method.name,
            targets=list(patterns),
            options=peft_method.options.to_dict(),
            resolved_targets=[site.name for site in sites],
        )
        self._specs[name] = spec
        if activate:
            self.enable(name)
        else:
            self._apply_active_set()
        counts = self.parameter_counts(name)
        logger.info(
            "injected PEFT set %s (%s) at %d modules: %d trainable values, %.3f%% of the base model",
            name,
            spec.method,
            len(sites),
            counts.trainable,
            counts.percent_of_base,
        )
        return spec

    def add_trainable_module(self, set_name: str, module_name: str, module: nn.Module | None = None) -> None:
        """Train a base-model module together with set ``set_name``, e.g. the tower of a new task.

        With ``module`` given, it is attached to the base model at ``module_name`` first (its parent
        must exist and the name must be free). Without it, the module already at ``module_name`` is
        used, which is how :func:`mtrank.peft.io.load_peft_set` restores it on a freshly built
        model. The module's parameters and buffers are saved with the set, and its batch-norm layers
        train normally while the set is active.

        Args:
            set_name: an injected set.
            module_name: dotted module name in the base model, e.g. ``"towers.new_task"``.
            module: a new module to attach, or ``None``.

        Raises:
            ConfigError: unknown set, missing parent or module, name already taken, or the module
                already belongs to a set.
        """
        spec = self.spec(set_name)
        for other in self._specs.values():
            if module_name in other.trainable_modules:
                raise ConfigError([f"module `{module_name}` is already trained with PEFT set `{other.name}`"])
        existing = find_site(self.base_model, module_name)
        if module is not None:
            if existing is not None:
                raise ConfigError(
                    [
                        f"the base model already has a module `{module_name}`; pass no module to train "
                        "the existing one, or choose a free name"
                    ]
                )
            parent_name, _, attribute = module_name.rpartition(".")
            parent_site = find_site(self.base_model, parent_name) if parent_name else None
            if parent_name and parent_site is None:
                raise ConfigError(
                    [f"cannot attach `{module_name}`: the base model has no module `{parent_name}`"]
                )
            parent = unwrap(parent_site.module) if parent_site is not None else self.base_model
            setattr(parent, attribute, module)
        elif existing is None:
            raise ConfigError(
                [
                    f"the base model has no module `{module_name}`; build it into the base model first "
                    "or pass the module to attach"
                ]
            )
        spec.trainable_modules.append(module_name)
        self._apply_active_set()

    def remove_set(self, name: str) -> None:
        """Delete set ``name``: unmerge it, drop its modules and restore wrapped modules it alone used.

        Trainable modules registered with the set stay in the base model, frozen.
        """
        spec = self.spec(name)
        if spec.method == "lora":
            self.unmerge_lora(name)
        if self._active == name:
            self.disable()
        for site in list(iter_sites(self.base_model)):
            if isinstance(site.module, PeftWrapper) and name in site.module.peft_modules:
                del site.module.peft_modules[name]
                if len(site.module.peft_modules) == 0:
                    setattr(site.parent, site.attribute, site.module.base_layer)
        if name in self.standalone_modules:
            standalone = self.standalone_modules[name]
            if isinstance(standalone, StandalonePeftModule):
                standalone.deactivate()
            del self.standalone_modules[name]
        del self._specs[name]
        self._apply_active_set()

    def unload(self) -> nn.Module:
        """Remove every set and return the base model with its original modules back in place."""
        for name in list(self._specs):
            self.remove_set(name)
        return self.base_model

    # ----------------------------------------------------------------------------------------------
    # Switching

    def enable(self, name: str) -> None:
        """Make set ``name`` the active one; merged LoRA weights of other sets are unmerged first.

        Only the active set's parameters (and its trainable modules) get ``requires_grad=True``.

        Raises:
            ConfigError: there is no such set.
        """
        self.spec(name)
        for other in self._specs.values():
            if other.name != name and self._is_merged(other.name):
                logger.info("unmerging LoRA set %s before switching to %s", other.name, name)
                self.unmerge_lora(other.name)
        self._active = name
        self._apply_active_set()

    def disable(self) -> None:
        """Deactivate every set, so that the model computes exactly the base outputs.

        Merged LoRA weights are unmerged first.
        """
        for spec in self._specs.values():
            if self._is_merged(spec.name):
                self.unmerge_lora(spec.name)
        self._active = None
        self._apply_active_set()

    def set_active(self, name: str | None) -> None:
        """Switch to set ``name``, or to the base model alone with ``None``; for per-request switching.

        NOTE: the active set is state of the model, so concurrent requests for different sets need
        one model copy each.
        """
        if name is None:
            self.disable()
        else:
            self.enable(name)

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[PeftModel]:
        """Activate ``name`` (or no set) inside a ``with`` block and restore the previous set after it."""
        previous = self._active
        self.set_active(name)
        try:
            yield self
        finally:
            self.set_active(previous)

    # ----------------------------------------------------------------------------------------------
    # LoRA merge and prefix collapse

    def merge_lora(self, name: str, *, keep_original: bool = True) -> None:
        """Activate LoRA set ``name`` and fold its updates into the base weights, for faster scoring.

        Args:
            name: a set injected with ``lora``.
            keep_original: keep copies of the touched base weights so that unmerging (also done
                by switching sets or :meth:`disable`) restores them bit for bit. Without copies,
                unmerging subtracts the update and the base outputs match only within rounding.

        Raises:
            ConfigError: the set is unknown or not a LoRA set.
        """
        self._check_method(name, "lora", "merged")
        self.enable(name)
        for wrapper, module in self._injected_modules(name):
            module.merge(wrapper.base_layer, keep_original=keep_original)

    def unmerge_lora(self, name: str) -> None:
        """Undo :meth:`merge_lora` for set ``name``; a no-op when it is not merged."""
        self._check_method(name, "lora", "unmerged")
        for wrapper, module in self._injected_modules(name):
            module.unmerge(wrapper.base_layer)

    def collapse_prefix(self, name: str) -> None:
        """Replace prefix set ``name``'s reparameterisation MLP by the prefixes it produces.

        Do this after training, because an optimizer built before keeps the old parameters.

        Raises:
            ConfigError: the set is unknown or not a prefix set.
        """
        self._check_method(name, "prefix", "collapsed")
        encoder = self.standalone_modules[name]
        collapse = getattr(encoder, "collapse", None)
        if collapse is None:
            raise ConfigError([f"the module of PEFT set `{name}` cannot be collapsed"])
        collapse()
        self._specs[name].prefix_collapsed = True
        self._apply_active_set()

    # ----------------------------------------------------------------------------------------------
    # Parameters and state

    def set_components(self, name: str) -> list[tuple[str, nn.Module]]:
        """Return set ``name``'s modules with the key prefix their state is saved under.

        Keys are ``targets/<module name>`` for injected modules, ``set`` for a standalone module
        (prefix encoder) and ``modules/<module name>`` for trainable modules.
        """
        spec = self.spec(name)
        components: list[tuple[str, nn.Module]] = []
        for site in iter_sites(self.base_model):
            if isinstance(site.module, PeftWrapper) and name in site.module.peft_modules:
                components.append((f"targets/{site.name}", site.module.peft_modules[name]))
        if name in self.standalone_modules:
            components.append(("set", self.standalone_modules[name]))
        for module_name in spec.trainable_modules:
            trainable_site = find_site(self.base_model, module_name)
            if trainable_site is None:
                raise ConfigError(
                    [f"trainable module `{module_name}` of PEFT set `{name}` is no longer in the model"]
                )
            components.append((f"modules/{module_name}", trainable_site.module))
        return components

    def set_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Return set ``name``'s parameters and persistent buffers by key, see :meth:`set_components`.

        The tensors are the live ones (not copies).
        """
        state: dict[str, torch.Tensor] = {}
        for prefix, module in self.set_components(name):
            for key, tensor in module.state_dict(keep_vars=True).items():
                state[f"{prefix}/{key}"] = tensor
        return state

    def trainable_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Return the parameters fine-tuning set ``name`` trains, each once.

        These are exactly the set's PEFT parameters plus those of its trainable modules; pass them
        to the optimizer. With ``name=None``, the active set's.

        Raises:
            ConfigError: the set is unknown, or ``name`` is ``None`` and no set is active.
        """
        if name is None:
            if self._active is None:
                raise ConfigError(["no PEFT set is active; call enable(name) or pass the set name"])
            name = self._active
        parameters: list[nn.Parameter] = []
        seen: set[int] = set()
        for _, module in self.set_components(name):
            for parameter in module.parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    parameters.append(parameter)
        return parameters

    def base_parameters(self) -> list[nn.Parameter]:
        """Return the base model's own parameters: everything not in a set or a trainable module."""
        owned = {id(parameter) for name in self._specs for parameter in self.trainable_parameters(name)}
        return [parameter for parameter in self.base_model.parameters() if id(parameter) not in owned]

    def parameter_counts(self, name: str | None = None) -> ParameterCounts:
        """Count set ``name``'s trainable values (the active set's by default) and the base model's."""
        return ParameterCounts(
            trainable=count_parameters(self.trainable_parameters(name)),
            base=count_parameters(self.base_parameters()),
        )

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the base model's parameters and persistent buffers under their original names.

        PEFT modules and trainable modules of sets are left out, and wrapper levels are removed from
        the names, so the result compares key by key with ``base_model.state_dict()`` taken before
        injection. The tensors are the live ones (not copies).
        """
        excluded = [module_name for spec in self._specs.values() for module_name in spec.trainable_modules]
        state = _own_state(unwrap(self.base_model), "")
        for site in iter_sites(self.base_model):
            if any(site.name == name or site.name.startswith(name + ".") for name in excluded):
                continue
            state.update(_own_state(unwrap(site.module), site.name + "."))
        return state

    # ----------------------------------------------------------------------------------------------
    # Train mode

    def train(self, mode: bool = True) -> PeftModel:
        """Set train or eval mode, keeping the frozen base's running statistics unchanged.

        In train mode, every module of the base model that tracks running statistics (batch norm,
        instance norm with ``track_running_stats``) is put back in eval mode, so it normalises
        with its stored statistics and never updates them. Those inside the active set's
        trainable modules are the exception and train normally.
        """
        super().train(mode)
        if not mode:
            return self
        trainable: set[int] = set()
        if self._active is not None:
            for module_name in self._specs[self._active].trainable_modules:
                site = find_site(self.base_model, module_name)
                if site is not None:
                    trainable.update(id(module) for module in site.module.modules())
        for module in self.base_model.modules():
            if _tracks_running_stats(module) and id(module) not in trainable:
                module.eval()
        return self

    # ----------------------------------------------------------------------------------------------
    # Internals

    def _apply_active_set(self) -> None:
        active = self._active
        for module in self.base_model.modules():
            if isinstance(module, PeftWrapper):
                module.active_set = active
        for standalone in self.standalone_modules.values():
            if isinstance(standalone, StandalonePeftModule):
                standalone.deactivate()
        if active is not None and active in self.standalone_modules:
            standalone = self.standalone_modules[active]
            if isinstance(standalone, StandalonePeftModule):
                standalone.activate()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        if active is not None:
            for parameter in self.trainable_parameters(active):
                parameter.requires_grad_(True)
        self.train(self.training)

    def _injected_modules(self, name: str) -> list[tuple[PeftWrapper, InjectedModule]]:
        pairs = []
        for module in self.base_model.modules():
            if isinstance(module, PeftWrapper) and name in module.peft_modules:
                injected = module.peft_modules[name]
                if isinstance(injected, InjectedModule):
                    pairs.append((module, injected))
        return pairs

    def _is_merged(self, name: str) -> bool:
        return any(module.merged for _, module in self._injected_modules(name))

    def _check_method(self, name: str, method: str, action: str) -> None:
        spec = self.spec(name)
        if spec.method != method:
            raise ConfigError(
                [f"PEFT set `{name}` uses `{spec.method}`; only `{method}` sets can be {action}"]
            )

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or SET_NAME_PATTERN.fullmatch(name) is None:
            raise ConfigError(
                [
                    f"invalid PEFT set name {name!r}: use letters, digits, `_` and `-`, "
                    "starting with a letter, e.g. `new_scenario`"
                ]
            )
        if hasattr(nn.ModuleDict(), name):
            raise ConfigError([f"invalid PEFT set name `{name}`: it is reserved by torch.nn.ModuleDict"])
        if name in self._specs:
            raise ConfigError([f"a PEFT set named `{name}` already exists; choose another name or remove it"])

    @staticmethod
    def _patterns_for(
        method: str, defaults: tuple[str, ...] | None, targets: Sequence[str] | None
    ) -> list[str]:
        if isinstance(targets, str):
            raise ConfigError([f"PEFT targets must be a list of patterns, got the string {targets!r}"])
        if targets:
            return list(targets)
        if defaults is None:
            raise ConfigError(
                [
                    f"PEFT method `{method}` needs target patterns, e.g. `experts.*` for adapters after "
                    "each expert or `towers.**` for LoRA on every tower layer"
                ]
            )
        return list(defaults)


def _own_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, parameter in module.named_parameters(recurse=False):
        state[prefix + key] = parameter
    for key, buffer in module.named_buffers(recurse=False):
        if key not in module._non_persistent_buffers_set:
            state[prefix + key] = buffer
    return state


def _tracks_running_stats(module: nn.Module) -> bool:
    return getattr(module, "track_running_stats", False) is True and isinstance(
        getattr(module, "running_mean", None), torch.Tensor
    )
