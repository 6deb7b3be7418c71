"""Per-task label masks: a row missing one task's label still trains and scores the other tasks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from mtrank.config import parse_config
from mtrank.data.pipeline import prepare_data
from mtrank.training.losses import task_loss_list
from mtrank.training.run import train_run
from mtrank.training.trainer import Trainer


def _log_with_missing_watch_time(write_log, num_rows: int = 600) -> tuple[Path, int]:
    # Every third row has no watch time, as for impressions without a play.
    rng = np.random.default_rng(5)
    watch = [f"{v:.3f}" for v in rng.normal(1.0, 0.5, num_rows)]
    for i in range(0, num_rows, 3):
        watch[i] = ""
    return write_log(num_rows=num_rows, watch_time=watch), len(range(0, num_rows, 3))


def test_masked_loss_matches_manual_mean() -> None:
    logits = torch.tensor([[0.5, 1.0], [-1.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([[1.0, 1.5], [0.0, 0.0], [1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])

    bce, mse = task_loss_list(logits, labels, ["bce", "mse"], mask)

    expected_bce = F.binary_cross_entropy_with_logits(logits[:2, 0], labels[:2, 0])
    expected_mse = F.mse_loss(logits[[0, 2], 1], labels[[0, 2], 1])
    assert torch.allclose(bce, expected_bce)
    assert torch.allclose(mse, expected_mse)


def test_task_without_labels_in_batch_gives_zero_loss() -> None:
    logits = torch.tensor([[0.5], [1.0]], requires_grad=True)
    labels = torch.zeros(2, 1)
    mask = torch.zeros(2, 1)

    (loss,) = task_loss_list(logits, labels, ["bce"], mask)
    loss.backward()

    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_skip_row_drops_rows_missing_a_label(write_log, config_dict) -> None:
    path, num_missing = _log_with_missing_watch_time(write_log)
    config = parse_config(config_dict(path, tasks=("click", "watch_time")))

    data = prepare_data(config)

    assert data.skipped_rows == num_missing
    assert data.train.batch.label_mask is None


def test_mask_keeps_rows_and_masks_one_task(write_log, config_dict) -> None:
    path, num_missing = _log_with_missing_watch_time(write_log)
    raw = config_dict(path, tasks=("click", "watch_time"))
    raw["data"]["missing_labels"] = "mask"
    config = parse_config(raw)

    data = prepare_data(config)
    total = len(data.train) + len(data.test) + (len(data.valid) if data.valid is not None else 0)
    masks = [d.batch.label_mask for d in (data.train, data.valid, data.test) if d is not None]

    assert data.skipped_rows == 0
    assert total == 600
    assert all(m is not None for m in masks)
    assert int(sum((m[:, 0] == 0).sum() for m in masks)) == 0
    assert int(sum((m[:, 1] == 0).sum() for m in masks)) == num_missing


def test_masked_training_reports_finite_metrics(write_log, config_dict, tmp_path: Path) -> None:
    path, _ = _log_with_missing_watch_time(write_log)
    raw = config_dict(path, tasks=("click", "watch_time"), epochs=2)
    raw["data"]["missing_labels"] = "mask"
    config = parse_config(raw)

    result = train_run(config, tmp_path / "run")

    assert result.test_metrics["click"]["auc"] > 0.9
    assert math.isfinite(result.test_metrics["watch_time"]["mse"])


def test_masked_rows_do_not_change_regression_metric(write_log, config_dict) -> None:
    path, _ = _log_with_missing_watch_time(write_log)
    raw = config_dict(path, tasks=("click", "watch_time"))
    raw["data"]["missing_labels"] = "mask"
    config = parse_config(raw)
    data = prepare_data(config)
    torch.manual_seed(0)
    from mtrank.models.builder import build_ranker

    trainer = Trainer(build_ranker(config, data.encoders), config)
    metrics = trainer.evaluate(data.test)
    present = data.test.take(np.flatnonzero(data.test.batch.label_mask[:, 1].numpy() > 0))
    present.batch.label_mask = None

    assert math.isclose(
        metrics["watch_time"]["mse"], trainer.evaluate(present)["watch_time"]["mse"], rel_tol=1e-9
    )
