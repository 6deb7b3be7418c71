"""Tests of the universal hash family (against Python big integers) and of HashEmbedding."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mtrank.embeddings import EMBEDDING_KINDS, build_embedding
from mtrank.embeddings.hashing import (
    MERSENNE_PRIME_61,
    HashEmbedding,
    UniversalHashFamily,
    draw_hash_coefficients,
    universal_hash,
)
from mtrank.errors import ConfigError, DataError

INT64_EXTREMES = [-(2**63), -(2**63) + 1, -(2**32), -1, 0, 1, 2**32 - 1, 2**32, 2**63 - 1]
PRIME = 2**61 - 1
MASK_32 = 2**32 - 1


def feistel_multipliers() -> list[int]:
    """The round multipliers as documented: 4-byte BLAKE2b digests, top bit cleared, lowest bit set."""
    multipliers = []
    for round_index in range(4):
        digest = hashlib.blake2b(f"mtrank.feistel.{round_index}".encode(), digest_size=4).digest()
        multipliers.append((int.from_bytes(digest, "little") & 0x7FFFFFFF) | 1)
    return multipliers


FEISTEL_MULTIPLIERS = feistel_multipliers()


def reference_hash(value: int, a_high: int, a_low: int, b: int, num_buckets: int) -> int:
    """The hash in unbounded Python integers: Feistel permutation of the limbs, then Carter-Wegman."""
    unsigned = value % 2**64
    high, low = unsigned >> 32, unsigned & MASK_32
    for multiplier in FEISTEL_MULTIPLIERS:
        high, low = low, high ^ (((low * multiplier) >> 16) & MASK_32)
    return ((a_high * high + a_low * low + b) % PRIME) % num_buckets


def reference_buckets(family: UniversalHashFamily, values: list[int]) -> list[list[int]]:
    coefficients = list(zip(family.a_high.tolist(), family.a_low.tolist(), family.b.tolist(), strict=True))
    return [
        [reference_hash(value, *triple, family.num_buckets) for triple in coefficients] for value in values
    ]


def random_int64(count: int, seed: int) -> list[int]:
    generator = random.Random(seed)
    return [generator.randrange(-(2**63), 2**63) for _ in range(count)]


def test_prime_constant() -> None:
    assert MERSENNE_PRIME_61 == PRIME


@pytest.mark.parametrize("num_buckets", [1, 7, 1_000_000, 2**61 - 1])
def test_extremes_match_big_integer_reference(num_buckets: int) -> None:
    family = UniversalHashFamily(8, num_buckets, seed=3)
    buckets = family(torch.tensor(INT64_EXTREMES))
    assert buckets.tolist() == reference_buckets(family, INT64_EXTREMES)


@pytest.mark.parametrize("num_buckets", [2, 1_000_003, 2**61 - 1])
def test_random_ids_match_big_integer_reference(num_buckets: int) -> None:
    values = random_int64(400, seed=num_buckets % 1000)
    family = UniversalHashFamily(16, num_buckets, seed=11)
    assert family(torch.tensor(values)).tolist() == reference_buckets(family, values)


def test_extreme_coefficients_match_reference() -> None:
    # Coefficients at the edges of [0, p) push every intermediate product to its largest value.
    edges = [PRIME - 1, 0, 1, 2**61 - 2, 2**31 - 1, 2**31, 2**60, PRIME - 2**31]
    a_high = torch.tensor(edges)
    a_low = torch.tensor(edges[::-1])
    offsets = torch.tensor(edges)
    values = INT64_EXTREMES + random_int64(100, seed=1)
    buckets = universal_hash(torch.tensor(values), a_high, a_low, offsets, PRIME)
    expected = [
        [
            reference_hash(value, high, low, offset, PRIME)
            for high, low, offset in zip(edges, edges[::-1], edges, strict=True)
        ]
        for value in values
    ]
    assert buckets.tolist() == expected


def test_block_boundaries_do_not_change_results() -> None:
    # 2**15 elements per CPU block: 3000 ids x 64 functions span several blocks and a partial one.
    values = random_int64(3000, seed=5)
    family = UniversalHashFamily(64, 1_000_000, seed=2)
    whole = family(torch.tensor(values))
    one_by_one = torch.cat([family(torch.tensor([value])) for value in values[:50]])
    assert torch.equal(whole[:50], one_by_one)


def test_buckets_lie_in_range() -> None:
    family = UniversalHashFamily(32, 1000, seed=0)
    buckets = family(torch.tensor(INT64_EXTREMES + random_int64(1000, seed=2)))
    assert int(buckets.min()) >= 0
    assert int(buckets.max()) < 1000


def test_output_shape_follows_input_shape() -> None:
    family = UniversalHashFamily(5, 100)
    assert family(torch.zeros(2, 3, dtype=torch.int64)).shape == (2, 3, 5)


def test_smaller_integer_dtypes_hash_like_int64() -> None:
    family = UniversalHashFamily(4, 1000)
    values = [-5, 0, 7, 2**31 - 1]
    assert torch.equal(
        family(torch.tensor(values, dtype=torch.int32)), family(torch.tensor(values, dtype=torch.int64))
    )


def test_rejects_float_ids() -> None:
    family = UniversalHashFamily(4, 1000)
    with pytest.raises(DataError, match="integer ids, got dtype torch.float32"):
        family(torch.tensor([1.0, 2.0]))


def test_coefficients_follow_blake2b_definition() -> None:
    a_high, a_low, b = draw_hash_coefficients(2, seed=9)
    message = b"mtrank.universal_hash.v1|9|1|a_low"
    digest = hashlib.blake2b(message, digest_size=8).digest()
    assert int(a_low[1]) == (int.from_bytes(digest, "little") & PRIME) % PRIME


def test_coefficients_lie_below_prime() -> None:
    for coefficients in draw_hash_coefficients(256, seed=0):
        assert int(coefficients.max()) < PRIME


def test_same_seed_same_coefficients() -> None:
    first = UniversalHashFamily(8, 100, seed=4)
    second = UniversalHashFamily(8, 100, seed=4)
    assert torch.equal(first.a_high, second.a_high)


def test_different_seed_different_coefficients() -> None:
    first = UniversalHashFamily(8, 100, seed=4)
    second = UniversalHashFamily(8, 100, seed=5)
    assert not torch.equal(first.a_high, second.a_high)


def test_coefficients_are_saved_in_state_dict() -> None:
    assert set(UniversalHashFamily(3, 10).state_dict()) == {"a_high", "a_low", "b"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_hashes": 0, "num_buckets": 10}, "`num_hashes` must be at least 1, got 0"),
        ({"num_hashes": 1, "num_buckets": 0}, r"`num_buckets` must lie in \[1, 2\*\*61 - 1\], got 0"),
        ({"num_hashes": 1, "num_buckets": 2**61}, "got 2305843009213693952"),
    ],
)
def test_family_rejects_invalid_arguments(arguments: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UniversalHashFamily(**arguments)


def test_hash_kind_is_registered() -> None:
    assert EMBEDDING_KINDS["hash"] is HashEmbedding


def test_hash_embedding_needs_no_vocabulary() -> None:
    assert HashEmbedding.needs_vocabulary is False


def test_hash_embedding_output_shape() -> None:
    embedding = build_embedding("hash", vocab_size=None, dim=8, options={"num_buckets": 1000})
    assert embedding(torch.tensor([1, 2, 3])).shape == (3, 8)


def test_hash_embedding_sums_hashed_rows() -> None:
    embedding = HashEmbedding(dim=4, num_buckets=50, num_hashes=3, seed=1)
    ids = torch.tensor([-(2**63), 12, 2**63 - 1])
    buckets = embedding.hash_family(ids)  # (3, 3)
    expected = embedding.weight[buckets].sum(dim=1)
    assert torch.equal(embedding(ids), expected)


def test_hash_embedding_initial_scale() -> None:
    torch.manual_seed(0)
    embedding = HashEmbedding(dim=64, num_buckets=20_000, num_hashes=4, init_std=0.01)
    summed = embedding(torch.arange(5000))
    assert abs(summed.std().item() - 0.01) < 0.001


def test_hash_embedding_parameters_ignore_vocabulary() -> None:
    small = build_embedding("hash", vocab_size=10**3, dim=8, options={"num_buckets": 1000})
    huge = build_embedding("hash", vocab_size=10**9, dim=8, options={"num_buckets": 1000})
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in huge.parameters())


def test_hash_embedding_parameter_count_is_buckets_times_dim() -> None:
    embedding = HashEmbedding(dim=8, num_buckets=1000, num_hashes=2)
    assert sum(p.numel() for p in embedding.parameters()) == 8000


def test_hash_embedding_accepts_ids_beyond_buckets() -> None:
    embedding = HashEmbedding(dim=4, num_buckets=100)
    assert embedding(torch.tensor([10**9, 2**63 - 1, -(2**63)])).shape == (3, 4)


def test_hash_embedding_batch_of_one() -> None:
    embedding = HashEmbedding(dim=4, num_buckets=100).eval()
    assert embedding(torch.tensor([5])).shape == (1, 4)


def test_hash_embedding_unseen_ids_are_distinct() -> None:
    # Two summed hash functions: two ids share an embedding only if both buckets coincide.
    embedding = HashEmbedding(dim=8, num_buckets=10_000, num_hashes=2, seed=0)
    unseen = 10**12 + torch.arange(1000)
    assert torch.unique(embedding(unseen), dim=0).shape[0] == 1000


def test_hash_embedding_rejects_invalid_arguments_together() -> None:
    with pytest.raises(ConfigError, match="3 invalid") as raised:
        HashEmbedding(dim=0, num_buckets=0, num_hashes=0)
    assert "`dim` must be at least 1, got 0" in str(raised.value)


def test_hash_embedding_safetensors_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = HashEmbedding(dim=8, num_buckets=1000, num_hashes=2, seed=1)
    path = tmp_path / "hash.safetensors"
    save_file(saved.state_dict(), str(path))
    torch.manual_seed(1)
    restored = HashEmbedding(dim=8, num_buckets=1000, num_hashes=2, seed=2)
    restored.load_state_dict(load_file(str(path)))
    ids = torch.tensor(INT64_EXTREMES)
    assert torch.equal(restored(ids), saved(ids))


_SUBPROCESS_SCRIPT = """
import json
import torch
from mtrank.embeddings.hashing import UniversalHashFamily
family = UniversalHashFamily(16, 1_000_000, seed=7)
ids = torch.tensor(json.loads({ids!r}))
print(json.dumps(family(ids).tolist()))
"""


def _buckets_in_subprocess(ids: list[int], hash_seed: str) -> list[list[int]]:
    environment = dict(os.environ, PYTHONHASHSEED=hash_seed)
    script = _SUBPROCESS_SCRIPT.format(ids=json.dumps(ids))
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(completed.stdout)


def test_same_buckets_across_processes_and_hash_seeds() -> None:
    ids = INT64_EXTREMES + random_int64(50, seed=3)
    first = _buckets_in_subprocess(ids, hash_seed="0")
    second = _buckets_in_subprocess(ids, hash_seed="2024")
    assert first == second
    assert first == UniversalHashFamily(16, 1_000_000, seed=7)(torch.tensor(ids)).tolist()


# --- property-based checks against the big-integer reference ------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(INT64, min_size=1, max_size=20),
    num_buckets=st.integers(min_value=1, max_value=MERSENNE_PRIME_61),
    num_hashes=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_family_matches_reference_for_any_ids(values, num_buckets, num_hashes, seed) -> None:
    family = UniversalHashFamily(num_hashes=num_hashes, num_buckets=num_buckets, seed=seed)
    buckets = family(torch.tensor(values, dtype=torch.int64)).tolist()
    assert buckets == reference_buckets(family, values)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(INT64, min_size=1, max_size=20), num_buckets=st.integers(min_value=1, max_value=10**6))
def test_family_buckets_in_range(values, num_buckets) -> None:
    buckets = UniversalHashFamily(num_hashes=3, num_buckets=num_buckets, seed=1)(torch.tensor(values))
    assert int(buckets.min()) >= 0
    assert int(buckets.max()) < num_buckets
