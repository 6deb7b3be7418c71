"""Loss balancers inside the trainer: step log, weight plot, GradNorm's shared layer, resume."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mtrank.config import parse_config
from mtrank.data.pipeline import prepare_data
from mtrank.errors import ConfigError
from mtrank.models.builder import build_ranker
from mtrank.training.checkpoint import read_latest
from mtrank.training.plots import MAX_PLOTTED_STEPS, plot_task_weights
from mtrank.training.run import train_run
from mtrank.training.trainer import (
    CHECKPOINTS,
    METRICS_FILE,
    STEPS_FILE,
    WEIGHTS_FILE,
    WEIGHTS_PLOT_FILE,
    StepStats,
    Trainer,
    read_step_log,
)

TASKS = ("click", "watch_time")
BATCH_SIZE = 64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # every PNG file starts with these 8 bytes


def balanced_config(
    config_dict, path: Path, balancer: str, *, epochs: int = 2, **options: Any
) -> dict[str, Any]:
    raw = config_dict(path, tasks=TASKS, epochs=epochs, batch_size=BATCH_SIZE)
    raw["training"]["balancer"] = {"name": balancer, "options": options}
    return raw


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines file strictly: NaN or Infinity in the file raise."""

    def reject(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant} in {path}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text(encoding="utf-8").splitlines()]


def trainer_for(raw: dict[str, Any], run_dir: Path | None = None) -> tuple[Trainer, Any]:
    config = parse_config(raw)
    prepared = prepare_data(config)
    torch.manual_seed(0)
    model = build_ranker(config, prepared.encoders)
    return Trainer(model, config, run_dir=run_dir), prepared


@pytest.fixture(scope="module")
def gradnorm_run(tmp_path_factory, write_log_in, config_dict):
    """A two-epoch GradNorm run on 300 synthetic rows, written to a run directory."""
    folder = tmp_path_factory.mktemp("gradnorm_run")
    raw = balanced_config(config_dict, write_log_in(folder, num_rows=300), "gradnorm")
    return train_run(parse_config(raw), folder / "run")


# ----------------------------------------------------------------------------------------------------
# step log


def test_step_log_has_one_line_per_step(gradnorm_run) -> None:
    rows = read_lines(gradnorm_run.run_dir / STEPS_FILE)
    steps_per_epoch = math.ceil(len(gradnorm_run.data.train) / BATCH_SIZE)

    assert len(gradnorm_run.data.train) % BATCH_SIZE != 1  # no one-row batch is dropped
    assert [row["epoch"] for row in rows] == [1] * steps_per_epoch + [2] * steps_per_epoch
    assert [row["step"] for row in rows] == list(range(steps_per_epoch)) * 2


def test_step_log_has_gradnorm_statistics(gradnorm_run) -> None:
    rows = read_lines(gradnorm_run.run_dir / STEPS_FILE)
    expected = {"epoch", "step", "loss/total"}
    for task in TASKS:
        expected |= {
            f"loss/{task}",
            f"weight/{task}",
            f"gradnorm/grad_norm/{task}",
            f"gradnorm/target/{task}",
        }

    for row in rows:
        assert set(row) == expected
        assert all(math.isfinite(value) for value in row.values())


def test_step_log_weights_are_the_step_weights(gradnorm_run) -> None:
    rows = read_lines(gradnorm_run.run_dir / STEPS_FILE)

    # GradNorm starts from w = 1 and renormalises to sum T = 2 after every update, so the first
    # step's weights are exactly 1 only if they are read before the balancer's step().
    assert rows[0]["weight/click"] == 1.0
    assert rows[0]["weight/watch_time"] == 1.0
    assert rows[-1]["weight/click"] != 1.0
    for row in rows:
        assert row["weight/click"] + row["weight/watch_time"] == pytest.approx(2.0, rel=1e-5)


def test_step_losses_average_to_epoch_loss(gradnorm_run) -> None:
    steps = read_step_log(gradnorm_run.run_dir / STEPS_FILE)
    metrics = json.loads((gradnorm_run.run_dir / METRICS_FILE).read_text(encoding="utf-8"))

    for record in metrics["epochs"]:
        in_epoch = steps["epoch"] == record["epoch"]
        for task in TASKS:
            assert steps[f"loss/{task}"][in_epoch].mean() == pytest.approx(record["train"][f"loss/{task}"])
        grad_norms = steps["gradnorm/grad_norm/click"][in_epoch]
        assert record["train"]["gradnorm/grad_norm/click"] == pytest.approx(grad_norms.mean())


