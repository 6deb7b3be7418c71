"""Distributed data-parallel training: row shards in-process, and two-process runs launched by torchrun.

The torchrun launches run gloo on the CPU with one thread per process. They meet through a
rendezvous file, and every socket they open listens on the loopback interface only
(see :func:`torchrun_command`).

Run as a script, this file is the torchrun worker: ``python test_distributed.py WORK_DIR`` trains
the scenarios listed in ``WORK_DIR/scenarios.json`` and writes each rank's weights and results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mtrank.cli.main import app
from mtrank.config import load_config, parse_config
from mtrank.data.pipeline import prepare_data
from mtrank.errors import ConfigError, DataError
from mtrank.models.builder import build_ranker
from mtrank.training.distributed import (
    LAUNCH_VARIABLES,
    destroy_distributed,
    epoch_steps,
    init_distributed,
    read_launch_environment,
    shard_range,
)
from mtrank.training.evaluation import evaluate_model
from mtrank.training.lock import LOCK_FILE
from mtrank.training.run import load_run, train_run
from mtrank.training.trainer import (
    CHECKPOINTS,
    METRICS_FILE,
    STEPS_FILE,
    WEIGHTS_FILE,
    Trainer,
    finite_json,
)

WriteLog = Callable[..., Path]
ConfigFactory = Callable[..., dict[str, Any]]

WORLD_SIZE = 2
# Rows of the synthetic log: its seeded split keeps 405 training rows. With a batch of 64 rows per
# step, the last step has 21 rows, which two ranks split 11 and 10, so the loss scaling is exercised.
NUM_ROWS = 600
TRAIN_ROWS = 405
BATCH_SIZE = 64
# Six steps of 64 rows and one of 21 per epoch.
STEPS_PER_EPOCH = 7
# Wall-clock limit of one torchrun launch, so a hung collective fails the test instead of blocking the suite.
LAUNCH_TIMEOUT_SECONDS = 300
# Two ranks with batch B/2 and one process with batch B compute the same mean gradient but sum it in
# another order, so float32 rounding differs, and Adam carries the differences over 14 steps. Measured
# here: 2.1e-7 at most. Without the per-rank loss scaling of the uneven last step the gap is 1.9e-3.
MATCH_TOLERANCE = 1e-5
# Scoring the same rows in batches of other sizes can round float32 predictions differently. Measured
# here: 3.6e-9 relative on a logloss. The mean of the two ranks' metrics differs from the metric over
# all rows by 6e-5 (click logloss) to 4e-3 (noise AUC) relative on this split.
METRIC_TOLERANCE = 1e-6


def launch_environment() -> dict[str, str]:
    """Return the environment of a torchrun launch: loopback sockets, one thread, no inherited ranks."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    # The workers host the store instead of torchrun's agent, and mtrank binds it to the loopback MASTER_ADDR.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def torchrun_command(work_dir: Path, *args: str) -> list[str]:
    """Return a two-process torchrun command on this machine that rendezvouses through a file.

    ``--standalone`` would start torchrun's own TCP store on every network interface, so the
    rendezvous goes through a file store and ``MASTER_ADDR`` is the loopback address.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(WORLD_SIZE),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        str(work_dir / "rendezvous"),
        "--rdzv-conf",
        "store_type=file",
        "--local-addr",
        "127.0.0.1",
        *args,
    ]


def run_torchrun(work_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Launch torchrun in ``work_dir`` and wait for it. With ``check``, a failed launch fails the test."""
    result = subprocess.run(
        torchrun_command(work_dir, *args),
        cwd=work_dir,
        env=launch_environment(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_SECONDS,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"torchrun exited with {result.returncode}:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        )
    return result


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# the torchrun worker


def run_scenarios(work_dir: Path) -> None:
    """Train each scenario of ``work_dir/scenarios.json`` in one process group, in the listed order.

    Each rank writes ``NAME-rankR.safetensors`` (the trained weights) and ``NAME-rankR.json`` (the
    fit history, early-stopping result and test metrics) into ``work_dir``, outside the run directory.
    """
    scenarios = json.loads((work_dir / "scenarios.json").read_text(encoding="utf-8"))
    context = init_distributed("cpu")
    try:
        for scenario in scenarios:
            result = train_run(
                load_config(scenario["config"]),
                Path(scenario["run_dir"]),
                resume=scenario.get("resume", False),
                stop_after=scenario.get("stop_after"),
            )
            prefix = work_dir / f"{scenario['name']}-rank{context.rank}"
            state = {name: tensor.contiguous() for name, tensor in result.model.state_dict().items()}
            save_file(state, f"{prefix}.safetensors")
            summary = {
                "best_epoch": result.fit.best_epoch,
                "stopped_early": result.fit.stopped_early,
                "history": [dataclasses.asdict(record) for record in result.fit.history],
                "test": result.test_metrics,
            }
            Path(f"{prefix}.json").write_text(json.dumps(finite_json(summary)), encoding="utf-8")
    finally:
        destroy_distributed()


# ----------------------------------------------------------------------------------------------------
# row shards


@pytest.mark.parametrize("min_rows_per_rank", [1, 2])
@pytest.mark.parametrize("num_rows", [9, 64, 65, 101, 130])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_epoch_reads_every_row_once(world_size: int, num_rows: int, min_rows_per_rank: int) -> None:
    steps = epoch_steps(
        num_rows,
        8,
        world_size,
        generator=torch.Generator().manual_seed(5),
        min_rows_per_rank=min_rows_per_rank,
    )

    parts = [
        [step[slice(*shard_range(len(step), world_size, rank))] for step in steps]
        for rank in range(world_size)
    ]
    read = torch.cat([row for rank_parts in parts for row in rank_parts])
    sizes = [[len(part) for part in rank_parts] for rank_parts in parts]
    assert sorted(read.tolist()) == list(range(num_rows))
    assert all(len(rank_parts) == len(steps) for rank_parts in parts)
    assert min(min(rank_sizes) for rank_sizes in sizes) >= min_rows_per_rank
    for step_index in range(len(steps)):
        step_sizes = [rank_sizes[step_index] for rank_sizes in sizes]
        assert max(step_sizes) - min(step_sizes) <= 1


def test_epoch_steps_are_global_batches() -> None:
    # 101 rows, 8 per rank, 3 ranks: four steps of 24 rows and a last one of 5 (>= 3 ranks x 1 row).
    steps = epoch_steps(101, 8, 3, generator=torch.Generator().manual_seed(0))

    assert [len(step) for step in steps] == [24, 24, 24, 24, 5]


def test_small_remainder_joins_last_step() -> None:
    # 101 rows, 8 per rank, 3 ranks, 2 rows per rank: the last 5 rows cannot give 3 ranks 2 rows each.
    steps = epoch_steps(101, 8, 3, generator=torch.Generator().manual_seed(0), min_rows_per_rank=2)

    assert [len(step) for step in steps] == [24, 24, 24, 29]


def test_one_process_steps_follow_shuffle_order() -> None:
    # `iterate_batches(shuffle=True)` draws `torch.randperm(N, generator)` and cuts it into batches.
    steps = epoch_steps(70, 16, 1, generator=torch.Generator().manual_seed(11))

    expected = torch.randperm(70, generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.cat(steps), expected)
    assert [len(step) for step in steps] == [16, 16, 16, 16, 6]


def test_too_few_rows_for_ranks_rejected() -> None:
    with pytest.raises(DataError, match=r"has 5 rows, but 3 processes need at least 6"):
        epoch_steps(5, 8, 3, generator=torch.Generator().manual_seed(0), min_rows_per_rank=2)


@pytest.mark.parametrize("num_rows", [0, 1, 7, 8])
def test_shard_range_covers_rows_in_order(num_rows: int) -> None:
    ranges = [shard_range(num_rows, 3, rank) for rank in range(3)]

    assert ranges[0][0] == 0
    assert ranges[-1][1] == num_rows
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(2))


# ----------------------------------------------------------------------------------------------------
# launch environment


def test_partial_launch_environment_rejected() -> None:
    with pytest.raises(
        ConfigError, match=r"environment variable LOCAL_RANK is missing while RANK, WORLD_SIZE"
    ):
        read_launch_environment({"RANK": "0", "WORLD_SIZE": "2"})


def test_rank_outside_world_rejected() -> None:
    with pytest.raises(ConfigError, match=r"RANK=2, LOCAL_RANK=0, WORLD_SIZE=2"):
        read_launch_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_trainer_without_process_group_rejected(
    monkeypatch: pytest.MonkeyPatch, write_log: WriteLog, config_dict: ConfigFactory
) -> None:
    config = parse_config(config_dict(write_log(num_rows=120)))
    model = build_ranker(config, prepare_data(config).encoders)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError, match=r"rank 1 of WORLD_SIZE=2, but no process group is initialised"):
        Trainer(model, config)


