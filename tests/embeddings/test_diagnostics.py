"""Tests of encoding_diagnostics on the default DHE encoding and on small families with known answers."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from mtrank.embeddings.dhe import DeepHashEmbedding
from mtrank.embeddings.diagnostics import EncodingReport, encoding_diagnostics, expected_random_entropy_bits
from mtrank.embeddings.hashing import HashEmbedding, UniversalHashFamily
from mtrank.errors import DataError

NUM_IDS = 100_000


@pytest.fixture(scope="module")
def default_dhe_report() -> EncodingReport:
    """Diagnostics of the default DHE encoding (k = 1024, m = 10**6) on the ids 0..99,999.

    Consecutive ids are the hard case for a linear hash, so they are used instead of random ones.
    """
    embedding = DeepHashEmbedding(dim=16, hidden=[])
    return encoding_diagnostics(embedding, torch.arange(NUM_IDS), num_pairs=10_000, seed=0)


def test_default_dhe_ids_counted(default_dhe_report: EncodingReport) -> None:
    assert default_dhe_report.num_ids == NUM_IDS


def test_default_dhe_encodings_all_distinct(default_dhe_report: EncodingReport) -> None:
    assert default_dhe_report.num_distinct_encodings == NUM_IDS


def test_default_dhe_no_colliding_ids(default_dhe_report: EncodingReport) -> None:
    assert default_dhe_report.num_colliding_ids == 0


def test_default_dhe_similarity_is_near_zero(default_dhe_report: EncodingReport) -> None:
    # Independent uniform values on [-1, 1] give cosines with mean 0 and standard deviation
    # 1 / sqrt(k) = 0.03125; the mean of 10,000 pairs has a standard error of about 0.0003.
    assert abs(default_dhe_report.cosine_mean) < 0.002


def test_default_dhe_similarity_spread_is_small(default_dhe_report: EncodingReport) -> None:
    assert default_dhe_report.cosine_std < 1.1 / math.sqrt(1024)


def test_default_dhe_similarity_range_is_narrow(default_dhe_report: EncodingReport) -> None:
    # Over 10,000 pairs the extremes stay within about 4.5 standard deviations of 0.
    assert default_dhe_report.cosine_max - default_dhe_report.cosine_min < 0.35


def test_default_dhe_entropy_close_to_random_function(default_dhe_report: EncodingReport) -> None:
    assert default_dhe_report.entropy_mean_bits > default_dhe_report.entropy_random_bits - 0.01


def test_default_dhe_worst_function_entropy(default_dhe_report: EncodingReport) -> None:
    # Without the Feistel permutation of the id limbs, the worst of 1024 functions reached 13.5 bits here.
    assert default_dhe_report.entropy_min_bits > default_dhe_report.entropy_random_bits - 0.05


def test_default_dhe_entropy_close_to_sample_maximum(default_dhe_report: EncodingReport) -> None:
    # log2(100,000) = 16.61 bits; random hashing into 10**6 buckets loses about n / m = 0.1 bits.
    assert default_dhe_report.entropy_max_bits - default_dhe_report.entropy_mean_bits < 0.15


def test_default_dhe_bounds_reported(default_dhe_report: EncodingReport) -> None:
    assert (default_dhe_report.entropy_max_bits, default_dhe_report.log2_num_buckets) == (
        pytest.approx(math.log2(NUM_IDS)),
        pytest.approx(math.log2(10**6)),
    )


def test_collisions_match_counter_reference() -> None:
    family = UniversalHashFamily(1, 1000, seed=0)
    ids = torch.arange(5000)
    report = encoding_diagnostics(family, ids, num_pairs=100)
    counts = Counter(family(ids)[:, 0].tolist())
    assert (report.num_distinct_encodings, report.num_colliding_ids) == (
        len(counts),
        sum(count for count in counts.values() if count > 1),
    )


def test_entropy_matches_counter_reference() -> None:
    family = UniversalHashFamily(3, 50, seed=1)
    ids = torch.arange(2000)
    report = encoding_diagnostics(family, ids, num_pairs=100)
    entropies = []
    for column in family(ids).t().tolist():
        counts = Counter(column)
        entropies.append(-sum(c / 2000 * math.log2(c / 2000) for c in counts.values()))
    assert report.entropy_min_bits == pytest.approx(min(entropies), abs=1e-12)


def test_entropy_for_large_bucket_counts_matches_reference() -> None:
    # m above 2**22 takes the sorting path instead of np.bincount.
    family = UniversalHashFamily(2, 2**40, seed=1)
    ids = torch.tensor([5, 6, 7, 5, 6, 7, 8] * 3)
    report = encoding_diagnostics(family, ids, num_pairs=10)
    assert report.entropy_mean_bits == pytest.approx(2.0, abs=1e-12)  # 4 distinct ids, no collision


def test_sequential_ids_spread_like_random_ids() -> None:
    family = UniversalHashFamily(64, 10**6, seed=3)
    sequential = encoding_diagnostics(family, torch.arange(50_000), num_pairs=100)
    assert sequential.entropy_min_bits > sequential.entropy_random_bits - 0.05


def test_duplicate_ids_are_dropped() -> None:
    family = UniversalHashFamily(4, 10**6)
    report = encoding_diagnostics(family, torch.tensor([1, 2, 2, 3, 3, 3]), num_pairs=10)
    assert (report.num_ids, report.num_colliding_ids) == (3, 0)


def test_hash_embedding_source() -> None:
    report = encoding_diagnostics(HashEmbedding(dim=4, num_buckets=100, num_hashes=2), torch.arange(300))
    assert report.num_hashes == 2


def test_gaussian_dhe_similarity() -> None:
    embedding = DeepHashEmbedding(dim=4, num_hashes=256, hidden=[], encoding="gaussian")
    report = encoding_diagnostics(embedding, torch.arange(5000), num_pairs=2000)
    assert report.cosine_std < 1.2 / math.sqrt(256)


def test_expected_random_entropy_exact_small_case() -> None:
    # Exact expectation by summing the full binomial distribution, n = 20 ids into m = 5 buckets.
    n, m = 20, 5
    expected_c_log_c = sum(
        math.comb(n, c) * (1 / m) ** c * (1 - 1 / m) ** (n - c) * c * math.log2(c) for c in range(2, n + 1)
    )
    exact = math.log2(n) - m * expected_c_log_c / n
    assert expected_random_entropy_bits(n, m) == pytest.approx(exact, abs=1e-12)


def test_expected_random_entropy_sparse_limit() -> None:
    # For n << m almost every colliding bucket holds 2 ids, so the loss is about (n - 1) / m bits.
    assert expected_random_entropy_bits(1000, 10**9) == pytest.approx(math.log2(1000) - 999 / 10**9, abs=1e-9)


def test_report_to_dict() -> None:
    report = encoding_diagnostics(UniversalHashFamily(4, 1000), torch.arange(100), num_pairs=10)
    assert report.to_dict()["num_ids"] == 100


def test_report_text_names_the_numbers() -> None:
    report = encoding_diagnostics(UniversalHashFamily(4, 1000), torch.arange(100), num_pairs=10)
    assert "encoding of 100 ids by 4 hash functions into 1000 buckets" in str(report)


def test_rejects_single_id() -> None:
    with pytest.raises(DataError, match="at least 2 distinct ids, got 1"):
        encoding_diagnostics(UniversalHashFamily(4, 1000), torch.tensor([7, 7]))


def test_rejects_float_ids() -> None:
    with pytest.raises(DataError, match="integer ids"):
        encoding_diagnostics(UniversalHashFamily(4, 1000), torch.tensor([1.0, 2.0]))


def test_rejects_zero_pairs() -> None:
    with pytest.raises(DataError, match="`num_pairs` must be at least 1, got 0"):
        encoding_diagnostics(UniversalHashFamily(4, 1000), torch.arange(10), num_pairs=0)


def test_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="got Linear"):
        encoding_diagnostics(torch.nn.Linear(2, 2), torch.arange(10))  # type: ignore[arg-type]
