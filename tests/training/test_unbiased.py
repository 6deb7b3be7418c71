"""Tests of evaluation against simulated ground truth and of shallow-tower runs on real logs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from mtrank.config import load_config, parse_config
from mtrank.data.simulator import SimulationConfig, examination_probabilities, simulate_click_log
from mtrank.training.run import load_run, train_run
from mtrank.training.unbiased import (
    ALL_DEVICES,
    BIAS_PLOT,
    evaluate_artifact,
    monotone_where_true,
    pairwise_auc,
    spearman,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A small simulated log: 3,000 requests of 10 items, ids 0 .. 2399 train, 2400 .. 2999 test.
NUM_REQUESTS = 3_000
TRAIN_MAX_REQUEST = 2_399


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    """Train examples/simulated.yaml for 3 epochs on a 30,000-impression simulated log."""
    folder = tmp_path_factory.mktemp("simulated")
    simulation = SimulationConfig(num_users=300, num_items=500, num_requests=NUM_REQUESTS, seed=0)
    log = folder / "log.parquet"
    pq.write_table(simulate_click_log(simulation), log)
    raw = yaml.safe_load((EXAMPLES / "simulated.yaml").read_text(encoding="utf-8"))
    raw["data"]["path"] = str(log)
    raw["data"]["split"]["train_max"] = TRAIN_MAX_REQUEST
    # Batches of 256 give the shallow tower about 85 steps per epoch on 21,600 training rows.
    raw["training"].update({"batch_size": 256, "epochs": 3, "early_stopping": None})
    train_run(parse_config(raw), folder / "run")
    run = load_run(folder / "run")
    return simulation, log, run, evaluate_artifact(run)


# ----------------------------------------------------------------------------------------------------
# metric helpers


def test_pairwise_auc_hand_computed() -> None:
    # Pairs ordered by relevance: (0.5, 0.1) and (0.9, 0.1) scored right, (0.9, 0.5) wrong -> 2 / 3.
    value = pairwise_auc(np.array([0.1, 0.5, 0.9]), np.array([1.0, 3.0, 2.0]), np.array([7, 7, 7]))

    assert value == pytest.approx(2 / 3)


def test_pairwise_auc_ties_and_groups() -> None:
    # Group 1: one pair, scores tied -> 0.5. Group 2: one pair scored right -> 1. Mean 0.75.
    relevance = np.array([0.2, 0.8, 0.3, 0.6])
    scores = np.array([1.0, 1.0, 0.0, 5.0])

    value = pairwise_auc(relevance, scores, np.array([1, 1, 2, 2]))

    assert value == pytest.approx(0.75)


def test_monotone_where_true() -> None:
    assert monotone_where_true([0.0, -1.0, -2.0], [0.0, -0.5, -0.9])
    assert not monotone_where_true([0.0, -1.0, -1.0], [0.0, -0.5, -0.9])
    # A step where the truth is flat is not checked.
    assert monotone_where_true([0.0, -1.0, -0.5], [0.0, -0.5, -0.5])


def test_spearman_of_constant_input_is_nan() -> None:
    assert math.isnan(spearman(np.zeros(4), np.arange(4.0)))


def test_spearman_reversed_order() -> None:
    assert spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------------------------
# evaluation of a simulated run


def test_ground_truth_metrics_per_binary_task(simulated_run) -> None:
    _simulation, _log, _run, report = simulated_run

    for task in ("click", "like"):
        assert 0.0 < report.metrics[task]["true_ndcg@10"] <= 1.0
        assert 0.5 < report.metrics[task]["true_pairwise_auc"] <= 1.0


def test_bias_rows_cover_devices_and_positions(simulated_run) -> None:
    _simulation, _log, _run, report = simulated_run
    rows = report.details["position_bias"]

    assert {r["device"] for r in rows} == {"phone", "tablet", "desktop"}
    for device in ("phone", "tablet", "desktop"):
        assert sorted(r["position"] for r in rows if r["device"] == device) == list(range(1, 11))
    assert all(r["learned"] == 0.0 for r in rows if r["position"] == 1)


def test_true_bias_matches_simulator(simulated_run) -> None:
    simulation, _log, _run, report = simulated_run
    exam = examination_probabilities(simulation)

    def log_odds(p: float) -> float:
        return math.log(p / (1 - p))

    for row in report.details["position_bias"]:
        top, here = exam[(row["device"], 1)], exam[(row["device"], row["position"])]
        assert row["true_log_examination"] == pytest.approx(math.log(here / top))
        assert row["true_log_odds"] == pytest.approx(log_odds(here) - log_odds(top))


def test_phone_true_log_examination_golden(simulated_run) -> None:
    # Phone examination 0.9 / p ** 1.5 (the simulator's default device), so position 2 is -1.5 ln 2.
    _simulation, _log, _run, report = simulated_run
    row = next(r for r in report.details["position_bias"] if r["device"] == "phone" and r["position"] == 2)

    assert row["true_log_examination"] == pytest.approx(-1.5 * math.log(2))


def test_learned_bias_ranks_positions_as_truth(simulated_run) -> None:
    _simulation, _log, _run, report = simulated_run

    for device, value in report.details["position_bias_spearman"].items():
        assert value >= 0.9, device


def test_learned_bias_top_positions_monotone(simulated_run) -> None:
    # Positions 1-4 hold most clicks, so their order is well determined even on 21,600 rows.
    _simulation, _log, _run, report = simulated_run

    for device in ("phone", "tablet", "desktop"):
        mine = sorted(
            (r for r in report.details["position_bias"] if r["device"] == device), key=lambda r: r["position"]
        )
        learned = [r["learned"] for r in mine[:4]]
        assert learned == sorted(learned, reverse=True), device


def test_bias_plot_written(simulated_run) -> None:
    _simulation, _log, run, report = simulated_run
    plot = run.run_dir / BIAS_PLOT

    assert plot in report.files
    assert plot.read_bytes().startswith(PNG_SIGNATURE)


def test_report_tables_render(simulated_run) -> None:
    _simulation, _log, _run, report = simulated_run

    titles = [table.title for table in report.tables()]

    assert titles == [
        "shallow-tower bias vs truth (relative to position 1)",
        "learned bias vs true log-odds per device",
    ]


def test_evaluate_other_file_reads_positions_for_truth(simulated_run) -> None:
    _simulation, log, run, _report = simulated_run

    report = evaluate_artifact(run, str(log))

    assert len(report.details["position_bias"]) == 30
    assert set(report.details["position_bias_monotone"]) == {"phone", "tablet", "desktop"}
    assert "true_ndcg@10" in report.metrics["click"]


# ----------------------------------------------------------------------------------------------------
# logs without ground truth


def test_log_without_truth_reports_learned_bias_only(tmp_path: Path, write_log, config_dict) -> None:
    raw = config_dict(write_log(num_rows=300), position_bias=True, epochs=2)
    train_run(parse_config(raw), tmp_path / "run")

    report = evaluate_artifact(load_run(tmp_path / "run"))

    rows = report.details["position_bias"]
    assert {r["device"] for r in rows} == {"phone", "tablet", "desktop"}
    assert all("true_log_odds" not in r for r in rows)
    assert "position_bias_spearman" not in report.details
    assert report.files == []
    assert "true_ndcg@10" not in report.metrics["click"]


def test_device_less_tower_reports_one_group(tmp_path: Path, write_log, config_dict) -> None:
    raw = config_dict(write_log(num_rows=300), position_bias=True, epochs=2)
    raw["model"]["position_bias"]["device"] = []
    train_run(parse_config(raw), tmp_path / "run")

    report = evaluate_artifact(load_run(tmp_path / "run"))

    rows = report.details["position_bias"]
    assert {r["device"] for r in rows} == {ALL_DEVICES}
    assert [r["position"] for r in rows] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------------------------------
# example configs on real logs


def test_simulated_examples_parse(monkeypatch) -> None:
    monkeypatch.delenv("MTRANK_SIM_LOG", raising=False)
    monkeypatch.delenv("MTRANK_KUAIRAND_SIM_LOG", raising=False)

    simulated = load_config(EXAMPLES / "simulated.yaml")
    kuairand = load_config(EXAMPLES / "kuairand_semi_synthetic.yaml")

    assert simulated.model.position_bias.tasks == ["click"]
    assert kuairand.model.position_bias.device == ["device"]


def avazu_folder(shared_data_dir: Path) -> Path:
    folder = shared_data_dir / "avazu-sample"
    if not (folder / "train.csv").is_file():
        pytest.skip(f"Avazu sample not found under {folder}")
    return folder


def test_avazu_files_split_trains_and_evaluates(tmp_path: Path, shared_data_dir: Path, monkeypatch) -> None:
    avazu_folder(shared_data_dir)
    monkeypatch.setenv("MTRANK_DATA_DIR", str(shared_data_dir))
    config = load_config(EXAMPLES / "avazu.yaml")
    config.training.epochs = 1

    result = train_run(config, tmp_path / "run")
    report = evaluate_artifact(load_run(tmp_path / "run"))

    # train.csv has a header; dev.csv and test.csv do not (`split.header: false`): no row is skipped.
    assert result.data.skipped_rows == 0
    assert (len(result.data.train), len(result.data.valid), len(result.data.test)) == (8087, 480, 432)
    assert 0.5 < report.metrics["click"]["auc"] <= 1.0
    positions = {r["position"] for r in report.details["position_bias"]}
    assert {0, 1} <= positions
    assert all("/" in r["device"] for r in report.details["position_bias"])


def test_avazu_banner_position_zero_based(tmp_path: Path, shared_data_dir: Path, monkeypatch) -> None:
    avazu_folder(shared_data_dir)
    monkeypatch.setenv("MTRANK_DATA_DIR", str(shared_data_dir))
    config = load_config(EXAMPLES / "avazu.yaml")
    config.training.epochs = 1

    result = train_run(config, tmp_path / "run")

    _column, encoder = result.data.encoders.position
    assert (encoder.first_position, encoder.size) == (0, 10)
    # banner_pos 0 maps to id 1, so every training row has a position id of at least 1.
    assert int(result.data.train.batch.position.min()) == 1


def test_open_bandit_device_less_tower(tmp_path: Path, shared_data_dir: Path, monkeypatch) -> None:
    log = shared_data_dir / "open-bandit-dataset" / "bts" / "men" / "men.csv"
    if not log.is_file():
        pytest.skip(f"Open Bandit log not found: {log}")
    monkeypatch.setenv("MTRANK_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("MTRANK_OBD_LOG", str(log))
    config = load_config(EXAMPLES / "open_bandit.yaml")
    config.training.epochs = 2

    train_run(config, tmp_path / "run")
    report = evaluate_artifact(load_run(tmp_path / "run"))

    rows = report.details["position_bias"]
    assert [(r["device"], r["position"]) for r in rows] == [
        (ALL_DEVICES, 1),
        (ALL_DEVICES, 2),
        (ALL_DEVICES, 3),
    ]
    assert all(math.isfinite(r["learned"]) for r in rows)
