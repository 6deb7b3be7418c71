"""Evaluation metrics over accumulated predictions: AUC, GAUC, logloss, MSE, MAE, RMSE and NDCG@k.

Every function takes the whole split as 1-D numpy arrays, because AUC-type metrics are not means of
batch metrics. The per-group metrics (GAUC, NDCG@k) sort all rows once by (group, score) with
``np.lexsort`` and reduce with ``np.bincount`` / ``np.add.reduceat``, so they cost O(N log N) in the
number of rows N with no Python loop over groups.

Metric names used in configs are listed in :data:`METRICS`; :func:`compute_task_metrics` computes a
list of them for one task.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from mtrank.errors import ConfigError, DataError, MtrankWarning

logger = logging.getLogger(__name__)

TaskType = Literal["binary", "regression"]
TASK_TYPES: tuple[TaskType, ...] = ("binary", "regression")

# Clipping bound for probabilities in logloss, so that a certain but wrong prediction costs
# -log(1e-7) ~ 16.1 instead of infinity. 1e-7 is the default of `keras.config.epsilon()`.
LOGLOSS_EPS = 1e-7


@dataclass(frozen=True)
class GroupMetric:
    """Result of a per-group metric.

    Attributes:
        value: the metric over the usable groups; NaN when no group is usable.
        groups_used: number of groups that entered ``value``.
        groups_skipped: number of groups on which the metric is undefined (one label class for GAUC,
            no relevant row for NDCG).
        rows_used: number of rows in the used groups.
    """

    value: float
    groups_used: int
    groups_skipped: int
    rows_used: int


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _as_1d_float(values: npt.ArrayLike, argument: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise DataError(f"`{argument}` must be 1-D, got shape {array.shape}; flatten it with `.reshape(-1)`")
    if array.size == 0:
        raise DataError(f"`{argument}` is empty; metrics need at least one row")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise DataError(
            f"`{argument}` contains {bad} non-finite value(s) (NaN or inf) out of {array.size}; "
            "check the input data, or the model for divergence if these are predictions"
        )
    return array


def _check_lengths(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"`{name}` has {n}" for name, n in lengths.items())
        raise DataError(f"metric inputs must have one value per row, but {listed} rows")


def _binary_labels(labels: npt.ArrayLike) -> np.ndarray:
    """Return 0/1 labels as int64, or raise DataError naming a value that is neither 0 nor 1."""
    array = _as_1d_float(labels, "labels")
    is_binary = (array == 0.0) | (array == 1.0)
    if not is_binary.all():
        bad = array[~is_binary]
        raise DataError(
            f"binary labels must be 0 or 1, but {bad.size} of {array.size} are not "
            f"(first: {float(bad[0])}); binarise the label column in the data config"
        )
    return array.astype(np.int64)


def _encode_groups(groups: npt.ArrayLike, n_rows: int) -> tuple[np.ndarray, int]:
    """Map group ids (integers or strings) to dense codes ``0..G-1``; return the codes and G."""
    array = np.asarray(groups)
    if array.ndim != 1:
        raise DataError(f"`groups` must be 1-D, got shape {array.shape}; flatten it with `.reshape(-1)`")
    if len(array) != n_rows:
        raise DataError(f"`groups` has {len(array)} rows but the labels have {n_rows}; pass one id per row")
    try:
        unique, codes = np.unique(array, return_inverse=True)
    except TypeError as err:
        raise DataError(
            f"group ids must be all integers or all strings, got mixed values of dtype {array.dtype}"
        ) from err
    return codes.reshape(-1).astype(np.int64), len(unique)


def _describe(name: str) -> str:
    return f" for {name}" if name else ""


# ---------------------------------------------------------------------------------------------
# AUC and GAUC
# ---------------------------------------------------------------------------------------------


def _auc_per_group(
    labels: np.ndarray, scores: np.ndarray, codes: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the AUC of every group with half credit for tied scores.

    Args:
        labels: ``(N,)`` int64 labels, 0 or 1.
        scores: ``(N,)`` float64 scores.
        codes: ``(N,)`` int64 group codes; every code in ``0..G-1`` occurs at least once.
        n_groups: G.

    Returns:
        ``(auc, positives, negatives)``, each of shape ``(G,)``; ``auc`` is NaN for a group with
        one label class.
    """
    n_rows = len(labels)
    order = np.lexsort((scores, codes))  # ascending score inside each group
    sorted_codes = codes[order]
    sorted_scores = scores[order]
    sorted_labels = labels[order]

    # A block is a run of rows with the same group and the same score: the rows that tie.
    starts_block = np.empty(n_rows, dtype=bool)
    starts_block[0] = True
    starts_block[1:] = (sorted_codes[1:] != sorted_codes[:-1]) | (sorted_scores[1:] != sorted_scores[:-1])
    block_starts = np.flatnonzero(starts_block)
    block_positives = np.add.reduceat(sorted_labels, block_starts)  # (blocks,)
    block_sizes = np.diff(np.append(block_starts, n_rows))
    block_negatives = block_sizes - block_positives
    block_codes = sorted_codes[block_starts]

    positives = np.bincount(codes[labels == 1], minlength=n_groups).astype(np.int64)  # (G,)
    negatives = np.bincount(codes[labels == 0], minlength=n_groups).astype(np.int64)  # (G,)

    # Negatives that score strictly lower in the same group: an exclusive running sum over all
    # blocks minus the negatives of the groups sorted before this one.
    negatives_before_block = np.cumsum(block_negatives) - block_negatives
    negatives_before_group = np.cumsum(negatives) - negatives
    negatives_below = negatives_before_block - negatives_before_group[block_codes]

    # Each positive wins against every lower negative and gets half a win per tied negative.
    # Counting in half wins keeps the sums exact in int64 for groups of up to ~4e9 rows (n^2 / 2 < 2^63).
    half_wins = block_positives * (2 * negatives_below + block_negatives)  # (blocks,)
    group_first_block = np.flatnonzero(np.append(True, block_codes[1:] != block_codes[:-1]))
    half_wins_per_group = np.add.reduceat(half_wins, group_first_block)  # (G,)

    pairs = positives * negatives
    auc = np.full(n_groups, np.nan)
    np.divide(half_wins_per_group, 2 * pairs, out=auc, where=pairs > 0)
    return auc, positives, negatives


