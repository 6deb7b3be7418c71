"""Field attention: AutoInt-style multi-head self-attention over per-feature embeddings.

Song et al., "AutoInt: Automatic Feature Interaction Learning via Self-Attentive Neural Networks",
CIKM 2019. Each layer lets every field attend to every other field, so stacked layers model
higher-order feature interactions. The query, key and value projections are plain ``nn.Linear``
modules so that LoRA can target them, and every layer accepts a key/value prefix so that
prefix-tuning can steer the attention without touching the base weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from mtrank.errors import ConfigError
from mtrank.models.activations import build_activation

PrefixProvider = Callable[[], tuple[torch.Tensor, torch.Tensor] | None]
"""Callable that returns one layer's ``(prefix_key, prefix_value)``, each ``(P, H*Dh)``, or ``None``."""


class FieldAttentionLayer(nn.Module):
    """One multi-head self-attention layer over fields, with a residual connection.

    Shapes: B batch, F fields, I ``in_dim``, H ``num_heads``, Dh ``head_dim``, W = H*Dh the output
    width, P prefix length.

    The layer computes ``act(norm(attention(x) + residual(x)))``. Scores are scaled by
    ``1 / sqrt(Dh)`` as in Vaswani et al. 2017. The residual is ``x`` itself when I equals W and a
    bias-free linear projection of ``x`` otherwise, as in AutoInt.

    Prefixes: a ``(P, W)`` key prefix and value prefix are prepended to the projected keys and
    values of every sample, so each field also attends to P learned positions. They come from the
    ``prefix_key``/``prefix_value`` arguments of :meth:`forward` or, when those are not given, from
    ``prefix_provider``, which PEFT code sets to a callable returning the pair (or ``None`` to
    switch the prefix off). Queries and the output shape do not change with P.

    Args:
        in_dim: input width I of each field.
        num_heads: number of heads H.
        head_dim: width Dh of each head.
        residual: add the (projected) input to the attention output.
        layer_norm: apply ``nn.LayerNorm(W)`` to the sum of attention output and residual.
        activation: activation name applied last; AutoInt uses ``relu``.
        dropout: dropout probability on the attention weights.
        bias: give the query, key and value projections a bias.

    Raises:
        ConfigError: a size is below 1 or ``dropout`` lies outside ``[0, 1)``.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        num_heads: int,
        head_dim: int,
        residual: bool = True,
        layer_norm: bool = False,
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        _validate_sizes(in_dim=in_dim, num_heads=num_heads, head_dim=head_dim, dropout=dropout)
        width = num_heads * head_dim
        self.in_dim = in_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.out_dim = width
        self.query = nn.Linear(in_dim, width, bias=bias)
        self.key = nn.Linear(in_dim, width, bias=bias)
        self.value = nn.Linear(in_dim, width, bias=bias)
        self.residual_projection: nn.Module | None = None
        if residual:
            self.residual_projection = (
                nn.Identity() if in_dim == width else nn.Linear(in_dim, width, bias=False)
            )
        self.norm = nn.LayerNorm(width) if layer_norm else None
        self.activation = build_activation(activation)
        self.attention_dropout = nn.Dropout(dropout)
        self.prefix_provider: PrefixProvider | None = None

    def forward(
        self,
        x: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over the fields of ``x``.

        Args:
            x: field embeddings, ``(B, F, I)``.
            prefix_key: optional ``(P, W)`` keys prepended for every sample; overrides
                ``prefix_provider``.
            prefix_value: optional ``(P, W)`` values; given together with ``prefix_key``.

        Returns:
            ``(B, F, W)``.

        Raises:
            ValueError: ``x`` is not ``(B, F, I)``, only one of the prefixes is given, or a prefix
                is not ``(P, W)``.
        """
        # Shape checks are skipped while tracing for export, where they would become constants.
        tracing = torch.jit.is_tracing()
        if not tracing and (x.dim() != 3 or x.shape[-1] != self.in_dim):
            raise ValueError(
                f"field attention expects input of shape (B, F, {self.in_dim}), got {tuple(x.shape)}"
            )
        if prefix_key is None and prefix_value is None and self.prefix_provider is not None:
            prefix = self.prefix_provider()
            if prefix is not None:
                prefix_key, prefix_value = prefix
        batch, fields, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim

        # Step 1: project to queries, keys and values; prepend the prefix to keys and values.
        query = self.query(x)  # (B, F, W)
        key = self.key(x)  # (B, F, W)
        value = self.value(x)  # (B, F, W)
        if prefix_key is not None or prefix_value is not None:
            key, value = self._prepend_prefix(key, value, prefix_key, prefix_value, check=not tracing)
        keys_len = key.shape[1]

        # Step 2: split heads and attend.
        query = query.view(batch, fields, heads, head_dim).transpose(1, 2)  # (B, H, F, Dh)
        key = key.view(batch, keys_len, heads, head_dim).transpose(1, 2)  # (B, H, P+F, Dh)
        value = value.view(batch, keys_len, heads, head_dim).transpose(1, 2)  # (B, H, P+F, Dh)
        scores = torch.einsum("bhfd,bhkd->bhfk", query, key) / math.sqrt(head_dim)  # (B, H, F, P+F)
        weights = self.attention_dropout(torch.softmax(scores, dim=-1))  # (B, H, F, P+F)
        attended = torch.einsum("bhfk,bhkd->bhfd", weights, value)  # (B, H, F, Dh)
        out = attended.transpose(1, 2).reshape(batch, fields, heads * head_dim)  # (B, F, W)

        # Step 3: residual, optional layer norm, activation.
        if self.residual_projection is not None:
            out = out + self.residual_projection(x)
        if self.norm is not None:
            out = self.norm(out)
        return self.activation(out)

    def _prepend_prefix(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        prefix_key: torch.Tensor | None,
        prefix_value: torch.Tensor | None,
        *,
        check: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return key and value ``(B, F, W)`` with the ``(P, W)`` prefixes prepended: ``(B, P+F, W)``."""
        if prefix_key is None or prefix_value is None:
            raise ValueError("give both `prefix_key` and `prefix_value` to field attention, or neither")
        width = self.out_dim
        batch = key.shape[0]
        prefix_len = prefix_key.shape[0]
        if check:
            self._check_prefix(prefix_key, prefix_value)
        key = torch.cat([prefix_key.expand(batch, prefix_len, width), key], dim=1)  # (B, P+F, W)
        value = torch.cat([prefix_value.expand(batch, prefix_len, width), value], dim=1)  # (B, P+F, W)
        return key, value

    def _check_prefix(self, prefix_key: torch.Tensor, prefix_value: torch.Tensor) -> None:
        width = self.out_dim
        for label, prefix in (("prefix_key", prefix_key), ("prefix_value", prefix_value)):
            if prefix.dim() != 2 or prefix.shape[1] != width:
                raise ValueError(f"`{label}` must have shape (P, {width}), got {tuple(prefix.shape)}")
        if prefix_key.shape[0] != prefix_value.shape[0]:
            raise ValueError(
                f"`prefix_key` has {prefix_key.shape[0]} rows but `prefix_value` has {prefix_value.shape[0]}"
            )


class FieldAttention(nn.Module):
    """Stack of :class:`FieldAttentionLayer` over per-field embeddings.

    Shapes: B batch, F fields, D ``embedding_dim``, H ``num_heads``, Dh ``head_dim``,
    W = H*Dh = ``out_dim``.

    The first layer maps width D to W and later layers map W to W. To feed an MLP backbone, flatten
    the output to ``(B, F*W)``.

    Args:
        embedding_dim: width D of each field embedding.
        num_layers: number of stacked attention layers.
        num_heads: heads H per layer.
        head_dim: width Dh of each head.
        residual: residual connection in every layer, projected when D differs from W.
        layer_norm: layer norm in every layer.
        activation: activation name applied at the end of every layer.
        dropout: dropout probability on the attention weights.
        bias: bias on the query, key and value projections.

    Raises:
        ConfigError: a size is below 1 or ``dropout`` lies outside ``[0, 1)``.

    NOTE: export with ``torch.jit.trace`` (which ONNX export also uses). ``torch.jit.script`` fails
    on the prefix hook and the shape-check messages.

    Example:
        >>> attention = FieldAttention(8, num_layers=2, num_heads=2, head_dim=4)
        >>> attention(torch.zeros(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(
        self,
        embedding_dim: int,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        residual: bool = True,
        layer_norm: bool = False,
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ConfigError([f"`num_layers` of field attention must be at least 1, got {num_layers}"])
        _validate_sizes(in_dim=embedding_dim, num_heads=num_heads, head_dim=head_dim, dropout=dropout)
        width = num_heads * head_dim
        self.layers = nn.ModuleList(
            FieldAttentionLayer(
                embedding_dim if index == 0 else width,
                num_heads=num_heads,
                head_dim=head_dim,
                residual=residual,
                layer_norm=layer_norm,
                activation=activation,
                dropout=dropout,
                bias=bias,
            )
            for index in range(num_layers)
        )
        self.in_dim = embedding_dim
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map field embeddings ``(B, F, D)`` to ``(B, F, W)``."""
        for layer in self.layers:
            x = layer(x)
        return x

    def attention_layers(self) -> list[FieldAttentionLayer]:
        """Return the attention layers in order, unwrapping PEFT wrappers, for prefix-tuning."""
        layers = []
        for module in self.layers:
            # A PEFT wrapper keeps the wrapped layer as `base_layer`.
            while not isinstance(module, FieldAttentionLayer) and hasattr(module, "base_layer"):
                module = cast(nn.Module, module.base_layer)
            if not isinstance(module, FieldAttentionLayer):
                raise TypeError(
                    f"field attention contains {type(module).__name__}, not a FieldAttentionLayer"
                )
            layers.append(module)
        return layers


def _validate_sizes(*, in_dim: int, num_heads: int, head_dim: int, dropout: float) -> None:
    problems = []
    for label, size in (("embedding_dim", in_dim), ("num_heads", num_heads), ("head_dim", head_dim)):
        if size < 1:
            problems.append(f"`{label}` of field attention must be at least 1, got {size}")
    if not 0.0 <= dropout < 1.0:
        problems.append(f"`dropout` of field attention must lie in [0, 1), got {dropout}")
    if problems:
        raise ConfigError(problems)
