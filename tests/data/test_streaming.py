"""Tests of streaming Parquet training on real files with several row groups.

The in-memory pipeline (``prepare_data``) reads the same files into one table. It is the reference:
a streamed run must fit the same encoders, encode the same validation and test rows, and yield every
training row it selects exactly once per epoch.

Run as a script, this file is the torchrun worker of the two-rank test: ``python test_streaming.py
CONFIG RUN_DIR OUT_DIR`` trains with ``train_run`` and writes each rank's weights into ``OUT_DIR``.
"""

from __future__ import annotations

import doctest
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mtrank.config import parse_config
from mtrank.config.schema import RunConfig
from mtrank.data import encoders as encoders_module
from mtrank.data import streaming as streaming_module
from mtrank.data.encoders import Encoder, NumericEncoder, RunningMoments, VocabularyCounts, VocabularyEncoder
from mtrank.data.pipeline import FeatureEncoders, prepare_data, read_source
from mtrank.data.streaming import (
    EncoderStatistics,
    StreamingData,
    concat_encoded,
    holdout_mask,
    plan_epoch,
    prepare_streaming_data,
    shuffle_buffer,
)
from mtrank.data.tensors import Batch, EncodedData
from mtrank.errors import ConfigError, DataError
from mtrank.models.builder import build_ranker
from mtrank.training.distributed import LAUNCH_VARIABLES, destroy_distributed, init_distributed
from mtrank.training.run import load_run, train_run
from mtrank.training.trainer import METRICS_FILE, STEPS_FILE, WEIGHTS_FILE, Trainer

# Rows per Parquet row group in the test files: the 400-row training file has 7 row groups, the
# last one short, so reads cross row-group ends and ranks get unequal row counts.
ROW_GROUP_ROWS = 64
TRAIN_ROWS = 400
EVAL_ROWS = 100
# Read batches smaller than a row group, so a row group takes two reads.
READ_ROWS = 50
BUFFER_ROWS = 100
BATCH_SIZE = 32
# Relative tolerance for statistics merged across batches against one whole-table pass: both run in
# float64 over values below 1e3, so they agree to about 1e-15 relative.
MOMENT_RTOL = 1e-12

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


def write_parquet(path: Path, columns: dict[str, list[Any]], *, row_group_size: int = ROW_GROUP_ROWS) -> Path:
    """Write ``columns`` as Parquet with row groups of ``row_group_size`` rows."""
    arrays = {name: pa.array(values, type=PARQUET_TYPES.get(name)) for name, values in columns.items()}
    pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)
    return path


def rows_of(columns: dict[str, list[Any]], start: int, stop: int) -> dict[str, list[Any]]:
    return {name: values[start:stop] for name, values in columns.items()}


@pytest.fixture
def log_columns(write_log) -> Callable[[], dict[str, list[Any]]]:
    """Return ``make()``: the 600-row synthetic log of the ``write_log`` fixture as lists, one per column."""

    def make() -> dict[str, list[Any]]:
        return pq.read_table(write_log("synthetic.parquet")).to_pydict()

    return make


@pytest.fixture
def split_files(tmp_path: Path, log_columns) -> Callable[..., dict[str, str]]:
    """Return ``write(columns=None) -> {"train", "valid", "test"}`` paths of 400/100/100 rows."""

    def write(columns: dict[str, list[Any]] | None = None) -> dict[str, str]:
        columns = columns or log_columns()
        bounds = {"train": (0, TRAIN_ROWS), "valid": (TRAIN_ROWS, TRAIN_ROWS + EVAL_ROWS)}
        bounds["test"] = (TRAIN_ROWS + EVAL_ROWS, TRAIN_ROWS + 2 * EVAL_ROWS)
        return {
            name: str(write_parquet(tmp_path / f"{name}.parquet", rows_of(columns, start, stop)))
            for name, (start, stop) in bounds.items()
        }

    return write


def make_config(
    config_dict,
    path: str,
    split: dict[str, Any],
    *,
    read_rows: int = READ_ROWS,
    buffer_rows: int = BUFFER_ROWS,
    batch_size: int = BATCH_SIZE,
    **data: Any,
) -> RunConfig:
    """A run config with the shallow tower, a min_count above 1 and streaming enabled."""
    raw = config_dict(path, split=split, position_bias=True, batch_size=batch_size)
    raw["features"][0]["min_count"] = 3
    raw["features"].append({"name": "age_log", "type": "numeric", "column": "age", "transform": "log1p"})
    raw["data"]["streaming"] = {"enabled": True, "read_rows": read_rows, "shuffle_buffer_rows": buffer_rows}
    raw["data"].update(data)
    return parse_config(raw)


