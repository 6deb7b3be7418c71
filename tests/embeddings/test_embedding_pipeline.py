"""End-to-end tests of the hash and DHE embedding kinds through the data pipeline, the ranker and runs.

The log used here has integer item ids in text. Rows of days 1 to 20 train and use items 1000..1039.
Rows of days 21 to 30 are the test split: the even rows reuse those items and the odd rows carry an
item id of their own (5000 + row) that the training split never contains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mtrank.config import parse_config
from mtrank.data.encoders import OOV_ID, RawIdEncoder, VocabularyEncoder
from mtrank.data.pipeline import prepare_data
from mtrank.embeddings import DeepHashEmbedding, HashEmbedding
from mtrank.errors import ConfigError
from mtrank.models.builder import build_ranker
from mtrank.training.evaluation import predict
from mtrank.training.run import RunResult, load_run, train_run

NUM_ROWS = 600
NUM_DAYS = 30
LAST_TRAIN_DAY = 20
NUM_SEEN_ITEMS = 40
# Test rows are days 21 to 30 (200 of 600 rows); the odd ones, 100, carry a new item each.
NUM_UNSEEN_ITEMS = 100
FIRST_SEEN_ITEM = 1000
FIRST_UNSEEN_ITEM = 5000

# Small enough for a fast test, large enough to learn: 32 hash functions and one hidden layer of 16.
DHE_OPTIONS: dict[str, Any] = {"num_hashes": 32, "hidden": [16], "seed": 5}
HASH_OPTIONS: dict[str, Any] = {"num_buckets": 4, "num_hashes": 2, "seed": 5}
KIND_OPTIONS: dict[str, dict[str, Any]] = {"table": {}, "hash": HASH_OPTIONS, "dhe": DHE_OPTIONS}
DATE_SPLIT = {
    "method": "column",
    "column": "date",
    "train_max": f"2024-01-{LAST_TRAIN_DAY}",
    "valid_fraction": 0.0,
}


def day_of_row(row: int) -> int:
    """Day 1..30 of data row ``row``."""
    return 1 + row % NUM_DAYS


def is_unseen_row(row: int) -> bool:
    """Tell whether data row ``row`` is a test row with an item id that no training row has."""
    return day_of_row(row) > LAST_TRAIN_DAY and row % 2 == 1


def item_of_row(row: int) -> int:
    """Item id of data row ``row``: a training item, or for unseen rows an id of its own."""
    if is_unseen_row(row):
        return FIRST_UNSEEN_ITEM + row
    return FIRST_SEEN_ITEM + row % NUM_SEEN_ITEMS


def unseen_log_columns() -> dict[str, list[Any]]:
    """Return the ``date`` and ``item`` columns described in the module docstring."""
    return {
        "date": [f"2024-01-{day_of_row(row):02d}" for row in range(NUM_ROWS)],
        "item": [str(item_of_row(row)) for row in range(NUM_ROWS)],
    }


def with_kinds(raw: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    """Set the embedding kind of each named feature of a raw config, with this module's options."""
    for feature in raw["features"]:
        kind = kinds.get(feature["name"])
        if kind is not None:
            feature["embedding"] = {"kind": kind, "dim": 4, "options": dict(KIND_OPTIONS[kind])}
    return raw


def item_column(feature_names: list[str]) -> int:
    """Return the position of ``item`` among the categorical features."""
    return feature_names.index("item")


@pytest.fixture(scope="module")
def hashed_run(tmp_path_factory: pytest.TempPathFactory, write_log_in: Any, config_dict: Any) -> RunResult:
    """A 3-epoch MMoE run with ``item`` on DHE and ``city`` on the hashing trick, split by date."""
    folder = tmp_path_factory.mktemp("hashed_run")
    path = write_log_in(folder, num_rows=NUM_ROWS, **unseen_log_columns())
    raw = with_kinds(config_dict(path, epochs=3, split=DATE_SPLIT), {"item": "dhe", "city": "hash"})
    return train_run(parse_config(raw), folder / "run")


@pytest.fixture(scope="module")
def table_data(tmp_path_factory: pytest.TempPathFactory, write_log_in: Any, config_dict: Any) -> Any:
    """The same log and split encoded for a table ``item`` embedding."""
    folder = tmp_path_factory.mktemp("table_data")
    path = write_log_in(folder, num_rows=NUM_ROWS, **unseen_log_columns())
    config = parse_config(config_dict(path, split=DATE_SPLIT))
    return config, prepare_data(config)