# ----------------------------------------------------------------------------------------------------
# two ranks through the library: identical ranks, balancers, early stopping, resume


@pytest.fixture(scope="module")
def two_rank_results(
    tmp_path_factory: pytest.TempPathFactory, write_log_in: WriteLog, config_dict: ConfigFactory
) -> Path:
    """Run six trainings in one two-process launch and return the folder of their per-rank results.

    Every model has dropout and the position-bias tower, so the ranks draw their own masks.
    ``fixed``: 3 epochs with the default balancer. ``parts``: the same run stopped after epoch 1,
    then ``resumed`` in the same run directory. ``gradnorm`` and ``dwa``: 2 epochs each.
    ``uncertainty``: early stopping on the click task's validation logloss in mode ``max``, which
    stops after epoch 2.
    """
    folder = tmp_path_factory.mktemp("two_ranks")
    log = write_log_in(folder, num_rows=NUM_ROWS)
    raw = config_dict(log, epochs=3, batch_size=BATCH_SIZE // WORLD_SIZE, position_bias=True)
    raw["model"]["dropout"] = 0.2
    raw["training"]["num_threads"] = 1
    base = write_config(folder / "fixed.yaml", raw)
    gradnorm = dict(raw, training={**raw["training"], "epochs": 2, "balancer": {"name": "gradnorm"}})
    dwa = dict(raw, training={**raw["training"], "epochs": 2, "balancer": {"name": "dwa"}})
    uncertainty = dict(
        raw,
        training={
            **raw["training"],
            "epochs": 4,
            "balancer": {"name": "uncertainty"},
            "early_stopping": {"metric": "click/logloss", "mode": "max", "patience": 1},
        },
    )
    scenarios = [
        {"name": "fixed", "config": str(base), "run_dir": str(folder / "fixed")},
        {"name": "parts", "config": str(base), "run_dir": str(folder / "parts"), "stop_after": 1},
        {"name": "resumed", "config": str(base), "run_dir": str(folder / "parts"), "resume": True},
        {
            "name": "gradnorm",
            "config": str(write_config(folder / "gradnorm.yaml", gradnorm)),
            "run_dir": str(folder / "gradnorm"),
        },
        {
            "name": "dwa",
            "config": str(write_config(folder / "dwa.yaml", dwa)),
            "run_dir": str(folder / "dwa"),
        },
        {
            "name": "uncertainty",
            "config": str(write_config(folder / "uncertainty.yaml", uncertainty)),
            "run_dir": str(folder / "uncertainty"),
        },
    ]
    (folder / "scenarios.json").write_text(json.dumps(scenarios), encoding="utf-8")
    run_torchrun(folder, str(Path(__file__).resolve()), str(folder))
    return folder


def rank_weights(folder: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(folder / f"{name}-rank{rank}.safetensors")) for rank in range(WORLD_SIZE)]