def binary_auc(labels: npt.ArrayLike, scores: npt.ArrayLike, *, name: str = "") -> float:
    """Compute the ROC AUC: the chance that a random positive scores above a random negative.

    Tied scores get half credit, which equals the trapezoidal area under the ROC curve that
    ``sklearn.metrics.roc_auc_score`` returns.

    Args:
        labels: ``(N,)`` labels, 0 or 1 (bool, int or float).
        scores: ``(N,)`` scores: probabilities, logits or any monotone transform of them.
        name: task and split named in the warning, such as ``"task `click` on split valid"``.

    Returns:
        The AUC in [0, 1], or NaN when the labels contain one class only.

    Raises:
        DataError: the inputs are not 1-D, are empty, differ in length, contain NaN or inf, or a
            label is neither 0 nor 1.

    Warns:
        MtrankWarning: the labels contain one class only; the message gives both class counts.

    Example:
        >>> binary_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9])
        0.875
    """
    label_array = _binary_labels(labels)
    score_array = _as_1d_float(scores, "scores")
    _check_lengths(labels=label_array, scores=score_array)

    codes = np.zeros(len(label_array), dtype=np.int64)
    auc, positives, negatives = _auc_per_group(label_array, score_array, codes, 1)
    if math.isnan(auc[0]):
        warnings.warn(
            f"AUC is undefined{_describe(name)}: the labels contain one class only "
            f"({positives[0]} positives, {negatives[0]} negatives); returning NaN. "
            "Evaluate on a split that contains both classes.",
            MtrankWarning,
            stacklevel=2,
        )
    return float(auc[0])


