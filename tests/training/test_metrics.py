"""Tests of mtrank.training.metrics against hand-computed values and scikit-learn references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    ndcg_score,
    roc_auc_score,
)

from mtrank.errors import ConfigError, DataError, MtrankWarning
from mtrank.training.metrics import (
    METRICS,
    GroupMetric,
    binary_auc,
    check_metric_names,
    compute_task_metrics,
    expected_calibration_error,
    gauc,
    logloss,
    mae,
    metric_names,
    mse,
    ndcg_at_k,
)


def _random_grouped_data(seed: int, n_rows: int, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, size=n_rows)
    labels = (rng.random(n_rows) < 0.3).astype(np.float64)
    # Rounded scores create ties inside and across groups.
    scores = np.round(rng.random(n_rows) + 0.3 * labels, 2)
    return labels, scores, groups


def _sklearn_gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Impression-weighted GAUC from a Python loop over groups with sklearn's AUC per group."""
    weighted_sum = 0.0
    rows = 0
    used = 0
    for group in np.unique(groups):
        mask = groups == group
        if len(np.unique(labels[mask])) < 2:
            continue
        weighted_sum += mask.sum() * roc_auc_score(labels[mask], scores[mask])
        rows += int(mask.sum())
        used += 1
    return weighted_sum / rows, used


# ---------------------------------------------------------------------------------------------
# binary_auc
# ---------------------------------------------------------------------------------------------


def test_auc_ties_hand_value() -> None:
    # Positives score 0.5 and 0.9, negatives 0.1 and 0.5: 2 x 2 = 4 positive/negative pairs.
    # (0.5 vs 0.1) win = 1, (0.5 vs 0.5) tie = 0.5, (0.9 vs 0.1) win = 1, (0.9 vs 0.5) win = 1.
    # AUC = 3.5 / 4 = 0.875.
    assert binary_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == 0.875


def test_auc_all_scores_tied_is_half() -> None:
    assert binary_auc([0, 1, 0, 1, 1], [0.3] * 5) == 0.5


def test_auc_reversed_order_is_zero() -> None:
    assert binary_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_random(seed: int) -> None:
    labels, scores, _ = _random_grouped_data(seed, 5_000, 1)
    assert binary_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_accepts_bool_labels() -> None:
    labels = np.array([False, True, False, True])
    scores = np.array([0.2, 0.6, 0.7, 0.9])
    assert binary_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_auc_single_class_warns_nan() -> None:
    with pytest.warns(MtrankWarning, match=r"task `click` on split valid.*3 positives, 0 negatives"):
        value = binary_auc([1, 1, 1], [0.2, 0.5, 0.9], name="task `click` on split valid")
    assert math.isnan(value)


def test_auc_rejects_non_binary_labels() -> None:
    with pytest.raises(DataError, match=r"must be 0 or 1.*first: 2\.0"):
        binary_auc([0, 1, 2], [0.1, 0.2, 0.3])


def test_auc_rejects_nan_scores() -> None:
    with pytest.raises(DataError, match=r"`scores` contains 1 non-finite"):
        binary_auc([0, 1, 1], [0.1, math.nan, 0.3])


def test_auc_rejects_length_mismatch() -> None:
    with pytest.raises(DataError, match=r"`labels` has 3, `scores` has 2 rows"):
        binary_auc([0, 1, 1], [0.1, 0.3])


def test_auc_rejects_column_vector() -> None:
    with pytest.raises(DataError, match=r"must be 1-D, got shape \(3, 1\)"):
        binary_auc([0, 1, 1], np.zeros((3, 1)))


def test_auc_rejects_empty_input() -> None:
    with pytest.raises(DataError, match="is empty"):
        binary_auc([], [])


# ---------------------------------------------------------------------------------------------
# gauc
# ---------------------------------------------------------------------------------------------