def files_split(paths: dict[str, str], *, valid: bool = True) -> dict[str, Any]:
    split: dict[str, Any] = {"method": "files", "test_path": paths["test"], "valid_fraction": 0.2}
    if valid:
        split["valid_path"] = paths["valid"]
    return split


def epoch_rows(data: StreamingData, epoch: int, *, rank: int = 0, world_size: int = 1) -> list[int]:
    """Row numbers of one epoch on one rank, in the order they were yielded."""
    data.train.rank, data.train.world_size = rank, world_size
    return [int(r) for encoded in data.train.iter_encoded(epoch) for r in encoded.row_ids]


def assert_same_encoders(streamed: FeatureEncoders, reference: FeatureEncoders) -> None:
    for name, (_, encoder) in reference.categorical.items():
        assert streamed.categorical[name][1].to_dict() == encoder.to_dict(), name
    for column, encoder in reference.device.items():
        assert streamed.device[column].to_dict() == encoder.to_dict(), column
    for name, (_, numeric) in reference.numeric.items():
        other = streamed.numeric[name][1]
        assert other.mean == pytest.approx(numeric.mean, rel=MOMENT_RTOL, abs=1e-300), name
        assert other.std == pytest.approx(numeric.std, rel=MOMENT_RTOL), name
    assert streamed.to_dict()["labels"] == reference.to_dict()["labels"]
    assert streamed.to_dict()["position"] == reference.to_dict()["position"]


def assert_same_rows(streamed: EncodedData, reference: EncodedData) -> None:
    assert np.array_equal(streamed.row_ids, reference.row_ids)
    for name in ("categorical", "labels", "position", "device", "label_mask"):
        left, right = getattr(streamed.batch, name), getattr(reference.batch, name)
        assert (left is None) == (right is None), name
        if left is not None:
            assert torch.equal(left, right), name
    # Standardised with statistics that may differ in the last bit, so float32 values may too.
    assert torch.allclose(streamed.batch.numeric, reference.batch.numeric, rtol=1e-6, atol=1e-6)


def rows_by_id(data: EncodedData) -> dict[int, int]:
    return {int(row): index for index, row in enumerate(data.row_ids)}


# ----------------------------------------------------------------------------------------------------
# encoder statistics, one encoder at a time


@pytest.mark.parametrize("module", [streaming_module, encoders_module], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: Any) -> None:
    result = doctest.testmod(module)

    assert result.attempted > 0
    assert result.failed == 0


def test_vocabulary_counts_match_fit_across_merges() -> None:
    # 3 batches of 40,000 rows over 150,000 possible values exceed MIN_PENDING_VALUES (65,536), so the
    # pending counts are merged more than once before the end.
    rng = np.random.default_rng(0)
    batches = [pa.array([f"v{v}" for v in rng.integers(0, 150_000, 40_000)]) for _ in range(3)]
    batches.append(pa.array(["v1", None, None, "v2"]))
    counts = VocabularyCounts()
    for batch in batches:
        counts.update(batch)

    streamed = VocabularyEncoder(min_count=2).fit_counts(counts)
    whole = VocabularyEncoder(min_count=2).fit(pa.chunked_array(batches))

    assert streamed.vocabulary == whole.vocabulary
    assert len(counts) == len(set(pa.chunked_array(batches).to_pylist()))


def test_vocabulary_counts_ties_ordered_by_value() -> None:
    counts = VocabularyCounts().update(pa.array(["b", "c"])).update(pa.array(["a", "c"]))

    encoder = VocabularyEncoder().fit_counts(counts)

    assert encoder.vocabulary == ["c", "a", "b"]


def test_vocabulary_counts_empty_gives_empty_vocabulary() -> None:
    encoder = VocabularyEncoder().fit_counts(VocabularyCounts())

    assert encoder.vocabulary == []
    assert encoder.size == 2


def test_running_moments_match_numpy() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.normal(1e3, 2.0, size) for size in (1, 0, 500, 37, 2_000)]
    merged = RunningMoments()
    for part in parts:
        merged = merged.merge(RunningMoments.from_values(part))
    values = np.concatenate(parts)

    assert merged.count == len(values)
    assert merged.mean == pytest.approx(values.mean(), rel=MOMENT_RTOL)
    assert merged.std == pytest.approx(values.std(), rel=1e-9)


