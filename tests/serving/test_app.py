"""Tests of the HTTP scoring service: endpoints, validation errors, combination, PEFT, a real server.

The run under test has a binary task (``click``) and a regression task (``watch_time``) and the
position-bias shallow tower over ``position`` and ``device``.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.csv as pacsv
import pytest
import uvicorn
from fastapi.testclient import TestClient

from mtrank.config import parse_config
from mtrank.errors import ArtifactError, DataError
from mtrank.serving.app import _categorical_column, combine_scores, create_app, required_columns
from mtrank.serving.scorer import Scorer
from mtrank.training.finetune import finetune, parse_finetune_config
from mtrank.training.run import train_run

TASKS = ["click", "watch_time"]
REQUIRED = ["item", "city", "score", "age", "device"]
SERVE_ROWS = 37
# Seconds a test waits for a server to start or to stop by itself before it fails.
SERVER_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, write_log_in, config_dict) -> Path:
    """A trained run over 300 synthetic rows."""
    folder = tmp_path_factory.mktemp("app")
    path = write_log_in(folder, num_rows=300)
    config = parse_config(config_dict(path, tasks=("click", "watch_time"), position_bias=True))
    return train_run(config, folder / "run").run_dir


@pytest.fixture(scope="module")
def client(run_dir: Path) -> TestClient:
    return TestClient(create_app(run_dir))


@pytest.fixture(scope="module")
def serve_log(tmp_path_factory, write_log_in) -> Path:
    """37 rows the run has not seen, without labels or position."""
    folder = tmp_path_factory.mktemp("serve-rows")
    return write_log_in(
        folder,
        "serve.csv",
        num_rows=SERVE_ROWS,
        seed=11,
        drop=["position", "click", "noise", "watch_time", "date"],
    )


def csv_rows(path: Path) -> list[dict[str, Any]]:
    """Read a CSV with pyarrow's type inference, as the scorer does, and return its rows as dicts."""
    return pacsv.read_csv(path).to_pylist()


def score_matrix(body: dict[str, Any]) -> np.ndarray:
    return np.array([[row[task] for task in body["tasks"]] for row in body["scores"]])


def one_row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"item": "i1", "city": "c1", "score": 0.25, "age": 30, "device": "phone"}
    row.update(changes)
    return row


# ----------------------------------------------------------------------------------------------------
# GET endpoints


def test_health_reports_run(client: TestClient, run_dir: Path) -> None:
    body = client.get("/health").json()

    model = Scorer.from_run(run_dir).run.model
    assert body["status"] == "ok"
    assert body["run"] == "synthetic"
    assert body["tasks"] == TASKS
    assert body["peft_set"] is None
    assert body["parameters"] == sum(p.numel() for p in model.parameters())


def test_metadata_lists_required_columns(client: TestClient) -> None:
    body = client.get("/metadata").json()

    assert body["required_columns"] == REQUIRED
    assert body["position"]["column"] == "position"
    assert body["position"]["required"] is False
    assert body["device_columns"] == ["device"]
    assert body["max_rows"] == 10_000


def test_metadata_feature_types(client: TestClient) -> None:
    body = client.get("/metadata").json()

    types = {feature["name"]: feature["type"] for feature in body["features"]}
    tasks = {task["name"]: task["score"] for task in body["tasks"]}
    assert types == {"item": "categorical", "city": "categorical", "score": "numeric", "age": "numeric"}
    assert tasks == {"click": "probability", "watch_time": "prediction"}


# ----------------------------------------------------------------------------------------------------
# POST /score


def test_scores_equal_scorer(client: TestClient, run_dir: Path, serve_log: Path) -> None:
    _row_ids, expected = Scorer.from_run(run_dir).score_path(str(serve_log))

    response = client.post("/score", json={"rows": csv_rows(serve_log)})

    body = response.json()
    assert response.status_code == 200
    assert body["tasks"] == TASKS
    assert len(body["scores"]) == SERVE_ROWS
    assert np.allclose(score_matrix(body), expected, atol=1e-6)