# Hand-built groups, rows interleaved so that a group's rows are not adjacent:
#   a: labels 1, 0, 0 with scores 0.9, 0.5, 0.7 -> the positive beats both negatives: AUC 2/2 = 1.0
#   b: labels 0, 1, 1, 0 with scores 0.2, 0.4, 0.1, 0.3 -> 0.4 beats 0.2 and 0.3, 0.1 beats neither:
#      AUC 2/4 = 0.5
#   c: labels 1, 1 -> one class, skipped
#   d: label 0 -> one class, skipped
# GAUC = (3 rows * 1.0 + 4 rows * 0.5) / 7 rows = 5/7.
_HAND_GROUPS = ["a", "b", "c", "a", "b", "d", "b", "a", "c", "b"]
_HAND_LABELS = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
_HAND_SCORES = [0.9, 0.2, 0.6, 0.5, 0.4, 0.8, 0.1, 0.7, 0.3, 0.3]


def test_gauc_hand_value_string_groups() -> None:
    result = gauc(_HAND_LABELS, _HAND_SCORES, np.array(_HAND_GROUPS))
    assert result.value == pytest.approx(5 / 7)


def test_gauc_hand_counts() -> None:
    result = gauc(_HAND_LABELS, _HAND_SCORES, _HAND_GROUPS)
    assert result.groups_used == 2
    assert result.groups_skipped == 2
    assert result.rows_used == 7


def test_gauc_hand_value_int64_groups() -> None:
    codes = {"a": 10, "b": -3, "c": 7, "d": 2**40}
    groups = np.array([codes[g] for g in _HAND_GROUPS], dtype=np.int64)
    assert gauc(_HAND_LABELS, _HAND_SCORES, groups).value == pytest.approx(5 / 7)


def test_gauc_ties_within_group_half_credit() -> None:
    # Group 1: labels 0, 1 tied at 0.5 -> AUC 0.5. Group 2: positive 0.5 above negative 0.2 -> 1.0.
    # Equal scores in different groups must not interact. GAUC = (2 * 0.5 + 2 * 1.0) / 4 = 0.75.
    result = gauc([0, 1, 1, 0], [0.5, 0.5, 0.5, 0.2], [1, 1, 2, 2])
    assert result.value == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1])
def test_gauc_matches_sklearn_loop(seed: int) -> None:
    labels, scores, groups = _random_grouped_data(seed, 3_000, 200)
    expected, used = _sklearn_gauc(labels, scores, groups)
    result = gauc(labels, scores, groups)
    assert result.value == pytest.approx(expected, abs=1e-12)
    assert result.groups_used == used


def test_gauc_no_usable_group_warns_nan() -> None:
    with pytest.warns(MtrankWarning, match=r"GAUC is undefined for valid: none of the 2 groups"):
        result = gauc([1, 1, 0], [0.1, 0.2, 0.3], [5, 5, 6], name="valid")
    assert math.isnan(result.value)
    assert result.groups_skipped == 2


def test_gauc_rejects_group_length_mismatch() -> None:
    with pytest.raises(DataError, match=r"`groups` has 2 rows but the labels have 3"):
        gauc([0, 1, 1], [0.1, 0.2, 0.3], [1, 1])


# ---------------------------------------------------------------------------------------------
# logloss, mse, mae
# ---------------------------------------------------------------------------------------------


def test_logloss_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random(1_000) < 0.4).astype(np.float64)
    probs = rng.uniform(0.01, 0.99, size=1_000)
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-12)


def test_logloss_clips_certain_wrong_prediction() -> None:
    # Label 1 predicted with probability 0 is clipped to 1e-7: loss -log(1e-7) = 7 * ln(10).
    assert logloss([1.0], [0.0]) == pytest.approx(7 * math.log(10), rel=1e-6)


def test_logloss_soft_labels_hand_value() -> None:
    # Label 0.5 at probability 0.5: -(0.5 ln 0.5 + 0.5 ln 0.5) = ln 2.
    assert logloss([0.5], [0.5]) == pytest.approx(math.log(2))


def test_logloss_rejects_logits() -> None:
    with pytest.raises(DataError, match="apply a sigmoid to logits"):
        logloss([0, 1], [-2.0, 3.0])


