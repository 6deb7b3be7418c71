"""Tests of the ``mtrank`` command line: train, evaluate and predict on a tiny config, and readable errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from mtrank.cli.main import app

pytestmark = pytest.mark.usefixtures("restore_mtrank_logger")


def invoke(args: list[str]):
    """Run the CLI in-process with a wide terminal, so that rich does not wrap paths in its output."""
    return CliRunner(env={"COLUMNS": "400"}).invoke(app, args)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, write_log_in, config_dict):
    """Train once through ``mtrank train`` and return (result, run folder, data folder)."""
    folder = tmp_path_factory.mktemp("cli")
    log = write_log_in(folder, num_rows=240)
    config_path = folder / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config_dict(log, tasks=("click", "watch_time"))), encoding="utf-8")
    run_dir = folder / "run"
    result = invoke(["-q", "train", str(config_path), "--run-dir", str(run_dir), "--epochs", "2"])
    return result, run_dir, folder


def test_train_succeeds(trained_run) -> None:
    result, _run_dir, _folder = trained_run

    assert result.exit_code == 0, result.output


def test_train_prints_test_metrics(trained_run) -> None:
    result, run_dir, _folder = trained_run

    assert "test metrics (synthetic)" in result.stdout
    assert "click" in result.stdout
    assert "watch_time" in result.stdout
    assert f"run directory: {run_dir}" in " ".join(result.stdout.split())


def test_train_epochs_option_applies(trained_run) -> None:
    _result, run_dir, _folder = trained_run

    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))

    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2]


def test_evaluate_on_test_split(trained_run, tmp_path: Path) -> None:
    _result, run_dir, _folder = trained_run
    out = tmp_path / "metrics.json"

    result = invoke(["-q", "evaluate", str(run_dir), "--out", str(out)])

    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text(encoding="utf-8"))
    assert set(written["metrics"]) == {"click", "watch_time", "mean"}
    assert 0.0 <= written["metrics"]["click"]["auc"] <= 1.0


def test_evaluate_on_other_file(trained_run, write_log) -> None:
    _result, run_dir, _folder = trained_run
    other = write_log("other.csv", num_rows=60, seed=9)

    result = invoke(["-q", "evaluate", str(run_dir), "--data", str(other)])

    assert result.exit_code == 0, result.output
    assert "click" in result.stdout
    assert "watch_time" in result.stdout


@pytest.mark.parametrize("name", ["scores.csv", "scores.parquet"])
def test_predict_writes_one_column_per_task(trained_run, write_log, tmp_path: Path, name: str) -> None:
    _result, run_dir, _folder = trained_run
    data = write_log("serve.csv", num_rows=30, seed=4, drop=["click", "noise", "watch_time"])
    out = tmp_path / name

    result = invoke(["-q", "predict", str(run_dir), "--data", str(data), "--out", str(out)])

    assert result.exit_code == 0, result.output
    table = pq.read_table(out) if name.endswith(".parquet") else pacsv.read_csv(out)
    assert table.column_names == ["row", "click", "watch_time"]
    assert table.num_rows == 30
    assert "scored 30 rows" in result.stdout


def test_bad_config_gives_one_readable_message(tmp_path: Path, config_dict) -> None:
    raw = config_dict("log.csv")
    raw["model"]["backbone"]["num_experts"] = 0
    raw["training"]["lrate"] = 0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")

    result = invoke(["train", str(path), "--run-dir", str(tmp_path / "run")])

    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stderr.count("error:") == 1
    assert "model.backbone.num_experts" in result.stderr
    assert "training.lrate: unknown key" in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_run_directory_reported(tmp_path: Path) -> None:
    result = invoke(
        ["predict", str(tmp_path / "nowhere"), "--data", "x.csv", "--out", str(tmp_path / "o.csv")]
    )

    assert result.exit_code == 2
    assert "is not a finished run" in result.stderr
    assert "Traceback" not in result.output


def test_missing_data_file_reported(trained_run, tmp_path: Path) -> None:
    _result, run_dir, _folder = trained_run

    result = invoke(
        ["predict", str(run_dir), "--data", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "o.csv")]
    )

    assert result.exit_code == 2
    assert "data file not found" in result.stderr


def test_console_script_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: {path: log.csv, splitt: 1}\nfeatures: []\ntasks: []\n", encoding="utf-8")
    script = shutil.which("mtrank") or shutil.which("mtrank", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the `mtrank` console script is not installed; run `pip install -e .`")

    completed = subprocess.run(
        [script, "train", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )

    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert "data.splitt: unknown key" in completed.stderr
    assert "features: List should have at least 1 item" in completed.stderr