def gauc(
    labels: npt.ArrayLike, scores: npt.ArrayLike, groups: npt.ArrayLike, *, name: str = ""
) -> GroupMetric:
    """Compute the group AUC: per-group AUC averaged with weights equal to the rows per group.

    This is the impression-weighted GAUC of Zhou et al. 2018, "Deep Interest Network for
    Click-Through Rate Prediction". Groups whose labels contain one class only have no AUC;
    they are skipped and counted. Tied scores inside a group get half credit.

    Args:
        labels: ``(N,)`` labels, 0 or 1.
        scores: ``(N,)`` scores.
        groups: ``(N,)`` group ids (user or request ids), integers or strings; rows of one group
            need not be adjacent.
        name: task and split named in the warning.

    Returns:
        A :class:`GroupMetric`; its value is NaN when no group contains both classes.

    Raises:
        DataError: invalid inputs, as for :func:`binary_auc`, or group ids of mixed types.

    Warns:
        MtrankWarning: no group contains both classes.

    Example:
        >>> gauc([1, 0, 1, 1], [0.9, 0.2, 0.3, 0.4], ["u1", "u1", "u2", "u2"])
        GroupMetric(value=1.0, groups_used=1, groups_skipped=1, rows_used=2)
    """
    label_array = _binary_labels(labels)
    score_array = _as_1d_float(scores, "scores")
    _check_lengths(labels=label_array, scores=score_array)
    codes, n_groups = _encode_groups(groups, len(label_array))

    auc, positives, negatives = _auc_per_group(label_array, score_array, codes, n_groups)
    usable = ~np.isnan(auc)
    groups_used = int(np.count_nonzero(usable))
    groups_skipped = n_groups - groups_used
    rows_per_group = positives + negatives
    rows_used = int(rows_per_group[usable].sum())
    logger.debug(
        "GAUC%s: %d groups used, %d skipped with one label class",
        _describe(name),
        groups_used,
        groups_skipped,
    )

    if groups_used == 0:
        warnings.warn(
            f"GAUC is undefined{_describe(name)}: none of the {n_groups} groups contains both a "
            "positive and a negative label; returning NaN. Check the group column, or use a split "
            "with more rows per group.",
            MtrankWarning,
            stacklevel=2,
        )
        return GroupMetric(math.nan, 0, groups_skipped, 0)

    value = float(np.sum(auc[usable] * rows_per_group[usable]) / rows_used)
    return GroupMetric(value, groups_used, groups_skipped, rows_used)


# ---------------------------------------------------------------------------------------------
# Pointwise metrics
# ---------------------------------------------------------------------------------------------