@pytest.mark.parametrize("transform", ["none", "log1p"])
def test_numeric_fit_moments_matches_fit(transform: str) -> None:
    batches = [
        pa.array(["1.5", "x", None, "3"]),
        pa.array(["-2", "7.25", "inf"]),
        pa.array([], type=pa.string()),
        pa.array(["0", "100"]),
    ]
    merged = RunningMoments()
    encoder = NumericEncoder(transform_name=transform)  # type: ignore[arg-type]
    for batch in batches:
        merged = merged.merge(encoder.moments(batch))

    streamed = NumericEncoder(transform_name=transform).fit_moments(merged)  # type: ignore[arg-type]
    whole = NumericEncoder(transform_name=transform).fit(pa.chunked_array(batches))  # type: ignore[arg-type]

    assert streamed.mean == pytest.approx(whole.mean, rel=MOMENT_RTOL)
    assert streamed.std == pytest.approx(whole.std, rel=MOMENT_RTOL)


@pytest.mark.parametrize(("values", "mean", "std"), [([], 0.0, 1.0), (["4", "4"], 4.0, 1.0)])
def test_numeric_fit_moments_degenerate(values: list[str], mean: float, std: float) -> None:
    # Same fallbacks as fit: no values -> mean 0, std 1; zero spread -> std 1.
    encoder = NumericEncoder()
    encoder.fit_moments(encoder.moments(pa.array(values, type=pa.string())))

    assert encoder.mean == mean
    assert encoder.std == std


def test_encoder_statistics_reject_unknown_fit() -> None:
    class Custom(Encoder):
        kind = "custom"

        def fit(self, column: Any) -> Custom:
            return self

    encoders = FeatureEncoders(categorical={"city": ("city", Custom())})

    with pytest.raises(TypeError, match="Custom of `city` has its own fit"):
        EncoderStatistics(encoders)


# ----------------------------------------------------------------------------------------------------
# encoders and evaluation rows against the in-memory pipeline


def test_encoders_match_memory_files_split(config_dict, split_files) -> None:
    paths = split_files()
    config = make_config(config_dict, paths["train"], files_split(paths))

    streamed = prepare_streaming_data(config)
    reference = prepare_data(config)

    assert_same_encoders(streamed.encoders, reference.encoders)


def test_encoders_match_memory_column_split(tmp_path: Path, config_dict, log_columns) -> None:
    path = write_parquet(tmp_path / "log.parquet", log_columns())
    split = {"method": "column", "column": "date", "train_max": "2024-01-20", "valid_fraction": 0.0}
    config = make_config(config_dict, str(path), split)

    streamed = prepare_streaming_data(config)
    reference = prepare_data(config)

    assert_same_encoders(streamed.encoders, reference.encoders)
    assert_same_rows(streamed.test, reference.test)
    assert len(streamed.train) == len(reference.train)


def test_date_sorted_log_test_rows_match_memory(tmp_path: Path, config_dict, log_columns) -> None:
    # Sorted by date, the test days fill the last row groups only, so the second pass skips the others.
    columns = log_columns()
    order = np.argsort(columns["date"], kind="stable")
    path = write_parquet(tmp_path / "log.parquet", {k: [v[i] for i in order] for k, v in columns.items()})
    split = {"method": "column", "column": "date", "train_max": "2024-01-20", "valid_fraction": 0.0}
    config = make_config(config_dict, str(path), split)

    streamed = prepare_streaming_data(config)
    reference = prepare_data(config)

    assert_same_rows(streamed.test, reference.test)


def test_encoders_match_fit_on_streamed_rows(config_dict, split_files) -> None:
    # With a hashed hold-out the training rows differ from the in-memory split, so the reference is
    # FeatureEncoders.fit on exactly the rows the stream trains on.
    paths = split_files()
    config = make_config(config_dict, paths["train"], files_split(paths, valid=False))

    streamed = prepare_streaming_data(config)
    full = prepare_data(config.model_copy(update={"data": _no_holdout(config)}))
    train_rows = sorted(epoch_rows(streamed, 1))
    table = read_source(config.data, paths["train"], full.encoders.input_columns())
    reference = FeatureEncoders.from_config(config).fit(table.take(train_rows))

    assert_same_encoders(streamed.encoders, reference)


def _no_holdout(config: RunConfig) -> Any:
    return config.data.model_copy(
        update={"split": config.data.split.model_copy(update={"valid_fraction": 0.0})}
    )


