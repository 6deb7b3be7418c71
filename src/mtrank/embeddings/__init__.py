"""Feature embeddings: int64 ids in, ``(B, D)`` out, whatever the kind."""

from mtrank.embeddings import table as _table  # noqa: F401  (registers "table")
from mtrank.embeddings.base import EMBEDDING_KINDS, FeatureEmbedding, build_embedding, register_embedding
from mtrank.embeddings.dhe import DeepHashEmbedding  # registers "dhe"
from mtrank.embeddings.diagnostics import EncodingReport, encoding_diagnostics
from mtrank.embeddings.hashing import HashEmbedding, UniversalHashFamily  # registers "hash"

__all__ = [
    "EMBEDDING_KINDS",
    "DeepHashEmbedding",
    "EncodingReport",
    "FeatureEmbedding",
    "HashEmbedding",
    "UniversalHashFamily",
    "build_embedding",
    "encoding_diagnostics",
    "register_embedding",
]