# ----------------------------------------------------------------------------------------------------
# a run with hash and DHE kinds


def test_run_builds_requested_kinds(hashed_run: RunResult) -> None:
    assert isinstance(hashed_run.model.embeddings["item"], DeepHashEmbedding)
    assert isinstance(hashed_run.model.embeddings["city"], HashEmbedding)


def test_run_encodes_raw_ids(hashed_run: RunResult) -> None:
    encoders = hashed_run.data.encoders.categorical

    assert isinstance(encoders["item"][1], RawIdEncoder)
    assert isinstance(encoders["city"][1], RawIdEncoder)


def test_run_keeps_integer_ids_exactly(hashed_run: RunResult) -> None:
    test = hashed_run.data.test
    column = item_column(list(hashed_run.data.encoders.categorical))
    expected = torch.tensor([item_of_row(int(row)) for row in test.row_ids])

    assert torch.equal(test.batch.categorical[:, column], expected)


def test_run_learns_informative_task(hashed_run: RunResult) -> None:
    # click is 1 exactly where the numeric feature `score` is positive, so a trained model ranks well.
    assert hashed_run.test_metrics["click"]["auc"] > 0.9


def test_run_evaluates_every_task(hashed_run: RunResult) -> None:
    assert set(hashed_run.test_metrics) == {"click", "noise", "mean"}


# ----------------------------------------------------------------------------------------------------
# parameter count against id cardinality


def ranker_parameters(folder: Path, config_dict: Any, write_log_in: Any, kind: str, num_items: int) -> int:
    """Build the ranker for a log with ``num_items`` distinct items and count its parameters."""
    items = [str(FIRST_SEEN_ITEM + row % num_items) for row in range(NUM_ROWS)]
    path = write_log_in(folder, f"items_{num_items}.csv", num_rows=NUM_ROWS, item=items)
    raw = with_kinds(config_dict(path), {"item": kind, "city": kind})
    config = parse_config(raw)
    model = build_ranker(config, prepare_data(config).encoders)
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("kind", ["hash", "dhe"])
def test_parameters_ignore_id_cardinality(
    kind: str, tmp_path: Path, config_dict: Any, write_log_in: Any
) -> None:
    few = ranker_parameters(tmp_path, config_dict, write_log_in, kind, num_items=40)
    many = ranker_parameters(tmp_path, config_dict, write_log_in, kind, num_items=400)

    assert few == many


def test_table_parameters_grow_with_id_cardinality(
    tmp_path: Path, config_dict: Any, write_log_in: Any
) -> None:
    # The control for the test above: the same comparison does see a vocabulary-sized table.
    few = ranker_parameters(tmp_path, config_dict, write_log_in, "table", num_items=40)
    many = ranker_parameters(tmp_path, config_dict, write_log_in, "table", num_items=400)

    assert many > few


# ----------------------------------------------------------------------------------------------------
# reloading the run


def every_id(run: RunResult, feature: str) -> torch.Tensor:
    """All ids of ``feature`` in the run's splits, plus int64 extremes and ids that never occur."""
    column = list(run.data.encoders.categorical).index(feature)
    splits = [run.data.train, run.data.test] + ([run.data.valid] if run.data.valid is not None else [])
    seen = torch.cat([split.batch.categorical[:, column] for split in splits])
    extra = torch.tensor([-(2**63), -1, 0, 2**63 - 1, 123_456_789])
    return torch.unique(torch.cat([seen, extra]))  # (N,)


@pytest.mark.parametrize("feature", ["item", "city"])
def test_reloaded_run_embeds_ids_bitwise(hashed_run: RunResult, feature: str) -> None:
    loaded = load_run(hashed_run.run_dir)
    ids = every_id(hashed_run, feature)
    hashed_run.model.eval()
    with torch.no_grad():
        original = hashed_run.model.embeddings[feature](ids)
        reloaded = loaded.model.embeddings[feature](ids)

    assert torch.equal(original, reloaded)


def test_reloaded_run_predicts_bitwise(hashed_run: RunResult) -> None:
    loaded = load_run(hashed_run.run_dir)
    loss_kinds = [task.loss or "bce" for task in loaded.config.tasks]
    original = predict(hashed_run.model, hashed_run.data.test, loss_kinds)
    reloaded = predict(loaded.model, hashed_run.data.test, loss_kinds)  # type: ignore[arg-type]

    assert np.array_equal(original, reloaded)


