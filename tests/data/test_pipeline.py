"""Tests of the data pipeline on real files: splits, invalid rows, joins, unseen values, exact int64 ids."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtrank.config import parse_config
from mtrank.data.encoders import OOV_ID, RawIdEncoder
from mtrank.data.pipeline import (
    ROW_COLUMN,
    FeatureEncoders,
    encode_for_scoring,
    prepare_data,
    read_source,
)
from mtrank.data.tensors import iterate_batches
from mtrank.errors import DataError
from mtrank.models.builder import build_ranker

NUM_ROWS = 600
# 2^53 + 1 rounds to 2^53 as float64 (IEEE 754 round-half-to-even), so only an exact int64 path
# keeps the first two ids apart. 2^53 + 2 is exact in float64 and checks the next neighbour.
BIG_IDS = (2**53, 2**53 + 1, 2**53 + 2)


def all_row_ids(prepared) -> list[np.ndarray]:
    parts = [prepared.train.row_ids, prepared.test.row_ids]
    if prepared.valid is not None:
        parts.append(prepared.valid.row_ids)
    return parts


# ----------------------------------------------------------------------------------------------------
# splits


def test_random_split_sizes_and_disjoint(write_log, config_dict) -> None:
    config = parse_config(config_dict(write_log()))

    prepared = prepare_data(config)

    train, test, valid = prepared.train.row_ids, prepared.test.row_ids, prepared.valid.row_ids
    assert len(test) == 150  # 25% of 600
    assert len(valid) == 45  # 10% of the 450 non-test rows
    assert len(train) == 405
    assert not set(train) & set(test)
    assert not set(train) & set(valid)
    assert not set(valid) & set(test)
    assert sorted(np.concatenate([train, valid, test]).tolist()) == list(range(NUM_ROWS))


def test_random_split_reproducible_by_seed(write_log, config_dict) -> None:
    path = write_log()
    split = {"method": "random", "test_fraction": 0.25, "valid_fraction": 0.1, "seed": 11}
    other = {"method": "random", "test_fraction": 0.25, "valid_fraction": 0.1, "seed": 12}

    first = prepare_data(parse_config(config_dict(path, split=split)))
    second = prepare_data(parse_config(config_dict(path, split=split)))
    third = prepare_data(parse_config(config_dict(path, split=other)))

    assert np.array_equal(first.test.row_ids, second.test.row_ids)
    assert np.array_equal(first.valid.row_ids, second.valid.row_ids)
    assert torch.equal(first.train.batch.categorical, second.train.batch.categorical)
    assert not np.array_equal(first.test.row_ids, third.test.row_ids)


def test_random_split_without_validation(write_log, config_dict) -> None:
    split = {"method": "random", "test_fraction": 0.5, "valid_fraction": 0.0}

    prepared = prepare_data(parse_config(config_dict(write_log(), split=split)))

    assert prepared.valid is None
    assert len(prepared.train) == 300


def test_column_split_by_date(write_log, config_dict) -> None:
    dates = [f"2024-01-{1 + i % 30:02d}" for i in range(NUM_ROWS)]
    path = write_log(date=dates)
    split = {"method": "column", "column": "date", "train_max": "2024-01-20", "valid_fraction": 0.1}

    prepared = prepare_data(parse_config(config_dict(path, split=split)))

    train_dates = {dates[i] for i in np.concatenate([prepared.train.row_ids, prepared.valid.row_ids])}
    test_dates = {dates[i] for i in prepared.test.row_ids}
    assert max(train_dates) == "2024-01-20"
    assert min(test_dates) == "2024-01-21"
    assert len(prepared.test) == 200  # days 21..30 have 20 rows each


def test_column_split_numeric_cutoff(write_log, config_dict) -> None:
    path = write_log(day=[i % 10 for i in range(NUM_ROWS)])
    split = {"method": "column", "column": "day", "train_max": 6, "valid_fraction": 0.0}

    prepared = prepare_data(parse_config(config_dict(path, split=split)))

    assert all(int(i) % 10 <= 6 for i in prepared.train.row_ids)
    assert all(int(i) % 10 > 6 for i in prepared.test.row_ids)


def test_column_split_missing_value_rejected(write_log, config_dict) -> None:
    days = [str(i % 10) for i in range(NUM_ROWS)]
    days[5] = "soon"
    split = {"method": "column", "column": "day", "train_max": 6}

    with pytest.raises(
        DataError, match=r"split column `day` has a missing or non-numeric value at data row 5: 'soon'"
    ):
        prepare_data(parse_config(config_dict(write_log(day=days), split=split)))


def test_empty_train_split_rejected(write_log, config_dict) -> None:
    split = {"method": "column", "column": "date", "train_max": "2000-01-01"}

    with pytest.raises(
        DataError,
        match=r"the train split of .*log\.csv is empty; check `data\.filters` and `data\.split` \(column\)",
    ):
        prepare_data(parse_config(config_dict(write_log(), split=split)))


def test_files_split_with_validation_file(write_log, config_dict) -> None:
    train = write_log("train.csv", num_rows=300, seed=1)
    valid = write_log("valid.csv", num_rows=50, seed=2)
    test = write_log("test.parquet", num_rows=80, seed=3)
    split = {"method": "files", "valid_path": str(valid), "test_path": str(test)}

    prepared = prepare_data(parse_config(config_dict(train, split=split)))

    assert len(prepared.train) == 300
    assert len(prepared.valid) == 50
    assert len(prepared.test) == 80
    assert prepared.test.row_ids.tolist() == list(range(80))


def test_files_split_holds_out_validation(write_log, config_dict) -> None:
    train = write_log("train.csv", num_rows=300, seed=1)
    test = write_log("test.csv", num_rows=80, seed=3)
    split = {"method": "files", "test_path": str(test), "valid_fraction": 0.2}

    prepared = prepare_data(parse_config(config_dict(train, split=split)))

    assert len(prepared.train) == 240
    assert len(prepared.valid) == 60
    assert not set(prepared.train.row_ids) & set(prepared.valid.row_ids)


def _drop_header(path: Path) -> Path:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[1:]), encoding="utf-8")
    return path


def test_files_split_headerless_split_files_take_training_names(write_log, config_dict) -> None:
    # Avazu's layout: the training file has a header, the valid and test files do not.
    train = write_log("train.csv", num_rows=300, seed=1)
    valid = _drop_header(write_log("valid.csv", num_rows=50, seed=2))
    test = _drop_header(write_log("test.csv", num_rows=80, seed=3))
    split = {"method": "files", "valid_path": str(valid), "test_path": str(test), "header": False}

    prepared = prepare_data(parse_config(config_dict(train, split=split)))

    assert (len(prepared.train), len(prepared.valid), len(prepared.test), prepared.skipped_rows) == (
        300,
        50,
        80,
        0,
    )


def test_files_split_header_matches_full_read(write_log, config_dict) -> None:
    # The same test rows read with and without their header line encode to the same ids.
    train = write_log("train.csv", num_rows=300, seed=1)
    with_header = write_log("test.csv", num_rows=80, seed=3)
    without = _drop_header(write_log("test_nohead.csv", num_rows=80, seed=3))
    plain = prepare_data(
        parse_config(config_dict(train, split={"method": "files", "test_path": str(with_header)}))
    )
    headerless = prepare_data(
        parse_config(
            config_dict(train, split={"method": "files", "test_path": str(without), "header": False})
        )
    )
    assert torch.equal(plain.test.batch.categorical, headerless.test.batch.categorical)


def test_files_split_without_header_setting_misreads(write_log, config_dict) -> None:
    # Without `split.header: false`, the first data row of a header-less file is taken as its header.
    train = write_log("train.csv", num_rows=300, seed=1)
    test = _drop_header(write_log("test.csv", num_rows=80, seed=3))
    with pytest.raises(DataError, match="test.csv"):
        prepare_data(parse_config(config_dict(train, split={"method": "files", "test_path": str(test)})))


# ----------------------------------------------------------------------------------------------------
# unseen values and exact ids


def test_unseen_category_at_evaluation_is_oov(write_log, config_dict) -> None:
    train = write_log("train.csv", num_rows=200, seed=1)
    items = [f"i{i % 40}" for i in range(20)]
    items[3] = "brand-new-item"
    items[7] = "another-new-item"
    test = write_log("test.csv", num_rows=20, seed=2, item=items)
    config = parse_config(config_dict(train, split={"method": "files", "test_path": str(test)}))

    prepared = prepare_data(config)
    model = build_ranker(config, prepared.encoders).eval()
    output = model(prepared.test.batch)

    item_ids = prepared.test.batch.categorical[:, 0]
    assert item_ids[3].item() == OOV_ID
    assert item_ids[7].item() == OOV_ID
    assert int(item_ids.max()) < prepared.encoders.vocabulary_sizes()["item"]
    assert output.logits.shape == (20, 2)
    assert torch.isfinite(output.logits).all()


def big_id_log(write_log, config_dict, name: str):
    """Write a log whose ``item_id`` cycles through :data:`BIG_IDS` and return its config."""
    path = write_log(name, item_id=[BIG_IDS[i % 3] for i in range(NUM_ROWS)])
    raw = config_dict(path)
    raw["features"].append({"name": "item_id", "type": "categorical"})
    return path, parse_config(raw)


def test_big_ids_stored_as_int64_parquet(write_log, config_dict) -> None:
    path, _config = big_id_log(write_log, config_dict, "log.parquet")

    assert pq.read_schema(path).field("item_id").type == pa.int64()


@pytest.mark.parametrize("name", ["log.csv", "log.parquet"])
def test_big_int64_ids_get_distinct_vocabulary_ids(write_log, config_dict, name: str) -> None:
    _path, config = big_id_log(write_log, config_dict, name)

    prepared = prepare_data(config)

    column = list(prepared.encoders.categorical).index("item_id")
    encoded = prepared.train.batch.categorical[:, column].numpy()
    ids_per_value = [set(encoded[prepared.train.row_ids % 3 == k].tolist()) for k in range(3)]
    assert all(len(ids) == 1 for ids in ids_per_value)
    assert len(set.union(*ids_per_value)) == 3
    vocabulary = prepared.encoders.categorical["item_id"][1].vocabulary
    assert sorted(vocabulary) == sorted(str(v) for v in BIG_IDS)


@pytest.mark.parametrize("name", ["log.csv", "log.parquet"])
def test_big_int64_ids_reach_embedding_apart(write_log, config_dict, name: str) -> None:
    path, config = big_id_log(write_log, config_dict, name)
    prepared = prepare_data(config)
    model = build_ranker(config, prepared.encoders)

    scored, _skipped = encode_for_scoring(prepared.encoders, config.data, str(path), with_labels=False)

    column = list(prepared.encoders.categorical).index("item_id")
    ids = scored.batch.categorical[:3, column]  # rows 0, 1, 2 contain 2^53, 2^53 + 1, 2^53 + 2
    vectors = model.embeddings["item_id"](ids)
    assert ids.dtype == torch.int64
    assert len(set(ids.tolist())) == 3
    assert not torch.equal(vectors[0], vectors[1])
    assert not torch.equal(vectors[1], vectors[2])


@pytest.mark.parametrize("name", ["log.csv", "log.parquet"])
def test_raw_id_encoder_keeps_big_id_in_batch(write_log, config_dict, name: str) -> None:
    path, config = big_id_log(write_log, config_dict, name)
    encoders = FeatureEncoders.from_config(config)
    encoders.categorical["item_id"] = ("item_id", RawIdEncoder())
    table = read_source(config.data, str(path), encoders.input_columns() + encoders.label_columns())
    encoders.fit(table)

    encoded = encoders.encode(table)

    column = list(encoders.categorical).index("item_id")
    assert encoded.batch.categorical.dtype == torch.int64
    assert encoded.batch.categorical[:3, column].tolist() == list(BIG_IDS)


# ----------------------------------------------------------------------------------------------------
# invalid rows


def invalid_log(write_log):
    columns = {
        "score": [str(v) for v in np.round(np.linspace(-2, 2, NUM_ROWS), 3)],
        "click": ["1"] * NUM_ROWS,
    }
    columns["click"] = [str(i % 2) for i in range(NUM_ROWS)]
    columns["score"][3] = "abc"
    columns["score"][10] = "n/a"
    columns["click"][20] = "2"
    columns["click"][30] = "?"
    return write_log(**columns)


def test_invalid_rows_skipped_counted_and_logged(write_log, config_dict, caplog) -> None:
    path = invalid_log(write_log)
    config = parse_config(config_dict(path))
    caplog.set_level(logging.WARNING, logger="mtrank.data.pipeline")

    prepared = prepare_data(config)

    kept = np.concatenate(all_row_ids(prepared))
    assert prepared.skipped_rows == 4
    assert len(kept) == NUM_ROWS - 4
    assert not {3, 10, 20, 30} & set(kept.tolist())
    assert (
        "skipping 2 row(s) with invalid `score` (not a number or out of float32 range); examples: row 3: 'abc', row 10: 'n/a'"
        in caplog.text
    )
    assert (
        "skipping 2 row(s) with invalid `click` (missing or not 0/1); examples: row 20: '2', row 30: None"
        in caplog.text
    )
    assert "skipped 4 of 600 rows in total; 596 remain" in caplog.text


def test_invalid_row_raises_with_location(write_log, config_dict) -> None:
    path = invalid_log(write_log)
    raw = config_dict(path)
    raw["data"]["on_invalid"] = "error"

    with pytest.raises(
        DataError,
        match=r"log\.csv: data row 3 \(0-based, header excluded\), column `score`: invalid value 'abc'",
    ):
        prepare_data(parse_config(raw))


def test_missing_numeric_value_is_not_invalid(write_log, config_dict) -> None:
    scores = ["0.5"] * NUM_ROWS
    scores[4] = "?"
    scores[5] = ""
    path = write_log(score=scores)

    prepared = prepare_data(parse_config(config_dict(path)))

    assert prepared.skipped_rows == 0


def test_invalid_rows_in_test_file_counted(write_log, config_dict) -> None:
    train = write_log("train.csv", num_rows=100, seed=1)
    scores = ["0.1"] * 30
    scores[0] = "oops"
    test = write_log("test.csv", num_rows=30, seed=2, score=scores)
    config = parse_config(config_dict(train, split={"method": "files", "test_path": str(test)}))

    prepared = prepare_data(config)

    assert prepared.skipped_rows == 1
    assert len(prepared.test) == 29
    assert prepared.test.row_ids[0] == 1


def test_missing_column_in_log_named(write_log, config_dict) -> None:
    path = write_log(drop=["age"])

    with pytest.raises(DataError, match=r"log\.csv has no column\(s\) age"):
        prepare_data(parse_config(config_dict(path)))


# ----------------------------------------------------------------------------------------------------
# joins


def write_users(tmp_path: Path, users: list[str], segments: list[str]) -> Path:
    path = tmp_path / "users.csv"
    lines = ["user,segment,signup"] + [f"{u},{s},2020" for u, s in zip(users, segments, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def join_config(config_dict, log: Path, side: Path):
    raw = config_dict(log)
    raw["data"]["join"] = {"path": str(side), "key": "user", "columns": ["segment"]}
    raw["features"].append({"name": "segment", "type": "categorical"})
    return parse_config(raw)


def test_join_keeps_row_order(tmp_path: Path, write_log, config_dict) -> None:
    log_users = [f"u{(7 * i) % 30}" for i in range(NUM_ROWS)]
    clicks = [(i // 3) % 2 for i in range(NUM_ROWS)]
    log = write_log(user=log_users, click=clicks)
    side_users = [f"u{i}" for i in reversed(range(30))]
    side = write_users(tmp_path, side_users, [f"s{u[1:]}" for u in side_users])
    config = join_config(config_dict, log, side)
    encoders = FeatureEncoders.from_config(config)

    table = read_source(config.data, config.data.path, encoders.input_columns() + encoders.label_columns())

    assert table[ROW_COLUMN].to_pylist() == list(range(NUM_ROWS))
    assert table["segment"].to_pylist() == [f"s{u[1:]}" for u in log_users]
    assert table["click"].to_pylist() == [str(v) for v in clicks]


def test_join_unmatched_rows_logged(tmp_path: Path, write_log, config_dict, caplog) -> None:
    log = write_log(user=[f"u{i % 30}" for i in range(NUM_ROWS)])
    side = write_users(tmp_path, [f"u{i}" for i in range(20)], ["a"] * 20)
    config = join_config(config_dict, log, side)
    caplog.set_level(logging.WARNING, logger="mtrank.data.pipeline")

    prepared = prepare_data(config)

    assert "200 of 600 rows of" in caplog.text
    assert "have no match for `user`" in caplog.text
    assert len(prepared.train) + len(prepared.valid) + len(prepared.test) == NUM_ROWS


def test_join_duplicate_keys_rejected(tmp_path: Path, write_log, config_dict) -> None:
    side = write_users(tmp_path, ["u1", "u2", "u1"], ["a", "b", "c"])
    config = join_config(config_dict, write_log(), side)

    with pytest.raises(
        DataError, match=r"users\.csv: join key `user` is not unique \(e\.g\. 'u1' appears more than once\)"
    ):
        prepare_data(config)


# ----------------------------------------------------------------------------------------------------
# encoders and batches


def test_saved_encoders_encode_identically(tmp_path: Path, write_log, config_dict) -> None:
    path = write_log()
    config = parse_config(config_dict(path, position_bias=True))
    prepared = prepare_data(config)
    prepared.encoders.save(tmp_path / "encoders.json")

    loaded = FeatureEncoders.load(tmp_path / "encoders.json")
    first, _ = encode_for_scoring(prepared.encoders, config.data, str(path), with_labels=True)
    second, _ = encode_for_scoring(loaded, config.data, str(path), with_labels=True)

    assert torch.equal(first.batch.categorical, second.batch.categorical)
    assert torch.equal(first.batch.numeric, second.batch.numeric)
    assert torch.equal(first.batch.labels, second.batch.labels)
    assert torch.equal(first.batch.device, second.batch.device)


def test_scoring_without_position_column(write_log, config_dict) -> None:
    path = write_log()
    config = parse_config(config_dict(path, position_bias=True))
    prepared = prepare_data(config)
    unlabelled = write_log("serve.csv", num_rows=10, drop=["position", "click", "noise"])

    encoded, skipped = encode_for_scoring(prepared.encoders, config.data, str(unlabelled), with_labels=False)

    assert skipped == 0
    assert encoded.batch.labels is None
    assert encoded.batch.position.tolist() == [0] * 10
    assert encoded.batch.device.shape == (10, 1)


def test_training_positions_encoded(write_log, config_dict) -> None:
    config = parse_config(config_dict(write_log(), position_bias=True))

    prepared = prepare_data(config)

    positions = prepared.train.batch.position
    assert positions.dtype == torch.int64
    assert int(positions.min()) == 1
    assert int(positions.max()) == 5


def test_group_column_kept_for_gauc(write_log, config_dict) -> None:
    raw = config_dict(write_log())
    raw["evaluation"] = {"group_column": "user"}

    prepared = prepare_data(parse_config(raw))

    assert prepared.test.groups is not None
    assert prepared.test.groups[0].startswith("u")


def test_batches_cover_rows_with_short_last_batch(write_log, config_dict) -> None:
    prepared = prepare_data(parse_config(config_dict(write_log())))
    data = prepared.train  # 405 rows

    sizes = [len(b) for b in iterate_batches(data, 101)]
    generator = torch.Generator().manual_seed(0)
    shuffled = torch.cat([b.numeric for b in iterate_batches(data, 101, shuffle=True, generator=generator)])

    assert sizes == [101, 101, 101, 101, 1]
    assert shuffled.shape == data.batch.numeric.shape
    assert torch.equal(shuffled.sort(dim=0).values, data.batch.numeric.sort(dim=0).values)
    assert not torch.equal(shuffled, data.batch.numeric)


def test_truth_columns_kept_as_extras(tmp_path: Path, write_log, config_dict) -> None:
    path = write_log("log.parquet", true_relevance=[float(i) for i in range(NUM_ROWS)])

    prepared = prepare_data(parse_config(config_dict(path)))

    extras = prepared.test.extras["true_relevance"]
    assert extras.tolist() == prepared.test.row_ids.astype(float).tolist()


def test_side_table_columns_only_when_requested(tmp_path: Path, write_log, config_dict) -> None:
    side = write_users(tmp_path, [f"u{i}" for i in range(30)], ["a"] * 30)
    config = join_config(config_dict, write_log(), side)
    encoders = FeatureEncoders.from_config(config)

    table = read_source(config.data, config.data.path, encoders.input_columns())

    assert "signup" not in table.column_names
    assert isinstance(table["segment"], pa.ChunkedArray)
