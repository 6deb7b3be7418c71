"""Embedding table: one learned row per vocabulary id."""

from __future__ import annotations

import torch
from torch import nn

from mtrank.embeddings.base import FeatureEmbedding, register_embedding
from mtrank.errors import ConfigError

# Vocabulary ids 0 and 1 are reserved by the categorical encoder: 0 pads, 1 is out-of-vocabulary.
PADDING_ID = 0
OOV_ID = 1


@register_embedding("table")
class TableEmbedding(FeatureEmbedding):
    """A learned ``(V, D)`` table looked up by vocabulary id.

    Shapes: B batch, V vocabulary size (padding and OOV included), D embedding width.

    Args:
        vocab_size: V; ids must lie in ``[0, V)``.
        dim: D.
        init_std: standard deviation of the normal initialisation.
    """

    needs_vocabulary = True

    def __init__(self, *, vocab_size: int | None, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        if vocab_size is None or vocab_size < 2:
            raise ConfigError([f"a table embedding needs a vocabulary of at least 2 ids, got {vocab_size}"])
        self.embedding_dim = dim
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.normal_(self.weight, std=init_std)
        with torch.no_grad():
            self.weight[PADDING_ID].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Look up ``(B,)`` int64 ids and return ``(B, D)``."""
        return nn.functional.embedding(ids, self.weight, padding_idx=PADDING_ID)
