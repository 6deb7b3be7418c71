"""Bottleneck adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019).

An adapter follows a target module: its output ``h`` of width W becomes
``h + up(act(down(h)))``, with ``down`` mapping W to a small bottleneck and ``up`` mapping back. The
up-projection starts at zero, so a freshly injected adapter returns ``h`` exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from mtrank.errors import ConfigError
from mtrank.models.activations import ACTIVATIONS, activation_names, build_activation
from mtrank.peft.base import MethodOptions, PeftMethod, check_int, move_like, register_peft_method
from mtrank.peft.targets import TargetSite, infer_output_width
from mtrank.peft.wrapper import InjectedModule, unwrap

# A starting point, not a tuned value: ranking towers and experts are tens of units wide, far narrower
# than the 1024-wide BERT-large layers Houlsby et al. 2019 adapted. Tune it per task.
DEFAULT_BOTTLENECK = 8


@dataclasses.dataclass
class AdapterOptions(MethodOptions):
    """Options of the ``adapter`` method.

    Attributes:
        bottleneck: width of the down-projection.
        activation: activation name between the projections, see
            :func:`mtrank.models.activations.activation_names`.
    """

    bottleneck: int = DEFAULT_BOTTLENECK
    activation: str = "relu"

    def problems(self) -> list[str]:
        """Return one message per invalid option value."""
        problems = check_int("bottleneck", self.bottleneck, 1)
        if not isinstance(self.activation, str) or self.activation.lower() not in ACTIVATIONS:
            problems.append(
                f"option `activation` is {self.activation!r}; choose one of: {', '.join(activation_names())}"
            )
        return problems


class BottleneckAdapter(InjectedModule):
    """Residual bottleneck applied to the output of the wrapped module.

    Shapes: W ``width`` (last dimension of the wrapped module's output), R ``bottleneck``; any
    leading dimensions pass through, so ``(B, W)`` and ``(B, F, W)`` outputs both work.

    Args:
        width: W.
        bottleneck: R.
        activation: activation name between the projections.
    """

    def __init__(self, width: int, bottleneck: int, activation: str = "relu") -> None:
        super().__init__()
        self.width = width
        self.down = nn.Linear(width, bottleneck)
        self.activation = build_activation(activation)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, base_layer: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run ``base_layer`` and adapt its output.

        Raises:
            TypeError: the wrapped module did not return a tensor.
            ValueError: its output's last dimension is not W.
        """
        hidden = base_layer(*args, **kwargs)
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(
                f"an adapter needs a tensor output from {type(base_layer).__name__}, got {type(hidden)}"
            )
        return self.adapt(hidden)

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map ``(..., W)`` to ``(..., W)``: ``hidden + up(act(down(hidden)))``."""
        if hidden.shape[-1] != self.width:
            raise ValueError(
                f"adapter of width {self.width} received an output of shape {tuple(hidden.shape)}"
            )
        return hidden + self.up(self.activation(self.down(hidden)))


@register_peft_method("adapter")
class AdapterMethod(PeftMethod):
    """Insert a :class:`BottleneckAdapter` after every target module.

    Targets can be any module whose output width can be inferred (see
    :func:`mtrank.peft.targets.infer_output_width`): an expert or tower MLP, one block of an MLP's
    ``layers`` such as its activation, or the field-attention block.
    """

    options_class = AdapterOptions

    def accepts(self, module: nn.Module) -> bool:
        """Accept any module with a forward; containers such as ``ModuleList`` have none."""
        return not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict))

    def build_module(self, site: TargetSite, model: nn.Module) -> BottleneckAdapter:
        """Build an adapter as wide as the target's output.

        Raises:
            ConfigError: the output width of the target cannot be inferred.
        """
        width = infer_output_width(site)
        if width is None:
            raise ConfigError(
                [
                    f"cannot infer the output width of `{site.name}` ({type(unwrap(site.module)).__name__}) "
                    "for an adapter; target a module with `out_dim`, `out_features` or `embedding_dim`, "
                    "such as an MLP, an nn.Linear or the field-attention block"
                ]
            )
        options: AdapterOptions = self.options
        adapter = BottleneckAdapter(width, options.bottleneck, options.activation)
        move_like(adapter, unwrap(site.module), model)
        return adapter