def test_metrics_file_names_step_log(gradnorm_run) -> None:
    metrics = json.loads((gradnorm_run.run_dir / METRICS_FILE).read_text(encoding="utf-8"))

    assert metrics["steps_file"] == STEPS_FILE


def test_step_summary_logged_at_debug(write_log, config_dict, caplog) -> None:
    trainer, prepared = trainer_for(balanced_config(config_dict, write_log(num_rows=200), "gradnorm"))
    caplog.set_level(logging.DEBUG, logger="mtrank.training.trainer")

    trainer.fit(prepared.train, None)

    step_lines = [
        r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and " step " in r.getMessage()
    ]
    epoch_lines = [
        r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "train (" in r.getMessage()
    ]
    assert len(step_lines) == len(trainer.epoch_steps) * 2  # two epochs of equal length
    assert "weight/click=" in step_lines[0]
    assert "gradnorm/target/watch_time=" in step_lines[0]
    assert len(epoch_lines) == 2
    assert "gradnorm/grad_norm/click=" in epoch_lines[0]


def test_step_stats_kept_without_run_dir(write_log, config_dict) -> None:
    trainer, prepared = trainer_for(
        balanced_config(config_dict, write_log(num_rows=200), "uncertainty", epochs=1)
    )

    trainer.fit(prepared.train, None)

    assert len(trainer.epoch_steps) == math.ceil(len(prepared.train) / BATCH_SIZE)
    assert "uncertainty/log_variance/click" in trainer.epoch_steps.columns


def test_step_stats_pad_missing_values() -> None:
    stats = StepStats()

    stats.append({"loss/click": 0.5})
    stats.append({"loss/click": 0.25, "gradnorm/target/click": 2.0})
    stats.append({"gradnorm/target/click": 4.0})

    rows = list(stats.rows())
    assert math.isnan(rows[0]["gradnorm/target/click"])
    assert math.isnan(rows[2]["loss/click"])
    assert stats.mean("loss/click") == 0.375
    assert stats.mean("gradnorm/target/click") == 3.0


# ----------------------------------------------------------------------------------------------------
# weight plot


def test_weight_plot_written(gradnorm_run) -> None:
    plot = gradnorm_run.run_dir / WEIGHTS_PLOT_FILE

    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert plot.stat().st_size > 5_000  # axes, two panels and a legend, not an empty canvas


