"""Tests of ``mtrank finetune`` and of ``--peft`` on ``predict`` and ``evaluate``.

The base run trains ``click`` and ``noise`` on cities c0..c2 with field attention. The fine-tune config
adapts it to cities c3 and c4 and adds the ``long_watch`` task (watch time above 1.0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pytest
import yaml
from typer.testing import CliRunner

from mtrank.cli.main import app
from mtrank.config import parse_config
from mtrank.training.run import train_run

pytestmark = pytest.mark.usefixtures("restore_mtrank_logger")

NEW_CITIES = ["c3", "c4"]


def invoke(args: list[str]):
    """Run the CLI in-process with a wide terminal, so that rich does not wrap paths in its output."""
    return CliRunner(env={"COLUMNS": "400"}).invoke(app, args)


def finetune_yaml(folder: Path, log: Path, **overrides: Any) -> Path:
    """Write a fine-tune config over cities c3 and c4 with the new ``long_watch`` task."""
    raw: dict[str, Any] = {
        "name": "new_cities",
        "data": {
            "path": str(log),
            "filters": [{"column": "city", "in": NEW_CITIES}],
            "split": {"method": "random", "test_fraction": 0.3, "valid_fraction": 0.1, "seed": 1},
        },
        "new_tasks": [
            {"name": "long_watch", "type": "binary", "label": {"column": "watch_time", "greater_than": 1.0}}
        ],
        "peft": {"adapter": {"options": {"bottleneck": 4}}},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.01, "early_stopping": None},
    }
    raw.update(overrides)
    path = folder / "finetune.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, write_log_in, config_dict) -> Path:
    """Train a base with attention on cities c0..c2 and a base without attention; return their folder."""
    folder = tmp_path_factory.mktemp("cli-finetune")
    log = write_log_in(folder, num_rows=300)
    raw = config_dict(log, tasks=("click", "noise"), epochs=1)
    raw["data"]["filters"] = [{"column": "city", "in": ["c0", "c1", "c2"]}]
    train_run(parse_config(raw), folder / "plain")
    raw["model"]["attention"] = {"num_layers": 1, "num_heads": 1, "head_dim": 4, "dim": 4}
    train_run(parse_config(raw), folder / "base")
    return folder


@pytest.fixture(scope="module")
def finetuned(base_folder: Path):
    """Run ``mtrank finetune`` once with adapters; return (result, base folder)."""
    config = finetune_yaml(base_folder, base_folder / "log.csv")
    result = invoke(["-q", "finetune", str(base_folder / "base"), str(config), "--method", "adapter"])
    return result, base_folder


def test_finetune_succeeds(finetuned) -> None:
    result, _folder = finetuned

    assert result.exit_code == 0, result.output


def test_finetune_prints_metrics_and_counts(finetuned) -> None:
    result, folder = finetuned
    text = " ".join(result.stdout.split())

    assert "test metrics (new_cities, adapter)" in text
    assert "long_watch" in text
    assert "% of the base's" in text
    assert f"PEFT set: {folder / 'base' / 'peft' / 'new_cities'}" in text


def test_finetune_writes_set_files(finetuned) -> None:
    _result, folder = finetuned
    set_dir = folder / "base" / "peft" / "new_cities"

    names = sorted(path.name for path in set_dir.iterdir())

    assert names == [
        "finetune.yaml",
        "metrics.json",
        "new_cities.json",
        "new_cities.safetensors",
        "train.log",
    ]


def test_predict_with_peft_adds_task_column(finetuned, tmp_path: Path) -> None:
    _result, folder = finetuned
    out = tmp_path / "scores.csv"

    result = invoke(
        [
            "-q",
            "predict",
            str(folder / "base"),
            "--peft",
            "new_cities",
            "--data",
            str(folder / "log.csv"),
            "--out",
            str(out),
        ]
    )

    assert result.exit_code == 0, result.output
    assert pacsv.read_csv(out).column_names == ["row", "click", "noise", "long_watch"]


def test_predict_with_peft_scores_fine_tune_rows(finetuned, tmp_path: Path) -> None:
    _result, folder = finetuned
    out = tmp_path / "scores.csv"
    cities = pacsv.read_csv(folder / "log.csv").column("city").to_pylist()

    invoke(
        [
            "-q",
            "predict",
            str(folder / "base"),
            "--peft",
            "new_cities",
            "--data",
            str(folder / "log.csv"),
            "--out",
            str(out),
        ]
    )

    # The set's data config keeps cities c3 and c4 only for training; prediction scores every row.
    rows = pacsv.read_csv(out).column("row").to_pylist()
    assert rows == list(range(len(cities)))


def test_predict_without_peft_keeps_base_columns(finetuned, tmp_path: Path) -> None:
    _result, folder = finetuned
    out = tmp_path / "scores.csv"

    result = invoke(
        ["-q", "predict", str(folder / "base"), "--data", str(folder / "log.csv"), "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    assert pacsv.read_csv(out).column_names == ["row", "click", "noise"]


def test_evaluate_with_peft_reports_new_task(finetuned, tmp_path: Path) -> None:
    _result, folder = finetuned
    out = tmp_path / "metrics.json"

    result = invoke(["-q", "evaluate", str(folder / "base"), "--peft", "new_cities", "--out", str(out)])

    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text(encoding="utf-8"))
    assert set(written["metrics"]) == {"click", "noise", "long_watch", "mean"}


def test_evaluate_with_peft_matches_finetune_metrics(finetuned, tmp_path: Path) -> None:
    _result, folder = finetuned
    out = tmp_path / "metrics.json"
    set_dir = folder / "base" / "peft" / "new_cities"

    invoke(["-q", "evaluate", str(folder / "base"), "--peft", str(set_dir), "--out", str(out)])

    finetune_metrics = json.loads((set_dir / "metrics.json").read_text(encoding="utf-8"))["test"]
    evaluated = json.loads(out.read_text(encoding="utf-8"))["metrics"]
    assert evaluated["long_watch"]["auc"] == pytest.approx(finetune_metrics["long_watch"]["auc"], abs=1e-6)


def test_unknown_peft_name_is_readable_error(finetuned, tmp_path: Path) -> None:
    _result, folder = finetuned

    result = invoke(
        [
            "-q",
            "predict",
            str(folder / "base"),
            "--peft",
            "missing",
            "--data",
            str(folder / "log.csv"),
            "--out",
            str(tmp_path / "scores.csv"),
        ]
    )

    assert result.exit_code == 2
    assert "sets of this run: new_cities" in " ".join(result.output.split())


def test_finetune_with_name_and_out(base_folder: Path, tmp_path: Path) -> None:
    config = finetune_yaml(tmp_path, base_folder / "log.csv")
    out = tmp_path / "lora-set"

    result = invoke(
        [
            "-q",
            "finetune",
            str(base_folder / "base"),
            str(config),
            "--method",
            "lora",
            "--name",
            "cities_lora",
            "-o",
            str(out),
        ]
    )

    assert result.exit_code == 0, result.output
    assert (out / "cities_lora.safetensors").is_file()


def test_prefix_on_base_without_attention_fails(base_folder: Path, tmp_path: Path) -> None:
    config = finetune_yaml(tmp_path, base_folder / "log.csv")

    result = invoke(["-q", "finetune", str(base_folder / "plain"), str(config), "--method", "prefix"])

    assert result.exit_code == 2
    assert "add `model.attention` to the base config" in " ".join(result.output.split())


def test_invalid_config_lists_problems(base_folder: Path, tmp_path: Path) -> None:
    config = finetune_yaml(tmp_path, base_folder / "log.csv", epochs=3)

    result = invoke(["-q", "finetune", str(base_folder / "base"), str(config), "--method", "adapter"])

    assert result.exit_code == 2
    assert "epochs: unknown key; allowed keys: name, seed, data" in " ".join(result.output.split())
