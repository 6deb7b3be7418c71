"""Categorical values sent as JSON numbers or text score like the same values in the training file.

The run under test reads three number-coded categorical columns from a CSV file: ``shop``
(integers, written ``3``), ``grade`` (floats, written ``3.0`` or ``2.5``) and the shallow tower's
``device`` (integers). Its vocabularies therefore hold the file's text, such as ``"3"`` and ``"3.0"``.
Scores from the HTTP service and the batch scorer must equal those of ``mtrank predict`` on the
training file, whichever JSON form a value takes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from mtrank.config import parse_config
from mtrank.data.encoders import OOV_ID, VocabularyEncoder
from mtrank.serving.app import create_app
from mtrank.serving.scorer import Scorer, ServingVocabularyEncoder
from mtrank.training.run import train_run

NUM_ROWS = 240
# Training rows sent per request.
REQUEST_ROWS = 60
SHOPS = [1, 2, 3, 4, 5, 6]
GRADES = [1.0, 2.0, 2.5, 3.0, 4.0]
DEVICES = [1, 2, 3]
NUMBER_CODED = ("shop", "grade", "device")
# Seconds `mtrank predict` may take in a subprocess before the test fails.
PREDICT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def training_log(tmp_path_factory, write_log_in) -> Path:
    folder = tmp_path_factory.mktemp("categorical-json")
    rng = np.random.default_rng(5)
    return write_log_in(
        folder,
        num_rows=NUM_ROWS,
        shop=[SHOPS[i] for i in rng.integers(0, len(SHOPS), NUM_ROWS)],
        grade=[GRADES[i] for i in rng.integers(0, len(GRADES), NUM_ROWS)],
        device=[DEVICES[i] for i in rng.integers(0, len(DEVICES), NUM_ROWS)],
    )


@pytest.fixture(scope="module")
def run_dir(training_log: Path, config_dict) -> Path:
    raw = config_dict(training_log, tasks=("click", "watch_time"), position_bias=True)
    raw["features"] += [
        {"name": "shop", "type": "categorical", "embedding": {"dim": 4}},
        {"name": "grade", "type": "categorical", "embedding": {"dim": 4}},
    ]
    return train_run(parse_config(raw), training_log.parent / "run").run_dir


@pytest.fixture(scope="module")
def predicted(run_dir: Path, training_log: Path) -> np.ndarray:
    """``(NUM_ROWS, 2)`` scores that ``mtrank predict`` writes for the training file, in row order."""
    out = training_log.parent / "predicted.csv"
    command = [sys.executable, "-m", "mtrank.cli.main", "-q", "predict", str(run_dir)]
    command += ["--data", str(training_log), "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=PREDICT_TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    table = pacsv.read_csv(out)
    assert table.column("row").to_pylist() == list(range(NUM_ROWS))
    return np.column_stack([table.column("click").to_numpy(), table.column("watch_time").to_numpy()])


@pytest.fixture(scope="module")
def client(run_dir: Path) -> TestClient:
    return TestClient(create_app(run_dir))


@pytest.fixture(scope="module")
def file_rows(training_log: Path) -> list[dict[str, str]]:
    """The first :data:`REQUEST_ROWS` rows of the training file, every cell as its text."""
    names = pacsv.read_csv(training_log).column_names
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in names})
    return pacsv.read_csv(training_log, convert_options=convert).to_pylist()[:REQUEST_ROWS]


def as_int(text: str) -> int | float:
    number = float(text)
    return int(number) if number.is_integer() else number


def as_integer_text(text: str) -> str:
    return str(as_int(text))


# JSON form name -> how a cell's text becomes that form. Every form denotes the cell's value.
FORMS: dict[str, Callable[[str], Any]] = {
    "int": as_int,
    "float": float,
    "integer text": as_integer_text,
    "float text": lambda text: repr(float(text)),
    "file text": lambda text: text,
}


def request_rows(rows: list[dict[str, str]], form: str) -> list[dict[str, Any]]:
    """Rows whose number-coded categorical cells take JSON form ``form`` (``mixed``: a form per row)."""
    names = list(FORMS)
    converted = []
    for index, row in enumerate(rows):
        convert = FORMS[names[index % len(names)] if form == "mixed" else form]
        new = dict(row)
        for column in NUMBER_CODED:
            new[column] = convert(row[column])
        new["score"] = float(row["score"])
        new["age"] = int(row["age"])
        converted.append(new)
    return converted


def score_matrix(body: dict[str, Any]) -> np.ndarray:
    return np.array([[row[task] for task in body["tasks"]] for row in body["scores"]])


# ----------------------------------------------------------------------------------------------------
# The HTTP service


def test_vocabularies_hold_file_text(run_dir: Path) -> None:
    encoders = Scorer.from_run(run_dir).run.encoders

    assert "3.0" in encoders.categorical["grade"][1].vocabulary
    assert "2.5" in encoders.categorical["grade"][1].vocabulary
    assert "3" in encoders.categorical["shop"][1].vocabulary
    assert "3" in encoders.device["device"].vocabulary


@pytest.mark.parametrize("form", [*FORMS, "mixed"])
def test_json_forms_score_like_predict(
    client: TestClient, file_rows: list[dict[str, str]], predicted: np.ndarray, form: str
) -> None:
    response = client.post("/score", json={"rows": request_rows(file_rows, form)})

    assert response.status_code == 200, response.text
    assert np.allclose(score_matrix(response.json()), predicted[:REQUEST_ROWS], atol=1e-6)


@pytest.mark.parametrize("form", [*FORMS, "mixed"])
def test_json_forms_have_no_oov(client: TestClient, file_rows: list[dict[str, str]], form: str) -> None:
    body = client.post("/score", json={"rows": request_rows(file_rows, form)}).json()

    assert body["oov_counts"]["shop"] == 0
    assert body["oov_counts"]["grade"] == 0
    assert body["oov_counts"]["device"] == 0


def test_non_numeric_category_counted_as_oov(client: TestClient, file_rows: list[dict[str, str]]) -> None:
    rows = request_rows(file_rows[:3], "int")
    rows[0]["shop"] = "abc"
    rows[1]["grade"] = "three"

    body = client.post("/score", json={"rows": rows}).json()

    assert body["oov_counts"]["shop"] == 1
    assert body["oov_counts"]["grade"] == 1


def test_non_numeric_category_logged(
    client: TestClient, file_rows: list[dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    rows = request_rows(file_rows[:4], "int")
    rows[0]["shop"] = "abc"
    rows[1]["shop"] = "abc"
    rows[2]["shop"] = True

    with caplog.at_level(logging.WARNING, logger="mtrank.serving.scorer"):
        client.post("/score", json={"rows": rows})

    messages = [r.getMessage() for r in caplog.records if "column `shop`" in r.getMessage()]
    assert len(messages) == 1
    assert "3 value(s) are not numbers" in messages[0]
    assert "'abc'" in messages[0]
    assert "'true'" in messages[0]


def test_non_numeric_category_scored_as_unseen(client: TestClient, file_rows: list[dict[str, str]]) -> None:
    rows = request_rows(file_rows[:1], "int") * 3
    rows[0] = {**rows[0], "shop": "abc"}
    rows[1] = {**rows[1], "shop": 999}

    body = client.post("/score", json={"rows": rows}).json()

    assert body["scores"][0] == body["scores"][1]
    # The known shop scores differently, so the equality above is not a coincidence of the model.
    assert body["scores"][2] != body["scores"][0]


def test_non_integral_float_not_matched_to_integer(
    client: TestClient, file_rows: list[dict[str, str]]
) -> None:
    rows = request_rows(file_rows[:1], "int")
    rows[0]["shop"] = 3.5

    body = client.post("/score", json={"rows": rows}).json()

    assert body["oov_counts"]["shop"] == 1


# ----------------------------------------------------------------------------------------------------
# The batch scorer


def test_typed_parquet_scores_like_predict(
    run_dir: Path, training_log: Path, predicted: np.ndarray, tmp_path: Path
) -> None:
    # Parquet keeps types: pyarrow casts the float 3.0 to the text "3", not the training file's "3.0".
    table = pacsv.read_csv(training_log)
    assert table.schema.field("grade").type == pa.float64()
    assert table.schema.field("shop").type == pa.int64()
    path = tmp_path / "typed.parquet"
    pq.write_table(table, path)

    rows, scores = Scorer.from_run(run_dir).score_path(str(path))

    assert rows.tolist() == list(range(NUM_ROWS))
    assert np.allclose(scores, predicted, atol=1e-6)


def test_numeric_text_file_scores_like_predict(
    run_dir: Path, training_log: Path, predicted: np.ndarray, tmp_path: Path
) -> None:
    table = pacsv.read_csv(training_log)
    texts = {
        column: [as_integer_text(str(v)) for v in table.column(column).to_pylist()] for column in NUMBER_CODED
    }
    for column, values in texts.items():
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(values))
    path = tmp_path / "integer-text.csv"
    pacsv.write_csv(table, path)

    _rows, scores = Scorer.from_run(run_dir).score_path(str(path))

    assert np.allclose(scores, predicted, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# The encoder on its own


def serving_encoder(values: list[str | None]) -> ServingVocabularyEncoder:
    fitted = VocabularyEncoder(min_count=1).fit(pa.array(values, type=pa.string()))
    return ServingVocabularyEncoder.from_encoder(fitted, "column")


def test_encoder_keeps_training_ids() -> None:
    values = ["3.0", "3.0", "1.5", "7", None, "x"]
    fitted = VocabularyEncoder(min_count=1).fit(pa.array(values))

    served = ServingVocabularyEncoder.from_encoder(fitted, "column").transform(pa.array(values))

    assert served.values.tolist() == fitted.transform(pa.array(values)).values.tolist()


def test_encoder_matches_numeric_forms() -> None:
    # Vocabulary order (count descending, then text): "3.0" id 2, "1.5" id 3, "7" id 4.
    encoder = serving_encoder(["3.0", "3.0", "3.0", "1.5", "1.5", "7"])
    sent = pa.array(["3", "3.00", "+3", "3e0", "0.3e1", "1.50", "7.0", "07", "-7", "2"])

    ids = encoder.transform(sent).values.tolist()

    assert ids == [2, 2, 2, 2, 2, 3, 4, 4, OOV_ID, OOV_ID]


def test_encoder_matches_typed_columns() -> None:
    encoder = serving_encoder(["3.0", "3.0", "1.5", "7"])

    from_floats = encoder.transform(pa.array([3.0, 1.5, 7.0])).values.tolist()
    from_ints = encoder.transform(pa.array([3, 7])).values.tolist()

    assert from_floats == [2, 3, 4]
    assert from_ints == [2, 4]


def test_encoder_prefers_exact_text() -> None:
    # "3" (id 2) and "3.0" (id 3) are separate training categories, and each keeps its own id.
    encoder = serving_encoder(["3", "3", "3.0"])

    ids = encoder.transform(pa.array(["3", "3.0", "3.00"])).values.tolist()

    assert ids == [2, 3, 2]


def test_encoder_keeps_large_integer_identity() -> None:
    # 2**53 + 1 has no exact float64. The nearest float is 2**53, which is another category.
    encoder = serving_encoder(["9007199254740993"])

    exact = encoder.transform(pa.array([9007199254740993])).values.tolist()
    rounded = encoder.transform(pa.array([9007199254740992.0])).values.tolist()

    assert exact == [2]
    assert rounded == [OOV_ID]


def test_encoder_missing_value_is_its_category() -> None:
    # Both counts are 1, so text order decides: the missing key "\x00missing" gets id 2, "3" id 3.
    encoder = serving_encoder(["3", None])

    ids = encoder.transform(pa.array([None, 3.0])).values.tolist()

    assert ids == [2, 3]


def test_encoder_mixed_vocabulary_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    encoder = serving_encoder(["3", "a"])

    with caplog.at_level(logging.WARNING, logger="mtrank.serving.scorer"):
        ids = encoder.transform(pa.array(["b"])).values.tolist()

    assert ids == [OOV_ID]
    assert caplog.records == []


def test_encoder_huge_exponent_is_oov() -> None:
    encoder = serving_encoder(["3"])

    ids = encoder.transform(pa.array(["1e999999999999999999999"])).values.tolist()

    assert ids == [OOV_ID]


def test_encoder_serialises_like_vocabulary() -> None:
    fitted = VocabularyEncoder(min_count=2).fit(pa.array(["3", "3", "4"]))

    served = ServingVocabularyEncoder.from_encoder(fitted, "column")

    assert served.to_dict() == fitted.to_dict()