def test_weight_plot_of_long_run(tmp_path: Path) -> None:
    num_steps = MAX_PLOTTED_STEPS * 2 + 1  # drawn with a stride of 3
    steps = {
        "epoch": np.repeat([1, 2, 3], num_steps // 3 + 1)[:num_steps],
        "weight/click": np.linspace(1.0, 1.5, num_steps),
        "weight/like": np.linspace(1.0, 0.5, num_steps),
        "loss/click": np.full(num_steps, 0.6),
    }

    written = plot_task_weights(steps, ["click", "like"], tmp_path / "weights.png")

    assert written == tmp_path / "weights.png"
    assert written.read_bytes()[:8] == PNG_SIGNATURE


def test_weight_plot_skipped_without_matplotlib(
    tmp_path: Path, write_log, config_dict, monkeypatch, caplog
) -> None:
    raw = balanced_config(config_dict, write_log(num_rows=120), "dwa", epochs=1)
    # A None entry in sys.modules makes `import matplotlib...` raise ImportError, as on a machine
    # without the `plot` extra.
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    caplog.set_level(logging.WARNING, logger="mtrank.training.plots")

    train_run(parse_config(raw), tmp_path / "run")

    assert not (tmp_path / "run" / WEIGHTS_PLOT_FILE).exists()
    assert (tmp_path / "run" / STEPS_FILE).is_file()
    assert any("matplotlib is not installed" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------------
# GradNorm's shared layer W


def test_shared_layer_by_prefix(write_log, config_dict, caplog) -> None:
    raw = balanced_config(config_dict, write_log(num_rows=120), "gradnorm", shared_layer="backbone.experts.0")
    caplog.set_level(logging.INFO, logger="mtrank.training.trainer")

    trainer, _ = trainer_for(raw)

    expected = dict(trainer.model.backbone.experts[0].named_parameters())
    assert len(trainer.shared_parameters) == len(expected)
    assert all(any(p is q for q in expected.values()) for p in trainer.shared_parameters)
    assert any("backbone.experts.0.layers.0.weight" in r.getMessage() for r in caplog.records)


def test_default_shared_layer_logged(write_log, config_dict, caplog) -> None:
    caplog.set_level(logging.INFO, logger="mtrank.training.trainer")

    trainer_for(balanced_config(config_dict, write_log(num_rows=120), "gradnorm"))

    messages = [r.getMessage() for r in caplog.records if "GradNorm shared layer W" in r.getMessage()]
    assert len(messages) == 1
    # The MMoE test model has three experts of one linear layer each: W is their weights and biases.
    for expert in range(3):
        assert f"backbone.experts.{expert}.layers.0.weight" in messages[0]


def test_shared_layer_prefix_stops_at_dot(write_log, config_dict) -> None:
    raw = balanced_config(config_dict, write_log(num_rows=120), "gradnorm", shared_layer="backbone.experts.1")
    raw["model"]["backbone"]["num_experts"] = 11

    trainer, _ = trainer_for(raw)

    expert_1 = list(trainer.model.backbone.experts[1].parameters())
    assert len(trainer.shared_parameters) == len(expert_1)
    assert all(any(p is q for q in expert_1) for p in trainer.shared_parameters)


def test_shared_layer_list_of_prefixes(write_log, config_dict) -> None:
    prefixes = ["backbone.experts.0.layers.0.weight", "backbone.experts.2"]
    raw = balanced_config(config_dict, write_log(num_rows=120), "gradnorm", shared_layer=prefixes)

    trainer, _ = trainer_for(raw)

    experts = trainer.model.backbone.experts
    expected = [experts[0].layers[0].weight, *experts[2].parameters()]
    assert len(trainer.shared_parameters) == 3
    assert all(any(p is q for q in expected) for p in trainer.shared_parameters)


def test_unknown_prefix_lists_layers(write_log, config_dict) -> None:
    raw = balanced_config(config_dict, write_log(num_rows=120), "gradnorm", shared_layer="backbone.expert.0")

    with pytest.raises(ConfigError, match=r"no parameter name starts with `backbone\.expert\.0`") as caught:
        trainer_for(raw)

    message = str(caught.value)
    assert "training.balancer.options.shared_layer" in message
    assert "backbone.experts.0.layers.0" in message
    assert "towers.click.layers.0" in message


def test_frozen_prefix_rejected(write_log, config_dict) -> None:
    raw = balanced_config(config_dict, write_log(num_rows=120), "gradnorm", shared_layer="backbone.experts.0")
    config = parse_config(raw)
    model = build_ranker(config, prepare_data(config).encoders)
    model.backbone.experts[0].requires_grad_(False)

    with pytest.raises(ConfigError, match=r"`backbone\.experts\.0` selects only frozen parameters"):
        Trainer(model, config)


def test_shared_layer_rejected_for_fixed(write_log, config_dict) -> None:
    raw = balanced_config(config_dict, write_log(num_rows=120), "fixed", shared_layer="backbone.experts.0")

    with pytest.raises(ConfigError, match=r"balancer `fixed` does not use a shared layer"):
        trainer_for(raw)


def test_gradnorm_backward_stops_at_shared_layer(write_log, config_dict) -> None:
    trainer, prepared = trainer_for(balanced_config(config_dict, write_log(num_rows=200), "gradnorm"))
    gradient_counts: Counter[str] = Counter()

    def counter(name: str) -> Callable[[torch.Tensor], None]:
        def count(grad: torch.Tensor) -> None:
            gradient_counts[name] += 1

        return count

    for name, parameter in trainer.model.named_parameters():
        parameter.register_hook(counter(name))
    shared = {id(p) for p in trainer.shared_parameters}

    trainer.train_epoch(prepared.train.take(np.arange(BATCH_SIZE)), epoch=1)  # exactly one step

    # One gradient per task for W (GradNorm's norms), plus one from the network's backward pass.
    # Every other parameter gets the network's gradient only: the extra passes end at W.
    for name, parameter in trainer.model.named_parameters():
        expected = len(TASKS) + 1 if id(parameter) in shared else 1
        assert gradient_counts[name] == expected, name


# ----------------------------------------------------------------------------------------------------
# a task whose loss never reaches W


def test_task_outside_shared_layer_has_no_nan(tmp_path: Path, write_log, config_dict, caplog) -> None:
    # In PLE's last level, task 0's own experts feed task 0's tower only, so `noise` has no gradient there.
    raw = config_dict(write_log(num_rows=200), backbone="ple", tasks=("click", "noise"), epochs=2)
    raw["training"]["balancer"] = {
        "name": "gradnorm",
        "options": {"shared_layer": "backbone.levels.1.task_experts.0"},
    }
    caplog.set_level(logging.WARNING, logger="mtrank.balancing.gradnorm")

    result = train_run(parse_config(raw), tmp_path / "run")

    steps = read_step_log(tmp_path / "run" / STEPS_FILE)
    assert np.all(steps["gradnorm/grad_norm/noise"] == 0.0)
    assert np.all(steps["gradnorm/grad_norm/click"] > 0.0)
    for key, column in steps.items():
        assert np.all(np.isfinite(column)), key
    final = result.fit.history[-1].train
    assert all(math.isfinite(value) for value in final.values())
    assert final["weight/click"] > 0.0
    assert final["weight/noise"] > 0.0
    assert any("noise" in r.getMessage() and "zero gradient" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("balancer", ["gradnorm", "uncertainty", "dwa"])
def test_resume_exact_with_balancer(tmp_path: Path, write_log, config_dict, balancer: str) -> None:
    raw = balanced_config(config_dict, write_log(num_rows=240), balancer, epochs=3)
    raw["model"]["dropout"] = 0.2

    train_run(parse_config(raw), tmp_path / "whole")
    train_run(parse_config(raw), tmp_path / "parts", stop_after=1)
    resumed = train_run(parse_config(raw), tmp_path / "parts", resume=True)

    expected = load_file(str(tmp_path / "whole" / WEIGHTS_FILE))
    actual = load_file(str(tmp_path / "parts" / WEIGHTS_FILE))
    assert [r.epoch for r in resumed.fit.history] == [1, 2, 3]
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    whole_folder, _ = read_latest(tmp_path / "whole" / CHECKPOINTS)
    parts_folder, _ = read_latest(tmp_path / "parts" / CHECKPOINTS)
    whole_extra = load_file(str(whole_folder / "extra.safetensors"))
    parts_extra = load_file(str(parts_folder / "extra.safetensors"))
    balancer_keys = [key for key in whole_extra if key.startswith(("balancer.", "balancer_optimizer."))]
    assert balancer_keys
    assert all(torch.equal(parts_extra[key], whole_extra[key]) for key in balancer_keys)
    whole_steps = read_lines(tmp_path / "whole" / STEPS_FILE)
    parts_steps = read_lines(tmp_path / "parts" / STEPS_FILE)
    assert parts_steps == whole_steps


def test_resume_drops_steps_after_checkpoint(tmp_path: Path, write_log, config_dict) -> None:
    raw = balanced_config(config_dict, write_log(num_rows=200), "fixed", epochs=2)
    train_run(parse_config(raw), tmp_path / "whole")
    train_run(parse_config(raw), tmp_path / "parts", stop_after=1)
    # A run that stopped after writing epoch 2's steps but before its checkpoint leaves these lines.
    with (tmp_path / "parts" / STEPS_FILE).open("a", encoding="utf-8") as handle:
        handle.write('{"epoch": 2, "step": 0, "loss/click": 0.5}\n{"epoch": 2, "st')

    train_run(parse_config(raw), tmp_path / "parts", resume=True)

    assert read_lines(tmp_path / "parts" / STEPS_FILE) == read_lines(tmp_path / "whole" / STEPS_FILE)


def test_fresh_run_replaces_old_step_log(tmp_path: Path, write_log, config_dict) -> None:
    raw = balanced_config(config_dict, write_log(num_rows=120), "fixed", epochs=1)
    train_run(parse_config(raw), tmp_path / "run")
    first = read_lines(tmp_path / "run" / STEPS_FILE)

    train_run(parse_config(raw), tmp_path / "run")

    assert read_lines(tmp_path / "run" / STEPS_FILE) == first