# ----------------------------------------------------------------------------------------------------
# ids first seen at evaluation


def unseen_mask(row_ids: np.ndarray) -> np.ndarray:
    """Return the expected unseen-item mask of the rows ``row_ids``."""
    return np.array([is_unseen_row(int(row)) for row in row_ids])


def test_test_split_has_unseen_items(hashed_run: RunResult) -> None:
    assert int(unseen_mask(hashed_run.data.test.row_ids).sum()) == NUM_UNSEEN_ITEMS


def test_dhe_unseen_ids_stay_out_of_training_ids(hashed_run: RunResult) -> None:
    column = item_column(list(hashed_run.data.encoders.categorical))
    train_ids = hashed_run.data.train.batch.categorical[:, column].numpy()
    test_ids = hashed_run.data.test.batch.categorical[:, column].numpy()

    assert np.array_equal(~np.isin(test_ids, train_ids), unseen_mask(hashed_run.data.test.row_ids))


def test_dhe_gives_unseen_ids_distinct_embeddings(hashed_run: RunResult) -> None:
    column = item_column(list(hashed_run.data.encoders.categorical))
    test = hashed_run.data.test
    unseen_ids = torch.unique(test.batch.categorical[unseen_mask(test.row_ids), column])  # (U,)
    loaded = load_run(hashed_run.run_dir)
    with torch.no_grad():
        rows = loaded.model.embeddings["item"](unseen_ids)  # (U, D)

    assert torch.unique(rows, dim=0).shape[0] == NUM_UNSEEN_ITEMS


def test_dhe_unseen_embeddings_differ_from_training_ones(hashed_run: RunResult) -> None:
    column = item_column(list(hashed_run.data.encoders.categorical))
    test = hashed_run.data.test
    unseen_ids = torch.unique(test.batch.categorical[unseen_mask(test.row_ids), column])
    train_ids = torch.unique(hashed_run.data.train.batch.categorical[:, column])
    loaded = load_run(hashed_run.run_dir)
    with torch.no_grad():
        rows = loaded.model.embeddings["item"](torch.cat([train_ids, unseen_ids]))

    assert torch.unique(rows, dim=0).shape[0] == NUM_SEEN_ITEMS + NUM_UNSEEN_ITEMS


def test_table_maps_unseen_ids_to_oov(table_data: Any) -> None:
    config, data = table_data
    column = item_column(list(data.encoders.categorical))
    test_ids = data.test.batch.categorical[:, column].numpy()

    assert np.array_equal(test_ids == OOV_ID, unseen_mask(data.test.row_ids))


def test_table_fits_vocabulary_on_training_items(table_data: Any) -> None:
    _config, data = table_data
    encoder = data.encoders.categorical["item"][1]

    assert isinstance(encoder, VocabularyEncoder)
    # The 40 training items and the padding and OOV ids.
    assert encoder.size == NUM_SEEN_ITEMS + 2


def test_table_gives_unseen_ids_one_shared_row(table_data: Any) -> None:
    config, data = table_data
    column = item_column(list(data.encoders.categorical))
    test = data.test
    unseen_ids = test.batch.categorical[unseen_mask(test.row_ids), column]  # (U,) all OOV
    model = build_ranker(config, data.encoders).eval()
    with torch.no_grad():
        rows = model.embeddings["item"](unseen_ids)

    assert torch.unique(rows, dim=0).shape[0] == 1


# ----------------------------------------------------------------------------------------------------
# embedding options in a run config


def test_misspelled_option_rejected(write_log: Any, config_dict: Any) -> None:
    raw = with_kinds(config_dict(write_log()), {"item": "dhe"})
    raw["features"][0]["embedding"]["options"] = {"num_hash": 8}
    config = parse_config(raw)
    encoders = prepare_data(config).encoders

    with pytest.raises(
        ConfigError, match=r"embedding kind `dhe` has no option `num_hash`; its options are: "
    ):
        build_ranker(config, encoders)


def test_dim_option_rejected(write_log: Any, config_dict: Any) -> None:
    raw = with_kinds(config_dict(write_log()), {"item": "hash"})
    raw["features"][0]["embedding"]["options"]["dim"] = 8
    config = parse_config(raw)
    encoders = prepare_data(config).encoders

    with pytest.raises(
        ConfigError, match=r"set the width as `embedding\.dim`, not as the `hash` option `dim`"
    ):
        build_ranker(config, encoders)
