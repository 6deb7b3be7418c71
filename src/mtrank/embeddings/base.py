"""The interface every embedding kind implements, and the registry that finds kinds by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtrank.errors import ConfigError


class FeatureEmbedding(nn.Module):
    """Base class of one categorical feature's embedding.

    Shapes: B batch, D ``embedding_dim``.

    Subclasses take int64 ids of shape ``(B,)`` and return ``(B, D)`` floats. ``needs_vocabulary``
    informs the data pipeline whether ids are vocabulary indices (a table) or raw int64 values that the
    module hashes itself (hashing trick, Deep Hash Embedding).
    """

    embedding_dim: int
    needs_vocabulary: bool = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


EmbeddingFactory = Callable[..., FeatureEmbedding]
EMBEDDING_KINDS: dict[str, EmbeddingFactory] = {}


def register_embedding(name: str) -> Callable[[EmbeddingFactory], EmbeddingFactory]:
    """Register an embedding factory under ``name`` (a class decorator)."""

    def wrap(factory: EmbeddingFactory) -> EmbeddingFactory:
        EMBEDDING_KINDS[name] = factory
        return factory

    return wrap


def build_embedding(
    kind: str, *, vocab_size: int | None, dim: int, options: dict[str, Any]
) -> FeatureEmbedding:
    """Build one feature's embedding module.

    Args:
        kind: a registered kind such as ``table``.
        vocab_size: number of ids including the reserved padding and OOV ids; ``None`` for kinds
            that need no vocabulary.
        dim: embedding width D.
        options: kind-specific settings from the config.

    Raises:
        ConfigError: the kind is not registered, or ``options`` names an argument the kind does not
            take (a misspelled option, or ``dim`` or ``vocab_size``, which are set elsewhere).
    """
    factory = EMBEDDING_KINDS.get(kind)
    if factory is None:
        raise ConfigError(
            [f"unknown embedding kind `{kind}`; choose one of: {', '.join(sorted(EMBEDDING_KINDS))}"]
        )
    _check_options(kind, factory, options)
    return factory(vocab_size=vocab_size, dim=dim, **options)


def _check_options(kind: str, factory: EmbeddingFactory, options: dict[str, Any]) -> None:
    """Raise one :class:`ConfigError` listing every option that ``factory`` would reject."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    allowed = sorted(
        name
        for name, parameter in parameters.items()
        if name not in ("vocab_size", "dim")
        and parameter.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    problems = []
    for name in options:
        if name == "dim":
            problems.append(f"set the width as `embedding.dim`, not as the `{kind}` option `dim`")
        elif name == "vocab_size":
            problems.append(
                "`vocab_size` is not an option because the fitted vocabulary sets it; "
                "remove it from the options"
            )
        elif name not in allowed:
            choices = ", ".join(allowed) or "none"
            problems.append(f"embedding kind `{kind}` has no option `{name}`; its options are: {choices}")
    if problems:
        raise ConfigError(problems)
