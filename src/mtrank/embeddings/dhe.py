"""Deep Hash Embedding: a fixed multi-hash encoding of each id, decoded into an embedding by an MLP.

Kang et al., KDD 2021, "Learning to Embed Categorical Features without Embedding Tables for
Recommendation" (arXiv:2010.10784). Each id is hashed by K universal hash functions into ``[0, m)``.
The K bucket indices are mapped to real numbers, uniform on ``[-1, 1]`` or standard normal through the
Box-Muller transform. A feed-forward network then turns that dense, non-learned identifier vector into
the embedding. Nothing is stored per id, so memory does not grow with the vocabulary and an unseen id
gets its own encoding instead of a shared out-of-vocabulary row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
from torch import nn

from mtrank.embeddings.base import FeatureEmbedding, register_embedding
from mtrank.embeddings.hashing import MERSENNE_PRIME_61, UniversalHashFamily, check_integer_ids
from mtrank.errors import ConfigError, DataError

DHEEncoding = Literal["uniform", "gaussian"]
DHEActivation = Literal["relu", "leaky_relu", "elu", "gelu", "silu", "mish", "tanh", "identity"]

# k = 1024 hash functions: the encoding width of Kang et al.'s main DHE setting (their Figure 1).
DHE_NUM_HASHES = 1024
# m = 10**6 buckets per hash function, Kang et al.'s setting. Two ids then share all 1024 bucket
# indices with probability about 10**-6144, so full encodings do not collide in practice.
DHE_NUM_BUCKETS = 1_000_000
# Hidden widths of the decoder. Kang et al.'s Figure 1 draws 1800-wide hidden layers.
# NOTE: the depth of two layers is this library's choice, not taken from the paper's experiments.
DHE_HIDDEN: tuple[int, ...] = (1800, 1800)
# Mish (Misra 2019): Kang et al. report it working better than ReLU for the DHE decoder.
DHE_ACTIVATION: DHEActivation = "mish"
# Kang et al. put batch normalization in the decoder; it also keeps the [-1, 1] or N(0, 1) inputs
# and the deep stack well scaled.
DHE_BATCH_NORM = True
# Uniform is the default because it needs no even K and no logarithm; gaussian is the alternative.
DHE_ENCODING: DHEEncoding = "uniform"

# A local copy of the activation names, because mtrank.models imports mtrank.embeddings and not the
# reverse. Keep the names in step with mtrank.models.activations.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def uniform_encoding(buckets: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Map bucket indices in ``[0, m)`` linearly onto ``[-1, 1]``.

    Args:
        buckets: ``(..., K)`` int64 bucket indices.
        num_buckets: m, at least 2.

    Returns:
        ``(..., K)`` float64; bucket 0 maps to -1 and bucket ``m - 1`` to 1.
    """
    # (2 h - (m - 1)) / (m - 1) is exact at both ends for m <= 2**52, unlike h * (2 / (m - 1)) - 1.
    return (2.0 * buckets.to(torch.float64) - (num_buckets - 1)) / (num_buckets - 1)


