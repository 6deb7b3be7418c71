"""Shared fixtures: small synthetic logs written to real files, and run configs that read them.

The synthetic log has one row per impression with these columns:

- ``user`` (30 values), ``item`` (40 values), ``city`` (5 values): categorical text.
- ``device`` (phone, tablet, desktop) and ``position`` (1..5): shallow-tower inputs.
- ``score`` (standard normal) and ``age`` (18..80): numeric.
- ``click``: 1 where ``score > 0``, so a model that reads ``score`` can reach AUC 1.
- ``noise``: an independent fair coin, so no model can beat AUC 0.5 on unseen rows.
- ``watch_time``: ``1 + 0.5 * score`` plus Gaussian noise (sd 0.1), a regression target.
- ``date``: ``2024-01-01`` .. ``2024-01-30`` as ISO text, for column splits.
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

SYNTHETIC_ROWS = 600
NUM_DAYS = 30

# Column types of the Parquet log. CSV and TSV logs contain text only.
PARQUET_TYPES: dict[str, pa.DataType] = {
    "user": pa.string(),
    "item": pa.string(),
    "city": pa.string(),
    "device": pa.string(),
    "position": pa.int64(),
    "score": pa.float64(),
    "age": pa.int64(),
    "click": pa.int64(),
    "noise": pa.int64(),
    "watch_time": pa.float64(),
    "date": pa.string(),
}

WriteLog = Callable[..., Path]
ConfigFactory = Callable[..., dict[str, Any]]


def synthetic_columns(num_rows: int = SYNTHETIC_ROWS, seed: int = 0) -> dict[str, list[Any]]:
    """Return the synthetic log described in the module docstring as Python lists, one per column."""
    rng = np.random.default_rng(seed)
    score = np.round(rng.normal(0.0, 1.0, num_rows), 3)
    days = rng.integers(1, NUM_DAYS + 1, num_rows)
    return {
        "user": [f"u{v}" for v in rng.integers(0, 30, num_rows)],
        "item": [f"i{v}" for v in rng.integers(0, 40, num_rows)],
        "city": [f"c{v}" for v in rng.integers(0, 5, num_rows)],
        "device": [("phone", "tablet", "desktop")[v] for v in rng.integers(0, 3, num_rows)],
        "position": [int(v) for v in rng.integers(1, 6, num_rows)],
        "score": [float(v) for v in score],
        "age": [int(v) for v in rng.integers(18, 81, num_rows)],
        "click": [int(v > 0) for v in score],
        "noise": [int(v) for v in rng.integers(0, 2, num_rows)],
        "watch_time": [float(v) for v in np.round(1.0 + 0.5 * score + rng.normal(0.0, 0.1, num_rows), 3)],
        "date": [f"2024-01-{int(d):02d}" for d in days],
    }


def write_columns(columns: dict[str, Sequence[Any]], path: Path, *, header: bool = True) -> Path:
    """Write columns to ``path`` as CSV, gzip CSV, TSV or Parquet, chosen by the file name's suffix.

    Text formats write ``str(value)`` for every cell and an empty cell for ``None``. Parquet uses
    :data:`PARQUET_TYPES` for known columns and lets pyarrow infer the others.
    """
    names = list(columns)
    num_rows = len(columns[names[0]])
    if path.suffix == ".parquet":
        arrays = {name: pa.array(list(columns[name]), type=PARQUET_TYPES.get(name)) for name in names}
        pq.write_table(pa.table(arrays), path)
        return path
    delimiter = "\t" if path.suffix == ".tsv" else ","
    rows = [
        ["" if columns[name][i] is None else str(columns[name][i]) for name in names] for i in range(num_rows)
    ]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        if header:
            writer.writerow(names)
        writer.writerows(rows)
    return path


def write_synthetic_log(
    folder: Path,
    name: str = "log.csv",
    *,
    num_rows: int = SYNTHETIC_ROWS,
    seed: int = 0,
    drop: Sequence[str] = (),
    header: bool = True,
    **replace: Sequence[Any],
) -> Path:
    """Write the synthetic log to ``folder / name``.

    ``drop`` removes columns, and keyword arguments replace or add whole columns.
    """
    columns: dict[str, Sequence[Any]] = dict(synthetic_columns(num_rows, seed))
    for column in drop:
        del columns[column]
    columns.update(replace)
    return write_columns(columns, folder / name, header=header)


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread during the tests.

    The test models are tiny, so a second thread only adds synchronisation. On a busy 2-core machine,
    two threads made a 12-step epoch take 3.5 s instead of 0.1 s (torch 2.13 CPU).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def write_log(tmp_path: Path) -> WriteLog:
    """Return ``write_log(name="log.csv", **options) -> Path``, which writes into ``tmp_path``.

    The options are those of :func:`write_synthetic_log`.
    """

    def write(name: str = "log.csv", **options: Any) -> Path:
        return write_synthetic_log(tmp_path, name, **options)

    return write


@pytest.fixture(scope="session")
def write_log_in() -> Callable[..., Path]:
    """Return :func:`write_synthetic_log`, for module-scoped fixtures that cannot use ``tmp_path``."""
    return write_synthetic_log


def run_config_dict(
    path: str | Path,
    *,
    backbone: str = "mmoe",
    tasks: Sequence[str] = ("click", "noise"),
    epochs: int = 1,
    batch_size: int = 64,
    position_bias: bool = False,
    split: dict[str, Any] | None = None,
    seed: int = 7,
) -> dict[str, Any]:
    """Return a raw run config (the mapping a YAML file contains) over a synthetic log at ``path``.

    Args:
        path: the log file.
        backbone: ``shared_bottom``, ``mmoe`` or ``ple``, each with a small network.
        tasks: any of ``click`` and ``noise`` (binary) and ``watch_time`` (regression).
        epochs: training epochs; early stopping is off.
        batch_size: training batch size.
        position_bias: add the shallow tower over ``position`` and ``device``.
        split: ``data.split``; default a seeded random split with 25% test and 10% validation rows.
        seed: the run seed.
    """
    backbones: dict[str, dict[str, Any]] = {
        "shared_bottom": {"kind": "shared_bottom", "hidden": [16]},
        "mmoe": {"kind": "mmoe", "num_experts": 3, "expert_hidden": [8]},
        "ple": {
            "kind": "ple",
            "num_levels": 2,
            "num_shared_experts": 1,
            "num_task_experts": 1,
            "expert_hidden": [8],
        },
    }
    task_specs: dict[str, dict[str, Any]] = {
        "click": {"name": "click", "type": "binary", "label": {"column": "click"}},
        "noise": {"name": "noise", "type": "binary", "label": {"column": "noise"}},
        "watch_time": {"name": "watch_time", "type": "regression", "label": {"column": "watch_time"}},
    }
    model: dict[str, Any] = {
        "backbone": backbones[backbone],
        "tower": {"hidden": [8]},
        # GELU rather than ReLU: an 8-unit ReLU tower can go dead within one epoch on these tiny data.
        "activation": "gelu",
    }
    if position_bias:
        model["position_bias"] = {"position": "position", "device": ["device"], "max_position": 5}
    return {
        "name": "synthetic",
        "seed": seed,
        "data": {
            "path": str(path),
            "split": split or {"method": "random", "test_fraction": 0.25, "valid_fraction": 0.1, "seed": 3},
        },
        "features": [
            {"name": "item", "type": "categorical", "embedding": {"dim": 4}},
            {"name": "city", "type": "categorical", "embedding": {"dim": 4}},
            {"name": "score", "type": "numeric"},
            {"name": "age", "type": "numeric"},
        ],
        "tasks": [task_specs[name] for name in tasks],
        "model": model,
        "training": {
            "optimizer": "adam",
            "lr": 0.01,
            "batch_size": batch_size,
            "eval_batch_size": 256,
            "epochs": epochs,
            "early_stopping": None,
        },
    }


@pytest.fixture(scope="session")
def config_dict() -> ConfigFactory:
    """Return :func:`run_config_dict`, so tests can build configs without importing this module."""
    return run_config_dict


@pytest.fixture
def shared_data_dir() -> Path:
    """Return the folder of real datasets: ``$MTRANK_DATA_DIR``, else ``shared/data`` next to the repository.

    Tests that need it are skipped when neither contains the Census-Income folder.
    """
    value = os.environ.get("MTRANK_DATA_DIR")
    folder = Path(value) if value else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (folder / "census-income-kdd").is_dir():
        pytest.skip(f"real data not found under {folder}; set MTRANK_DATA_DIR to the shared data folder")
    return folder


@pytest.fixture
def restore_mtrank_logger() -> Iterator[None]:
    """Undo logging changes the CLI makes to the ``mtrank`` logger (handlers, level, propagation)."""
    package_logger = logging.getLogger("mtrank")
    handlers = list(package_logger.handlers)
    level = package_logger.level
    propagate = package_logger.propagate
    yield
    for handler in list(package_logger.handlers):
        if handler not in handlers:
            package_logger.removeHandler(handler)
    package_logger.setLevel(level)
    package_logger.propagate = propagate