def rank_summaries(folder: Path, name: str) -> list[dict[str, Any]]:
    return [
        json.loads((folder / f"{name}-rank{rank}.json").read_text(encoding="utf-8"))
        for rank in range(WORLD_SIZE)
    ]


@pytest.mark.parametrize("scenario", ["fixed", "gradnorm", "dwa", "uncertainty"])
def test_ranks_end_with_identical_weights(two_rank_results: Path, scenario: str) -> None:
    first, second = rank_weights(two_rank_results, scenario)

    assert sorted(first) == sorted(second)
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert different == []


@pytest.mark.parametrize("scenario", ["gradnorm", "dwa", "uncertainty"])
def test_balancer_weights_identical_across_ranks(two_rank_results: Path, scenario: str) -> None:
    first, second = rank_summaries(two_rank_results, scenario)

    weights = [
        {key: value for key, value in summary["history"][-1]["train"].items() if key.startswith("weight/")}
        for summary in (first, second)
    ]
    assert weights[0] == weights[1]
    # Each balancer starts every weight at 1 (uncertainty: 1 * exp(-0) for binary tasks). DWA sets
    # new weights from the loss ratios of epochs 1 and 2, the others learn them at every step.
    assert all(value != 1.0 for value in weights[0].values())


def test_gradnorm_logs_gradient_norms(two_rank_results: Path) -> None:
    lines = (two_rank_results / "gradnorm" / STEPS_FILE).read_text(encoding="utf-8").splitlines()

    rows = [json.loads(line) for line in lines]
    norms = [row["gradnorm/grad_norm/click"] for row in rows]
    assert len(rows) == 2 * STEPS_PER_EPOCH
    assert all(norm is not None and math.isfinite(norm) and norm > 0 for norm in norms)


