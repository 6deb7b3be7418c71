"""Tests of `mtrank simulate` (options, a settings file, KuaiRand limits) and `mtrank datasets list`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mtrank.cli.main import app
from mtrank.data.simulator import METADATA_KEY

pytestmark = pytest.mark.usefixtures("restore_mtrank_logger")


def invoke(args: list[str]):
    return CliRunner(env={"COLUMNS": "400"}).invoke(app, args)


def _settings(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])["config"]


def test_options_reach_the_simulator(tmp_path: Path) -> None:
    out = tmp_path / "log.parquet"
    result = invoke(
        [
            "-q",
            "simulate",
            "--out",
            str(out),
            "--requests",
            "50",
            "--items",
            "80",
            "--logging-item-error",
            "0.7",
        ]
    )
    assert result.exit_code == 0, result.output
    assert pq.read_metadata(out).num_rows == 500
    assert _settings(out)["logging_item_error"] == 0.7


def test_default_user_count(tmp_path: Path) -> None:
    out = tmp_path / "log.parquet"
    assert invoke(["-q", "simulate", "--out", str(out), "--requests", "20"]).exit_code == 0
    assert _settings(out)["num_users"] == 2_000


def test_settings_file_with_override(tmp_path: Path) -> None:
    settings = tmp_path / "sim.yaml"
    settings.write_text(
        "num_requests: 30\nlist_size: 4\nnum_items: 40\nlogging_noise: 0.5\n"
        "devices:\n  - {name: watch, eta: 2.0, share: 1.0}\n",
        encoding="utf-8",
    )
    out = tmp_path / "log.parquet"
    result = invoke(["-q", "simulate", "--out", str(out), "--config", str(settings), "--list-size", "5"])
    assert result.exit_code == 0, result.output
    values = _settings(out)
    assert (values["list_size"], values["logging_noise"], values["devices"][0]["name"]) == (5, 0.5, "watch")


def test_settings_file_unknown_key(tmp_path: Path) -> None:
    settings = tmp_path / "sim.yaml"
    settings.write_text("num_request: 30\n", encoding="utf-8")
    result = invoke(["simulate", "--out", str(tmp_path / "log.parquet"), "--config", str(settings)])
    assert result.exit_code == 2
    assert "unknown key `num_request`" in result.output


def test_kuairand_rejects_population_options(tmp_path: Path) -> None:
    result = invoke(
        ["simulate", "--out", str(tmp_path / "log.parquet"), "--kuairand", str(tmp_path), "--users", "9"]
    )
    assert result.exit_code == 2
    assert "--users cannot be combined with --kuairand" in result.output


def test_invalid_value_is_one_readable_error(tmp_path: Path) -> None:
    result = invoke(["simulate", "--out", str(tmp_path / "log.parquet"), "--logging-item-error", "-1"])
    assert result.exit_code == 2
    assert "`logging_item_error` must be a finite number" in result.output


def test_datasets_list_keeps_names_whole_in_80_columns(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MTRANK_DATA_DIR", str(tmp_path))
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["datasets", "list"])
    assert result.exit_code == 0, result.output
    # `datasets fetch` takes these names, so a cut name would be a wrong hint.
    assert "kuairand-explicit-feedback-subset" in result.output
    assert "processed_standard_kcore_15.csv" in result.output
    assert "…" not in result.output


def test_out_folder_rejected(tmp_path: Path) -> None:
    result = invoke(["simulate", "--out", str(tmp_path), "--requests", "5"])
    assert result.exit_code == 2
    assert "is a folder; give a file name" in result.output


def test_out_suffix_must_be_parquet(tmp_path: Path) -> None:
    result = invoke(["simulate", "--out", str(tmp_path / "log.csv"), "--requests", "5"])
    assert result.exit_code == 2
    assert "with a .parquet suffix" in result.output


def test_settings_file_reports_every_problem(tmp_path: Path) -> None:
    settings = tmp_path / "sim.yaml"
    settings.write_text('num_request: 30\nlist_size: "ten"\n', encoding="utf-8")
    result = invoke(["simulate", "--out", str(tmp_path / "log.parquet"), "--config", str(settings)])
    assert result.exit_code == 2
    assert "unknown key `num_request`" in result.output
    assert "`list_size` must be a positive integer" in result.output
    assert str(settings) in result.output


def test_error_text_with_brackets_printed_literally(tmp_path: Path) -> None:
    # Rich markup in a path or a YAML message must not be interpreted (nor crash the error output).
    folder = tmp_path / "[red]" / "[/x]"
    settings = folder / "sim.yaml"
    folder.mkdir(parents=True)
    settings.write_text("num_request: 3\n", encoding="utf-8")
    result = invoke(["simulate", "--out", str(tmp_path / "log.parquet"), "--config", str(settings)])
    assert result.exit_code == 2
    assert "[red]/[/x]/sim.yaml" in result.output


def test_kuairand_rejects_settings_that_do_not_apply(tmp_path: Path) -> None:
    settings = tmp_path / "sim.yaml"
    settings.write_text("num_users: 5\nseed: 3\n", encoding="utf-8")
    result = invoke(
        [
            "simulate",
            "--out",
            str(tmp_path / "log.parquet"),
            "--kuairand",
            str(tmp_path),
            "--config",
            str(settings),
        ]
    )
    assert result.exit_code == 2
    assert "num_users in" in result.output
    assert "do not apply with --kuairand" in result.output


def test_kuairand_long_list_gets_kuairand_error(tmp_path: Path) -> None:
    folder = tmp_path / "kuairand"
    folder.mkdir()
    header = (
        "user_id\tvideo_id\tdate\thourmin\ttime_ms\tis_click\tlong_view\tplay_time_ms\tduration_ms\tlabel\n"
    )
    rows = "".join(f"7\t{i}\t20220410\t1700\t{1000 + i}\t1\t1\t5000\t9000\t1\n" for i in range(12))
    (folder / "processed_standard_kcore_15.csv").write_text(header + rows, encoding="utf-8")
    (folder / "user_features_pure.csv").write_text("user_id\n7\n", encoding="utf-8")
    out = tmp_path / "log.parquet"
    result = invoke(["simulate", "--out", str(out), "--kuairand", str(folder), "--list-size", "6000"])
    assert result.exit_code == 2
    assert "no KuaiRand user has 6000 impressions" in result.output