def test_eval_rows_match_memory(config_dict, split_files) -> None:
    paths = split_files()
    config = make_config(config_dict, paths["train"], files_split(paths))

    streamed = prepare_streaming_data(config)
    reference = prepare_data(config)

    assert streamed.valid is not None and reference.valid is not None
    assert_same_rows(streamed.valid, reference.valid)
    assert_same_rows(streamed.test, reference.test)


def test_streamed_group_column_kept(config_dict, split_files) -> None:
    paths = split_files()
    raw = make_config(config_dict, paths["train"], files_split(paths)).model_dump()
    raw["evaluation"]["group_column"] = "user"
    config = parse_config(raw)

    streamed = prepare_streaming_data(config)
    reference = prepare_data(config)

    assert streamed.test.groups is not None
    assert np.array_equal(streamed.test.groups, reference.test.groups)


def test_filters_and_join_match_in_memory(tmp_path: Path, config_dict, split_files, log_columns) -> None:
    columns = log_columns()
    users = sorted(set(columns["user"]))
    side = tmp_path / "users.parquet"
    # One user has no side row, so the join leaves missing values.
    pq.write_table(
        pa.table({"user": users[1:], "segment": [f"s{i % 3}" for i in range(len(users) - 1)]}), side
    )
    paths = split_files(columns)
    raw = make_config(config_dict, paths["train"], files_split(paths)).model_dump(by_alias=True)
    raw["data"]["join"] = {"path": str(side), "key": "user"}
    raw["data"]["filters"] = [{"column": "city", "not_in": ["c0"]}]
    raw["features"].append({"name": "segment", "type": "categorical", "embedding": {"dim": 2}})
    config = parse_config(raw)

    streamed = prepare_streaming_data(config)
    reference = prepare_data(config)

    assert_same_encoders(streamed.encoders, reference.encoders)
    assert sorted(epoch_rows(streamed, 1)) == sorted(reference.train.row_ids.tolist())
    assert_same_rows(streamed.test, reference.test)


# ----------------------------------------------------------------------------------------------------
# the training stream


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_row_once_per_epoch(config_dict, split_files, world_size: int, shuffle: bool) -> None:
    paths = split_files()
    config = make_config(config_dict, paths["train"], files_split(paths))
    streamed = prepare_streaming_data(config, shuffle=shuffle)
    expected = sorted(prepare_data(config).train.row_ids.tolist())

    for epoch in (1, 2):
        per_rank = [epoch_rows(streamed, epoch, rank=r, world_size=world_size) for r in range(world_size)]
        union = [row for rows in per_rank for row in rows]

        assert sorted(union) == expected
        assert len(set(union)) == len(union)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_take_equal_steps(config_dict, split_files, world_size: int) -> None:
    paths = split_files()
    streamed = prepare_streaming_data(make_config(config_dict, paths["train"], files_split(paths)))
    streamed.train.world_size = world_size

    steps = []
    for rank in range(world_size):
        streamed.train.rank = rank
        sizes = [len(batch) for batch in streamed.train.iter_batches(1)]
        steps.append(len(sizes))
        assert len(sizes) == streamed.train.num_batches(1)
        assert max(sizes) <= BATCH_SIZE

    assert len(set(steps)) == 1


def test_single_rank_batches_full_then_short(config_dict, split_files) -> None:
    paths = split_files()
    streamed = prepare_streaming_data(make_config(config_dict, paths["train"], files_split(paths)))

    sizes = [len(batch) for batch in streamed.train.iter_batches(1)]

    assert sizes[:-1] == [BATCH_SIZE] * (len(sizes) - 1)
    assert sizes[-1] == TRAIN_ROWS - BATCH_SIZE * (len(sizes) - 1)


def test_unshuffled_stream_keeps_file_order(config_dict, split_files) -> None:
    paths = split_files()
    streamed = prepare_streaming_data(
        make_config(config_dict, paths["train"], files_split(paths)), shuffle=False
    )

    assert epoch_rows(streamed, 1) == list(range(TRAIN_ROWS))


def test_stream_reproducible_per_seed(config_dict, split_files) -> None:
    paths = split_files()
    config = make_config(config_dict, paths["train"], files_split(paths))
    other_seed = config.model_copy(update={"seed": config.seed + 1})

    first = prepare_streaming_data(config)
    again = prepare_streaming_data(config)
    other = prepare_streaming_data(other_seed)

    assert epoch_rows(first, 1) == epoch_rows(again, 1)
    assert epoch_rows(first, 2) == epoch_rows(again, 2)
    assert epoch_rows(first, 1) != epoch_rows(first, 2)
    assert epoch_rows(first, 1) != epoch_rows(other, 1)


