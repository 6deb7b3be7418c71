"""Evaluation of a trained run, with unbiased metrics when the log carries simulated ground truth.

A simulated log (``mtrank simulate``) contains ``true_relevance`` and ``true_examination`` columns.
When they are present, evaluation also reports how well each binary task's score ranks items by
true relevance within each request (NDCG@k and pairwise AUC), and compares the learned
shallow-tower bias per (position, device) with the true examination, as a table, a Spearman
correlation and a monotonicity check per device, and a PNG plot in the run directory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from mtrank.data.encoders import FIRST_VALUE_ID, MISSING_POSITION_ID
from mtrank.data.pipeline import POSITION_EXTRA, encode_for_scoring
from mtrank.data.tensors import EncodedData
from mtrank.training.evaluation import Metrics, evaluate_predictions, predict
from mtrank.training.metrics import ndcg_at_k
from mtrank.training.run import LoadedRun

logger = logging.getLogger(__name__)

TRUE_RELEVANCE = "true_relevance"
TRUE_EXAMINATION = "true_examination"
# NDCG cut-off of the unbiased ranking metric; lists in the simulated logs hold 10 items by default.
UNBIASED_NDCG_K = 10
# Largest request size the pairwise AUC handles (it builds a (G, K, K) comparison array).
MAX_PAIRWISE_GROUP = 256
BIAS_PLOT = "position_bias.png"


@dataclass
class EvaluationReport:
    """Metrics of one evaluation, extra tables, and files written (plots)."""

    metrics: Metrics
    extra_tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def tables(self) -> list[Table]:
        """Render the extra tables with rich (the CLI prints them)."""
        rendered = []
        for title, header, rows in self.extra_tables:
            table = Table(title=title)
            for name in header:
                table.add_column(name)
            for row in rows:
                table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
            rendered.append(table)
        return rendered

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, **self.details, "files": [str(p) for p in self.files]}


def pairwise_auc(relevance: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups of the share of item pairs the scores order as true relevance does.

    For binary relevance this is the per-group AUC; for graded relevance it is the concordance
    probability. Pairs with equal relevance are ignored and tied scores get half credit. Groups
    with no pair of different relevance are skipped.

    Args:
        relevance: ``(N,)`` true relevance.
        scores: ``(N,)`` model scores.
        groups: ``(N,)`` request ids.

    Returns:
        The mean over usable groups, or NaN when there is none.
    """
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if counts.max() > MAX_PAIRWISE_GROUP:
        raise ValueError(
            f"a request has {counts.max()} rows; pairwise AUC handles at most {MAX_PAIRWISE_GROUP}"
        )
    order = np.argsort(inverse, kind="stable")
    sorted_groups = inverse[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(order)) - starts[sorted_groups]
    num_groups, width = len(counts), int(counts.max())
    rel = np.full((num_groups, width), np.nan)
    sco = np.full((num_groups, width), np.nan)
    rel[sorted_groups, slot] = relevance[order]
    sco[sorted_groups, slot] = scores[order]
    rel_diff = rel[:, :, None] - rel[:, None, :]  # (G, K, K)
    score_diff = sco[:, :, None] - sco[:, None, :]  # (G, K, K)
    pairs = rel_diff > 0
    credit = np.where(score_diff > 0, 1.0, np.where(score_diff == 0, 0.5, 0.0))
    num_pairs = pairs.sum(axis=(1, 2))
    correct = (credit * pairs).sum(axis=(1, 2))
    usable = num_pairs > 0
    return float((correct[usable] / num_pairs[usable]).mean()) if usable.any() else math.nan


def ground_truth_metrics(
    predictions: np.ndarray, data: EncodedData, task_names: list[str], binary: list[bool]
) -> dict[str, dict[str, float]]:
    """Ranking quality of each binary task's score against the simulated true relevance, per request."""
    if TRUE_RELEVANCE not in data.extras or data.groups is None:
        return {}
    relevance = data.extras[TRUE_RELEVANCE]
    results: dict[str, dict[str, float]] = {}
    for t, name in enumerate(task_names):
        if not binary[t]:
            continue
        ndcg = ndcg_at_k(relevance, predictions[:, t], data.groups, UNBIASED_NDCG_K)
        results[name] = {
            f"true_ndcg@{UNBIASED_NDCG_K}": ndcg.value,
            "true_pairwise_auc": pairwise_auc(relevance, predictions[:, t], data.groups),
        }
    return results


# Label of the single device group of a shallow tower without device features.
ALL_DEVICES = "all"