def test_logloss_rejects_invalid_eps() -> None:
    with pytest.raises(ConfigError, match=r"`eps` must be in \(0, 0.5\), got 0.0"):
        logloss([0, 1], [0.2, 0.8], eps=0.0)


def test_mse_matches_sklearn() -> None:
    rng = np.random.default_rng(4)
    labels, predictions = rng.normal(size=500), rng.normal(size=500)
    assert mse(labels, predictions) == pytest.approx(mean_squared_error(labels, predictions), rel=1e-12)


def test_mae_matches_sklearn() -> None:
    rng = np.random.default_rng(5)
    labels, predictions = rng.normal(size=500), rng.normal(size=500)
    assert mae(labels, predictions) == pytest.approx(mean_absolute_error(labels, predictions), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# ndcg_at_k
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 10])
def test_ndcg_matches_sklearn_per_group(k: int) -> None:
    rng = np.random.default_rng(6)
    n_rows = 2_000
    groups = rng.integers(0, 150, size=n_rows)
    relevance = rng.integers(0, 4, size=n_rows).astype(np.float64)
    # Continuous scores have no ties, which sklearn's ignore_ties=True orders differently from mtrank.
    scores = rng.random(n_rows)

    per_group = []
    for group in np.unique(groups):
        mask = groups == group
        if mask.sum() < 2 or relevance[mask].max() == 0:
            # sklearn rejects queries of one row, and mtrank skips groups whose ideal DCG is zero.
            continue
        # sklearn's gain is the relevance itself, so pass 2^rel - 1 to get the exponential gain.
        gains = np.exp2(relevance[mask]) - 1
        per_group.append(ndcg_score(gains[None, :], scores[mask][None, :], k=k, ignore_ties=True))

    keep = np.isin(groups, [g for g in np.unique(groups) if (groups == g).sum() >= 2])
    result = ndcg_at_k(relevance[keep], scores[keep], groups[keep], k)
    assert result.value == pytest.approx(np.mean(per_group), abs=1e-12)
    assert result.groups_used == len(per_group)


def test_ndcg_ties_keep_input_order() -> None:
    # Both rows score 0.5, so input order ranks the irrelevant row first:
    # DCG@2 = 0 / log2(2) + (2^1 - 1) / log2(3) = 1 / log2(3); ideal DCG@2 = 1 / log2(2) = 1.
    result = ndcg_at_k([0, 1], [0.5, 0.5], [0, 0], k=2)
    assert result.value == pytest.approx(1 / math.log2(3))


def test_ndcg_cutoff_one_hand_value() -> None:
    # Top row by score has relevance 1 (gain 1); ideal top row has relevance 2 (gain 3): NDCG@1 = 1/3.
    result = ndcg_at_k([1, 2, 0], [0.9, 0.5, 0.1], ["q", "q", "q"], k=1)
    assert result.value == pytest.approx(1 / 3)


def test_ndcg_skips_zero_ideal_groups() -> None:
    # Group 1 ranks its relevant row first (NDCG 1.0); groups 2 and 3 have no relevant row.
    result = ndcg_at_k([1, 0, 0, 0, 0], [0.9, 0.1, 0.5, 0.4, 0.3], [1, 1, 2, 2, 3], k=5)
    assert result == GroupMetric(value=1.0, groups_used=1, groups_skipped=2, rows_used=2)


def test_ndcg_no_relevant_row_warns_nan() -> None:
    with pytest.warns(MtrankWarning, match=r"NDCG@3 is undefined"):
        result = ndcg_at_k([0, 0], [0.1, 0.2], [1, 2], k=3)
    assert math.isnan(result.value)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_ndcg_rejects_invalid_cutoff(k: object) -> None:
    with pytest.raises(ConfigError, match="must be a positive integer"):
        ndcg_at_k([1, 0], [0.1, 0.2], [1, 1], k=k)  # type: ignore[arg-type]


def test_ndcg_rejects_negative_relevance() -> None:
    with pytest.raises(DataError, match=r"relevance must be >= 0, got a minimum of -1.0"):
        ndcg_at_k([-1, 1], [0.1, 0.2], [1, 1], k=2)


