"""Evaluation of a trained run, with unbiased metrics when the log carries simulated ground truth.

A simulated log (``mtrank simulate``) holds ``true_relevance`` and ``true_examination`` columns.
When they are present, evaluation also reports how well the model ranks by true relevance within
each request (NDCG@k and per-request AUC) and compares the learned shallow-tower bias per
(position, device) with the true examination log-odds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from mtrank.data.pipeline import encode_for_scoring
from mtrank.data.tensors import EncodedData
from mtrank.training.evaluation import Metrics, evaluate_predictions, predict
from mtrank.training.run import LoadedRun

logger = logging.getLogger(__name__)


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
    return EvaluationReport(metrics=metrics)
