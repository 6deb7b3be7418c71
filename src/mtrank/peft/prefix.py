"""Prefix-tuning (Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021).

Every field-attention layer receives P learned key vectors and P learned value vectors, prepended to
the keys and values computed from the fields, so each field can also attend to them. The base
weights stay frozen. As in the paper, the prefixes are reparameterised during training: a small
``(P, E)`` embedding passes through an MLP whose output is split into each layer's keys and
values, which Li & Liang found more stable than optimising the prefixes directly. After training,
:meth:`PrefixEncoder.collapse` replaces the embedding and MLP with the plain prefix tensors.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import cast

import torch
from torch import nn
from torch.nn import functional

from mtrank.errors import ConfigError
from mtrank.models.activations import ACTIVATIONS, activation_names, build_activation
from mtrank.models.attention import FieldAttention, FieldAttentionLayer
from mtrank.peft.base import (
    MethodOptions,
    PeftMethod,
    StandalonePeftModule,
    check_int,
    move_like,
    register_peft_method,
)
from mtrank.peft.targets import TargetSite
from mtrank.peft.wrapper import unwrap

# A starting point, not a tuned value: about as many learned positions as a ranking model has fields.
# The best length depends on the task, so tune it.
DEFAULT_PREFIX_LENGTH = 10
# The reparameterisation exists only during training and is collapsed afterwards, so it only needs to
# train smoothly. These widths are a starting point, not tuned values.
DEFAULT_PREFIX_EMBEDDING_DIM = 16
DEFAULT_PREFIX_HIDDEN_DIM = 64

ATTENTION_CONFIG_KEY = "model.attention"


@dataclasses.dataclass
class PrefixOptions(MethodOptions):
    """Options of the ``prefix`` method.

    Attributes:
        length: P, the number of prefix positions per layer.
        embedding_dim: E, the width of the reparameterisation embedding.
        hidden_dim: hidden width of the reparameterisation MLP.
        activation: activation name inside the MLP; Li & Liang use tanh.
    """

    length: int = DEFAULT_PREFIX_LENGTH
    embedding_dim: int = DEFAULT_PREFIX_EMBEDDING_DIM
    hidden_dim: int = DEFAULT_PREFIX_HIDDEN_DIM
    activation: str = "tanh"

    def problems(self) -> list[str]:
        """Return one message per invalid option value."""
        problems = (
            check_int("length", self.length, 1)
            + check_int("embedding_dim", self.embedding_dim, 1)
            + check_int("hidden_dim", self.hidden_dim, 1)
        )
        if not isinstance(self.activation, str) or self.activation.lower() not in ACTIVATIONS:
            problems.append(
                f"option `activation` is {self.activation!r}; choose one of: {', '.join(activation_names())}"
            )
        return problems


class PrefixEncoder(StandalonePeftModule):
    """Produces the key and value prefixes of a list of field-attention layers.

    Shapes: P ``length``, E ``embedding_dim``, N hidden width, L layers, W_l the width of layer l.

    Before :meth:`collapse`, ``embedding`` is ``(P, E)`` and ``mlp`` maps it to
    ``(P, 2 * sum_l W_l)``, which splits into each layer's ``(P, W_l)`` key and value. After it,
    ``keys[l]`` and ``values[l]`` hold those tensors directly.

    The layers belong to the base model and are kept in a plain list, so they are not part of
    this module's parameters or state dict.

    Args:
        layers: the attention layers to feed, in order.
        options: prefix options.
    """

    def __init__(self, layers: list[FieldAttentionLayer], options: PrefixOptions) -> None:
        super().__init__()
        self._layers = list(layers)
        self.widths = [layer.out_dim for layer in layers]
        self.length = options.length
        self.collapsed = False
        self.embedding: nn.Parameter | None = nn.Parameter(torch.randn(options.length, options.embedding_dim))
        self.mlp: nn.Sequential | None = nn.Sequential(
            nn.Linear(options.embedding_dim, options.hidden_dim),
            build_activation(options.activation),
            nn.Linear(options.hidden_dim, 2 * sum(self.widths)),
        )
        self.keys = nn.ParameterList()
        self.values = nn.ParameterList()

    @property
    def layers(self) -> list[FieldAttentionLayer]:
        """The attention layers this encoder feeds, in order."""
        return list(self._layers)

    def layer_prefix(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return layer ``index``'s key and value prefixes, each ``(P, W_index)``."""
        if self.collapsed:
            return self.keys[index], self.values[index]
        if self.mlp is None or self.embedding is None:
            raise RuntimeError("prefix encoder has neither its MLP nor collapsed prefixes")
        # Only the rows of the last linear layer that belong to this layer are computed.
        start = 2 * sum(self.widths[:index])
        width = self.widths[index]
        hidden = self.mlp[1](self.mlp[0](self.embedding))  # (P, N)
        last = cast(nn.Linear, self.mlp[2])
        rows = slice(start, start + 2 * width)
        key_value = functional.linear(hidden, last.weight[rows], last.bias[rows])  # (P, 2 * W_index)
        key, value = key_value.split(width, dim=1)  # (P, W_index) each
        return key, value

    def all_prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return every layer's ``(key, value)`` pair, each ``(P, W_l)``."""
        return [self.layer_prefix(index) for index in range(len(self._layers))]

    def collapse(self) -> None:
        """Replace the embedding and MLP by the prefixes they currently produce.

        The outputs stay the same. Build a new optimizer afterwards, because the parameters change.
        """
        if self.collapsed:
            return
        with torch.no_grad():
            prefixes = [(key.detach().clone(), value.detach().clone()) for key, value in self.all_prefixes()]
        for key, value in prefixes:
            self.keys.append(nn.Parameter(key))
            self.values.append(nn.Parameter(value))
        self.embedding = None
        self.mlp = None
        self.collapsed = True

    def activate(self) -> None:
        """Make every target layer read its prefix from this encoder."""
        for index, layer in enumerate(self._layers):
            layer.prefix_provider = functools.partial(self.layer_prefix, index)

    def deactivate(self) -> None:
        """Remove the prefixes from every target layer."""
        for layer in self._layers:
            layer.prefix_provider = None


@register_peft_method("prefix")
class PrefixMethod(PeftMethod):
    """Learn key/value prefixes for every layer of the target :class:`FieldAttention` blocks.

    The default targets are all field-attention blocks of the model.
    """

    options_class = PrefixOptions
    default_targets = ("**",)

    def accepts(self, module: nn.Module) -> bool:
        """Accept field-attention blocks."""
        return isinstance(module, FieldAttention)

    def check_model(self, model: nn.Module) -> None:
        """Raise when the model has no field-attention block.

        Raises:
            ConfigError: no :class:`FieldAttention` module in ``model``.
        """
        if not any(isinstance(module, FieldAttention) for module in model.modules()):
            raise ConfigError(
                [
                    "prefix-tuning needs the field-attention block, but the base model has none; "
                    f"enable it with the config key `{ATTENTION_CONFIG_KEY}` and train the base model again, "
                    "or fine-tune with `adapter` or `lora`"
                ]
            )

    def inject(self, set_name: str, sites: list[TargetSite], model: nn.Module) -> PrefixEncoder:
        """Build one encoder that feeds every layer of the target blocks."""
        layers: list[FieldAttentionLayer] = []
        for site in sites:
            block = unwrap(site.module)
            if isinstance(block, FieldAttention):
                layers.extend(block.attention_layers())
        options: PrefixOptions = self.options
        encoder = PrefixEncoder(layers, options)
        move_like(encoder, *(layer for layer in layers))
        return encoder
