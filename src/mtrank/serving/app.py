"""HTTP scoring service over a trained run (FastAPI).

Endpoints:

- ``GET /health``: status, run name, PEFT set, task names and the model's parameter count.
- ``GET /metadata``: features with their types, tasks, the required columns, and the position
  column, which is not required because scoring never reads it.
- ``POST /score``: ``{"rows": [{column: value, ...}, ...], "combine": {...}?}`` ->
  ``{"tasks": [...], "scores": [{task: score, ...}, ...], "combined": [...] | null,
  "oov_counts": {feature: count}}``.

A request is scored in whole columns: the rows become one pyarrow table, the run's fitted encoders
encode it, and the model runs once per ``eval_batch_size`` rows in eval mode under
``torch.inference_mode``. Every response carries an ``X-Request-ID`` header (the client's, when it
sends a valid one), and every rejected request is logged with that id.

Categorical values go through :class:`~mtrank.serving.scorer.ServingVocabularyEncoder`, so a
category that training read as ``"3.0"`` is found whether a row sends ``3``, ``3.0``, ``"3"`` or
``"3.0"``.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from mtrank.data.encoders import OOV_ID, VocabularyEncoder
from mtrank.data.pipeline import MAX_EXAMPLES, FeatureEncoders
from mtrank.data.readers import clean_text_columns
from mtrank.errors import DataError
from mtrank.serving.scorer import Scorer
from mtrank.training.evaluation import predict

logger = logging.getLogger(__name__)

# Rows accepted per POST /score unless `create_app` gets another limit; larger requests get 413 and
# the client splits them. 10,000 rows of the 10-column test log are a 1.5 MB JSON body and took
# 0.3-0.7 s per request through TestClient (torch 2.13 CPU, 1 thread, a busy 2-core machine).
DEFAULT_MAX_ROWS = 10_000
REQUEST_ID_HEADER = "X-Request-ID"
# A client-sent request id is used only when it matches this, so it cannot inject text into log lines.
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Maximum length of a rejected value's repr in an error message or log line.
MAX_VALUE_CHARS = 80
# Prefix of a device column's key in `oov_counts` when a categorical feature has the same name.
SHALLOW_TOWER_KEY_PREFIX = "shallow_tower/"

CombineMethod = Literal["weighted_sum", "weighted_product"]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


# ----------------------------------------------------------------------------------------------------
# Request and response bodies


class CombineRequest(BaseModel):
    """How to combine the task scores of each row into one ranking score.

    ``weighted_sum``: ``combined = sum_t w_t * s_t``. ``weighted_product``: ``combined = prod_t s_t ** w_t``,
    computed as ``exp(sum_t w_t * log s_t)``, which needs ``s_t > 0`` for every task with a weight.
    Tasks without a weight do not take part.
    """

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, FiniteFloat] = Field(min_length=1, description="task name -> weight (exponent)")
    method: CombineMethod = "weighted_sum"


class ScoreRequest(BaseModel):
    """Rows to score, each a mapping from column name to value, and an optional combination."""

    model_config = ConfigDict(extra="forbid")

    rows: list[dict[str, Any]] = Field(min_length=1, description="one object per row: column -> value")
    combine: CombineRequest | None = None


class ScoreResponse(BaseModel):
    """Scores per row and task, the optional combined score, and out-of-vocabulary counts."""

    tasks: list[str]
    scores: list[dict[str, float]] = Field(description="per row: task -> probability or predicted value")
    combined: list[float] | None = Field(description="per row: the combined score, when `combine` was sent")
    oov_counts: dict[str, int] = Field(
        description="per vocabulary feature: rows whose value the training data lacked"
    )


class HealthResponse(BaseModel):
    """Liveness and identity of the loaded run."""

    status: Literal["ok"]
    run: str
    peft_set: str | None
    tasks: list[str]
    parameters: int


# ----------------------------------------------------------------------------------------------------
# Rows -> table -> scores, without any HTTP


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def _row_list(rows: Sequence[int]) -> str:
    listed = ", ".join(str(r) for r in rows[:MAX_EXAMPLES])
    more = f" and {len(rows) - MAX_EXAMPLES} more" if len(rows) > MAX_EXAMPLES else ""
    return f"{'row' if len(rows) == 1 else 'rows'} {listed}{more}"


def required_columns(encoders: FeatureEncoders) -> list[str]:
    """Return the columns every row must contain: feature sources and the shallow tower's device columns.

    The position column is not among them unless a feature reads it too.
    """
    columns = [source for source, _ in encoders.categorical.values()]
    columns += [source for source, _ in encoders.numeric.values()]
    columns += list(encoders.device)
    return list(dict.fromkeys(columns))


def _categorical_column(values: list[Any]) -> pa.Array:
    """Build a categorical column of JSON values, typed where they share one type and text otherwise.

    Mixed values become the text that pyarrow's cast gives a typed column, so ``5.0`` becomes ``"5"``.
    The serving encoders then match numbers by value, so this text need not equal the training text.
    """
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        array = None  # mixed types, or an integer beyond int64
    if array is not None and (
        pa.types.is_string(array.type)
        or pa.types.is_integer(array.type)
        or pa.types.is_floating(array.type)
        or pa.types.is_boolean(array.type)
        or pa.types.is_null(array.type)
    ):
        return array
    # Mixed types: format each value as Arrow casts a typed column to text ("5" for 5.0, "true").
    texts: list[str | None] = []
    for value in values:
        if value is None or isinstance(value, str):
            texts.append(value)
        elif isinstance(value, bool):
            texts.append("true" if value else "false")
        elif isinstance(value, int):
            texts.append(str(value))
        else:
            texts.append(pc.cast(pa.array([value], type=pa.float64()), pa.string())[0].as_py())
    return pa.array(texts, type=pa.string())


def _numeric_column(values: list[Any]) -> tuple[pa.Array, np.ndarray]:
    """Build a numeric column: typed when every value is a number or null, else text for the encoder to parse.

    Returns:
        The column and the ``(N,)`` mask of values that are not finite numbers, text or null, such
        as booleans, lists, objects, NaN and infinities. Those rows hold null in the column.
    """
    wrong_type = np.zeros(len(values), dtype=bool)
    cleaned: list[Any] = []
    for i, value in enumerate(values):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        # A Python int is always finite, and math.isfinite overflows on one beyond float's range.
        finite = number and (isinstance(value, int) or math.isfinite(value))
        if value is None or isinstance(value, str) or finite:
            cleaned.append(value)
        else:
            wrong_type[i] = True
            cleaned.append(None)
    if not any(isinstance(value, str) for value in cleaned):
        try:
            return pa.array(cleaned, type=pa.float64()), wrong_type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass  # an integer that float64 cannot hold exactly: parse it from text below, rounded
    # repr keeps every digit of a float; the encoder parses text like a CSV cell.
    texts = [value if value is None or isinstance(value, str) else repr(value) for value in cleaned]
    return pa.array(texts, type=pa.string()), wrong_type


def rows_to_table(
    rows: Sequence[dict[str, Any]],
    encoders: FeatureEncoders,
    *,
    strip: bool = True,
    missing_values: Sequence[str] = (),
) -> pa.Table:
    """Build one pyarrow table of the required columns from JSON rows, checking every value.

    Keys that are not required (the position column, labels, ids) are ignored. A null is a missing
    value: its own category for categorical features, the training mean for numeric ones.

    Args:
        rows: the request rows.
        encoders: the run's fitted encoders.
        strip: strip surrounding spaces from text values, as the run's ``data.strip`` did in training.
        missing_values: text values that mean missing, the run's ``data.missing_values``.

    Returns:
        A table with one column per :func:`required_columns` entry, ``len(rows)`` rows.

    Raises:
        DataError: a row lacks a required column, a categorical value is a list or object, or a
            numeric value is not a finite number, numeric text or null. The message names the rows,
            keys and values.
    """
    required = required_columns(encoders)
    missing: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        for key in required:
            if key not in row:
                missing.setdefault(key, []).append(index)
    if missing:
        parts = ", ".join(f"`{key}` ({_row_list(found)})" for key, found in missing.items())
        raise DataError(
            f"missing required column(s): {parts}; every row needs every column in GET /metadata "
            "`required_columns`, with null for a missing value"
        )

    numeric_sources = {source for source, _ in encoders.numeric.values()}
    arrays: dict[str, pa.Array] = {}
    problems: list[str] = []
    for key in required:
        values = [row[key] for row in rows]
        if key in numeric_sources:
            arrays[key], wrong_type = _numeric_column(values)
            bad = [int(i) for i in np.flatnonzero(wrong_type)]
            reason = "is not a finite number"
        else:
            bad = [i for i, value in enumerate(values) if isinstance(value, (list, dict))]
            arrays[key] = pa.nulls(len(values)) if bad else _categorical_column(values)
            reason = "is not a string, number or null"
        problems += [f"row {i}, key `{key}`: {_quote(values[i])} {reason}" for i in bad[:MAX_EXAMPLES]]
        if len(bad) > MAX_EXAMPLES:
            problems.append(f"{len(bad) - MAX_EXAMPLES} more in `{key}`")
    # The same text cleaning as the training files got, so a row scores as it would from a file.
    table = clean_text_columns(pa.table(arrays), strip=strip, missing_values=missing_values)

    # The encoders' own checks, as on training data: numeric text that is not a number, or a
    # negative value under log1p.
    for column, (mask, reason) in encoders.find_invalid(table, with_labels=False).items():
        bad = [int(i) for i in np.flatnonzero(mask)]
        problems += [
            f"row {i}, key `{column}`: {_quote(rows[i][column])} ({reason})" for i in bad[:MAX_EXAMPLES]
        ]
        if len(bad) > MAX_EXAMPLES:
            problems.append(f"{len(bad) - MAX_EXAMPLES} more in `{column}`")
    if problems:
        raise DataError(
            "invalid value(s): " + "; ".join(problems) + "; send numbers or numeric text for numeric "
            "columns, strings or numbers for categorical ones, or null for a missing value"
        )
    return table


def count_oov(
    encoders: FeatureEncoders, categorical: torch.Tensor, device: torch.Tensor | None
) -> dict[str, int]:
    """Count, per vocabulary feature and device column, the rows encoded as the out-of-vocabulary id.

    Args:
        encoders: the run's fitted encoders.
        categorical: ``(N, Fc)`` encoded ids.
        device: ``(N, Fd)`` encoded device ids, or ``None``.

    Returns:
        Feature name (or device column) -> count. Raw-id features (hashing, DHE) have no vocabulary
        and are left out. A device column whose name is also a feature name gets the key
        ``shallow_tower/<column>``.
    """
    counts: dict[str, int] = {}
    for j, (name, (_source, encoder)) in enumerate(encoders.categorical.items()):
        if isinstance(encoder, VocabularyEncoder):
            counts[name] = int((categorical[:, j] == OOV_ID).sum())
    if device is not None:
        for j, column in enumerate(encoders.device):
            key = SHALLOW_TOWER_KEY_PREFIX + column if column in counts else column
            counts[key] = int((device[:, j] == OOV_ID).sum())
    return counts


def combine_scores(
    predictions: np.ndarray, task_names: Sequence[str], weights: dict[str, float], method: CombineMethod
) -> np.ndarray:
    """Combine task scores into one score per row.

    ``weighted_sum``: ``sum_t w_t * s_t``. ``weighted_product``: ``prod_t s_t ** w_t``, computed as
    ``exp(sum_t w_t * log s_t)``. Tasks absent from ``weights`` do not take part.

    Args:
        predictions: ``(N, T)`` task scores.
        task_names: the T task names, in column order.
        weights: task name -> weight.
        method: ``weighted_sum`` or ``weighted_product``.

    Returns:
        ``(N,)`` float64 combined scores.

    Raises:
        DataError: a weight names an unknown task, ``weighted_product`` meets a score <= 0 on a
            weighted task, or a combined score is not finite.
    """
    unknown = sorted(set(weights) - set(task_names))
    if unknown:
        raise DataError(
            f"combine.weights names unknown task(s) {unknown}; the run's tasks are {list(task_names)}"
        )
    chosen = [t for t, name in enumerate(task_names) if name in weights]
    scores = predictions[:, chosen].astype(np.float64)  # (N, T') with T' weighted tasks
    vector = np.array([weights[task_names[t]] for t in chosen], dtype=np.float64)  # (T',)
    if method == "weighted_sum":
        with np.errstate(over="ignore", invalid="ignore"):  # checked for finiteness below
            combined = scores @ vector  # (N, T') @ (T',) -> (N,)
    else:
        non_positive = np.argwhere(scores <= 0)
        if len(non_positive):
            row, column = (int(v) for v in non_positive[0])
            task = task_names[chosen[column]]
            raise DataError(
                f"combine method `weighted_product` needs scores > 0, but task `{task}` scored "
                f"{float(scores[row, column])!r} at row {row}; use `weighted_sum` for tasks that can be <= 0"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # checked for finiteness below
            combined = np.exp(np.log(scores) @ vector)  # (N, T') @ (T',) -> (N,)
    if not np.isfinite(combined).all():
        row = int(np.flatnonzero(~np.isfinite(combined))[0])
        raise DataError(f"combined score of row {row} is {float(combined[row])!r}; use smaller weights")
    return combined


class RowScorer:
    """Validate, encode and score JSON rows with a loaded run.

    Args:
        scorer: the run's :class:`~mtrank.serving.scorer.Scorer`.
    """

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.encoders = scorer.encoders
        self.task_names = list(scorer.task_names)
        self.batch_size = scorer.run.config.training.eval_batch_size
        scorer.run.model.eval()

    def score(self, rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, dict[str, int]]:
        """Score rows.

        Returns:
            ``(N, T)`` float64 predictions (probabilities for binary tasks, values for regression
            tasks) and the out-of-vocabulary counts of :func:`count_oov`.

        Raises:
            DataError: see :func:`rows_to_table`; also a value that passes those checks but that an
                encoder cannot convert.
        """
        data_config = self.scorer.run.config.data
        table = rows_to_table(
            rows, self.encoders, strip=data_config.strip, missing_values=data_config.missing_values
        )
        try:
            data = self.encoders.encode(table, with_labels=False, with_position=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            # e.g. an integer id beyond int64 for a raw-id (hashing) feature
            raise DataError(f"the rows could not be encoded: {exc}") from exc
        with torch.inference_mode():
            predictions = predict(self.scorer.run.model, data, self.scorer.loss_kinds, self.batch_size)
        return predictions, count_oov(self.encoders, data.batch.categorical, data.batch.device)

    def metadata(self) -> dict[str, Any]:
        """Return the input schema and tasks of the run, as ``GET /metadata`` sends them."""
        encoders = self.encoders
        features: list[dict[str, Any]] = []
        for name, (source, encoder) in encoders.categorical.items():
            entry: dict[str, Any] = {
                "name": name,
                "column": source,
                "type": "categorical",
                "encoder": encoder.kind,
            }
            if isinstance(encoder, VocabularyEncoder):
                entry["vocabulary_size"] = encoder.size
            features.append(entry)
        for name, (source, numeric) in encoders.numeric.items():
            features.append(
                {
                    "name": name,
                    "column": source,
                    "type": "numeric",
                    "transform": numeric.transform_name,
                    "standardize": numeric.standardize,
                }
            )
        task_types = {task.name: task.type for task in self.scorer.run.config.tasks}
        tasks = [
            {
                "name": name,
                "type": task_types[name],
                "score": "probability" if kind == "bce" else "prediction",
            }
            for name, kind in zip(self.task_names, self.scorer.loss_kinds, strict=True)
        ]
        position = encoders.position[0] if encoders.position is not None else None
        return {
            "run": self.scorer.run.config.name,
            "peft_set": self.scorer.run.peft_set,
            "features": features,
            "device_columns": list(encoders.device),
            "tasks": tasks,
            "required_columns": required_columns(encoders),
            "position": {
                "column": position,
                "required": False,
                "note": "ignored when sent: the shallow tower scores every row at the missing position"
                if position is not None
                else "the run has no shallow tower",
            },
            "combine_methods": ["weighted_sum", "weighted_product"],
        }


# ----------------------------------------------------------------------------------------------------
# The FastAPI application


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


def create_app(
    run_dir: str | Path, *, peft: str | Path | None = None, max_rows: int = DEFAULT_MAX_ROWS
) -> FastAPI:
    """Build the scoring service for a run.

    Args:
        run_dir: the run folder.
        peft: a PEFT set from ``mtrank finetune`` (a name under ``RUN/peft/`` or a set folder); its
            new tasks are scored after the base tasks.
        max_rows: rows accepted per ``POST /score``; more get 413.

    Returns:
        The FastAPI application; serve it with uvicorn.

    Raises:
        ArtifactError: the run or the PEFT set is missing or incomplete.
        ValueError: ``max_rows`` is below 1.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    scorer = Scorer.from_run(run_dir, peft=peft)
    row_scorer = RowScorer(scorer)
    metadata = row_scorer.metadata() | {"max_rows": max_rows}
    num_parameters = sum(p.numel() for p in scorer.run.model.parameters())
    app = FastAPI(title="mtrank scoring service", version="1", summary=f"run {scorer.run.config.name}")
    logger.info(
        "serving run %s from %s (PEFT set %s): %d tasks, %d parameters, at most %d rows per request",
        scorer.run.config.name,
        run_dir,
        scorer.run.peft_set,
        len(row_scorer.task_names),
        num_parameters,
        max_rows,
    )

    @app.middleware("http")
    async def assign_request_id(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        sent = request.headers.get(REQUEST_ID_HEADER, "")
        request.state.request_id = sent if _REQUEST_ID_PATTERN.fullmatch(sent) else uuid.uuid4().hex[:16]
        response = await call_next(request)
        response.headers[REQUEST_ID_HEADER] = request.state.request_id
        return response

    @app.exception_handler(RequestValidationError)
    async def log_invalid_body(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        logger.warning(
            "request %s: %s %s rejected with 422, invalid body: %d error(s), first at %s: %s",
            _request_id(request),
            request.method,
            request.url.path,
            len(errors),
            errors[0].get("loc") if errors else None,
            errors[0].get("msg") if errors else None,
        )
        return await request_validation_exception_handler(request, exc)

    @app.get("/health")
    def health() -> HealthResponse:
        """Return liveness and identity of the loaded run."""
        return HealthResponse(
            status="ok",
            run=scorer.run.config.name,
            peft_set=scorer.run.peft_set,
            tasks=row_scorer.task_names,
            parameters=num_parameters,
        )

    @app.get("/metadata")
    def get_metadata() -> dict[str, Any]:
        """Return the features, tasks and required columns of the run."""
        return metadata

    @app.post("/score", responses={413: {"description": "more rows than the server accepts"}})
    def score(body: ScoreRequest, request: Request) -> ScoreResponse:
        """Score rows; see the module docstring for the request and response bodies."""
        request_id = _request_id(request)
        if len(body.rows) > max_rows:
            logger.warning(
                "request %s: rejected with 413, %d rows > limit %d", request_id, len(body.rows), max_rows
            )
            raise HTTPException(
                status_code=413,
                detail=f"{len(body.rows)} rows exceed this server's limit of {max_rows} per request; "
                "split the rows into several requests",
            )
        try:
            predictions, oov_counts = row_scorer.score(body.rows)
            combined = None
            if body.combine is not None:
                combined = combine_scores(
                    predictions, row_scorer.task_names, body.combine.weights, body.combine.method
                ).tolist()
        except DataError as exc:
            logger.warning("request %s: rejected with 422, %d rows: %s", request_id, len(body.rows), exc)
            raise HTTPException(status_code=422, detail=str(exc)) from None
        unseen = {name: count for name, count in oov_counts.items() if count}
        if unseen:
            logger.debug("request %s: out-of-vocabulary rows per feature: %s", request_id, unseen)
        names = row_scorer.task_names
        scores = [dict(zip(names, row, strict=True)) for row in predictions.tolist()]
        return ScoreResponse(tasks=names, scores=scores, combined=combined, oov_counts=oov_counts)

    return app