def _unit_interval_pair(
    labels: npt.ArrayLike, probs: npt.ArrayLike, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(N,)`` labels and probabilities as float64 after checking both lie in [0, 1].

    Raises:
        DataError: invalid inputs as for :func:`binary_auc`, or a value outside [0, 1].
    """
    label_array = _as_1d_float(labels, "labels")
    prob_array = _as_1d_float(probs, "probs")
    _check_lengths(labels=label_array, probs=prob_array)
    for argument, array in (("labels", label_array), ("probs", prob_array)):
        if array.min() < 0.0 or array.max() > 1.0:
            hint = "; apply a sigmoid to logits first" if argument == "probs" else ""
            raise DataError(
                f"{metric} `{argument}` must be in [0, 1], got values from {float(array.min())} "
                f"to {float(array.max())}{hint}"
            )
    return label_array, prob_array


def logloss(labels: npt.ArrayLike, probs: npt.ArrayLike, eps: float = LOGLOSS_EPS) -> float:
    """Compute the mean binary cross-entropy, with probabilities clipped to ``[eps, 1 - eps]``.

    Args:
        labels: ``(N,)`` labels in [0, 1]; soft labels are allowed.
        probs: ``(N,)`` predicted probabilities in [0, 1] (apply a sigmoid to logits first).
        eps: clipping bound, in (0, 0.5).

    Returns:
        The mean of ``-(y log p + (1 - y) log(1 - p))``.

    Raises:
        DataError: invalid inputs as for :func:`binary_auc`, or a label or probability outside [0, 1].
        ConfigError: ``eps`` is outside (0, 0.5).

    Example:
        >>> round(logloss([1, 0], [0.5, 0.5]), 6)
        0.693147
    """
    if not 0.0 < eps < 0.5:
        raise ConfigError([f"logloss `eps` must be in (0, 0.5), got {eps!r}"])
    label_array, prob_array = _unit_interval_pair(labels, probs, "logloss")
    clipped = np.clip(prob_array, eps, 1.0 - eps)
    losses = -(label_array * np.log(clipped) + (1.0 - label_array) * np.log1p(-clipped))
    return float(losses.mean())


def mse(labels: npt.ArrayLike, predictions: npt.ArrayLike) -> float:
    """Compute the mean squared error of ``(N,)`` predictions; on probabilities it is the Brier score.

    Raises:
        DataError: the inputs are not 1-D, are empty, differ in length or contain NaN or inf.

    Example:
        >>> mse([1.0, 2.0], [1.5, 2.0])
        0.125
    """
    label_array = _as_1d_float(labels, "labels")
    prediction_array = _as_1d_float(predictions, "predictions")
    _check_lengths(labels=label_array, predictions=prediction_array)
    return float(np.mean((prediction_array - label_array) ** 2))


def mae(labels: npt.ArrayLike, predictions: npt.ArrayLike) -> float:
    """Compute the mean absolute error of ``(N,)`` predictions.

    Raises:
        DataError: the inputs are not 1-D, are empty, differ in length or contain NaN or inf.

    Example:
        >>> mae([1.0, 2.0], [1.5, 2.0])
        0.25
    """
    label_array = _as_1d_float(labels, "labels")
    prediction_array = _as_1d_float(predictions, "predictions")
    _check_lengths(labels=label_array, predictions=prediction_array)
    return float(np.mean(np.abs(prediction_array - label_array)))


# Equal-width probability bins of the expected calibration error; 10 is the common choice
# (Naeini, Cooper and Hauskrecht, AAAI 2015; Guo et al., "On Calibration of Modern Neural Networks",
# ICML 2017).
ECE_BINS = 10


def expected_calibration_error(
    labels: npt.ArrayLike, probs: npt.ArrayLike, num_bins: int = ECE_BINS
) -> float:
    """Compute the expected calibration error of predicted probabilities over equal-width bins.

    Rows are binned by predicted probability into ``num_bins`` intervals of ``[0, 1]``; the error is
    ``sum_b (n_b / N) * |mean label_b - mean prob_b|``. 0 means the mean prediction matches the
    observed rate in every bin, which is what combining task scores by weights assumes.

    Args:
        labels: ``(N,)`` labels in [0, 1].
        probs: ``(N,)`` predicted probabilities in [0, 1].
        num_bins: number of bins, at least 1.

    Returns:
        The error, in [0, 1].

    Raises:
        DataError: invalid inputs as for :func:`logloss`.
        ConfigError: ``num_bins`` is below 1.

    Example:
        >>> round(expected_calibration_error([0, 1, 1, 1], [0.05, 0.95, 0.95, 0.95]), 6)
        0.05
    """
    if num_bins < 1:
        raise ConfigError([f"expected calibration error needs at least 1 bin, got {num_bins!r}"])
    label_array, prob_array = _unit_interval_pair(labels, probs, "ece")
    # A probability of exactly 1 belongs to the last bin, not to a bin of its own.
    bins = np.minimum((prob_array * num_bins).astype(np.int64), num_bins - 1)
    label_sums = np.bincount(bins, weights=label_array, minlength=num_bins)
    prob_sums = np.bincount(bins, weights=prob_array, minlength=num_bins)
    return float(np.abs(label_sums - prob_sums).sum() / label_array.size)


# ---------------------------------------------------------------------------------------------
# NDCG@k
# ---------------------------------------------------------------------------------------------


def _dcg_per_group(
    gains: np.ndarray,
    sort_keys: np.ndarray,
    codes: np.ndarray,
    group_starts: np.ndarray,
    k: int,
    n_groups: int,
) -> np.ndarray:
    """Compute the DCG@k of every group with rows ranked by descending ``sort_keys``; shape ``(G,)``."""
    # np.lexsort is stable, so rows with equal keys keep their input order.
    order = np.lexsort((-sort_keys, codes))
    sorted_codes = codes[order]
    rank = np.arange(len(order)) - group_starts[sorted_codes]  # 0-based rank inside the group
    in_top_k = rank < k
    discounted = gains[order][in_top_k] / np.log2(rank[in_top_k] + 2.0)
    return np.bincount(sorted_codes[in_top_k], weights=discounted, minlength=n_groups)


def ndcg_at_k(
    relevance: npt.ArrayLike, scores: npt.ArrayLike, groups: npt.ArrayLike, k: int, *, name: str = ""
) -> GroupMetric:
    """Compute the mean over groups of NDCG@k.

    A row at 1-based rank r contributes the gain ``2^relevance - 1`` divided by ``log2(r + 1)``.
    Rows are ranked by descending score inside each group. Tied scores are broken by input order:
    of two rows with the same score, the one that comes first in ``scores`` ranks higher. This makes
    the result deterministic but not tie-averaged like ``sklearn.metrics.ndcg_score``'s default.
    Groups whose ideal DCG is zero (no row with relevance above 0) are skipped and counted. Every
    usable group has the same weight.

    Args:
        relevance: ``(N,)`` graded relevance, >= 0 (0/1 labels for binary tasks).
        scores: ``(N,)`` scores.
        groups: ``(N,)`` group ids, integers or strings; rows of one group need not be adjacent.
        k: cut-off, a positive integer; groups shorter than k use all their rows.
        name: task and split named in the warning.

    Returns:
        A :class:`GroupMetric`; its value is NaN when no group has a relevant row.

    Raises:
        ConfigError: ``k`` is not a positive integer.
        DataError: invalid inputs as for :func:`binary_auc`, a negative relevance, or a relevance so
            large that ``2^relevance`` overflows float64.

    Warns:
        MtrankWarning: no group has a relevant row.

    Example:
        >>> ndcg_at_k([0, 1, 1, 0], [0.9, 0.1, 0.8, 0.2], [7, 7, 8, 8], k=2)
        GroupMetric(value=0.8154648767857288, groups_used=2, groups_skipped=0, rows_used=4)
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError([f"NDCG cut-off `k` must be a positive integer, got {k!r}"])
    relevance_array = _as_1d_float(relevance, "relevance")
    score_array = _as_1d_float(scores, "scores")
    _check_lengths(relevance=relevance_array, scores=score_array)
    if relevance_array.min() < 0.0:
        raise DataError(f"NDCG relevance must be >= 0, got a minimum of {float(relevance_array.min())}")
    with np.errstate(over="ignore"):  # an overflow is reported below as a DataError
        gains = np.exp2(relevance_array) - 1.0
    if not np.isfinite(gains).all():
        raise DataError(
            f"NDCG gain 2^relevance overflows for relevance up to {float(relevance_array.max())}; "
            "map the label to a few integer grades before using ndcg@K"
        )
    codes, n_groups = _encode_groups(groups, len(relevance_array))

    rows_per_group = np.bincount(codes, minlength=n_groups)
    group_starts = np.cumsum(rows_per_group) - rows_per_group
    dcg = _dcg_per_group(gains, score_array, codes, group_starts, int(k), n_groups)
    ideal_dcg = _dcg_per_group(gains, relevance_array, codes, group_starts, int(k), n_groups)

    usable = ideal_dcg > 0.0
    groups_used = int(np.count_nonzero(usable))
    groups_skipped = n_groups - groups_used
    rows_used = int(rows_per_group[usable].sum())
    logger.debug(
        "NDCG@%d%s: %d groups used, %d skipped without a relevant row",
        k,
        _describe(name),
        groups_used,
        groups_skipped,
    )

    if groups_used == 0:
        warnings.warn(
            f"NDCG@{k} is undefined{_describe(name)}: none of the {n_groups} groups has a row with "
            "relevance above 0; returning NaN.",
            MtrankWarning,
            stacklevel=2,
        )
        return GroupMetric(math.nan, 0, groups_skipped, 0)

    value = float(np.mean(dcg[usable] / ideal_dcg[usable]))
    return GroupMetric(value, groups_used, groups_skipped, rows_used)


# ---------------------------------------------------------------------------------------------
# Registry and per-task evaluation
# ---------------------------------------------------------------------------------------------

# Arguments of a registry entry's `compute`: labels, predictions, groups (or None), the NDCG
# cut-off (None for other metrics) and the task name for warnings.
MetricFunction = Callable[
    [npt.ArrayLike, npt.ArrayLike, npt.ArrayLike | None, int | None, str], float | GroupMetric
]


@dataclass(frozen=True, kw_only=True)
class MetricInfo:
    """Registry entry of one metric.

    Attributes:
        task_types: task types the metric is defined for.
        needs_groups: whether the metric needs a group id per row (user or request id).
        greater_is_better: direction for early stopping and best-checkpoint selection.
        description: one line for help text and error messages.
        compute: function of ``(labels, predictions, groups, cutoff, task_name)``.
    """

    task_types: frozenset[str]
    needs_groups: bool
    greater_is_better: bool
    description: str
    compute: MetricFunction


# Registry name of the NDCG family. In a config, K is a positive integer cut-off, as in "ndcg@10".
NDCG_TEMPLATE = "ndcg@K"
_NDCG_PATTERN = re.compile(r"ndcg@(.*)")


def _groups_or_raise(groups: npt.ArrayLike | None, metric: str) -> npt.ArrayLike:
    if groups is None:
        raise ConfigError(
            [f"metric `{metric}` needs a group id per row; set a group column in the data config"]
        )
    return groups


def _registry_gauc(
    labels: npt.ArrayLike,
    predictions: npt.ArrayLike,
    groups: npt.ArrayLike | None,
    cutoff: int | None,
    task: str,
) -> GroupMetric:
    return gauc(labels, predictions, _groups_or_raise(groups, "gauc"), name=task)


def _registry_ndcg(
    labels: npt.ArrayLike,
    predictions: npt.ArrayLike,
    groups: npt.ArrayLike | None,
    cutoff: int | None,
    task: str,
) -> GroupMetric:
    if cutoff is None:
        raise ConfigError([f"metric `{NDCG_TEMPLATE}` needs a cut-off K, as in `ndcg@10`"])
    return ndcg_at_k(labels, predictions, _groups_or_raise(groups, f"ndcg@{cutoff}"), cutoff, name=task)


_BINARY = frozenset({"binary"})
_ALL_TASKS = frozenset(TASK_TYPES)

METRICS: dict[str, MetricInfo] = {
    "auc": MetricInfo(
        task_types=_BINARY,
        needs_groups=False,
        greater_is_better=True,
        description="ROC AUC over all rows; tied scores get half credit",
        compute=lambda labels, predictions, groups, cutoff, task: binary_auc(labels, predictions, name=task),
    ),
    "gauc": MetricInfo(
        task_types=_BINARY,
        needs_groups=True,
        greater_is_better=True,
        description="per-group AUC averaged with weights = rows per group",
        compute=_registry_gauc,
    ),
    "logloss": MetricInfo(
        task_types=_BINARY,
        needs_groups=False,
        greater_is_better=False,
        description="binary cross-entropy of the predicted probabilities",
        compute=lambda labels, predictions, groups, cutoff, task: logloss(labels, predictions),
    ),
    "ece": MetricInfo(
        task_types=_BINARY,
        needs_groups=False,
        greater_is_better=False,
        description=f"expected calibration error over {ECE_BINS} equal-width probability bins",
        compute=lambda labels, predictions, groups, cutoff, task: expected_calibration_error(
            labels, predictions
        ),
    ),
    "mse": MetricInfo(
        task_types=_ALL_TASKS,
        needs_groups=False,
        greater_is_better=False,
        description="mean squared error (the Brier score on binary tasks)",
        compute=lambda labels, predictions, groups, cutoff, task: mse(labels, predictions),
    ),
    "rmse": MetricInfo(
        task_types=_ALL_TASKS,
        needs_groups=False,
        greater_is_better=False,
        description="square root of the mean squared error",
        compute=lambda labels, predictions, groups, cutoff, task: math.sqrt(mse(labels, predictions)),
    ),
    "mae": MetricInfo(
        task_types=_ALL_TASKS,
        needs_groups=False,
        greater_is_better=False,
        description="mean absolute error",
        compute=lambda labels, predictions, groups, cutoff, task: mae(labels, predictions),
    ),
    NDCG_TEMPLATE: MetricInfo(
        task_types=_ALL_TASKS,
        needs_groups=True,
        greater_is_better=True,
        description="mean per-group NDCG at cut-off K with gain 2^label - 1",
        compute=_registry_ndcg,
    ),
}


def _check_task_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        raise ConfigError([f"unknown task type `{task_type}`; choose one of: {', '.join(TASK_TYPES)}"])


def metric_names(task_type: TaskType) -> list[str]:
    """Return the metric names allowed for a task type, sorted; ``"ndcg@K"`` represents every cut-off.

    Raises:
        ConfigError: the task type is unknown.

    Example:
        >>> metric_names("regression")
        ['mae', 'mse', 'ndcg@K', 'rmse']
    """
    _check_task_type(task_type)
    return sorted(name for name, info in METRICS.items() if task_type in info.task_types)


def _parse_metric_name(name: str) -> tuple[str, int | None] | str:
    """Split a metric name into its registry key and NDCG cut-off, or return a problem message."""
    normalized = name.strip().lower()
    match = _NDCG_PATTERN.fullmatch(normalized)
    if match is None:
        if normalized in METRICS:
            return normalized, None
        return f"unknown metric `{name}`"
    cutoff = match.group(1)
    if not cutoff.isdigit() or int(cutoff) < 1:
        return (
            f"invalid metric `{name}`: the cut-off K in `ndcg@K` must be a positive integer, as in `ndcg@10`"
        )
    return NDCG_TEMPLATE, int(cutoff)


def check_metric_names(task_type: TaskType, names: Sequence[str]) -> list[str]:
    """List every problem with metric names for one task type, without raising.

    Config validation can prefix each message with its key path and report them together.

    Args:
        task_type: ``"binary"`` or ``"regression"``.
        names: metric names, case-insensitive, such as ``["auc", "gauc", "ndcg@10"]``.

    Returns:
        One message per invalid name; empty when all are valid.

    Raises:
        ConfigError: the task type is unknown.

    Example:
        >>> check_metric_names("regression", ["mse", "auc"])
        ['metric `auc` is not defined for regression tasks; choose one of: mae, mse, ndcg@K, rmse']
    """
    return _parse_metric_requests(task_type, names)[1]


def _parse_metric_requests(
    task_type: TaskType, names: Sequence[str]
) -> tuple[list[tuple[str, str, int | None]], list[str]]:
    """Parse metric names into ``(output name, registry key, NDCG cut-off)`` and a list of problems."""
    _check_task_type(task_type)
    choices = ", ".join(metric_names(task_type))
    requests: list[tuple[str, str, int | None]] = []
    problems: list[str] = []
    for name in names:
        parsed = _parse_metric_name(name)
        if isinstance(parsed, str):
            problems.append(f"{parsed}; choose one of: {choices}")
        elif task_type not in METRICS[parsed[0]].task_types:
            problems.append(f"metric `{name}` is not defined for {task_type} tasks; choose one of: {choices}")
        else:
            requests.append((name.strip().lower(), *parsed))
    return requests, problems


def compute_task_metrics(
    task_type: TaskType,
    names: Sequence[str],
    labels: npt.ArrayLike,
    predictions: npt.ArrayLike,
    groups: npt.ArrayLike | None = None,
    *,
    task_name: str = "",
) -> dict[str, float]:
    """Compute the named metrics of one task on one split.

    Args:
        task_type: ``"binary"`` (``predictions`` are probabilities) or ``"regression"``.
        names: metric names from :func:`metric_names`, case-insensitive; ``ndcg@K`` with K >= 1.
        labels: ``(N,)`` labels; 0 or 1 for binary tasks, relevance >= 0 for ``ndcg@K``.
        predictions: ``(N,)`` probabilities for binary tasks, predicted values for regression.
        groups: ``(N,)`` group ids (user or request ids), required by ``gauc`` and ``ndcg@K``.
        task_name: task and split named in warnings and errors, such as
            ``"task `click` on split valid"``.

    Returns:
        The value of each metric under its lower-case name, in the order requested. Each per-group
        metric adds ``<name>_groups_skipped``, such as ``gauc_groups_skipped``: the number of groups
        left out because the metric is undefined on them. A metric undefined on the whole split
        is NaN.

    Raises:
        ConfigError: the task type or a metric name is unknown, a metric is not defined for the task
            type, or a per-group metric is requested without ``groups``. One error lists all
            invalid names.
        DataError: the arrays are invalid; see :func:`binary_auc`, :func:`logloss` and
            :func:`ndcg_at_k`.

    Example:
        >>> compute_task_metrics("binary", ["auc", "logloss"], [0, 1], [0.2, 0.7])
        {'auc': 1.0, 'logloss': 0.2899092476264711}
    """
    source = f"the metrics of {task_name}" if task_name else None
    requests, problems = _parse_metric_requests(task_type, names)
    if problems:
        raise ConfigError(problems, source=source)
    grouped = [name for name, key, _ in requests if METRICS[key].needs_groups]
    if grouped and groups is None:
        raise ConfigError(
            [
                f"metric(s) {', '.join(grouped)} need a group id per row (user or request id), but no "
                "groups were given; set a group column in the data config or remove these metrics"
            ],
            source=source,
        )

    results: dict[str, float] = {}
    for name, key, cutoff in requests:
        value = METRICS[key].compute(labels, predictions, groups, cutoff, task_name)
        if isinstance(value, GroupMetric):
            results[name] = value.value
            results[f"{name}_groups_skipped"] = float(value.groups_skipped)
        else:
            results[name] = value
    return results