def test_scores_without_combine_leave_combined_null(client: TestClient) -> None:
    body = client.post("/score", json={"rows": [one_row()]}).json()

    assert body["combined"] is None


def test_supplied_position_ignored(client: TestClient, serve_log: Path) -> None:
    rows = csv_rows(serve_log)

    bare = client.post("/score", json={"rows": rows}).json()
    first = client.post("/score", json={"rows": [dict(row, position=1) for row in rows]}).json()
    last = client.post("/score", json={"rows": [dict(row, position=5) for row in rows]}).json()

    assert first["scores"] == bare["scores"]
    assert last["scores"] == bare["scores"]


def test_extra_keys_ignored(client: TestClient) -> None:
    plain = client.post("/score", json={"rows": [one_row()]}).json()
    extra = client.post("/score", json={"rows": [one_row(click=1, request="r-7")]}).json()

    assert extra["scores"] == plain["scores"]


def test_binary_scores_are_probabilities(client: TestClient, serve_log: Path) -> None:
    body = client.post("/score", json={"rows": csv_rows(serve_log)}).json()

    clicks = np.array([row["click"] for row in body["scores"]])
    assert clicks.min() > 0.0
    assert clicks.max() < 1.0


def test_numeric_text_scored_like_numbers(client: TestClient) -> None:
    as_numbers = client.post("/score", json={"rows": [one_row(score=0.25, age=30)]}).json()
    as_text = client.post("/score", json={"rows": [one_row(score="0.25", age="30")]}).json()

    assert as_text["scores"] == as_numbers["scores"]


def test_mixed_type_categorical_read_as_text() -> None:
    # Expected text: what pyarrow's cast gives for a typed int, float or bool column.
    column = _categorical_column([7, "i1", 5.0, 2.5, True, None, 10**30])

    assert column.to_pylist() == ["7", "i1", "5", "2.5", "true", None, "1" + "0" * 30]


def test_null_values_accepted(client: TestClient) -> None:
    response = client.post("/score", json={"rows": [one_row(city=None, score=None, device=None)]})

    assert response.status_code == 200
    assert len(response.json()["scores"]) == 1


def test_unseen_categories_counted_as_oov(client: TestClient) -> None:
    rows = [one_row(item="never-seen"), one_row(item="also-new", device="smart-tv"), one_row()]

    response = client.post("/score", json={"rows": rows})

    assert response.status_code == 200
    assert response.json()["oov_counts"] == {"item": 2, "city": 0, "device": 1}


def test_unseen_category_scored_as_oov_id(client: TestClient) -> None:
    # Two different unseen values share the OOV id, so every score matches.
    body = client.post("/score", json={"rows": [one_row(item="new-a"), one_row(item="new-b")]}).json()

    assert body["scores"][0] == body["scores"][1]


# ----------------------------------------------------------------------------------------------------
# Objective combination


def test_weighted_sum_combines_scores(client: TestClient, serve_log: Path) -> None:
    combine = {"weights": {"click": 1.0, "watch_time": 0.5}, "method": "weighted_sum"}

    body = client.post("/score", json={"rows": csv_rows(serve_log), "combine": combine}).json()

    expected = [row["click"] + 0.5 * row["watch_time"] for row in body["scores"]]
    assert np.allclose(body["combined"], expected, rtol=1e-12)


def test_weighted_product_combines_scores(client: TestClient, serve_log: Path) -> None:
    combine = {"weights": {"click": 2.0}, "method": "weighted_product"}

    body = client.post("/score", json={"rows": csv_rows(serve_log), "combine": combine}).json()

    expected = [row["click"] ** 2 for row in body["scores"]]
    assert np.allclose(body["combined"], expected, rtol=1e-12)