def test_buffered_rows_keep_their_values(config_dict, split_files, log_columns) -> None:
    # Through the shuffle buffer's in-place writes, each row must keep its own features, labels and
    # label mask. Missing `noise` labels are masked, so the buffer mixes rows with and without a mask.
    columns = log_columns()
    columns["noise"] = [None if i % 7 == 0 else v for i, v in enumerate(columns["noise"])]
    paths = split_files(columns)
    config = make_config(config_dict, paths["train"], files_split(paths), missing_labels="mask")
    streamed = prepare_streaming_data(config)
    reference = prepare_data(config).train
    index = rows_by_id(reference)

    for encoded in streamed.train.iter_encoded(1):
        positions = torch.tensor([index[int(r)] for r in encoded.row_ids])
        expected = _select(reference.batch, positions)
        assert torch.equal(encoded.batch.categorical, expected.categorical)
        assert torch.equal(encoded.batch.labels, expected.labels)
        assert encoded.batch.label_mask is not None
        assert torch.equal(encoded.batch.label_mask, expected.label_mask)
        assert torch.equal(encoded.batch.position, expected.position)
        assert torch.allclose(encoded.batch.numeric, expected.numeric, rtol=1e-6, atol=1e-6)


def _select(batch: Batch, rows: torch.Tensor) -> Batch:
    def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.index_select(0, rows)

    return Batch(
        batch.categorical.index_select(0, rows),
        batch.numeric.index_select(0, rows),
        pick(batch.labels),
        pick(batch.position),
        pick(batch.device),
        pick(batch.label_mask),
    )


# ----------------------------------------------------------------------------------------------------
# shuffle buffer and epoch plan


def _encoded(rows: range) -> EncodedData:
    ids = np.arange(rows.start, rows.stop, dtype=np.int64)
    batch = Batch(
        categorical=torch.from_numpy(ids.copy()).view(-1, 1),
        numeric=torch.from_numpy(ids.astype(np.float32)).view(-1, 1),
        labels=torch.zeros((len(ids), 1)),
    )
    return EncodedData(batch=batch, row_ids=ids)


@pytest.mark.parametrize("capacity", [0, 1, 7, 100, 1_000])
def test_shuffle_buffer_yields_each_row_once(capacity: int) -> None:
    pieces = [_encoded(range(start, min(start + 30, 250))) for start in range(0, 250, 30)]

    out = list(shuffle_buffer(pieces, capacity, np.random.default_rng(0)))
    merged = concat_encoded(out)

    assert sorted(merged.row_ids.tolist()) == list(range(250))
    # Row ids travel with their tensors.
    assert merged.batch.categorical.view(-1).tolist() == merged.row_ids.tolist()


def test_shuffle_buffer_leaves_input_untouched() -> None:
    pieces = [_encoded(range(0, 10)), _encoded(range(10, 20))]

    list(shuffle_buffer(pieces, 10, np.random.default_rng(0)))

    assert pieces[0].batch.categorical.view(-1).tolist() == list(range(10))


def test_shuffle_buffer_mixes_across_pieces() -> None:
    pieces = [_encoded(range(start, start + 10)) for start in range(0, 100, 10)]

    first = concat_encoded(list(shuffle_buffer(pieces, 50, np.random.default_rng(0)))).row_ids[:10]

    # Without mixing, the first ten rows out would be rows 0..9.
    assert first.tolist() != list(range(10))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_plan_covers_row_groups_once(world_size: int) -> None:
    counts = [64, 64, 0, 64, 17, 64, 64, 33]

    plan = plan_epoch(counts, batch_size=10, world_size=world_size, generator=np.random.default_rng(5))
    dealt = sorted(g for groups in plan.row_groups for g in groups)

    assert dealt == [g for g, n in enumerate(counts) if n]
    assert len({len(sizes) for sizes in plan.batch_sizes}) == 1
    for groups, sizes in zip(plan.row_groups, plan.batch_sizes, strict=True):
        assert sum(sizes) == sum(counts[g] for g in groups)
        assert max(sizes) <= 10


def test_plan_merges_batch_below_minimum() -> None:
    plan = plan_epoch([21], batch_size=10, world_size=1, min_rows_per_batch=2)

    assert plan.batch_sizes == ((10, 11),)


