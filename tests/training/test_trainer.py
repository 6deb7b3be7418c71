"""Tests of the trainer and of whole runs on synthetic logs (and, marked slow, on Census-Income)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mtrank.config import parse_config
from mtrank.data.pipeline import prepare_data
from mtrank.errors import ArtifactError
from mtrank.models.builder import build_ranker
from mtrank.training.evaluation import predict
from mtrank.training.lock import LOCK_FILE
from mtrank.training.run import train_run
from mtrank.training.trainer import CHECKPOINTS, METRICS_FILE, WEIGHTS_FILE, Trainer

BACKBONES = ["shared_bottom", "mmoe", "ple"]


@pytest.fixture(scope="module")
def three_task_run(tmp_path_factory, write_log_in, config_dict):
    """One short MMoE run with an informative, a pure-noise and a regression task (1,200 rows, 2 epochs)."""
    folder = tmp_path_factory.mktemp("three_tasks")
    path = write_log_in(folder, num_rows=1200)
    raw = config_dict(path, tasks=("click", "noise", "watch_time"), epochs=2)
    raw["data"]["split"] = {"method": "random", "test_fraction": 0.3, "valid_fraction": 0.1, "seed": 3}
    config = parse_config(raw)
    return train_run(config, folder / "run")


# ----------------------------------------------------------------------------------------------------
# per-task results


def test_informative_task_learned(three_task_run) -> None:
    assert three_task_run.test_metrics["click"]["auc"] > 0.95


def test_noise_task_stays_at_chance(three_task_run) -> None:
    # 360 test rows: the AUC of an uninformed score has a standard deviation of about 0.03 (Hanley and
    # McNeil 1982), so 0.1 is more than three of them.
    assert abs(three_task_run.test_metrics["noise"]["auc"] - 0.5) < 0.1


def test_metrics_keyed_by_task(three_task_run) -> None:
    metrics = three_task_run.test_metrics

    assert list(metrics) == ["click", "noise", "watch_time", "mean"]
    assert set(metrics["click"]) == {"auc", "logloss"}
    assert set(metrics["watch_time"]) == {"mse", "mae"}
    assert metrics["mean"]["auc"] == pytest.approx((metrics["click"]["auc"] + metrics["noise"]["auc"]) / 2)
    assert metrics["mean"]["mse"] == metrics["watch_time"]["mse"]


def test_regression_task_learned(three_task_run) -> None:
    # watch_time = 1 + 0.5 * score + N(0, 0.1^2), so its variance is 0.25 + 0.01; a useful model beats it.
    assert three_task_run.test_metrics["watch_time"]["mse"] < 0.26


def test_metrics_file_written(three_task_run) -> None:
    written = json.loads((three_task_run.run_dir / METRICS_FILE).read_text(encoding="utf-8"))

    assert [epoch["epoch"] for epoch in written["epochs"]] == [1, 2]
    assert written["test"]["click"]["auc"] == pytest.approx(three_task_run.test_metrics["click"]["auc"])
    assert set(written["epochs"][0]["train"]) >= {"loss/click", "loss/noise", "loss/watch_time", "loss/total"}
    assert set(written["epochs"][0]["valid"]) == {"click", "noise", "watch_time", "mean"}


def test_run_directory_complete(three_task_run) -> None:
    names = {p.name for p in three_task_run.run_dir.iterdir()}

    assert {"config.yaml", "encoders.json", WEIGHTS_FILE, METRICS_FILE, "train.log", CHECKPOINTS} <= names
    # No temporary file is left behind; the lock file stays by design (see mtrank.training.lock).
    assert not [name for name in names if name.startswith(".") and name != LOCK_FILE]


def test_mmoe_experts_differ_after_training(three_task_run) -> None:
    model = three_task_run.model.eval()
    x = model.embed(three_task_run.data.test.batch)
    experts = model.backbone.experts

    outputs = [expert(x) for expert in experts]

    for a, b in itertools.combinations(range(len(experts)), 2):
        assert not torch.equal(experts[a].layers[0].weight, experts[b].layers[0].weight)
        assert not torch.allclose(outputs[a], outputs[b], atol=1e-4), f"experts {a} and {b} collapsed"


def test_trained_gates_sum_to_one(three_task_run) -> None:
    model = three_task_run.model.eval()

    gates = model(three_task_run.data.test.batch).gates

    assert gates.shape == (len(three_task_run.data.test), 3, 3)  # (B, T, E)
    assert torch.allclose(gates.sum(dim=-1), torch.ones(gates.shape[:2]), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# batches of one row


def small_trainer(write_log, config_dict, kind: str, *, batch_size: int, batch_norm: bool = False):
    raw = config_dict(write_log(num_rows=120), backbone=kind, batch_size=batch_size)
    raw["model"]["batch_norm"] = batch_norm
    config = parse_config(raw)
    prepared = prepare_data(config)
    torch.manual_seed(0)
    model = build_ranker(config, prepared.encoders)
    return Trainer(model, config), prepared


def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", BACKBONES)
def test_train_with_batch_size_one(write_log, config_dict, kind: str) -> None:
    trainer, prepared = small_trainer(write_log, config_dict, kind, batch_size=1)
    before = parameters_of(trainer.model)

    record = trainer.train_epoch(prepared.train.take(np.arange(6)), epoch=1)

    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert changed
    assert np.isfinite(record["loss/total"])


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_train_with_last_batch_of_one_row(write_log, config_dict, kind: str, batch_norm: bool) -> None:
    trainer, prepared = small_trainer(write_log, config_dict, kind, batch_size=4, batch_norm=batch_norm)
    nine_rows = prepared.train.take(np.arange(9))  # batches of 4, 4 and 1

    result = trainer.fit(nine_rows, prepared.valid)

    assert len(result.history) == 1
    assert np.isfinite(result.history[0].train["loss/total"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("kind", BACKBONES)
def test_eval_batch_size_one_matches_full_batch(write_log, config_dict, kind: str) -> None:
    trainer, prepared = small_trainer(write_log, config_dict, kind, batch_size=16, batch_norm=True)
    trainer.fit(prepared.train, None)

    one_by_one = predict(trainer.model, prepared.test, ["bce", "bce"], batch_size=1)
    whole = predict(trainer.model, prepared.test, ["bce", "bce"], batch_size=1024)

    assert one_by_one.shape == (len(prepared.test), 2)
    assert np.allclose(one_by_one, whole, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# early stopping, resume, balancers and failures


def test_early_stopping_keeps_best_epoch(tmp_path: Path, write_log, config_dict) -> None:
    raw = config_dict(write_log(), tasks=("click",), epochs=5)
    # Valid logloss falls as the model learns, so under mode `max` epoch 1 stays the best.
    raw["training"]["early_stopping"] = {"metric": "click/logloss", "mode": "max", "patience": 1}
    config = parse_config(raw)

    result = train_run(config, tmp_path / "run")

    first_epoch = load_file(str(tmp_path / "run" / CHECKPOINTS / "epoch-0001" / "model.safetensors"))
    final = load_file(str(tmp_path / "run" / WEIGHTS_FILE))
    assert result.fit.stopped_early
    assert result.fit.best_epoch == 1
    assert [r.epoch for r in result.fit.history] == [1, 2]
    assert all(torch.equal(final[name], first_epoch[name]) for name in final)


def test_resume_matches_uninterrupted_run(tmp_path: Path, write_log, config_dict) -> None:
    raw = config_dict(write_log(num_rows=300), epochs=3, position_bias=True)
    raw["model"]["dropout"] = 0.2
    raw["training"]["early_stopping"] = {"metric": "mean/auc", "mode": "max", "patience": 5}
    config = parse_config(raw)

    uninterrupted = train_run(config, tmp_path / "whole")
    interrupted = train_run(parse_config(raw), tmp_path / "parts", stop_after=1)
    resumed = train_run(parse_config(raw), tmp_path / "parts", resume=True)

    expected = load_file(str(tmp_path / "whole" / WEIGHTS_FILE))
    actual = load_file(str(tmp_path / "parts" / WEIGHTS_FILE))
    assert [r.epoch for r in interrupted.fit.history] == [1]
    assert [r.epoch for r in resumed.fit.history] == [1, 2, 3]
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert resumed.fit.best_epoch == uninterrupted.fit.best_epoch
    assert resumed.test_metrics == uninterrupted.test_metrics


def test_resume_without_checkpoint_rejected(tmp_path: Path, write_log, config_dict) -> None:
    config = parse_config(config_dict(write_log(num_rows=100)))

    with pytest.raises(
        ArtifactError, match=r"no checkpoint to resume from in .*checkpoints; start without --resume"
    ):
        train_run(config, tmp_path / "fresh", resume=True)


@pytest.mark.parametrize("balancer", ["uncertainty", "gradnorm"])
def test_learned_balancer_weights_change(write_log, config_dict, balancer: str) -> None:
    raw = config_dict(write_log(num_rows=200), tasks=("click", "watch_time"))
    raw["training"]["balancer"] = {"name": balancer}
    config = parse_config(raw)
    prepared = prepare_data(config)
    trainer = Trainer(build_ranker(config, prepared.encoders), config)

    record = trainer.train_epoch(prepared.train, epoch=1)

    assert record["weight/click"] != 1.0 or record["weight/watch_time"] != 1.0
    assert np.isfinite(record["loss/total"])


def test_non_finite_loss_stops_training(write_log, config_dict) -> None:
    path = write_log(num_rows=100, watch_time=["1e30"] * 100)
    config = parse_config(config_dict(path, tasks=("click", "watch_time")))
    prepared = prepare_data(config)
    trainer = Trainer(build_ranker(config, prepared.encoders), config)

    with pytest.raises(
        FloatingPointError, match=r"epoch 1, step 0: the total loss is inf .*lower `training\.lr`"
    ):
        trainer.train_epoch(prepared.train, epoch=1)


# ----------------------------------------------------------------------------------------------------
# real data


@pytest.mark.slow
def test_census_preset_reaches_paper_auc(tmp_path: Path, shared_data_dir: Path, monkeypatch) -> None:
    from mtrank.config.presets import census_config

    monkeypatch.setenv("MTRANK_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("MTRANK_OFFLINE", "1")

    result = train_run(census_config(), tmp_path / "census")

    # Ma et al. (KDD 2018), Table 2: MMoE reaches about 0.94 AUC on income and 0.99 on marital status.
    assert result.test_metrics["income"]["auc"] >= 0.935
    assert result.test_metrics["never_married"]["auc"] >= 0.990
