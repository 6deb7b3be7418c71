"""Tests of PEFT fine-tuning of a trained run: config validation, the frozen base, saved sets and loading.

The base run trains ``click`` and ``noise`` on the synthetic log's cities c0..c2, with field attention
and batch norm. Fine-tuning adapts it to cities c3 and c4, which the base vocabulary does not contain,
and adds a ``long_watch`` task (watch time above 1.0) with a new tower.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtrank.config import parse_config
from mtrank.data.encoders import OOV_ID
from mtrank.errors import ArtifactError, ConfigError
from mtrank.training.evaluation import predict
from mtrank.training.finetune import (
    FINETUNE_FILE,
    FinetuneResult,
    evaluate_finetune_split,
    finetune,
    load_finetune_config,
    parse_finetune_config,
)
from mtrank.training.run import load_run, train_run

METHODS = ("adapter", "lora", "prefix")
BASE_CITIES = ["c0", "c1", "c2"]
NEW_CITIES = ["c3", "c4"]
# The builder appends one MMoE gate and one tower for the new task; the base has two tasks.
NEW_MODULES = {"backbone.gates.2", "towers.long_watch"}
SET_NAMESPACES = {"targets", "set", "modules"}


def base_config_dict(config_dict: Any, log: Path, *, attention: bool) -> dict[str, Any]:
    """Return the base run config: click and noise on cities c0..c2, batch norm, optional attention."""
    raw = config_dict(log, tasks=("click", "noise"), epochs=2)
    raw["data"]["filters"] = [{"column": "city", "in": BASE_CITIES}]
    raw["model"]["batch_norm"] = True
    if attention:
        raw["model"]["attention"] = {"num_layers": 1, "num_heads": 1, "head_dim": 4, "dim": 4}
    return raw


def finetune_dict(log: Path, **overrides: Any) -> dict[str, Any]:
    """Return a fine-tune config over cities c3 and c4 with the new ``long_watch`` task."""
    raw: dict[str, Any] = {
        "name": "new_cities",
        "seed": 5,
        "data": {
            "path": str(log),
            "filters": [{"column": "city", "in": NEW_CITIES}],
            "split": {"method": "random", "test_fraction": 0.3, "valid_fraction": 0.1, "seed": 1},
        },
        "new_tasks": [
            {"name": "long_watch", "type": "binary", "label": {"column": "watch_time", "greater_than": 1.0}}
        ],
        "peft": {
            "adapter": {"options": {"bottleneck": 4}},
            "lora": {"options": {"rank": 2}},
            "prefix": {"options": {"length": 3, "embedding_dim": 4, "hidden_dim": 8}},
        },
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.01, "early_stopping": None},
    }
    raw.update(overrides)
    return raw


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, write_log_in, config_dict) -> tuple[Path, Path]:
    """Train the base with attention once; return (run folder, log file)."""
    folder = tmp_path_factory.mktemp("finetune-base")
    log = write_log_in(folder)
    run_dir = folder / "base"
    train_run(parse_config(base_config_dict(config_dict, log, attention=True)), run_dir)
    return run_dir, log


@pytest.fixture(scope="module")
def plain_base_run(tmp_path_factory, write_log_in, config_dict) -> tuple[Path, Path]:
    """Train a base without field attention; return (run folder, log file)."""
    folder = tmp_path_factory.mktemp("finetune-plain")
    log = write_log_in(folder)
    run_dir = folder / "base"
    config = base_config_dict(config_dict, log, attention=False)
    config["training"]["epochs"] = 1
    train_run(parse_config(config), run_dir)
    return run_dir, log


@pytest.fixture(scope="module", params=METHODS)
def finetuned(request, base_run) -> tuple[FinetuneResult, dict[str, torch.Tensor], str]:
    """Fine-tune the base with one method; return (result, base tensors read before, base file SHA-256)."""
    run_dir, log = base_run
    weights = run_dir / "model.safetensors"
    before = load_file(str(weights))
    digest = sha256(weights)
    method = request.param
    result = finetune(run_dir, parse_finetune_config(finetune_dict(log)), method, name=f"cities_{method}")
    return result, before, digest


# ----------------------------------------------------------------------------------------------------
# The frozen base


def test_base_tensors_bitwise_unchanged(finetuned) -> None:
    result, before, _digest = finetuned

    after = result.model.base_state_dict()

    changed = [key for key in before if not torch.equal(after[key], before[key])]
    assert set(after) == set(before)
    assert changed == []


def test_base_has_batch_norm_statistics(finetuned) -> None:
    _result, before, _digest = finetuned

    # The bitwise check above covers running statistics only when the base has them.
    assert any(key.endswith("running_mean") for key in before)


def test_base_weights_file_unchanged(finetuned, base_run) -> None:
    _result, _before, digest = finetuned
    run_dir, _log = base_run

    assert sha256(run_dir / "model.safetensors") == digest


def test_optimizer_has_exactly_trainable_parameters(finetuned) -> None:
    result, _before, _digest = finetuned

    in_optimizer = [id(p) for group in result.trainer.optimizer.param_groups for p in group["params"]]
    trainable = [id(p) for p in result.model.trainable_parameters(result.set_name)]

    assert len(in_optimizer) == len(set(in_optimizer))
    assert set(in_optimizer) == set(trainable)


def test_frozen_parameters_need_no_grad(finetuned) -> None:
    result, _before, _digest = finetuned

    trainable = {id(p) for p in result.model.trainable_parameters(result.set_name)}
    needing_grad = {id(p) for p in result.model.parameters() if p.requires_grad}

    assert needing_grad == trainable


def test_new_task_modules_found(finetuned) -> None:
    result, _before, _digest = finetuned

    assert set(result.new_modules) == NEW_MODULES


def test_new_cities_map_to_oov(finetuned) -> None:
    result, _before, _digest = finetuned

    # Features in config order: item, city; the base vocabulary has only c0..c2.
    city_ids = result.data.train.batch.categorical[:, 1]

    assert torch.all(city_ids == OOV_ID)


# ----------------------------------------------------------------------------------------------------
# The saved set


def test_saved_tensors_are_set_tensors_only(finetuned) -> None:
    result, before, _digest = finetuned

    saved = load_file(str(result.set_dir / f"{result.set_name}.safetensors"))

    namespaces = {key.partition("/")[0] for key in saved}
    modules = {key.split("/")[1] for key in saved if key.startswith("modules/")}
    assert namespaces <= SET_NAMESPACES
    assert modules == NEW_MODULES
    assert not set(saved) & set(before)


def test_saved_values_equal_trainable_count(finetuned) -> None:
    result, _before, _digest = finetuned

    saved = load_file(str(result.set_dir / f"{result.set_name}.safetensors"))

    assert sum(tensor.numel() for tensor in saved.values()) == result.counts.trainable


def test_finetune_record_references_base_weights(finetuned, base_run) -> None:
    result, _before, digest = finetuned

    record = yaml.safe_load((result.set_dir / FINETUNE_FILE).read_text(encoding="utf-8"))
    description = json.loads((result.set_dir / f"{result.set_name}.json").read_text(encoding="utf-8"))

    assert record["base_reference"] == f"sha256:{digest}"
    assert description["base_run"] == f"sha256:{digest}"


def test_metrics_file_has_test_metrics(finetuned) -> None:
    result, _before, _digest = finetuned

    metrics = json.loads((result.set_dir / "metrics.json").read_text(encoding="utf-8"))

    assert set(metrics["test"]) == {"click", "noise", "long_watch", "mean"}
    assert metrics["trainable_values"] == result.counts.trainable
    assert len(metrics["epochs"]) == 2


# ----------------------------------------------------------------------------------------------------
# Loading a base run plus a set


def test_loaded_set_reproduces_finetuned_scores(finetuned, base_run) -> None:
    result, _before, _digest = finetuned
    run_dir, _log = base_run

    loaded = load_run(run_dir, peft=result.set_name)

    kinds = ["bce", "bce", "bce"]
    expected = predict(result.model, result.data.test, kinds)
    actual = predict(loaded.model, result.data.test, kinds)
    # A loaded prefix set is collapsed into plain prefixes, which changes float rounding only.
    assert np.allclose(actual, expected, atol=1e-6)


def test_loaded_set_adds_task_column(finetuned, base_run) -> None:
    result, _before, _digest = finetuned
    run_dir, _log = base_run

    loaded = load_run(run_dir, peft=result.set_dir)

    assert loaded.config.task_names() == ["click", "noise", "long_watch"]
    assert loaded.peft_set == result.set_name


def test_disabled_set_scores_base_tasks_as_base(finetuned, base_run) -> None:
    result, _before, _digest = finetuned
    run_dir, _log = base_run
    base = load_run(run_dir)
    loaded = load_run(run_dir, peft=result.set_name)

    loaded.model.disable()

    expected = predict(base.model, result.data.test, ["bce", "bce"])
    actual = predict(loaded.model, result.data.test, ["bce", "bce", "bce"])[:, :2]
    # The base weights are bitwise equal. The MMoE einsum over three gates instead of two may round
    # differently, so the scores are compared within float32 rounding.
    assert np.allclose(actual, expected, rtol=0, atol=1e-6)


def test_evaluate_split_covers_every_task(finetuned, base_run) -> None:
    result, _before, _digest = finetuned
    run_dir, _log = base_run

    metrics = evaluate_finetune_split(load_run(run_dir, peft=result.set_name))

    assert set(metrics) == {"click", "noise", "long_watch", "mean"}
    assert metrics["click"]["auc"] == pytest.approx(result.test_metrics["click"]["auc"], abs=1e-6)


def test_load_onto_other_base_rejected(finetuned, plain_base_run) -> None:
    result, _before, _digest = finetuned
    other_dir, _log = plain_base_run

    with pytest.raises(ArtifactError, match="trained on base run"):
        load_run(other_dir, peft=result.set_dir)


def test_unknown_set_name_lists_sets(base_run, finetuned) -> None:
    run_dir, _log = base_run

    with pytest.raises(ArtifactError, match="sets of this run: .*cities_"):
        load_run(run_dir, peft="no_such_set")


# ----------------------------------------------------------------------------------------------------
# Variants of the flow


def test_disabled_set_bitwise_without_new_tasks(base_run, tmp_path: Path) -> None:
    run_dir, log = base_run
    config = parse_finetune_config(finetune_dict(log, new_tasks=[]))

    result = finetune(run_dir, config, "lora", out_dir=tmp_path / "set")
    result.model.disable()

    base = load_run(run_dir)
    expected = predict(base.model, result.data.test, ["bce", "bce"])
    actual = predict(result.model, result.data.test, ["bce", "bce"])
    assert np.array_equal(actual, expected)


def test_train_only_new_task(base_run, tmp_path: Path) -> None:
    run_dir, log = base_run
    config = parse_finetune_config(finetune_dict(log, tasks=[]))

    result = finetune(run_dir, config, "adapter", out_dir=tmp_path / "set")

    assert set(result.test_metrics) == {"long_watch", "mean"}
    assert result.fit.history[-1].train["loss/long_watch"] > 0


def test_output_folder_with_set_rejected(finetuned, base_run) -> None:
    result, _before, _digest = finetuned
    run_dir, log = base_run

    with pytest.raises(ArtifactError, match="already contains"):
        finetune(run_dir, parse_finetune_config(finetune_dict(log)), "adapter", out_dir=result.set_dir)


def test_prefix_without_attention_raises(plain_base_run) -> None:
    run_dir, log = plain_base_run

    with pytest.raises(ConfigError, match="add `model.attention` to the base config"):
        finetune(run_dir, parse_finetune_config(finetune_dict(log)), "prefix")


def test_prefix_rejection_creates_no_folder(plain_base_run) -> None:
    run_dir, log = plain_base_run

    with pytest.raises(ConfigError):
        finetune(run_dir, parse_finetune_config(finetune_dict(log)), "prefix")

    assert not (run_dir / "peft").exists()


# ----------------------------------------------------------------------------------------------------
# Config validation


def test_unknown_key_rejected(tmp_path: Path) -> None:
    raw = finetune_dict(tmp_path / "log.csv")
    raw["training"]["epoch"] = 3

    with pytest.raises(ConfigError, match=r"training\.epoch: unknown key; allowed keys: optimizer"):
        parse_finetune_config(raw)


def test_unknown_method_settings_key_rejected(tmp_path: Path) -> None:
    raw = finetune_dict(tmp_path / "log.csv")
    raw["peft"]["lora"]["option"] = {"rank": 2}

    with pytest.raises(ConfigError, match=r"peft\.lora\.option: unknown key; allowed keys: targets, options"):
        parse_finetune_config(raw)


def test_schema_errors_reported_together(tmp_path: Path) -> None:
    raw = finetune_dict(tmp_path / "log.csv", seed="x", surprise=1)
    raw["data"]["split"] = {"method": "column", "column": "date"}

    with pytest.raises(ConfigError) as caught:
        parse_finetune_config(raw)

    assert len(caught.value.problems) == 3
    assert "data.split.train_max: required key is missing" in caught.value.problems


def test_yaml_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(finetune_dict(tmp_path / "log.csv")), encoding="utf-8")

    config = load_finetune_config(path)

    assert [task.name for task in config.new_tasks] == ["long_watch"]


def test_problems_against_base_reported_together(plain_base_run) -> None:
    run_dir, log = plain_base_run
    raw = finetune_dict(log, tasks=["click", "like"])
    raw["new_tasks"].append({"name": "noise", "type": "binary", "label": {"column": "noise"}})
    raw["peft"]["lora"]["options"] = {"rank": 0}
    raw["training"]["balancer"] = {"name": "gradnorm"}

    with pytest.raises(ConfigError) as caught:
        finetune(run_dir, parse_finetune_config(raw), "lora")

    problems = "\n".join(caught.value.problems)
    assert "tasks[1]: `like` is not a task of the base run" in problems
    assert "new_tasks[1].name: `noise` is already a task of the base run" in problems
    assert "peft.lora.options:" in problems
    assert "training.balancer.name: `gradnorm` needs a trainable layer" in problems


def test_unknown_method_rejected(plain_base_run) -> None:
    run_dir, log = plain_base_run

    with pytest.raises(
        ConfigError, match="unknown PEFT method `bitfit`; choose one of: adapter, lora, prefix"
    ):
        finetune(run_dir, parse_finetune_config(finetune_dict(log)), "bitfit")


def test_label_leak_in_new_task_rejected(plain_base_run) -> None:
    run_dir, log = plain_base_run
    raw = finetune_dict(log)
    raw["new_tasks"] = [{"name": "old", "type": "binary", "label": {"column": "age", "greater_than": 50}}]

    with pytest.raises(ConfigError, match=r"new_tasks\[0\]\.label\.column: `age` is also the source"):
        finetune(run_dir, parse_finetune_config(raw), "adapter")


def test_nothing_to_train_rejected(plain_base_run) -> None:
    run_dir, log = plain_base_run

    with pytest.raises(ConfigError, match="nothing to train"):
        finetune(run_dir, parse_finetune_config(finetune_dict(log, tasks=[], new_tasks=[])), "adapter")


def test_new_task_metric_problem_located(plain_base_run) -> None:
    run_dir, log = plain_base_run
    raw = finetune_dict(log, tasks=["noise", "noise"])
    raw["new_tasks"][0]["metrics"] = ["gauc"]

    with pytest.raises(ConfigError) as caught:
        finetune(run_dir, parse_finetune_config(raw), "adapter")

    problems = "\n".join(caught.value.problems)
    assert "tasks[1]: `noise` is listed twice" in problems
    assert "new_tasks[0].metrics: `gauc` needs `evaluation.group_column`" in problems
