"""Quality checks of a hash encoding: collisions, similarity of random pairs, entropy per dimension.

A good multi-hash encoding (as Deep Hash Embedding needs) gives every id its own encoding, makes
random pairs of ids about equally similar, and spreads each hash function's values evenly over its
buckets. :func:`encoding_diagnostics` measures all three on a sample of ids.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mtrank.embeddings.dhe import DeepHashEmbedding, uniform_encoding
from mtrank.embeddings.hashing import HashEmbedding, UniversalHashFamily, check_integer_ids, universal_hash
from mtrank.errors import DataError

# 10,000 random pairs estimate the cosine mean to about 0.01 / sqrt(K) and its spread to about 1%.
DEFAULT_NUM_PAIRS = 10_000
# Hash functions handled at once: a (N, 64) int64 block is 51 MB for N = 100,000 ids.
_FUNCTIONS_PER_BLOCK = 64
# Largest m whose per-column bucket counts come from np.bincount (a 32 MiB count array). Larger m
# sorts each column instead, which took 2 to 3 times longer on 100,000 ids x 64 functions, m = 10**6.
_BINCOUNT_MAX_BUCKETS = 1 << 22
# Pairs encoded at once in the similarity estimate.
_PAIRS_PER_BLOCK = 2048

HashSource = UniversalHashFamily | HashEmbedding | DeepHashEmbedding


@dataclass(frozen=True)
class EncodingReport:
    """Diagnostics of one hash encoding over a sample of distinct ids.

    Attributes:
        num_ids: distinct ids examined (duplicates in the input are dropped).
        num_hashes: K, the encoding dimension.
        num_buckets: m, the range of each hash function.
        num_distinct_encodings: distinct full K-dimensional bucket vectors among the ids.
        num_colliding_ids: ids whose full encoding equals that of at least one other id.
        num_pairs: random pairs of different ids behind the cosine statistics.
        cosine_mean: mean cosine similarity of the real-valued encodings of the pairs.
        cosine_std: standard deviation of those similarities.
        cosine_min: smallest similarity.
        cosine_max: largest similarity.
        entropy_mean_bits: Shannon entropy of each hash function's bucket counts, averaged over the K
            functions, in bits.
        entropy_min_bits: the smallest of the K entropies.
        entropy_random_bits: expected entropy for the same number of ids under a truly random
            function into m buckets (from the binomial distribution of bucket counts).
        entropy_max_bits: ``log2(min(num_ids, m))``, the most any function can reach on this sample.
        log2_num_buckets: ``log2(m)``, the entropy of a uniform distribution over all buckets, reached
            only when the sample is much larger than m.
    """

    num_ids: int
    num_hashes: int
    num_buckets: int
    num_distinct_encodings: int
    num_colliding_ids: int
    num_pairs: int
    cosine_mean: float
    cosine_std: float
    cosine_min: float
    cosine_max: float
    entropy_mean_bits: float
    entropy_min_bits: float
    entropy_random_bits: float
    entropy_max_bits: float
    log2_num_buckets: float

    def to_dict(self) -> dict[str, int | float]:
        """Return the fields as a flat dictionary, for JSON or logging."""
        return asdict(self)

    def __str__(self) -> str:
        return "\n".join(
            [
                f"encoding of {self.num_ids} ids by {self.num_hashes} hash functions into "
                f"{self.num_buckets} buckets",
                f"  distinct encodings: {self.num_distinct_encodings} "
                f"({self.num_colliding_ids} ids share their encoding with another id)",
                f"  cosine similarity of {self.num_pairs} random pairs: mean {self.cosine_mean:+.4f}, "
                f"std {self.cosine_std:.4f}, min {self.cosine_min:+.4f}, max {self.cosine_max:+.4f}",
                f"  entropy per hash function: mean {self.entropy_mean_bits:.3f} bits, "
                f"min {self.entropy_min_bits:.3f} bits; a random function gives "
                f"{self.entropy_random_bits:.3f} bits; at most {self.entropy_max_bits:.3f} bits for "
                f"this sample, log2(m) = {self.log2_num_buckets:.3f} bits",
            ]
        )


def encoding_diagnostics(
    source: HashSource,
    ids: torch.Tensor,
    *,
    num_pairs: int = DEFAULT_NUM_PAIRS,
    seed: int = 0,
) -> EncodingReport:
    """Measure collisions, pairwise similarity and per-function entropy of a hash encoding.

    Collisions and entropies are computed on the integer bucket indices, K/64 hash functions at a
    time, so memory stays near ``N * 64`` int64 values even for K = 1024. Cosine similarities use the
    real-valued encoding: the module's own for :class:`DeepHashEmbedding`, and the uniform map onto
    ``[-1, 1]`` for a bare hash family or a :class:`HashEmbedding`.

    Args:
        source: a :class:`UniversalHashFamily`, :class:`HashEmbedding` or :class:`DeepHashEmbedding`.
        ids: ``(N,)`` integer ids; duplicates are dropped before measuring.
        num_pairs: random pairs of different ids for the cosine statistics, at least 1.
        seed: seed of the pair sampling.

    Returns:
        An :class:`EncodingReport`.

    Raises:
        TypeError: ``source`` is not one of the supported types.
        DataError: ``ids`` is not an integer tensor or has fewer than 2 distinct values, or
            ``num_pairs`` is below 1.

    Example:
        >>> family = UniversalHashFamily(num_hashes=8, num_buckets=1000)
        >>> encoding_diagnostics(family, torch.arange(500), num_pairs=100).num_colliding_ids
        0
    """
    family = _hash_family_of(source)
    check_integer_ids(ids, "encoding_diagnostics")
    if num_pairs < 1:
        raise DataError(f"`num_pairs` must be at least 1, got {num_pairs}")
    distinct_ids = torch.unique(ids.reshape(-1).to(torch.int64))  # (N,)
    if distinct_ids.numel() < 2:
        raise DataError(
            f"encoding_diagnostics needs at least 2 distinct ids, got {distinct_ids.numel()}; "
            "pass a larger sample"
        )
    with torch.no_grad():
        num_distinct, num_colliding, entropies = _collisions_and_entropies(family, distinct_ids)
        cosines = _pair_cosines(source, family, distinct_ids, num_pairs, seed)

    num_ids = distinct_ids.numel()
    return EncodingReport(
        num_ids=num_ids,
        num_hashes=family.num_hashes,
        num_buckets=family.num_buckets,
        num_distinct_encodings=num_distinct,
        num_colliding_ids=num_colliding,
        num_pairs=num_pairs,
        cosine_mean=cosines.mean().item(),
        cosine_std=cosines.std().item() if num_pairs > 1 else 0.0,
        cosine_min=cosines.min().item(),
        cosine_max=cosines.max().item(),
        entropy_mean_bits=entropies.mean().item(),
        entropy_min_bits=entropies.min().item(),
        entropy_random_bits=expected_random_entropy_bits(num_ids, family.num_buckets),
        entropy_max_bits=math.log2(min(num_ids, family.num_buckets)),
        log2_num_buckets=math.log2(family.num_buckets),
    )


def expected_random_entropy_bits(num_ids: int, num_buckets: int) -> float:
    """Compute the expected entropy of n ids thrown into m buckets by a truly random function.

    Each bucket's count c follows Binomial(n, 1/m), and the entropy of the counts is
    ``log2(n) - sum(c log2 c) / n``, so its expectation is ``log2(n) - m E[c log2 c] / n``. Counts
    more than 12 standard deviations from the mean are left out of the sum.

    Args:
        num_ids: n, at least 1.
        num_buckets: m, at least 1.

    Returns:
        The expected entropy in bits.
    """
    probability = 1.0 / num_buckets
    mean = num_ids * probability
    spread = 12.0 * math.sqrt(num_ids * probability * (1.0 - probability)) + 12.0
    low = max(2, math.floor(mean - spread))
    high = min(num_ids, math.ceil(mean + spread))
    if high < low:
        return math.log2(num_ids)
    counts = torch.arange(low, high + 1, dtype=torch.float64)
    # log of the binomial probability mass, through log-gamma so large n does not overflow.
    log_pmf = (
        math.lgamma(num_ids + 1)
        - torch.lgamma(counts + 1)
        - torch.lgamma(num_ids - counts + 1)
        + counts * math.log(probability)
        + (num_ids - counts) * math.log1p(-probability)
    )
    expected_c_log_c = (torch.exp(log_pmf) * counts * torch.log2(counts)).sum().item()
    return math.log2(num_ids) - num_buckets * expected_c_log_c / num_ids


def _hash_family_of(source: HashSource) -> UniversalHashFamily:
    """Return the hash family inside ``source``."""
    if isinstance(source, UniversalHashFamily):
        return source
    if isinstance(source, (HashEmbedding, DeepHashEmbedding)):
        return source.hash_family
    raise TypeError(
        "encoding_diagnostics accepts a UniversalHashFamily, HashEmbedding or DeepHashEmbedding, "
        f"got {type(source).__name__}"
    )


def _collisions_and_entropies(
    family: UniversalHashFamily, ids: torch.Tensor
) -> tuple[int, int, torch.Tensor]:
    """Count distinct full encodings and colliding ids, and compute each function's entropy.

    Ids are grouped by equal bucket vectors one block of functions at a time: after each block, an id's
    group label identifies its buckets on all functions so far. Once every id is alone in its group,
    later blocks only contribute entropies.

    Returns:
        Distinct encodings, colliding ids, and ``(K,)`` float64 entropies in bits.
    """
    device = family.a_high.device
    ids = ids.to(device)
    labels = torch.zeros(ids.numel(), dtype=torch.int64, device=device)  # (N,) group of each id
    all_distinct = False
    entropies = []
    for start in range(0, family.num_hashes, _FUNCTIONS_PER_BLOCK):
        stop = start + _FUNCTIONS_PER_BLOCK
        buckets = universal_hash(
            ids, family.a_high[start:stop], family.a_low[start:stop], family.b[start:stop], family.num_buckets
        )  # (N, F) for the F functions of this block
        entropies.append(_column_entropies_bits(buckets, family.num_buckets))
        if not all_distinct:
            keyed = torch.cat([labels.unsqueeze(1), buckets], dim=1)  # (N, 1 + F)
            labels = torch.unique(keyed, dim=0, return_inverse=True)[1]
            all_distinct = int(labels.max().item()) + 1 == ids.numel()

    group_sizes = torch.bincount(labels)
    num_colliding = int(group_sizes[group_sizes > 1].sum().item())
    return group_sizes.numel(), num_colliding, torch.cat(entropies)


def _column_entropies_bits(buckets: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Compute the Shannon entropy, in bits, of the value counts in each column of ``(N, F)`` buckets.

    With ``H = log2(N) - sum(c log2 c) / N`` over the counts c of each distinct value, only counts of
    2 or more contribute. Up to :data:`_BINCOUNT_MAX_BUCKETS` buckets, counts come from
    ``np.bincount`` per column; above that, from runs in each sorted column.
    """
    num_rows, num_columns = buckets.shape
    columns = np.ascontiguousarray(buckets.cpu().numpy().T)  # (F, N), rows contiguous
    sum_c_log_c = np.zeros(num_columns, dtype=np.float64)
    if num_buckets <= _BINCOUNT_MAX_BUCKETS:
        for index, column in enumerate(columns):
            counts = np.bincount(column, minlength=num_buckets)
            repeated = counts[counts > 1].astype(np.float64)
            sum_c_log_c[index] = np.sum(repeated * np.log2(repeated))
    else:
        columns = np.sort(columns, axis=1)  # (F, N), each row sorted
        run_starts = np.ones(columns.shape, dtype=bool)  # (F, N), True where a new value begins
        run_starts[:, 1:] = columns[:, 1:] != columns[:, :-1]
        start_positions = np.flatnonzero(run_starts)  # (R,) flat positions; every row opens a new run
        run_sizes = np.diff(np.append(start_positions, columns.size)).astype(np.float64)  # (R,)
        column_of_run = start_positions // num_rows  # (R,)
        # With weights, bincount returns float64, so astype copies nothing. It gives type checkers the dtype.
        sum_c_log_c = np.bincount(
            column_of_run, weights=run_sizes * np.log2(run_sizes), minlength=num_columns
        ).astype(np.float64, copy=False)
    return torch.from_numpy(math.log2(num_rows) - sum_c_log_c / num_rows)  # (F,) float64