def test_ndcg_rejects_overflowing_gain() -> None:
    with pytest.raises(DataError, match="overflows"):
        ndcg_at_k([2000.0, 1.0], [0.1, 0.2], [1, 1], k=2)


# ---------------------------------------------------------------------------------------------
# Registry and compute_task_metrics
# ---------------------------------------------------------------------------------------------


def test_metric_names_binary() -> None:
    assert metric_names("binary") == ["auc", "ece", "gauc", "logloss", "mae", "mse", "ndcg@K", "rmse"]


def test_metric_names_regression() -> None:
    assert metric_names("regression") == ["mae", "mse", "ndcg@K", "rmse"]


def test_metric_names_unknown_task_type() -> None:
    with pytest.raises(ConfigError, match=r"unknown task type `ranking`; choose one of: binary, regression"):
        metric_names("ranking")  # type: ignore[arg-type]


def test_registry_direction_of_logloss() -> None:
    assert METRICS["logloss"].greater_is_better is False


def test_check_metric_names_lists_every_problem() -> None:
    problems = check_metric_names("regression", ["mse", "auc", "foo", "ndcg@0", "NDCG@5"])
    assert len(problems) == 3
    assert problems[0].startswith("metric `auc` is not defined for regression tasks; choose one of: mae")
    assert problems[1].startswith("unknown metric `foo`; choose one of:")
    assert "positive integer" in problems[2]


