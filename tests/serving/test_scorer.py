"""Tests of batch scoring over a trained run directory: one column per task, no position needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mtrank.config import parse_config
from mtrank.errors import ArtifactError, DataError
from mtrank.serving.scorer import Scorer
from mtrank.training.evaluation import predict
from mtrank.training.run import train_run

NUM_ROWS = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory, write_log_in, config_dict):
    """A run with a binary and a regression task and the position-bias tower, plus its folder."""
    folder = tmp_path_factory.mktemp("scorer")
    path = write_log_in(folder, num_rows=NUM_ROWS)
    config = parse_config(config_dict(path, tasks=("click", "watch_time"), position_bias=True))
    return train_run(config, folder / "run"), folder


def test_scores_match_trained_model(trained) -> None:
    result, folder = trained
    scorer = Scorer.from_run(result.run_dir)

    rows, predictions = scorer.score_path(str(folder / "log.csv"))

    expected = predict(result.model, result.data.test, ["bce", "mse"])
    assert rows.tolist() == list(range(NUM_ROWS))
    assert np.allclose(predictions[result.data.test.row_ids], expected, atol=1e-6)


def test_csv_output_has_one_column_per_task(trained, tmp_path: Path) -> None:
    result, folder = trained
    out = tmp_path / "scores.csv"

    written = Scorer.from_run(result.run_dir).score_file(str(folder / "log.csv"), out)

    table = pacsv.read_csv(out)
    assert written == NUM_ROWS
    assert table.column_names == ["row", "click", "watch_time"]
    assert table.num_rows == NUM_ROWS


def test_binary_scores_are_probabilities(trained, tmp_path: Path) -> None:
    result, folder = trained
    out = tmp_path / "scores.parquet"

    Scorer.from_run(result.run_dir).score_file(str(folder / "log.csv"), out)

    clicks = np.asarray(pq.read_table(out).column("click").to_pylist())
    assert clicks.min() > 0.0
    assert clicks.max() < 1.0


def test_parquet_and_csv_outputs_agree(trained, tmp_path: Path) -> None:
    result, folder = trained
    scorer = Scorer.from_run(result.run_dir)

    scorer.score_file(str(folder / "log.csv"), tmp_path / "scores.csv")
    scorer.score_file(str(folder / "log.csv"), tmp_path / "scores.parquet")

    from_csv = pacsv.read_csv(tmp_path / "scores.csv")
    from_parquet = pq.read_table(tmp_path / "scores.parquet")
    assert from_parquet.column_names == ["row", "click", "watch_time"]
    assert from_parquet.column("row").to_pylist() == from_csv.column("row").to_pylist()
    assert np.allclose(from_parquet.column("watch_time").to_numpy(), from_csv.column("watch_time").to_numpy())


def test_scoring_without_position_or_labels(trained, write_log, tmp_path: Path) -> None:
    result, _folder = trained
    scorer = Scorer.from_run(result.run_dir)
    with_position = write_log("full.csv", num_rows=40, seed=5)
    bare = write_log("bare.csv", num_rows=40, seed=5, drop=["position", "click", "noise", "watch_time"])

    rows, predictions = scorer.score_path(str(bare))
    _rows, reference = scorer.score_path(str(with_position))

    assert rows.tolist() == list(range(40))
    assert predictions.shape == (40, 2)
    assert np.array_equal(predictions, reference)


def test_scores_ignore_supplied_position(trained, write_log) -> None:
    result, _folder = trained
    scorer = Scorer.from_run(result.run_dir)
    first = write_log("first.csv", num_rows=40, seed=5, position=[1] * 40)
    last = write_log("last.csv", num_rows=40, seed=5, position=[5] * 40)

    _rows, at_first = scorer.score_path(str(first))
    _rows, at_last = scorer.score_path(str(last))

    assert np.array_equal(at_first, at_last)


def test_parquet_input_scored(trained, write_log, tmp_path: Path) -> None:
    result, _folder = trained
    path = write_log("serve.parquet", num_rows=25, seed=6, drop=["position"])

    written = Scorer.from_run(result.run_dir).score_file(str(path), tmp_path / "out" / "scores.csv")

    assert written == 25
    assert (tmp_path / "out" / "scores.csv").is_file()


def test_invalid_rows_skipped_when_scoring(trained, write_log) -> None:
    result, _folder = trained
    scores = ["0.5"] * 20
    scores[4] = "abc"
    path = write_log("serve.csv", num_rows=20, seed=7, score=scores)

    rows, predictions = Scorer.from_run(result.run_dir).score_path(str(path))

    assert 4 not in rows.tolist()
    assert len(rows) == 19
    assert predictions.shape == (19, 2)


def test_unknown_output_suffix_rejected(trained, tmp_path: Path) -> None:
    result, folder = trained

    with pytest.raises(DataError, match=r"--out .*scores\.json: use a \.csv or \.parquet file name"):
        Scorer.from_run(result.run_dir).score_file(str(folder / "log.csv"), tmp_path / "scores.json")


def test_unfinished_run_rejected(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("name: x\n", encoding="utf-8")

    with pytest.raises(ArtifactError, match=r"is not a finished run: encoders\.json is missing"):
        Scorer.from_run(tmp_path)