def gaussian_encoding(buckets: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Turn pairs of bucket indices into standard normal values with the Box-Muller transform.

    Columns ``2i`` and ``2i + 1`` give ``u1 = (h + 1) / m`` in ``(0, 1]`` (never 0, so the logarithm is
    finite) and ``u2 = h / m`` in ``[0, 1)``. Then ``r = sqrt(-2 ln u1)``, and the output contains
    ``r cos(2 pi u2)`` in its first K/2 columns and ``r sin(2 pi u2)`` in the last K/2.

    Args:
        buckets: ``(..., K)`` int64 bucket indices, K even.
        num_buckets: m, at least 2.

    Returns:
        ``(..., K)`` float64.
    """
    values = buckets.to(torch.float64)
    u1 = (values[..., 0::2] + 1.0) / num_buckets  # (..., K/2)
    u2 = values[..., 1::2] / num_buckets  # (..., K/2)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)  # (..., K)


_ENCODINGS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "uniform": uniform_encoding,
    "gaussian": gaussian_encoding,
}


@register_embedding("dhe")
class DeepHashEmbedding(FeatureEmbedding):
    """Deep Hash Embedding: K hashes of each id, encoded as reals, decoded by an MLP into D values.

    Shapes: B batch, K ``num_hashes``, H hidden width, D ``dim``.

    The decoder is ``Linear -> [BatchNorm1d] -> activation`` for each hidden width, then a final
    ``Linear`` to D. The hash coefficients are buffers, so ``state_dict`` restores the exact encoding.
    The parameter count depends on K, the hidden widths and D, never on the vocabulary.

    Args:
        vocab_size: ignored; accepted because every embedding factory receives it.
        dim: D, at least 1.
        num_hashes: K, at least 1, and even for the gaussian encoding.
        num_buckets: m, in ``[2, 2**61 - 1]``.
        encoding: ``uniform`` (buckets onto ``[-1, 1]``) or ``gaussian`` (Box-Muller on pairs).
        hidden: decoder hidden widths; empty means one linear layer from K to D.
        activation: activation after each hidden layer, one of :data:`DHEActivation`.
        batch_norm: insert ``BatchNorm1d`` after each hidden linear layer.
        seed: chooses the hash coefficients; the decoder is initialised from torch's global generator.

    Raises:
        ConfigError: an argument is out of range or unknown; all problems are listed together.

    Example:
        >>> embedding = DeepHashEmbedding(dim=8, num_hashes=16, hidden=[32]).eval()
        >>> embedding(torch.tensor([7, -(2**63)])).shape
        torch.Size([2, 8])
    """

    needs_vocabulary = False

    def __init__(
        self,
        *,
        vocab_size: int | None = None,
        dim: int,
        num_hashes: int = DHE_NUM_HASHES,
        num_buckets: int = DHE_NUM_BUCKETS,
        encoding: DHEEncoding = DHE_ENCODING,
        hidden: Sequence[int] = DHE_HIDDEN,
        activation: DHEActivation = DHE_ACTIVATION,
        batch_norm: bool = DHE_BATCH_NORM,
        seed: int = 0,
    ) -> None:
        super().__init__()
        hidden = tuple(hidden)
        _validate_arguments(dim, num_hashes, num_buckets, encoding, hidden, activation)
        self.embedding_dim = dim
        self.encoding = encoding
        self.batch_norm = batch_norm
        self.hash_family = UniversalHashFamily(num_hashes, num_buckets, seed=seed)
        self.decoder = _build_decoder(num_hashes, hidden, dim, activation, batch_norm)
        # An empty `hidden` leaves no layer to normalize, even with `batch_norm=True`.
        self._has_batch_norm = any(isinstance(layer, nn.BatchNorm1d) for layer in self.decoder)

    @property
    def num_hashes(self) -> int:
        """K, the encoding width."""
        return self.hash_family.num_hashes

    @property
    def num_buckets(self) -> int:
        """m, the range of each hash function."""
        return self.hash_family.num_buckets

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Compute the fixed, non-learned encoding of ``(...,)`` integer ids as ``(..., K)`` floats.

        The values are computed in float64 and returned in the decoder's dtype.

        Raises:
            DataError: ``ids`` is not an integer tensor.
        """
        buckets = self.hash_family(ids)  # (..., K)
        encoded = _ENCODINGS[self.encoding](buckets, self.num_buckets)
        return encoded.to(self._decoder_dtype())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embed ``(B,)`` integer ids as ``(B, D)``; any leading shape ``(...,)`` gives ``(..., D)``.

        Raises:
            DataError: ``ids`` is not an integer tensor, or it contains a single id in training mode
                with batch normalization, where batch statistics are undefined.
        """
        check_integer_ids(ids, type(self).__name__)
        flat_ids = ids.reshape(-1)  # (N,) with N the product of the batch shape
        if self.training and self._has_batch_norm and flat_ids.numel() == 1:
            raise DataError(
                "DeepHashEmbedding got a batch of 1 id in training mode, where batch normalization "
                "has no batch statistics; train on batches of 2 or more ids, call .eval() for "
                "inference, or build it with batch_norm=False"
            )
        if flat_ids.numel() == 0:
            return torch.zeros(*ids.shape, self.embedding_dim, dtype=self._decoder_dtype(), device=ids.device)
        embeddings = self.decoder(self.encode(flat_ids))  # (N, K) -> (N, D)
        return embeddings.reshape(*ids.shape, self.embedding_dim)  # (..., D)

    def extra_repr(self) -> str:
        return f"encoding={self.encoding!r}"

    def _decoder_dtype(self) -> torch.dtype:
        """Return the floating dtype of the decoder's parameters."""
        return next(self.decoder.parameters()).dtype


def _validate_arguments(
    dim: int,
    num_hashes: int,
    num_buckets: int,
    encoding: str,
    hidden: tuple[int, ...],
    activation: str,
) -> None:
    """Raise one :class:`ConfigError` listing every invalid constructor argument."""
    problems = []
    if dim < 1:
        problems.append(f"`dim` must be at least 1, got {dim}")
    if num_hashes < 1:
        problems.append(f"`num_hashes` must be at least 1, got {num_hashes}")
    if not 2 <= num_buckets <= MERSENNE_PRIME_61:
        problems.append(f"`num_buckets` must lie in [2, 2**61 - 1], got {num_buckets}")
    if encoding not in get_args(DHEEncoding):
        problems.append(f"unknown `encoding` {encoding!r}; choose one of: {', '.join(get_args(DHEEncoding))}")
    elif encoding == "gaussian" and num_hashes % 2 != 0:
        problems.append(
            f"the gaussian encoding pairs hash values, so `num_hashes` must be even, got {num_hashes}"
        )
    bad_widths = [
        width for width in hidden if isinstance(width, bool) or not isinstance(width, int) or width < 1
    ]
    if bad_widths:
        problems.append(f"`hidden` widths must be integers of at least 1, got {list(hidden)}")
    if activation not in _ACTIVATIONS:
        problems.append(
            f"unknown `activation` {activation!r}; choose one of: {', '.join(sorted(_ACTIVATIONS))}"
        )
    if problems:
        raise ConfigError(problems)


def _build_decoder(
    in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str, batch_norm: bool
) -> nn.Sequential:
    """Build ``Linear -> [BatchNorm1d] -> activation`` per hidden width, then ``Linear`` to ``out_dim``."""
    layers: list[nn.Module] = []
    width = in_dim
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(_ACTIVATIONS[activation]())
        width = size
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)