def test_combine_product_golden_value() -> None:
    # By hand: 0.5 ** 2 * 0.25 ** 1 = 0.0625. The third task has no weight, so it takes no part.
    predictions = np.array([[0.5, 0.25, -3.0]])

    combined = combine_scores(predictions, ["a", "b", "c"], {"a": 2.0, "b": 1.0}, "weighted_product")

    assert combined.tolist() == pytest.approx([0.0625], rel=1e-12)


def test_combine_sum_golden_value() -> None:
    # By hand: 2 * 0.5 - 1 * 0.25 = 0.75.
    predictions = np.array([[0.5, 0.25]])

    combined = combine_scores(predictions, ["a", "b"], {"a": 2.0, "b": -1.0}, "weighted_sum")

    assert combined.tolist() == pytest.approx([0.75], rel=1e-12)


def test_combine_product_rejects_non_positive_score() -> None:
    predictions = np.array([[0.5, 0.25], [0.5, -0.1]])

    with pytest.raises(DataError, match=r"needs scores > 0, but task `b` scored -0\.1 at row 1"):
        combine_scores(predictions, ["a", "b"], {"a": 1.0, "b": 1.0}, "weighted_product")


def test_combine_rejects_non_finite_result() -> None:
    predictions = np.array([[1e-300, 0.5]])

    with pytest.raises(DataError, match=r"combined score of row 0 is inf"):
        combine_scores(predictions, ["a", "b"], {"a": -2.0}, "weighted_product")


def test_combine_unknown_task_rejected(client: TestClient) -> None:
    response = client.post("/score", json={"rows": [one_row()], "combine": {"weights": {"like": 1.0}}})

    assert response.status_code == 422
    assert "unknown task(s) ['like']" in response.json()["detail"]
    assert "['click', 'watch_time']" in response.json()["detail"]


def test_combine_unknown_method_rejected(client: TestClient) -> None:
    combine = {"weights": {"click": 1.0}, "method": "max"}

    response = client.post("/score", json={"rows": [one_row()], "combine": combine})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "combine", "method"]


# ----------------------------------------------------------------------------------------------------
# Validation errors


def test_missing_columns_rejected(client: TestClient) -> None:
    rows = [one_row(), {"item": "i1", "city": "c1", "score": 0.1}]

    response = client.post("/score", json={"rows": rows})

    detail = response.json()["detail"]
    assert response.status_code == 422
    assert "`age` (row 1)" in detail
    assert "`device` (row 1)" in detail
    assert "`item`" not in detail


def test_non_numeric_value_rejected(client: TestClient) -> None:
    rows = [one_row(), one_row(), one_row(score="abc")]

    response = client.post("/score", json={"rows": rows})

    assert response.status_code == 422
    assert "row 2, key `score`: 'abc' (not a number or out of float32 range)" in response.json()["detail"]


@pytest.mark.parametrize("value", [1e308, "1e400"])
def test_value_beyond_float32_rejected(client: TestClient, value: object) -> None:
    # In a float32 tensor the value would be infinite and the score NaN.
    response = client.post("/score", json={"rows": [one_row(), one_row(score=value)]})

    assert response.status_code == 422
    assert "row 1, key `score`" in response.json()["detail"]


@pytest.mark.parametrize(
    ("value", "shown"),
    [(True, "True is not a finite number"), ([1, 2], "[1, 2] is not a finite number")],
)
def test_wrong_numeric_type_rejected(client: TestClient, value: Any, shown: str) -> None:
    response = client.post("/score", json={"rows": [one_row(age=value)]})

    assert response.status_code == 422
    assert f"row 0, key `age`: {shown}" in response.json()["detail"]


def test_nan_number_rejected(client: TestClient) -> None:
    # Python's JSON parser accepts the NaN literal, so the service must reject it itself.
    content = '{"rows": [{"item": "i1", "city": "c1", "score": NaN, "age": 1, "device": "phone"}]}'

    response = client.post("/score", content=content, headers={"content-type": "application/json"})

    assert response.status_code == 422
    assert "row 0, key `score`: nan is not a finite number" in response.json()["detail"]