def test_plan_rejects_more_ranks_than_row_groups() -> None:
    with pytest.raises(DataError, match=r"the file has 2 row group\(s\) with training rows"):
        plan_epoch([50, 50, 0], batch_size=10, world_size=3)


def test_holdout_independent_of_batching() -> None:
    rows = np.arange(10_000)

    whole = holdout_mask(rows, 0.2, seed=9)
    pieces = np.concatenate([holdout_mask(rows[i : i + 333], 0.2, seed=9) for i in range(0, 10_000, 333)])

    assert np.array_equal(whole, pieces)
    assert abs(whole.mean() - 0.2) < 0.02
    assert not np.array_equal(whole, holdout_mask(rows, 0.2, seed=10))


def test_column_split_holdout_partitions_rows(tmp_path: Path, config_dict, log_columns) -> None:
    path = write_parquet(tmp_path / "log.parquet", log_columns())
    split = {"method": "column", "column": "date", "train_max": "2024-01-20", "valid_fraction": 0.2}
    config = make_config(config_dict, str(path), split)

    streamed = prepare_streaming_data(config)
    train = epoch_rows(streamed, 1)
    assert streamed.valid is not None
    parts = [set(train), set(streamed.valid.row_ids.tolist()), set(streamed.test.row_ids.tolist())]

    assert sorted(train + streamed.valid.row_ids.tolist() + streamed.test.row_ids.tolist()) == list(
        range(600)
    )
    assert not parts[0] & parts[1]
    assert len(parts[1]) == pytest.approx(0.2 * (len(parts[0]) + len(parts[1])), abs=25)


def test_holdout_same_for_any_read_size(config_dict, split_files) -> None:
    paths = split_files()
    small = prepare_streaming_data(
        make_config(config_dict, paths["train"], files_split(paths, valid=False), read_rows=7)
    )
    large = prepare_streaming_data(
        make_config(config_dict, paths["train"], files_split(paths, valid=False), read_rows=1_000)
    )

    assert small.valid is not None and large.valid is not None
    assert np.array_equal(small.valid.row_ids, large.valid.row_ids)


# ----------------------------------------------------------------------------------------------------
# invalid rows and input errors