def test_early_stopping_same_on_ranks(two_rank_results: Path) -> None:
    first, second = rank_summaries(two_rank_results, "uncertainty")

    assert first["stopped_early"] is True
    assert second["stopped_early"] is True
    assert first["best_epoch"] == second["best_epoch"] == 1
    assert [r["epoch"] for r in first["history"]] == [r["epoch"] for r in second["history"]] == [1, 2]
    assert [r["valid"] for r in first["history"]] == [r["valid"] for r in second["history"]]


def test_two_rank_resume_matches_uninterrupted(two_rank_results: Path) -> None:
    whole = load_file(str(two_rank_results / "fixed" / WEIGHTS_FILE))
    resumed = load_file(str(two_rank_results / "parts" / WEIGHTS_FILE))
    parts = rank_summaries(two_rank_results, "parts")[0]
    resumed_summary = rank_summaries(two_rank_results, "resumed")[0]

    assert [r["epoch"] for r in parts["history"]] == [1]
    assert [r["epoch"] for r in resumed_summary["history"]] == [1, 2, 3]
    assert sorted(resumed) == sorted(whole)
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)
    assert resumed_summary["test"] == rank_summaries(two_rank_results, "fixed")[0]["test"]


# ----------------------------------------------------------------------------------------------------
# two ranks through `torchrun -m mtrank train`, against one process with the same global batch


