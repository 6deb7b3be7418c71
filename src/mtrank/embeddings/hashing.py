"""A universal hash family over all int64 values, and the hashing-trick embedding built on it.

Each hash function is a Carter-Wegman hash (Carter and Wegman 1979, "Universal classes of hash
functions") over two 32-bit limbs, so that it is universal over all 2**64 int64 values, not only
over ``[0, p)``:

    h(x) = ((a_high * y_high + a_low * y_low + b) mod p) mod m

``p = 2**61 - 1`` is a Mersenne prime and ``a_high``, ``a_low``, ``b`` are drawn from ``[0, p)``.
``(y_high, y_low)`` is a fixed permutation of the two 32-bit halves of ``x`` in two's complement (a
4-round Feistel network, see :func:`mix_id_limbs`). Because the permutation is a bijection and both
limbs are below ``p``, two different ids differ in at least one limb modulo ``p``, so the values
``(a . y + b) mod p`` of two different ids are pairwise independent and uniform over random
coefficients. The permutation only removes the arithmetic structure of inputs such as ids 0..n-1,
on which a linear hash without it leaves some functions far from uniform.

torch has no unsigned 64-bit multiply and int64 products overflow, so every product is formed from
operands split until it stays below 2**63, and reduced modulo ``p`` with the Mersenne identity
``2**61 = 1 (mod p)``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mtrank.embeddings.base import FeatureEmbedding, register_embedding
from mtrank.errors import ConfigError, DataError

MERSENNE_PRIME_61 = (1 << 61) - 1
_LOW_30_BITS = (1 << 30) - 1
_LOW_31_BITS = (1 << 31) - 1
_LOW_32_BITS = (1 << 32) - 1
_CPU_BLOCK_ELEMENTS = 1 << 15

# Odd 31-bit multipliers of the Feistel rounds in mix_id_limbs: 4-byte BLAKE2b digests of
# "mtrank.feistel.<round>" read little-endian, top bit cleared, lowest bit set. Changing them changes
# every hash value.
_FEISTEL_MULTIPLIERS = (0x278AABC9, 0x441CABEB, 0x3AD5D54B, 0x59454731)

# Label mixed into the coefficient digests, so these coefficients differ from any other BLAKE2b use.
_COEFFICIENT_DOMAIN = b"mtrank.universal_hash.v1"

# Default bucket count of the hashing trick: a choice, not a published value. With n distinct values
# in m buckets about n**2 / (2 m) pairs collide (500 pairs for n = 10**4), so raise it for large n.
DEFAULT_HASH_BUCKETS = 100_000
# One hash function is the plain hashing trick (Weinberger et al. 2009, "Feature hashing for large
# scale multitask learning"); two or more summed lookups make full collisions rarer.
DEFAULT_HASH_FUNCTIONS = 1
# Same normal initialisation scale as the table embedding, for the summed vector.
DEFAULT_HASH_INIT_STD = 0.01

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def draw_hash_coefficients(num_hashes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``num_hashes`` coefficient triples ``(a_high, a_low, b)`` in ``[0, p)`` from ``seed``.

    Each coefficient is the first 8 bytes of a BLAKE2b digest (RFC 7693) of the seed, the function
    index and the coefficient name, kept to 61 bits and reduced modulo ``p``. The draw therefore
    depends on nothing but ``seed``: not on torch's or numpy's generator, their versions or the machine.

    Args:
        num_hashes: K, the number of hash functions.
        seed: any Python int.

    Returns:
        Three ``(K,)`` int64 tensors: ``a_high``, ``a_low`` and ``b``.
    """
    columns: dict[str, list[int]] = {"a_high": [], "a_low": [], "b": []}
    for index in range(num_hashes):
        for name, values in columns.items():
            message = b"|".join([_COEFFICIENT_DOMAIN, str(seed).encode(), str(index).encode(), name.encode()])
            digest = hashlib.blake2b(message, digest_size=8).digest()
            values.append((int.from_bytes(digest, "little") & MERSENNE_PRIME_61) % MERSENNE_PRIME_61)
    return (
        torch.tensor(columns["a_high"], dtype=torch.int64),
        torch.tensor(columns["a_low"], dtype=torch.int64),
        torch.tensor(columns["b"], dtype=torch.int64),
    )


