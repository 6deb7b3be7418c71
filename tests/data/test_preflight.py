"""Tests of the pre-training check of data files and columns, on real CSV and Parquet files."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from mtrank.cli.main import app
from mtrank.config import parse_config
from mtrank.data.preflight import check_data_files


def test_complete_log_has_no_problem(write_log, config_dict) -> None:
    report = check_data_files(parse_config(config_dict(write_log(), position_bias=True)))
    assert report.problems == []
    assert [entry.role for entry in report.files] == ["data"]


def test_misspelt_column_gets_suggestion(write_log, config_dict) -> None:
    raw = config_dict(write_log())
    raw["features"][1]["name"] = "cty"
    report = check_data_files(parse_config(raw))
    assert len(report.problems) == 1
    assert "column `cty` not found; did you mean `city`?" in report.problems[0]


def test_every_missing_column_reported(write_log, config_dict) -> None:
    log = write_log(drop=["city", "click"])
    report = check_data_files(parse_config(config_dict(log)))
    missing = sorted(problem.split("`")[1] for problem in report.problems)
    assert missing == ["city", "click"]


def test_missing_test_file_reported(write_log, config_dict, tmp_path: Path) -> None:
    split = {"method": "files", "test_path": str(tmp_path / "absent.csv")}
    report = check_data_files(parse_config(config_dict(write_log(), split=split)))
    assert len(report.problems) == 1
    assert report.problems[0].startswith("test file: file not found:")


def test_parquet_split_file_checked(write_log, config_dict) -> None:
    test = write_log("test.parquet", drop=["age"])
    split = {"method": "files", "test_path": str(test)}
    report = check_data_files(parse_config(config_dict(write_log(), split=split)))
    assert len(report.problems) == 1
    assert "test file" in report.problems[0]
    assert "column `age` not found" in report.problems[0]


def test_headerless_split_file_uses_training_names(write_log, config_dict) -> None:
    test = write_log("test.csv", header=False)
    split = {"method": "files", "test_path": str(test), "header": False}
    report = check_data_files(parse_config(config_dict(write_log(), split=split)))
    assert report.problems == []


def test_join_provides_side_columns(write_log, config_dict, tmp_path: Path) -> None:
    # `city` lives only in the side table, joined by `item`.
    log = write_log(drop=["city"])
    side = tmp_path / "items.csv"
    side.write_text("item,city\n" + "".join(f"i{i},c{i % 5}\n" for i in range(40)), encoding="utf-8")
    raw = config_dict(log)
    raw["data"]["join"] = {"path": str(side), "key": "item"}
    report = check_data_files(parse_config(raw))
    assert report.problems == []
    assert [entry.role for entry in report.files] == ["join", "data"]


def test_cli_check_exit_code(write_log, config_dict, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config_dict(write_log())), encoding="utf-8")
    raw = config_dict(write_log("other.csv", drop=["age"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw), encoding="utf-8")
    runner = CliRunner(env={"COLUMNS": "400"})
    assert runner.invoke(app, ["check", str(good)]).exit_code == 0
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 2
    assert "column `age` not found" in result.output


def test_unreadable_join_reported_alone(write_log, config_dict, tmp_path: Path) -> None:
    raw = config_dict(write_log(drop=["city"]))
    raw["data"]["join"] = {"path": str(tmp_path / "absent.csv"), "key": "item"}
    report = check_data_files(parse_config(raw))
    assert len(report.problems) == 1
    assert report.problems[0].startswith("data.join.path:")


def test_join_columns_entry_missing(write_log, config_dict, tmp_path: Path) -> None:
    side = tmp_path / "items.csv"
    side.write_text("item,city\ni1,c1\n", encoding="utf-8")
    raw = config_dict(write_log(drop=["city"]))
    raw["data"]["join"] = {"path": str(side), "key": "item", "columns": ["city", "colour"]}
    report = check_data_files(parse_config(raw))
    assert report.problems == [
        f"data.join.columns: join file {side}: column `colour` not found; the file has: item, city"
    ]


def test_cli_check_names_finetune_config(tmp_path: Path) -> None:
    config = tmp_path / "ft.yaml"
    config.write_text("name: ft\npeft: {method: lora}\n", encoding="utf-8")
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["check", str(config)])
    assert result.exit_code == 2
    assert "is a fine-tune config" in result.output
