"""Evaluation of a trained run, with unbiased metrics when the log carries simulated ground truth.

A simulated log (``mtrank simulate``) holds ``true_relevance`` and ``true_examination`` columns.
When they are present, evaluation also reports how well each binary task's score ranks items by
true relevance within each request (NDCG@k and pairwise AUC), and compares the learned
shallow-tower bias per (position, device) with the true examination log-odds, as a table and a
PNG plot in the run directory.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

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
        raise ValueError(f"a request has {counts.max()} rows; pairwise AUC handles at most {MAX_PAIRWISE_GROUP}")
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


@torch.no_grad()
def learned_position_bias(run: LoadedRun, data: EncodedData) -> list[dict[str, Any]]:
    """Compare the shallow tower's bias per (device, position) with the true examination log-odds.

    Both are reported relative to position 1 of the same device, because a bias logit is defined
    only up to a per-device constant that the main tower can absorb.

    Returns:
        One dict per (device, position) with ``device``, ``position``, ``learned`` and ``true``.
    """
    model = run.model
    tower = model.shallow_tower
    if tower is None or data.batch.device is None or POSITION_EXTRA not in data.extras:
        return []
    if TRUE_EXAMINATION not in data.extras:
        return []
    column, position_encoder = run.encoders.position  # type: ignore[misc]
    device_names = {
        column: {i + 2: value for i, value in enumerate(enc.vocabulary)} for column, enc in run.encoders.device.items()
    }
    positions = data.extras[POSITION_EXTRA]
    devices = data.batch.device.numpy()
    examination = data.extras[TRUE_EXAMINATION]
    rows: list[dict[str, Any]] = []
    for combo in np.unique(devices, axis=0):
        on_device = (devices == combo).all(axis=1)
        label = "/".join(names.get(int(i), "OOV") for names, i in zip(device_names.values(), combo))
        position_ids = np.unique(positions[on_device & (positions > 0)])
        if len(position_ids) < 2:
            continue
        ids = torch.from_numpy(position_ids.astype(np.int64))
        device_ids = torch.from_numpy(np.repeat(combo[None, :], len(ids), axis=0).astype(np.int64))
        learned = tower.bias_logits(ids, device_ids)[:, 0].double().numpy()
        true = []
        for p in position_ids:
            mean = float(examination[on_device & (positions == p)].mean())
            true.append(math.log(mean / (1 - mean)) if 0 < mean < 1 else math.nan)
        for k, p in enumerate(position_ids):
            rows.append(
                {
                    "device": label,
                    "position": int(p) - 1 + position_encoder.first_position,
                    "learned": float(learned[k] - learned[0]),
                    "true": float(true[k] - true[0]),
                }
            )
    return rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def plot_position_bias(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Plot learned against true bias per device; returns ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s (pip install 'mtrank[plot]')", path)
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for device in sorted({r["device"] for r in rows}):
        mine = [r for r in rows if r["device"] == device]
        (line,) = axis.plot([r["position"] for r in mine], [r["true"] for r in mine], "--", label=f"{device} true")
        axis.plot([r["position"] for r in mine], [r["learned"] for r in mine], "o-", color=line.get_color(),
                  label=f"{device} learned")
    axis.set_xlabel("position")
    axis.set_ylabel("logit relative to position 1")
    axis.set_title("Shallow-tower bias vs true examination log-odds")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def evaluate_artifact(run: LoadedRun, data_path: str | None = None) -> EvaluationReport:
    """Evaluate a loaded run on ``data_path``, or on its own test split when ``None``."""
    config = run.config
    if data_path is None:
        from mtrank.data.pipeline import prepare_data

        data: EncodedData = prepare_data(config).test
    else:
        data, _skipped = encode_for_scoring(run.encoders, config.data, data_path, with_labels=True)
    kinds = [t.loss or "bce" for t in config.tasks]
    predictions = predict(run.model, data, kinds, config.training.eval_batch_size)
    metrics = evaluate_predictions(predictions, data, config.tasks, config.evaluation.group_column, "evaluate")
    report = EvaluationReport(metrics=metrics)

    truth = ground_truth_metrics(predictions, data, config.task_names(), [k == "bce" for k in kinds])
    for task, values in truth.items():
        metrics[task].update(values)
    bias_rows = learned_position_bias(run, data)
    if bias_rows:
        correlations = {}
        for device in sorted({r["device"] for r in bias_rows}):
            mine = [r for r in bias_rows if r["device"] == device]
            correlations[device] = spearman(np.array([r["learned"] for r in mine]), np.array([r["true"] for r in mine]))
        report.extra_tables.append(
            (
                "shallow-tower bias vs true examination log-odds (relative to position 1)",
                ["device", "position", "learned", "true"],
                [[r["device"], r["position"], r["learned"], r["true"]] for r in bias_rows],
            )
        )
        report.extra_tables.append(
            ("Spearman correlation per device", ["device", "spearman"], [[d, c] for d, c in correlations.items()])
        )
        report.details["position_bias"] = bias_rows
        report.details["position_bias_spearman"] = correlations
        plot = plot_position_bias(bias_rows, run.run_dir / BIAS_PLOT)
        if plot is not None:
            report.files.append(plot)
    return report