def test_compute_binary_matches_references() -> None:
    labels, scores, groups = _random_grouped_data(7, 4_000, 300)
    probs = np.clip(scores / scores.max(), 0.01, 0.99)
    results = compute_task_metrics(
        "binary", ["AUC", "logloss", "gauc", "mse", "ndcg@5"], labels, probs, groups, task_name="click"
    )
    expected_gauc, used = _sklearn_gauc(labels, probs, groups)
    assert list(results) == [
        "auc",
        "logloss",
        "gauc",
        "gauc_groups_skipped",
        "mse",
        "ndcg@5",
        "ndcg@5_groups_skipped",
    ]
    assert results["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert results["logloss"] == pytest.approx(log_loss(labels, probs), rel=1e-12)
    assert results["gauc"] == pytest.approx(expected_gauc, abs=1e-12)
    assert results["gauc_groups_skipped"] == len(np.unique(groups)) - used
    assert results["mse"] == pytest.approx(mean_squared_error(labels, probs), rel=1e-12)


def test_compute_regression_matches_sklearn() -> None:
    rng = np.random.default_rng(8)
    labels, predictions = rng.normal(size=300), rng.normal(size=300)
    results = compute_task_metrics("regression", ["mse", "rmse", "mae"], labels, predictions)
    reference_mse = mean_squared_error(labels, predictions)
    assert results["mse"] == pytest.approx(reference_mse, rel=1e-12)
    assert results["rmse"] == pytest.approx(math.sqrt(reference_mse), rel=1e-12)
    assert results["mae"] == pytest.approx(mean_absolute_error(labels, predictions), rel=1e-12)


def test_compute_rejects_unknown_metric() -> None:
    with pytest.raises(ConfigError, match=r"unknown metric `recall`; choose one of: auc, ece, gauc, logloss"):
        compute_task_metrics("binary", ["recall"], [0, 1], [0.2, 0.8])


def test_compute_rejects_metric_of_other_task_type() -> None:
    with pytest.raises(ConfigError, match=r"metric `logloss` is not defined for regression tasks"):
        compute_task_metrics("regression", ["logloss"], [0.0, 1.0], [0.2, 0.8])


def test_compute_gauc_without_groups() -> None:
    with pytest.raises(ConfigError, match=r"gauc, ndcg@10 need a group id.*set a group column"):
        compute_task_metrics("binary", ["auc", "gauc", "ndcg@10"], [0, 1], [0.2, 0.8])


def test_compute_error_names_task() -> None:
    with pytest.raises(ConfigError, match=r"in the metrics of task `like`"):
        compute_task_metrics("binary", ["bogus"], [0, 1], [0.2, 0.8], task_name="task `like`")


def test_compute_single_class_warns_with_task_name() -> None:
    with pytest.warns(MtrankWarning, match=r"AUC is undefined for task `follow` on split valid"):
        results = compute_task_metrics(
            "binary", ["auc"], [0, 0, 0], [0.2, 0.3, 0.1], task_name="task `follow` on split valid"
        )
    assert math.isnan(results["auc"])


# ---------------------------------------------------------------------------------------------
# Scale
# ---------------------------------------------------------------------------------------------


def test_many_groups_run() -> None:
    labels, scores, groups = _random_grouped_data(9, 100_000, 20_000)
    n_groups = len(np.unique(groups))
    auc_result = gauc(labels, scores, groups)
    ndcg_result = ndcg_at_k(labels, scores, groups, k=10)
    assert auc_result.groups_used + auc_result.groups_skipped == n_groups
    assert ndcg_result.groups_used + ndcg_result.groups_skipped == n_groups
    assert 0.5 < auc_result.value < 1.0


# --- expected calibration error ---------------------------------------------------------------


def test_ece_zero_when_bins_match_rates() -> None:
    # Each bin's mean prediction equals its label rate: 0.25 in the third bin, 0.75 in the eighth.
    labels = [1, 0, 0, 0, 1, 1, 1, 0]
    probs = [0.25] * 4 + [0.75] * 4
    assert expected_calibration_error(labels, probs) == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_hand_computation() -> None:
    # Bin 0: label mean 0, prob mean 0.05 -> 0.05 * 1/4; bin 9: 1 vs 0.95 -> 0.05 * 3/4.
    assert expected_calibration_error([0, 1, 1, 1], [0.05, 0.95, 0.95, 0.95]) == pytest.approx(0.05)


def test_ece_probability_one_in_last_bin() -> None:
    assert expected_calibration_error([1, 1], [1.0, 0.95]) == pytest.approx(0.025)


def test_ece_constant_prediction_is_rate_gap() -> None:
    # One bin contains every row, so the error is |observed rate - prediction|.
    rng = np.random.default_rng(3)
    labels = (rng.random(10_000) < 0.2).astype(np.float64)
    assert expected_calibration_error(labels, np.full(10_000, 0.5)) == pytest.approx(abs(labels.mean() - 0.5))


def test_ece_rejects_probability_out_of_range() -> None:
    with pytest.raises(DataError, match="ece `probs` must be in \\[0, 1\\]"):
        expected_calibration_error([0, 1], [0.5, 1.5])


def test_ece_through_registry() -> None:
    values = compute_task_metrics("binary", ["ece"], [0, 1, 1, 1], [0.05, 0.95, 0.95, 0.95])
    assert values["ece"] == pytest.approx(0.05)


# --- property-based checks against scikit-learn --------------------------------------------------

# Scores on a coarse grid so that ties, which AUC must count as half, are frequent.
TIED_SCORES = st.integers(min_value=0, max_value=5).map(lambda value: value / 5)


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(min_value=0, max_value=1), TIED_SCORES), min_size=2, max_size=60))
def test_auc_matches_sklearn_with_ties(rows) -> None:
    labels = [label for label, _ in rows]
    scores = [score for _, score in rows]
    assume(len(set(labels)) == 2)  # AUC is undefined with one class
    assert binary_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(min_value=0, max_value=1), st.floats(min_value=0.0, max_value=1.0)),
        min_size=1,
        max_size=60,
    )
)
def test_ece_bounded_by_mean_absolute_gap(rows) -> None:
    labels = np.array([label for label, _ in rows], dtype=np.float64)
    probs = np.array([prob for _, prob in rows], dtype=np.float64)
    # Binning can only cancel errors inside a bin, so ECE never exceeds the per-row mean gap.
    assert expected_calibration_error(labels, probs) <= float(np.mean(np.abs(labels - probs))) + 1e-12
