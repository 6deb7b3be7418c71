"""Tests of what a run records about its inputs: absolute data paths, a fresh log per run, str run paths."""

from __future__ import annotations

from pathlib import Path

import yaml

from mtrank.config import parse_config
from mtrank.training.run import load_run, train_run
from mtrank.training.unbiased import evaluate_artifact


def test_relative_data_path_recorded_absolute(tmp_path: Path, write_log, config_dict, monkeypatch) -> None:
    log = write_log()
    monkeypatch.chdir(log.parent)
    train_run(parse_config(config_dict(log.name)), tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["path"] == str(log)


def test_run_loads_from_another_folder(tmp_path: Path, write_log, config_dict, monkeypatch) -> None:
    log = write_log()
    monkeypatch.chdir(log.parent)
    train_run(parse_config(config_dict(log.name)), tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = evaluate_artifact(load_run(str(tmp_path / "run")))
    assert "click" in report.metrics


def test_overwrite_starts_a_fresh_log(tmp_path: Path, write_log, config_dict) -> None:
    config = parse_config(config_dict(write_log()))
    train_run(config, tmp_path / "run")
    train_run(config, tmp_path / "run", overwrite=True)
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert log.count("writing to") == 1