def _device_groups(run: LoadedRun, devices: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``label -> (device ids (Fd,), row mask (N,))`` for each device combination in ``devices``.

    A label joins the device values with ``/`` (``OOV`` for an id outside the vocabulary); a tower
    without device features has one group, ``all``.
    """
    names_by_id = [
        {i + FIRST_VALUE_ID: value for i, value in enumerate(encoder.vocabulary)}
        for encoder in run.encoders.device.values()
    ]
    groups: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for combo in np.unique(devices, axis=0):  # (G, Fd); one empty combination when Fd is 0
        names = [names.get(int(i), "OOV") for names, i in zip(names_by_id, combo, strict=True)]
        label = "/".join(names) if names else ALL_DEVICES
        groups[label] = (combo, (devices == combo).all(axis=1))
    return groups


@torch.no_grad()
def learned_bias_by_position(run: LoadedRun, data: EncodedData) -> list[dict[str, Any]]:
    """Return the shallow tower's bias logit per (device, position) seen in ``data``, relative to the first.

    The bias is read from the tower directly, so the positions are those of the log even though
    the served score never uses them. A bias logit is defined only up to a per-device constant that
    the main tower can absorb, so each device's values are reported minus the value at its first
    position. Only the first biased task is read.

    Args:
        run: the loaded run.
        data: encoded rows whose positions were read (the test split, or a simulated log).

    Returns:
        One dict per (device, position) with ``device``, ``position`` (as written in the log),
        ``position_id``, ``rows`` (rows of ``data`` in the cell) and ``learned``; empty when the
        run has no shallow tower or ``data`` holds no positions.
    """
    tower = run.model.shallow_tower
    # build_ranker adds a shallow tower only when there is a position encoder, so `position` is set
    # whenever `tower` is.
    position = run.encoders.position
    if tower is None or position is None or data.batch.device is None or POSITION_EXTRA not in data.extras:
        return []
    _column, position_encoder = position
    positions = data.extras[POSITION_EXTRA]
    rows: list[dict[str, Any]] = []
    for label, (combo, on_device) in _device_groups(run, data.batch.device.numpy()).items():
        position_ids = np.unique(positions[on_device & (positions != MISSING_POSITION_ID)])
        if len(position_ids) < 2:
            continue
        ids = torch.from_numpy(position_ids.astype(np.int64))  # (P,)
        device_ids = torch.from_numpy(np.repeat(combo[None, :], len(ids), axis=0).astype(np.int64))  # (P, Fd)
        learned = tower.bias_logits(ids, device_ids)[:, 0].double().numpy()  # (P,)
        for k, position_id in enumerate(position_ids):
            rows.append(
                {
                    "device": label,
                    "position": int(position_id) - 1 + position_encoder.first_position,
                    "position_id": int(position_id),
                    "rows": int(np.count_nonzero(on_device & (positions == position_id))),
                    "learned": float(learned[k] - learned[0]),
                }
            )
    return rows


def learned_position_bias(run: LoadedRun, data: EncodedData) -> list[dict[str, Any]]:
    """Compare the shallow tower's bias per (device, position) with the simulated true examination.

    Each row of :func:`learned_bias_by_position` gets two true values, both relative to the
    device's first position: ``true_log_odds``, the log-odds of the mean true examination, and
    ``true_log_examination``, its log. Under ``click = examination * relevance`` with small click
    rates, the additive bias logit estimates the log of examination rather than its log-odds. Both
    increase with the examination probability, so rank statistics such as Spearman's agree.

    Returns:
        The rows with ``true_log_odds`` and ``true_log_examination`` added; empty when ``data`` has
        no ``true_examination`` column or the run has no shallow tower.
    """
    if TRUE_EXAMINATION not in data.extras:
        return []
    rows = learned_bias_by_position(run, data)
    if not rows or data.batch.device is None:
        return []
    positions = data.extras[POSITION_EXTRA]
    examination = data.extras[TRUE_EXAMINATION]
    for label, (_combo, on_device) in _device_groups(run, data.batch.device.numpy()).items():
        mine = [r for r in rows if r["device"] == label]
        if not mine:
            continue
        means = [float(examination[on_device & (positions == r["position_id"])].mean()) for r in mine]
        log_odds = [math.log(m / (1 - m)) if 0 < m < 1 else math.nan for m in means]
        logs = [math.log(m) if m > 0 else math.nan for m in means]
        for k, row in enumerate(mine):
            row["true_log_odds"] = log_odds[k] - log_odds[0]
            row["true_log_examination"] = logs[k] - logs[0]
    return rows


def monotone_where_true(learned: Sequence[float], truth: Sequence[float]) -> bool:
    """Check that ``learned`` falls at every step between consecutive positions where ``truth`` falls.

    Args:
        learned: learned bias per position, in position order.
        truth: true bias per position, in the same order.

    Returns:
        ``True`` when each strict decrease of ``truth`` is matched by a strict decrease of
        ``learned``; steps where the truth does not fall are not checked.

    Example:
        >>> monotone_where_true([0.0, -1.0, -0.5], [0.0, -2.0, -3.0])
        False
    """
    return all(learned[k + 1] < learned[k] for k in range(len(truth) - 1) if truth[k + 1] < truth[k])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either input is constant."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def bias_agreement(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | bool]]:
    """Summarise :func:`learned_position_bias` rows per device.

    Returns:
        ``device -> {"spearman": ..., "monotone": ...}``: Spearman's correlation between the learned
        bias and the true log-odds, and :func:`monotone_where_true` on the same values.
    """
    summary: dict[str, dict[str, float | bool]] = {}
    for device in sorted({r["device"] for r in rows}):
        mine = sorted((r for r in rows if r["device"] == device), key=lambda r: r["position"])
        learned = np.array([r["learned"] for r in mine])
        truth = np.array([r["true_log_odds"] for r in mine])
        summary[device] = {
            "spearman": spearman(learned, truth),
            "monotone": monotone_where_true(learned.tolist(), truth.tolist()),
        }
    return summary


def plot_position_bias(rows: list[dict[str, Any]], path: Path, *, title: str | None = None) -> Path | None:
    """Plot the learned bias against the true log examination per device.

    Both curves are relative to each device's first position. Returns ``None`` when matplotlib is
    missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s (pip install 'mtrank[plot]')", path)
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for device in sorted({r["device"] for r in rows}):
        mine = sorted((r for r in rows if r["device"] == device), key=lambda r: r["position"])
        positions = [r["position"] for r in mine]
        (line,) = axis.plot(
            positions, [r["true_log_examination"] for r in mine], "--", label=f"{device} true log(exam)"
        )
        axis.plot(
            positions, [r["learned"] for r in mine], "o-", color=line.get_color(), label=f"{device} learned"
        )
    axis.set_xlabel("position")
    axis.set_ylabel("logit relative to position 1")
    axis.set_title(title or "Shallow-tower bias vs true log examination")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def evaluate_artifact(run: LoadedRun, data_path: str | None = None) -> EvaluationReport:
    """Evaluate a loaded run on ``data_path``, or on its own test split when ``None``.

    Besides the per-task metrics, a log with simulated ground truth adds ``true_ndcg@10`` and
    ``true_pairwise_auc`` per binary task. A run with a shallow tower adds the learned bias per
    (device, position). When the log has a ``true_examination`` column, the bias is compared with the
    truth (Spearman, monotonicity, plot); otherwise it is reported on its own.
    """
    config = run.config
    if data_path is None:
        from mtrank.data.pipeline import prepare_data

        data: EncodedData = prepare_data(config, run.encoders).test
    else:
        data, _skipped = encode_for_scoring(run.encoders, config.data, data_path, with_labels=True)
    kinds = [t.loss or "bce" for t in config.tasks]
    predictions = predict(run.model, data, kinds, config.training.eval_batch_size)
    metrics = evaluate_predictions(
        predictions, data, config.tasks, config.evaluation.group_column, "evaluate"
    )
    report = EvaluationReport(metrics=metrics)

    truth = ground_truth_metrics(predictions, data, config.task_names(), [k == "bce" for k in kinds])
    for task, values in truth.items():
        metrics[task].update(values)

    bias_rows = learned_position_bias(run, data)
    if bias_rows:
        agreement = bias_agreement(bias_rows)
        report.extra_tables.append(
            (
                "shallow-tower bias vs truth (relative to position 1)",
                ["device", "position", "learned", "true log-odds", "true log(exam)"],
                [
                    [r["device"], r["position"], r["learned"], r["true_log_odds"], r["true_log_examination"]]
                    for r in bias_rows
                ],
            )
        )
        report.extra_tables.append(
            (
                "learned bias vs true log-odds per device",
                ["device", "spearman", "monotone"],
                [[d, a["spearman"], str(a["monotone"])] for d, a in agreement.items()],
            )
        )
        report.details["position_bias"] = bias_rows
        report.details["position_bias_spearman"] = {d: a["spearman"] for d, a in agreement.items()}
        report.details["position_bias_monotone"] = {d: a["monotone"] for d, a in agreement.items()}
        plot = plot_position_bias(bias_rows, run.run_dir / BIAS_PLOT)
        if plot is not None:
            report.files.append(plot)
        return report

    learned_rows = learned_bias_by_position(run, data)
    if learned_rows:
        report.extra_tables.append(
            (
                "shallow-tower bias (relative to the first position)",
                ["device", "position", "rows", "learned"],
                [[r["device"], r["position"], r["rows"], r["learned"]] for r in learned_rows],
            )
        )
        report.details["position_bias"] = learned_rows
    return report