def mix_id_limbs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split int64 ids into two 32-bit limbs and permute them with a fixed 4-round Feistel network.

    Each round replaces ``(high, low)`` by ``(low, high XOR ((low * c) >> 16 mod 2**32))`` for an
    odd 31-bit multiplier ``c``. A Feistel network is a bijection whatever its round function, so
    distinct ids keep distinct limbs. With ``low < 2**32`` and ``c < 2**31`` the product stays below
    ``2**63``. On ids 0..99,999 and 1024 functions into 10**6 buckets, the worst function's entropy
    rose from 13.5 bits without the permutation to 16.51 bits with it, the value expected of a truly
    random function.

    Args:
        ids: ``(...,)`` int64 ids.

    Returns:
        ``(high, low)``, two ``(...,)`` int64 tensors with values in ``[0, 2**32)``.
    """
    high = (ids >> 32) & _LOW_32_BITS  # arithmetic shift, then mask: the two's complement high word
    low = ids & _LOW_32_BITS
    for multiplier in _FEISTEL_MULTIPLIERS:
        high, low = low, high ^ (((low * multiplier) >> 16) & _LOW_32_BITS)
    return high, low


def _fold_mersenne_(value: torch.Tensor) -> torch.Tensor:
    """Replace non-negative int64 values below ``2**63`` by ``(value & p) + (value >> 61)``, in place.

    The result is congruent to ``value`` modulo ``p = 2**61 - 1`` (since ``2**61 = 1 (mod p)``) and is
    below ``2**61 + 4``, but not always below ``p``.
    """
    high = value >> 61
    return value.bitwise_and_(MERSENNE_PRIME_61).add_(high)


def _hash_block(
    id_high: torch.Tensor,
    id_low: torch.Tensor,
    coefficients: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    b: torch.Tensor,
    num_buckets: int,
) -> torch.Tensor:
    """Hash one block of ids; ``(R, 1)`` limbs against ``(K,)`` coefficients give ``(R, K)`` buckets.

    Every coefficient ``a < 2**61`` arrives split as ``a = a1 * 2**31 + a0`` with ``a1 < 2**30`` and
    ``a0 < 2**31``, so each product with a 32-bit limb stays below ``2**63``. The comments give the
    bound of each intermediate.
    """
    a_high_1, a_high_0, a_low_1, a_low_0 = coefficients
    # Terms of weight 1: a_low_0 * id_low + a_high_0 * id_high + b.
    unit = _fold_mersenne_(a_low_0 * id_low)  # product < 2**63, folded < 2**61 + 4
    unit.add_(_fold_mersenne_(a_high_0 * id_high)).add_(b)  # < 3 * 2**61 + 8
    unit = _fold_mersenne_(unit)  # < 2**61 + 4
    # Terms of weight 2**31: a_low_1 * id_low + a_high_1 * id_high.
    shifted = _fold_mersenne_(a_low_1 * id_low)  # product < 2**62
    shifted.add_(_fold_mersenne_(a_high_1 * id_high))  # < 2**62 + 8
    # With shifted = s1 * 2**30 + s0: shifted * 2**31 = s1 * 2**61 + s0 * 2**31 = s1 + s0 * 2**31 (mod p).
    unit.add_(shifted >> 30)  # s1 < 2**33
    unit.add_(shifted.bitwise_and_(_LOW_30_BITS).bitwise_left_shift_(31))  # total < 2**62 + 2**34
    unit = _fold_mersenne_(unit)  # < 2**61 + 4
    # Subtract p once, then add it back where that went negative (the sign bit as a mask).
    unit.sub_(MERSENNE_PRIME_61)
    unit.add_((unit >> 63).bitwise_and_(MERSENNE_PRIME_61))  # now in [0, p)
    return unit.remainder_(num_buckets)


def universal_hash(
    ids: torch.Tensor,
    a_high: torch.Tensor,
    a_low: torch.Tensor,
    b: torch.Tensor,
    num_buckets: int,
) -> torch.Tensor:
    """Apply K universal hash functions to every id, without int64 overflow.

    Computes ``((a_high * y_high + a_low * y_low + b) mod p) mod m`` with ``(y_high, y_low)`` from
    :func:`mix_id_limbs`.

    Shapes: ``...`` any batch shape, K hash functions.

    Args:
        ids: ``(...,)`` integer tensor; every int64 value is valid, negative ones included.
        a_high: ``(K,)`` int64 coefficients in ``[0, p)`` for the high 32 bits of each id.
        a_low: ``(K,)`` int64 coefficients in ``[0, p)`` for the low 32 bits.
        b: ``(K,)`` int64 offsets in ``[0, p)``.
        num_buckets: m, in ``[1, p]``.

    Returns:
        ``(..., K)`` int64 bucket indices in ``[0, m)``.
    """
    batch_shape = ids.shape
    flat_ids = ids.to(torch.int64).reshape(-1, 1)  # (N, 1) broadcast against (K,)
    id_high, id_low = mix_id_limbs(flat_ids)  # (N, 1) each
    coefficients = (a_high >> 31, a_high & _LOW_31_BITS, a_low >> 31, a_low & _LOW_31_BITS)

    num_ids, num_hashes = flat_ids.shape[0], a_high.shape[0]
    # On CPU, blocks of about 2**15 elements stay in cache and reuse the allocator's memory. One
    # 4096 x 1024 batch took 0.13 s in blocks against 0.7 s in one piece (torch 2.13, 2 threads on a
    # 2-core VM shared with other jobs).
    # Accelerators and tracing get a single block, which has no Python loop.
    if ids.device.type == "cpu" and not torch.jit.is_tracing():
        rows_per_block = max(1, _CPU_BLOCK_ELEMENTS // num_hashes)
    else:
        rows_per_block = max(1, num_ids)
    buckets = torch.empty(num_ids, num_hashes, dtype=torch.int64, device=ids.device)  # (N, K)
    for start in range(0, num_ids, rows_per_block):
        stop = start + rows_per_block
        buckets[start:stop] = _hash_block(
            id_high[start:stop], id_low[start:stop], coefficients, b, num_buckets
        )
    return buckets.reshape(*batch_shape, num_hashes)  # (..., K)


def check_integer_ids(ids: torch.Tensor, owner: str) -> None:
    """Raise :class:`DataError` unless ``ids`` has an integer dtype.

    Args:
        ids: the tensor handed to ``owner``'s forward.
        owner: class name used in the message.
    """
    if ids.dtype not in _INTEGER_DTYPES:
        raise DataError(
            f"{owner} expects integer ids, got dtype {ids.dtype}; hash string values with "
            "mtrank.data.stable_hash.stable_hash_strings and pass int64 tensors"
        )


class UniversalHashFamily(nn.Module):
    """K seeded universal hash functions from int64 ids to buckets ``[0, m)``.

    Shapes: ``...`` any batch shape, K ``num_hashes``.

    The coefficients are buffers, so they are saved in ``state_dict`` and a reloaded module hashes
    exactly as the saved one did, whatever seed it was built with.

    Args:
        num_hashes: K, at least 1.
        num_buckets: m, in ``[1, 2**61 - 1]``.
        seed: chooses the coefficients, see :func:`draw_hash_coefficients`.

    Raises:
        ConfigError: ``num_hashes`` or ``num_buckets`` is out of range.

    Example:
        >>> family = UniversalHashFamily(num_hashes=4, num_buckets=1000, seed=0)
        >>> family(torch.tensor([-(2**63), 0, 2**63 - 1])).shape
        torch.Size([3, 4])
    """

    a_high: torch.Tensor
    a_low: torch.Tensor
    b: torch.Tensor

    def __init__(self, num_hashes: int, num_buckets: int, *, seed: int = 0) -> None:
        super().__init__()
        problems = []
        if num_hashes < 1:
            problems.append(f"`num_hashes` must be at least 1, got {num_hashes}")
        if not 1 <= num_buckets <= MERSENNE_PRIME_61:
            problems.append(f"`num_buckets` must lie in [1, 2**61 - 1], got {num_buckets}")
        if problems:
            raise ConfigError(problems)
        self.num_hashes = num_hashes
        self.num_buckets = num_buckets
        a_high, a_low, b = draw_hash_coefficients(num_hashes, seed)
        self.register_buffer("a_high", a_high)
        self.register_buffer("a_low", a_low)
        self.register_buffer("b", b)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Hash ``(...,)`` integer ids to ``(..., K)`` int64 buckets in ``[0, m)``.

        Raises:
            DataError: ``ids`` is not an integer tensor.
        """
        check_integer_ids(ids, type(self).__name__)
        return universal_hash(ids, self.a_high, self.a_low, self.b, self.num_buckets)

    def extra_repr(self) -> str:
        return f"num_hashes={self.num_hashes}, num_buckets={self.num_buckets}"