def _pair_cosines(
    source: HashSource,
    family: UniversalHashFamily,
    ids: torch.Tensor,
    num_pairs: int,
    seed: int,
) -> torch.Tensor:
    """Compute cosine similarities of the real-valued encodings of random pairs of different ids."""
    generator = torch.Generator().manual_seed(seed)
    num_ids = ids.numel()
    first = torch.randint(0, num_ids, (num_pairs,), generator=generator)
    second = torch.randint(0, num_ids - 1, (num_pairs,), generator=generator)
    second = second + (second >= first).to(torch.int64)  # skip `first`, so each pair has two different ids

    def encode(batch: torch.Tensor) -> torch.Tensor:
        if isinstance(source, DeepHashEmbedding):
            return source.encode(batch).to(torch.float64)
        return uniform_encoding(family(batch), max(family.num_buckets, 2))

    device = family.a_high.device
    cosines = []
    for start in range(0, num_pairs, _PAIRS_PER_BLOCK):
        stop = start + _PAIRS_PER_BLOCK
        left = encode(ids[first[start:stop]].to(device))  # (P, K)
        right = encode(ids[second[start:stop]].to(device))  # (P, K)
        cosines.append(torch.nn.functional.cosine_similarity(left, right, dim=1).cpu())
    return torch.cat(cosines)