def _with_invalid_rows(columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Missing click labels at rows 7 and 300, and a position of 0 (below 1) at row 150."""
    columns = dict(columns)
    columns["click"] = [None if i in (7, 300) else v for i, v in enumerate(columns["click"])]
    columns["position"] = [0 if i == 150 else v for i, v in enumerate(columns["position"])]
    return columns


def test_invalid_rows_counted_and_logged(config_dict, split_files, log_columns, caplog) -> None:
    paths = split_files(_with_invalid_rows(log_columns()))
    config = make_config(config_dict, paths["train"], files_split(paths))

    with caplog.at_level(logging.WARNING, logger="mtrank.data.streaming"):
        streamed = prepare_streaming_data(config)
    reference = prepare_data(config)
    rows = epoch_rows(streamed, 1)

    assert streamed.skipped_rows == 3
    assert streamed.skipped_rows == reference.skipped_rows
    assert "skipping 2 row(s) with invalid `click`" in caplog.text
    assert "row 7: None, row 300: None" in caplog.text
    assert "skipped 3 of 400 rows in total; 397 remain" in caplog.text
    assert len(rows) == 397
    assert not {7, 150, 300} & set(rows)
    assert streamed.train.skipped_rows == 3


def test_invalid_row_raises_with_location(config_dict, split_files, log_columns) -> None:
    paths = split_files(_with_invalid_rows(log_columns()))
    config = make_config(config_dict, paths["train"], files_split(paths), on_invalid="error")

    with pytest.raises(DataError, match=r"train\.parquet: data row 7 .* column `click`: invalid value None"):
        prepare_streaming_data(config)


def test_split_column_error_names_row(tmp_path: Path, config_dict, log_columns) -> None:
    columns = log_columns()
    columns["day"] = [None if i == 250 else i % 10 for i in range(len(columns["user"]))]
    path = write_parquet(tmp_path / "log.parquet", columns)
    config = make_config(config_dict, str(path), {"method": "column", "column": "day", "train_max": 6})

    with pytest.raises(
        DataError, match=r"split column `day` has a missing or non-numeric value at data row 250"
    ):
        prepare_streaming_data(config)


def test_not_parquet_content_rejected(tmp_path: Path, config_dict, split_files) -> None:
    paths = split_files()
    fake = tmp_path / "fake.parquet"
    fake.write_text("user,item\nu1,i1\n", encoding="utf-8")
    config = make_config(config_dict, str(fake), files_split(paths))

    with pytest.raises(DataError, match=r"fake\.parquet is not a Parquet file"):
        prepare_streaming_data(config)


def test_empty_train_split_rejected(tmp_path: Path, config_dict, log_columns) -> None:
    path = write_parquet(tmp_path / "log.parquet", log_columns())
    split = {"method": "column", "column": "date", "train_max": "2000-01-01"}

    with pytest.raises(DataError, match=r"the train split of .*log\.parquet is empty"):
        prepare_streaming_data(make_config(config_dict, str(path), split))


def test_missing_column_named(config_dict, split_files, log_columns) -> None:
    columns = log_columns()
    del columns["city"]
    paths = split_files(columns)

    with pytest.raises(DataError, match=r"train\.parquet has no column\(s\) city"):
        prepare_streaming_data(make_config(config_dict, paths["train"], files_split(paths)))


def test_join_key_missing_in_log_named(tmp_path: Path, config_dict, split_files) -> None:
    side = tmp_path / "side.parquet"
    pq.write_table(pa.table({"account": ["u1"], "segment": ["s0"]}), side)
    paths = split_files()
    raw = make_config(config_dict, paths["train"], files_split(paths)).model_dump(by_alias=True)
    raw["data"]["join"] = {"path": str(side), "key": "account"}
    raw["features"].append({"name": "segment", "type": "categorical"})

    with pytest.raises(DataError, match=r"train\.parquet has no join key column `account`"):
        prepare_streaming_data(parse_config(raw))


# ----------------------------------------------------------------------------------------------------
# configuration


def _raw_config(config_dict, path: str, split: dict[str, Any], **data: Any) -> dict[str, Any]:
    raw = config_dict(path, split=split)
    raw["data"]["streaming"] = {"enabled": True}
    raw["data"].update(data)
    return raw


def test_config_rejects_random_split(config_dict) -> None:
    raw = _raw_config(config_dict, "log.parquet", {"method": "random"})

    with pytest.raises(
        ConfigError, match=r"`data\.streaming\.enabled` supports `data\.split\.method` `files`"
    ):
        parse_config(raw)


def test_config_rejects_text_log(config_dict) -> None:
    raw = _raw_config(config_dict, "log.csv", {"method": "column", "column": "date", "train_max": "x"})

    with pytest.raises(ConfigError, match=r"needs Parquet input, but `data\.path` is 'log\.csv'"):
        parse_config(raw)


def test_config_rejects_text_test_file(config_dict) -> None:
    raw = _raw_config(config_dict, "log.parquet", {"method": "files", "test_path": "test.csv.gz"})

    with pytest.raises(ConfigError, match=r"`data\.split\.test_path` is 'test\.csv\.gz'"):
        parse_config(raw)


def test_config_rejects_text_format(config_dict) -> None:
    raw = _raw_config(config_dict, "log.parquet", {"method": "files", "test_path": "t.parquet"}, format="csv")

    with pytest.raises(ConfigError, match=r"needs Parquet input, got `data\.format: csv`"):
        parse_config(raw)


def test_config_accepts_parquet_without_suffix(config_dict) -> None:
    raw = _raw_config(config_dict, "log.bin", {"method": "files", "test_path": "t.bin"}, format="parquet")

    assert parse_config(raw).data.streaming.enabled


def test_config_streaming_off_by_default(config_dict) -> None:
    config = parse_config(config_dict("log.csv"))

    assert not config.data.streaming.enabled


def test_prepare_rejects_random_split(config_dict, split_files) -> None:
    paths = split_files()
    config = parse_config(config_dict(paths["train"]))

    with pytest.raises(ConfigError, match="streaming supports the `files` and `column` splits, got `random`"):
        prepare_streaming_data(config)


# ----------------------------------------------------------------------------------------------------
# training


def training_config(config_dict, paths: dict[str, str], **training: Any) -> RunConfig:
    raw = make_config(config_dict, paths["train"], files_split(paths)).model_dump(by_alias=True)
    raw["training"].update({"epochs": 2, "num_threads": 1, **training})
    return parse_config(raw)


def test_train_run_streams_and_evaluates(tmp_path: Path, config_dict, split_files) -> None:
    config = training_config(config_dict, split_files(), epochs=3)

    result = train_run(config, tmp_path / "run")
    loaded = load_run(tmp_path / "run")

    assert isinstance(result.data, StreamingData)
    assert (tmp_path / "run" / WEIGHTS_FILE).is_file()
    assert "test" in json.loads((tmp_path / "run" / METRICS_FILE).read_text(encoding="utf-8"))
    # click is 1 exactly where the numeric feature `score` is positive, so a trained model ranks well.
    assert result.test_metrics["click"]["auc"] > 0.9
    assert loaded.encoders.to_dict() == result.data.encoders.to_dict()


def test_streamed_epoch_steps_logged(tmp_path: Path, config_dict, split_files) -> None:
    config = training_config(config_dict, split_files())

    result = train_run(config, tmp_path / "run")
    lines = (tmp_path / "run" / STEPS_FILE).read_text(encoding="utf-8").splitlines()

    assert isinstance(result.data, StreamingData)
    assert len(lines) == 2 * result.data.train.num_batches(1)


def test_streamed_resume_matches_uninterrupted(tmp_path: Path, config_dict, split_files) -> None:
    config = training_config(config_dict, split_files(), epochs=3)
    config.model.dropout = 0.2

    whole = train_run(config, tmp_path / "whole")
    train_run(config, tmp_path / "parts", stop_after=1)
    resumed = train_run(config, tmp_path / "parts", resume=True)

    whole_state, resumed_state = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(resumed_state[name], whole_state[name]) for name in whole_state)


def test_trainer_rejects_stream_of_other_rank(config_dict, split_files) -> None:
    config = training_config(config_dict, split_files())
    data = prepare_streaming_data(config, rank=1, world_size=2)
    trainer = Trainer(build_ranker(config, data.encoders), config)

    with pytest.raises(ConfigError, match=r"reads the rows of rank 1 of 2, but this process is rank 0 of 1"):
        trainer.fit(data.train, data.valid)


# Wall-clock limit of the torchrun launch, so a hung collective fails the test instead of blocking.
LAUNCH_TIMEOUT_SECONDS = 300
WORLD_SIZE = 2


def test_two_ranks_end_with_equal_parameters(tmp_path: Path, config_dict, split_files) -> None:
    # Batch norm makes each rank's batches keep at least two rows; dropout draws per-rank masks.
    raw = training_config(config_dict, split_files()).model_dump(by_alias=True)
    raw["model"].update({"batch_norm": True, "dropout": 0.2})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    # One thread per process, workers host the store, sockets on the loopback interface only.
    env.update({"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={WORLD_SIZE}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={tmp_path / 'rendezvous'}",
        "--rdzv-conf=store_type=file",
        "--local-addr=127.0.0.1",
        str(Path(__file__).resolve()),
        str(config_path),
        str(tmp_path / "run"),
        str(tmp_path),
    ]

    launch = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_SECONDS
    )

    assert launch.returncode == 0, launch.stderr[-6000:]
    ranks = [load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in range(WORLD_SIZE)]
    assert set(ranks[0]) == set(ranks[1])
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    assert (tmp_path / "run" / WEIGHTS_FILE).is_file()
    # Rank 0 logs one line per step; both ranks took the planned steps or the launch would have hung.
    steps = (tmp_path / "run" / STEPS_FILE).read_text(encoding="utf-8").splitlines()
    planned = prepare_streaming_data(parse_config(raw), world_size=WORLD_SIZE).train
    assert len(steps) == 2 * planned.num_batches(1, min_rows_per_batch=2)
    # The first step's loss is a mean over both ranks' rows, on the scale of a one-process step
    # (an unscaled sum over ranks would be about twice as large).
    single = train_run(parse_config(raw), tmp_path / "single", stop_after=1)
    first_single = json.loads((single.run_dir / STEPS_FILE).read_text(encoding="utf-8").splitlines()[0])
    first_ranks = json.loads(steps[0])
    ratio = first_ranks["loss/total"] / first_single["loss/total"]
    assert 0.75 < ratio < 1.33, ratio


def _train_one_rank(config_path: Path, run_dir: Path, out_dir: Path) -> None:
    """Torchrun worker: train with ``train_run`` and save this rank's parameters as ``rankR.safetensors``."""
    from mtrank.config import load_config

    context = init_distributed("cpu")
    try:
        result = train_run(load_config(config_path), run_dir)
        # Parameters only: batch-norm running statistics are per-rank buffers. DDP copies rank 0's at
        # the start of each forward pass, and each rank then updates them from its own rows.
        state = {name: tensor.detach().contiguous() for name, tensor in result.model.named_parameters()}
        save_file(state, str(out_dir / f"rank{context.rank}.safetensors"))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    _train_one_rank(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