def test_nested_categorical_value_rejected(client: TestClient) -> None:
    response = client.post("/score", json={"rows": [one_row(city={"name": "c1"})]})

    assert response.status_code == 422
    assert "row 0, key `city`: {'name': 'c1'} is not a string, number or null" in response.json()["detail"]


def test_every_invalid_value_reported(client: TestClient) -> None:
    rows = [one_row(score="x"), one_row(age=False), one_row(item=[1])]

    detail = client.post("/score", json={"rows": rows}).json()["detail"]

    assert "row 0, key `score`" in detail
    assert "row 1, key `age`" in detail
    assert "row 2, key `item`" in detail


def test_row_limit_rejected_with_413(run_dir: Path) -> None:
    limited = TestClient(create_app(run_dir, max_rows=3))

    accepted = limited.post("/score", json={"rows": [one_row()] * 3})
    rejected = limited.post("/score", json={"rows": [one_row()] * 4})

    assert accepted.status_code == 200
    assert rejected.status_code == 413
    assert "4 rows exceed this server's limit of 3" in rejected.json()["detail"]


def test_empty_rows_rejected(client: TestClient) -> None:
    response = client.post("/score", json={"rows": []})

    assert response.status_code == 422


def test_invalid_max_rows_rejected(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_rows must be at least 1, got 0"):
        create_app(run_dir, max_rows=0)


def test_unfinished_run_rejected(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="is not a finished run"):
        create_app(tmp_path)


def test_required_columns_skip_position(run_dir: Path) -> None:
    encoders = Scorer.from_run(run_dir).run.encoders

    assert required_columns(encoders) == REQUIRED


# ----------------------------------------------------------------------------------------------------
# Request ids and logging


def test_request_id_echoed(client: TestClient) -> None:
    response = client.get("/health", headers={"X-Request-ID": "req-42"})

    assert response.headers["X-Request-ID"] == "req-42"


def test_invalid_request_id_replaced(client: TestClient) -> None:
    response = client.get("/health", headers={"X-Request-ID": "bad id with spaces"})

    assert response.headers["X-Request-ID"] != "bad id with spaces"
    assert len(response.headers["X-Request-ID"]) == 16


def test_rejection_logged_with_request_id(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mtrank.serving.app"):
        client.post("/score", json={"rows": [one_row(score="abc")]}, headers={"X-Request-ID": "req-bad-1"})

    messages = [record.getMessage() for record in caplog.records]
    assert any("request req-bad-1: rejected with 422" in message for message in messages)


def test_body_error_logged_with_request_id(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mtrank.serving.app"):
        client.post("/score", json={"rows": "not a list"}, headers={"X-Request-ID": "req-bad-2"})

    messages = [record.getMessage() for record in caplog.records]
    assert any("request req-bad-2: POST /score rejected with 422" in message for message in messages)


def test_limit_logged_with_request_id(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    limited = TestClient(create_app(run_dir, max_rows=1))

    with caplog.at_level(logging.WARNING, logger="mtrank.serving.app"):
        limited.post("/score", json={"rows": [one_row()] * 2}, headers={"X-Request-ID": "req-big"})

    messages = [record.getMessage() for record in caplog.records]
    assert any("request req-big: rejected with 413, 2 rows > limit 1" in message for message in messages)


# ----------------------------------------------------------------------------------------------------
# PEFT


@pytest.fixture(scope="module")
def peft_set(run_dir: Path) -> str:
    """Fine-tune the run with LoRA and a new ``long_watch`` task; return the set name."""
    log = run_dir.parent / "log.csv"
    raw = {
        "name": "long_watch_lora",
        "seed": 5,
        "data": {
            "path": str(log),
            "split": {"method": "random", "test_fraction": 0.3, "valid_fraction": 0.1},
        },
        "new_tasks": [
            {"name": "long_watch", "type": "binary", "label": {"column": "watch_time", "greater_than": 1.0}}
        ],
        "peft": {"lora": {"options": {"rank": 2}}},
        "training": {"epochs": 1, "batch_size": 64, "lr": 0.01, "early_stopping": None},
    }
    return finetune(run_dir, parse_finetune_config(raw), "lora").set_name


def test_peft_scores_equal_scorer(run_dir: Path, peft_set: str, serve_log: Path) -> None:
    peft_client = TestClient(create_app(run_dir, peft=peft_set))
    _row_ids, expected = Scorer.from_run(run_dir, peft=peft_set).score_path(str(serve_log))

    body = peft_client.post("/score", json={"rows": csv_rows(serve_log)}).json()

    assert body["tasks"] == [*TASKS, "long_watch"]
    assert np.allclose(score_matrix(body), expected, atol=1e-6)


def test_peft_health_names_set(run_dir: Path, peft_set: str) -> None:
    body = TestClient(create_app(run_dir, peft=peft_set)).get("/health").json()

    assert body["peft_set"] == peft_set
    assert body["tasks"] == [*TASKS, "long_watch"]


# ----------------------------------------------------------------------------------------------------
# Real servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_health(url: str, deadline: float) -> httpx.Response:
    """Poll GET /health until the server responds, ignoring connection errors until ``deadline``."""
    while True:
        try:
            return httpx.get(f"{url}/health", timeout=5.0)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_uvicorn_server_scores(run_dir: Path, serve_log: Path) -> None:
    port = free_port()
    # The server exits by itself after three requests: /health, /score and /metadata.
    config = uvicorn.Config(
        create_app(run_dir), host="127.0.0.1", port=port, limit_max_requests=3, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        health = httpx.get(f"{url}/health", timeout=10.0)
        scored = httpx.post(f"{url}/score", json={"rows": csv_rows(serve_log)}, timeout=30.0)
        metadata = httpx.get(f"{url}/metadata", timeout=10.0)
    finally:
        thread.join(timeout=SERVER_TIMEOUT_S)
        server.should_exit = True

    _row_ids, expected = Scorer.from_run(run_dir).score_path(str(serve_log))
    assert health.json()["status"] == "ok"
    assert np.allclose(score_matrix(scored.json()), expected, atol=1e-6)
    assert metadata.json()["required_columns"] == REQUIRED
    assert not thread.is_alive()


CLI_SCRIPT = (
    "import typer\nfrom mtrank.cli.serve_export import register\napp = typer.Typer()\nregister(app)\napp()\n"
)


def test_serve_command_runs_server(run_dir: Path) -> None:
    port = free_port()
    command = [sys.executable, "-c", CLI_SCRIPT, "serve", str(run_dir), "--port", str(port)]
    command += ["--limit-max-requests", "2", "--max-rows", "5", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_for_health(url, time.monotonic() + SERVER_TIMEOUT_S)
        too_many = httpx.post(f"{url}/score", json={"rows": [one_row()] * 6}, timeout=10.0)
        output, _ = process.communicate(timeout=SERVER_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert health.json()["tasks"] == TASKS
    assert too_many.status_code == 413
    assert process.returncode == 0, output.decode(errors="replace")
    assert f"http://127.0.0.1:{port}" in output.decode(errors="replace")


def test_serve_command_default_host_is_loopback() -> None:
    import inspect

    from mtrank.cli.serve_export import DEFAULT_HOST, serve

    default = inspect.signature(serve).parameters["host"].default.default

    assert DEFAULT_HOST == "127.0.0.1"
    assert default == DEFAULT_HOST


def test_integer_beyond_float_range_rejected(client: TestClient) -> None:
    # math.isfinite overflows on such an int; the service must still return 422, not 500.
    response = client.post("/score", json={"rows": [one_row(score=10**400)]})

    assert response.status_code == 422
    assert "row 0, key `score`" in response.json()["detail"]
