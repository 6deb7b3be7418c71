"""Tests of YAML config loading: every problem reported at once with its key path, and cross-field rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mtrank.config import dump_config, load_config, parse_config
from mtrank.config.schema import ColumnSplit, MMoEConfig, PLEConfig, RunConfig
from mtrank.errors import ConfigError


def write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return caught.value.problems


def test_load_config_reads_valid_yaml(tmp_path: Path, config_dict) -> None:
    path = write_yaml(tmp_path / "run.yaml", config_dict("log.csv", backbone="ple"))

    config = load_config(path)

    assert isinstance(config, RunConfig)
    assert isinstance(config.model.backbone, PLEConfig)
    assert config.task_names() == ["click", "noise"]
    assert [f.name for f in config.categorical_features()] == ["item", "city"]
    assert [f.name for f in config.numeric_features()] == ["score", "age"]


def test_every_error_listed_at_once(tmp_path: Path, config_dict) -> None:
    raw = config_dict("log.csv")
    raw["model"]["backbone"]["num_experts"] = 0
    raw["model"]["backbone"]["expert_count"] = 3
    raw["training"]["lr"] = -1
    raw["training"]["optimiser"] = "adam"
    raw["features"][0]["embedding"]["dim"] = 0
    raw["data"]["splitt"] = {}
    path = write_yaml(tmp_path / "bad.yaml", raw)

    with pytest.raises(ConfigError, match=r"6 invalid configuration value\(s\) in .*bad\.yaml") as caught:
        load_config(path)

    message = str(caught.value)
    assert len(caught.value.problems) == 6
    assert "model.backbone.num_experts: Input should be greater than or equal to 1 (got 0)" in message
    assert "training.lr: Input should be greater than 0 (got -1)" in message
    assert "features[0].embedding.dim:" in message
    assert (
        "model.backbone.expert_count: unknown key; allowed keys: kind, num_experts, expert_hidden" in message
    )
    assert "training.optimiser: unknown key; allowed keys: optimizer, lr," in message
    assert "data.splitt: unknown key; allowed keys: path, format," in message


def test_unknown_key_in_tagged_union_lists_its_keys(config_dict) -> None:
    raw = config_dict("log.csv", split={"method": "column", "column": "date", "train_max": "x", "cutoff": 1})

    problems = problems_of(raw)

    assert problems == [
        "data.split.cutoff: unknown key; allowed keys: method, column, train_max, valid_fraction, seed"
    ]


def test_missing_union_tag_names_the_choices(config_dict) -> None:
    raw = config_dict("log.csv")
    del raw["features"][1]["type"]
    del raw["model"]["backbone"]["kind"]
    raw["data"]["split"] = {"test_fraction": 0.3}

    problems = problems_of(raw)

    assert "features[1].type: required key is missing; choose one of: categorical, numeric" in problems
    assert "model.backbone.kind: required key is missing; choose one of: shared_bottom, mmoe, ple" in problems
    assert "data.split.method: required key is missing; choose one of: random, column, files" in problems


def test_missing_required_keys_named(config_dict) -> None:
    raw = config_dict("log.csv")
    del raw["data"]["path"]
    del raw["tasks"][0]["label"]

    problems = problems_of(raw)

    assert problems == ["data.path: required key is missing", "tasks[0].label: required key is missing"]


def test_label_leakage_rejected(config_dict) -> None:
    raw = config_dict("log.csv")
    raw["features"].append({"name": "click_feature", "type": "numeric", "column": "click"})

    with pytest.raises(
        ConfigError, match=r"tasks\[0\]\.label\.column: `click` is also the source of features\[4\]"
    ):
        parse_config(raw)


def test_label_leakage_by_feature_name(config_dict) -> None:
    raw = config_dict("log.csv")
    raw["features"].append({"name": "noise", "type": "categorical"})

    with pytest.raises(ConfigError, match=r"label leakage"):
        parse_config(raw)


def test_semantic_problems_listed_together(config_dict) -> None:
    raw = config_dict("log.csv")
    raw["tasks"].append({"name": "click", "label": {"column": "watch_time", "greater_than": 1.0}})
    raw["model"]["activation"] = "swishy"
    raw["training"]["balancer"] = {"name": "magic"}
    raw["training"]["early_stopping"] = {"metric": "ctr/auc"}

    problems = problems_of(raw)

    assert len(problems) == 4
    assert problems[0] == "tasks[2].name: duplicate name `click`; names must be unique"
    assert problems[1].startswith("model.activation: unknown activation `swishy`; choose one of: elu, gelu,")
    assert problems[2].startswith("training.balancer.name: unknown balancer `magic`; choose one of:")
    assert (
        problems[3] == "training.early_stopping.metric: unknown task `ctr`; choose one of: mean, click, noise"
    )


def test_activation_name_case_insensitive(config_dict) -> None:
    raw = config_dict("log.csv")
    raw["model"]["activation"] = "GeLU"

    config = parse_config(raw)

    assert config.model.activation == "GeLU"


def test_gauc_needs_group_column(config_dict) -> None:
    raw = config_dict("log.csv")
    raw["tasks"][0]["metrics"] = ["auc", "gauc"]

    with pytest.raises(ConfigError, match=r"tasks\[0\]\.metrics: `gauc` needs `evaluation.group_column`"):
        parse_config(raw)


def test_metric_for_wrong_task_type(config_dict) -> None:
    raw = config_dict("log.csv", tasks=("watch_time",))
    raw["tasks"][0]["metrics"] = ["auc"]

    with pytest.raises(ConfigError, match=r"tasks\[0\]\.metrics: metric `auc` is not defined for regression"):
        parse_config(raw)


def test_binary_task_rejects_mse_loss(config_dict) -> None:
    raw = config_dict("log.csv")
    raw["tasks"][0]["loss"] = "mse"

    with pytest.raises(ConfigError, match=r"binary task `click` takes loss `bce`, got `mse`"):
        parse_config(raw)


def test_label_rule_takes_one_form(config_dict) -> None:
    raw = config_dict("log.csv")
    raw["tasks"][0]["label"] = {"column": "score", "equals": "1", "greater_than": 0.0}

    with pytest.raises(
        ConfigError, match=r"tasks\[0\]\.label: .*set at most one of `equals` and `greater_than`"
    ):
        parse_config(raw)


def test_headerless_csv_needs_column_names(config_dict) -> None:
    raw = config_dict("log.csv")
    raw["data"]["header"] = False

    with pytest.raises(ConfigError, match=r"data: .*a file without a header needs `column_names`"):
        parse_config(raw)


def test_position_column_cannot_be_a_feature(config_dict) -> None:
    raw = config_dict("log.csv", position_bias=True)
    raw["features"].append({"name": "position", "type": "numeric"})

    with pytest.raises(
        ConfigError, match=r"model\.position_bias\.position: column `position` is also features\[4\]"
    ):
        parse_config(raw)


def test_batch_norm_needs_two_rows_per_batch(config_dict) -> None:
    raw = config_dict("log.csv", batch_size=1)
    raw["model"]["batch_norm"] = True

    with pytest.raises(ConfigError, match=r"training\.batch_size: batch norm needs at least 2 rows"):
        parse_config(raw)


def test_missing_config_file_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError, match=r"config file not found: .*absent\.yaml"):
        load_config(path)


def test_invalid_yaml_reported(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("data: {path: [unclosed\n", encoding="utf-8")

    with pytest.raises(ConfigError, match=r"invalid YAML"):
        load_config(path)


def test_non_mapping_root_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")

    with pytest.raises(ConfigError, match=r"<root>: expected a mapping, got list"):
        load_config(path)


def test_environment_variables_expanded(monkeypatch: pytest.MonkeyPatch, config_dict) -> None:
    monkeypatch.setenv("MTRANK_TEST_LOGS", "/data/logs")
    monkeypatch.delenv("MTRANK_TEST_UNSET", raising=False)
    raw = config_dict("${MTRANK_TEST_LOGS}/log.csv")
    raw["name"] = "${MTRANK_TEST_UNSET:-fallback}"

    config = parse_config(raw)

    assert config.data.path == "/data/logs/log.csv"
    assert config.name == "fallback"


def test_unset_environment_variable_named(monkeypatch: pytest.MonkeyPatch, config_dict) -> None:
    monkeypatch.delenv("MTRANK_TEST_UNSET", raising=False)
    raw = config_dict("${MTRANK_TEST_UNSET}/log.csv")

    with pytest.raises(ConfigError, match=r"environment variable `MTRANK_TEST_UNSET` is not set"):
        parse_config(raw)


def test_dump_config_round_trips(config_dict) -> None:
    raw = config_dict(
        "log.csv", backbone="mmoe", split={"method": "column", "column": "date", "train_max": "2024-01-20"}
    )
    config = parse_config(raw)

    reread = parse_config(yaml.safe_load(dump_config(config)))

    assert reread == config
    assert isinstance(reread.data.split, ColumnSplit)
    assert isinstance(reread.model.backbone, MMoEConfig)