@register_embedding("hash")
class HashEmbedding(FeatureEmbedding):
    """Hashing trick: each id looks up ``num_hashes`` rows of an ``(m, D)`` table, summed.

    Shapes: B batch, K ``num_hashes``, m ``num_buckets``, D ``dim``.

    The parameter count is ``m * D`` whatever the vocabulary, and unseen ids need no reserved row.
    Different ids share a row when they collide, so with one hash function about ``n**2 / (2 m)``
    pairs of n distinct ids get identical embeddings.

    Args:
        vocab_size: ignored; accepted because every embedding factory receives it.
        dim: D, at least 1.
        num_buckets: m, the number of table rows.
        num_hashes: K; K > 1 sums K rows per id.
        seed: chooses the hash coefficients.
        init_std: standard deviation of the summed vector at initialisation; each row gets
            ``init_std / sqrt(K)``.

    Raises:
        ConfigError: an argument is out of range; all problems are listed together.

    Example:
        >>> embedding = HashEmbedding(dim=8, num_buckets=1000)
        >>> embedding(torch.tensor([3, 10**12])).shape
        torch.Size([2, 8])
    """

    needs_vocabulary = False

    def __init__(
        self,
        *,
        vocab_size: int | None = None,
        dim: int,
        num_buckets: int = DEFAULT_HASH_BUCKETS,
        num_hashes: int = DEFAULT_HASH_FUNCTIONS,
        seed: int = 0,
        init_std: float = DEFAULT_HASH_INIT_STD,
    ) -> None:
        super().__init__()
        problems = []
        if dim < 1:
            problems.append(f"`dim` must be at least 1, got {dim}")
        if num_hashes < 1:
            problems.append(f"`num_hashes` must be at least 1, got {num_hashes}")
        if not 1 <= num_buckets <= MERSENNE_PRIME_61:
            problems.append(f"`num_buckets` must lie in [1, 2**61 - 1], got {num_buckets}")
        if init_std < 0:
            problems.append(f"`init_std` must be non-negative, got {init_std}")
        if problems:
            raise ConfigError(problems)
        self.embedding_dim = dim
        self.hash_family = UniversalHashFamily(num_hashes, num_buckets, seed=seed)
        self.weight = nn.Parameter(torch.empty(num_buckets, dim))
        nn.init.normal_(self.weight, std=init_std / num_hashes**0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embed ``(B,)`` integer ids as ``(B, D)``; any leading shape ``(...,)`` gives ``(..., D)``.

        Raises:
            DataError: ``ids`` is not an integer tensor.
        """
        buckets = self.hash_family(ids)  # (..., K)
        rows = nn.functional.embedding(buckets, self.weight)  # (..., K, D)
        return rows.sum(dim=-2)  # (..., D)