@pytest.fixture(scope="module")
def cli_runs(
    tmp_path_factory: pytest.TempPathFactory, write_log_in: WriteLog, config_dict: ConfigFactory
) -> tuple[Path, Path]:
    """Train with ``torchrun -m mtrank train`` (batch B/2 per rank) and in one process (batch B).

    Returns:
        The two-rank run directory and the one-process run directory.
    """
    folder = tmp_path_factory.mktemp("cli_two_ranks")
    log = write_log_in(folder, num_rows=NUM_ROWS)
    raw = config_dict(log, epochs=2, batch_size=BATCH_SIZE // WORLD_SIZE)
    raw["training"]["num_threads"] = 1
    config_path = write_config(folder / "config.yaml", raw)
    run_torchrun(folder, "-m", "mtrank", "-q", "train", str(config_path), "--run-dir", str(folder / "two"))
    single = parse_config({**raw, "training": {**raw["training"], "batch_size": BATCH_SIZE}})
    train_run(single, folder / "one")
    return folder / "two", folder / "one"


def test_two_ranks_match_one_process(cli_runs: tuple[Path, Path]) -> None:
    two_ranks, one_process = (load_file(str(run / WEIGHTS_FILE)) for run in cli_runs)

    gaps = {name: float((two_ranks[name] - one_process[name]).abs().max()) for name in one_process}
    assert sorted(two_ranks) == sorted(one_process)
    assert max(gaps.values()) < MATCH_TOLERANCE, gaps


@pytest.fixture(scope="module")
def gradnorm_runs(
    tmp_path_factory: pytest.TempPathFactory, write_log_in: WriteLog, config_dict: ConfigFactory
) -> tuple[Path, Path]:
    """GradNorm trained by two ranks (batch B/2 each) and by one process (batch B); their run folders."""
    folder = tmp_path_factory.mktemp("gradnorm_two_ranks")
    log = write_log_in(folder, num_rows=NUM_ROWS)
    raw = config_dict(log, epochs=2, batch_size=BATCH_SIZE // WORLD_SIZE)
    raw["training"].update({"num_threads": 1, "balancer": {"name": "gradnorm"}})
    config_path = write_config(folder / "config.yaml", raw)
    run_torchrun(folder, "-m", "mtrank", "-q", "train", str(config_path), "--run-dir", str(folder / "two"))
    single = parse_config({**raw, "training": {**raw["training"], "batch_size": BATCH_SIZE}})
    train_run(single, folder / "one")
    return folder / "two", folder / "one"


def test_gradnorm_two_ranks_match_one_process(gradnorm_runs: tuple[Path, Path]) -> None:
    # The task gradients at W are averaged over ranks, so both runs balance the same global batch.
    two_ranks, one_process = (load_file(str(run / WEIGHTS_FILE)) for run in gradnorm_runs)
    gaps = {name: float((two_ranks[name] - one_process[name]).abs().max()) for name in one_process}
    assert max(gaps.values()) < MATCH_TOLERANCE, gaps
    logs = [
        [json.loads(line) for line in (run / STEPS_FILE).read_text(encoding="utf-8").splitlines()]
        for run in gradnorm_runs
    ]
    last_weights = [rows[-1]["weight/click"] for rows in logs]
    assert last_weights[0] == pytest.approx(last_weights[1], abs=MATCH_TOLERANCE)


def test_two_rank_losses_match_one_process(cli_runs: tuple[Path, Path]) -> None:
    two_ranks, one_process = (
        json.loads((run / METRICS_FILE).read_text(encoding="utf-8")) for run in cli_runs
    )

    for two_epoch, one_epoch in zip(two_ranks["epochs"], one_process["epochs"], strict=True):
        assert two_epoch["train"]["loss/total"] == pytest.approx(one_epoch["train"]["loss/total"], rel=1e-5)


def test_distributed_run_directory_complete(cli_runs: tuple[Path, Path]) -> None:
    run_dir = cli_runs[0]

    names = {path.name for path in run_dir.iterdir()}
    expected = {
        "config.yaml",
        "encoders.json",
        WEIGHTS_FILE,
        METRICS_FILE,
        STEPS_FILE,
        "train.log",
        CHECKPOINTS,
    }
    assert expected <= names
    # No temporary file is left behind; the lock file stays by design (see mtrank.training.lock).
    assert not [name for name in names if name.startswith(".") and name != LOCK_FILE]
    assert sorted(path.name for path in (run_dir / CHECKPOINTS).iterdir()) == [
        "epoch-0001",
        "epoch-0002",
        "latest.json",
    ]


def test_step_log_written_by_one_rank(cli_runs: tuple[Path, Path]) -> None:
    lines = (cli_runs[0] / STEPS_FILE).read_text(encoding="utf-8").splitlines()

    rows = [json.loads(line) for line in lines]
    assert [row["epoch"] for row in rows] == [1] * STEPS_PER_EPOCH + [2] * STEPS_PER_EPOCH
    assert [row["step"] for row in rows] == list(range(STEPS_PER_EPOCH)) * 2


def test_existing_run_rejected_on_every_rank(cli_runs: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir = cli_runs[0]
    config_path = run_dir.parent / "config.yaml"

    result = run_torchrun(
        tmp_path, "-m", "mtrank", "train", str(config_path), "--run-dir", str(run_dir), check=False
    )

    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "already contains a run" in output
    assert "rank 0 rejected the run directory" in output


def test_train_log_written_by_one_rank(cli_runs: tuple[Path, Path]) -> None:
    text = (cli_runs[0] / "train.log").read_text(encoding="utf-8")

    assert text.count("run synthetic: writing to") == 1


def test_valid_metrics_cover_all_rows(cli_runs: tuple[Path, Path]) -> None:
    run_dir = cli_runs[0]
    loaded = load_run(run_dir)
    valid = prepare_data(loaded.config, loaded.encoders).valid
    assert valid is not None

    expected = evaluate_model(loaded.model, valid, loaded.config.tasks, None)
    recorded = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))["epochs"][-1]["valid"]
    for task in ("click", "noise"):
        for metric in ("auc", "logloss"):
            assert recorded[task][metric] == pytest.approx(expected[task][metric], rel=METRIC_TOLERANCE), (
                task,
                metric,
            )


def test_batch_norm_metrics_describe_saved_model(
    tmp_path: Path, write_log_in: WriteLog, config_dict: ConfigFactory
) -> None:
    # Each rank updates its own batch-norm running statistics. The test metrics must still be those
    # of the saved model (rank 0's statistics) on every row, including the rows that rank 1 scored.
    log = write_log_in(tmp_path, num_rows=NUM_ROWS)
    raw = config_dict(log, epochs=2, batch_size=BATCH_SIZE // WORLD_SIZE)
    raw["training"]["num_threads"] = 1
    raw["model"]["batch_norm"] = True
    config_path = write_config(tmp_path / "config.yaml", raw)
    run_dir = tmp_path / "two"
    run_torchrun(tmp_path, "-m", "mtrank", "-q", "train", str(config_path), "--run-dir", str(run_dir))

    loaded = load_run(run_dir)
    test = prepare_data(loaded.config, loaded.encoders).test
    expected = evaluate_model(loaded.model, test, loaded.config.tasks, None)
    recorded = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))["test"]
    for task in ("click", "noise"):
        assert recorded[task]["logloss"] == pytest.approx(expected[task]["logloss"], rel=METRIC_TOLERANCE), (
            task
        )


@pytest.mark.usefixtures("restore_mtrank_logger")
def test_evaluate_command_on_distributed_run(cli_runs: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir = cli_runs[0]
    out = tmp_path / "evaluation.json"

    result = CliRunner(env={"COLUMNS": "400"}).invoke(
        app, ["-q", "evaluate", str(run_dir), "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    evaluated = json.loads(out.read_text(encoding="utf-8"))["metrics"]
    recorded = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))["test"]
    assert evaluated["click"]["auc"] == pytest.approx(recorded["click"]["auc"], rel=METRIC_TOLERANCE)
    assert evaluated["noise"]["logloss"] == pytest.approx(recorded["noise"]["logloss"], rel=METRIC_TOLERANCE)


if __name__ == "__main__":
    run_scenarios(Path(sys.argv[1]))


def test_cuda_without_torchrun_rejected(monkeypatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="device `cuda` needs a torchrun launch"):
        init_distributed("cuda")
