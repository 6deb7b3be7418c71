"""Feature embeddings: int64 ids in, ``(B, D)`` out, whatever the kind."""

from mtrank.embeddings import table as _table  # noqa: F401  (registers "table")
from mtrank.embeddings.base import EMBEDDING_KINDS, FeatureEmbedding, build_embedding, register_embedding

__all__ = ["EMBEDDING_KINDS", "FeatureEmbedding", "build_embedding", "register_embedding"]
