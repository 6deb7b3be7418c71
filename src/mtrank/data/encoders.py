"""Encoders fitted on the training split and reused unchanged at evaluation and serving.

Every encoder turns a whole pyarrow column into a numpy array in one vectorised pass and returns a
mask of rows it could not parse, so the pipeline can count, log or reject them. Each encoder
serialises to a JSON-ready dict (``to_dict`` / ``from_dict``); nothing is pickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Reserved vocabulary ids, shared with mtrank.embeddings.table: 0 pads, 1 stands for any value the
# training split did not contain (or kept fewer than `min_count` times).
PADDING_ID = 0
OOV_ID = 1
FIRST_VALUE_ID = 2
# Vocabulary key of a missing (null) categorical value; missing is a value of its own.
MISSING_KEY = "\x00missing"
# Position id of "position unknown"; the shallow tower receives it for dropped positions and at serving.
MISSING_POSITION_ID = 0

_NUMBER_PATTERN = r"^[+-]?((\d+(\.\d*)?)|(\.\d+))([eE][+-]?\d+)?$"
_INTEGER_PATTERN = r"^[+-]?\d+$"


@dataclass
class Encoded:
    """Result of encoding one column: values and the mask of rows that could not be parsed."""

    values: np.ndarray
    invalid: np.ndarray
    # A human-readable reason for invalid rows, e.g. "not a number".
    reason: str = ""
    # Rows whose value is missing but allowed (a masked task label); ``None`` when not tracked.
    missing: np.ndarray | None = None


def _as_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


# Largest finite float32; a value beyond it becomes infinite in the model's tensors.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def parse_float(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a column to float64.

    Numbers beyond float32's range (infinities included) are invalid, because features and labels
    end up in float32 tensors, where they would become infinite and turn the loss or the score into
    NaN. A NaN in a typed (Parquet) column counts as missing, the usual meaning in dataframes.

    Returns:
        ``(values, missing, invalid)``: values with NaN where missing or invalid; ``missing`` marks
        nulls and typed NaN; ``invalid`` marks non-null text that is not a number and numbers whose
        magnitude exceeds :data:`FLOAT32_MAX`.
    """
    array = _as_array(column)
    missing = np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        ok = pc.fill_null(pc.match_substring_regex(array, _NUMBER_PATTERN), False)
        invalid = ~missing & ~np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
        cleaned = pc.if_else(ok, array, pa.scalar(None, array.type))
        values = pc.cast(cleaned, pa.float64()).to_numpy(zero_copy_only=False)
    else:
        invalid = np.zeros(len(array), dtype=bool)
        values = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
    values = np.array(values, dtype=np.float64)  # a writable copy: Arrow buffers are read-only
    missing = missing | (np.isnan(values) & ~invalid)
    with np.errstate(invalid="ignore"):
        out_of_range = ~missing & ~invalid & ~(np.abs(values) <= FLOAT32_MAX)
    invalid = invalid | out_of_range
    values[missing | invalid] = np.nan
    return values, missing, invalid


def _as_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    array = _as_array(column)
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        array = pc.cast(array, pa.string())
    return array


# A batch's value counts wait in a list until they hold at least this many distinct values and at
# least as many as the merged counts. A merge then costs no more than the rows it adds, so merging
# stays linear in the rows counted.
MIN_PENDING_VALUES = 1 << 16


class VocabularyCounts:
    """Occurrence counts of a categorical column's values, accumulated over batches of rows.

    Memory grows with the number of distinct values, not with the number of rows. Values are
    compared as text and nulls count as :data:`MISSING_KEY`, as in :meth:`VocabularyEncoder.fit`.

    Example:
        >>> counts = VocabularyCounts().update(pa.array(["a", "b"])).update(pa.array(["a", None]))
        >>> VocabularyEncoder().fit_counts(counts).vocabulary
        ['a', '\\x00missing', 'b']
    """

    def __init__(self) -> None:
        self._merged: pa.Table | None = None
        self._pending: list[pa.Table] = []
        self._pending_values = 0

    def update(self, column: pa.ChunkedArray | pa.Array) -> VocabularyCounts:
        """Add the values of one batch of rows; returns ``self``."""
        text = pc.fill_null(_as_text(column), MISSING_KEY)
        counts = pc.value_counts(text)
        batch = pa.table(
            {
                # large_string, so that a vocabulary with more than 2 GiB of text still fits one array.
                "value": pc.cast(counts.field("values"), pa.large_string()),
                "count": pc.cast(counts.field("counts"), pa.int64()),
            }
        )
        self._pending.append(batch)
        self._pending_values += batch.num_rows
        merged_values = self._merged.num_rows if self._merged is not None else 0
        if self._pending_values >= max(merged_values, MIN_PENDING_VALUES):
            self._merge_pending()
        return self

    def table(self) -> pa.Table:
        """Return the counts as a table with columns ``value`` (text) and ``count`` (int64), one row per value."""
        self._merge_pending()
        if self._merged is None:
            return pa.table(
                {"value": pa.array([], type=pa.large_string()), "count": pa.array([], type=pa.int64())}
            )
        return self._merged

    def __len__(self) -> int:
        """Number of distinct values counted so far."""
        return self.table().num_rows

    def _merge_pending(self) -> None:
        if not self._pending:
            return
        parts = ([self._merged] if self._merged is not None else []) + self._pending
        summed = pa.concat_tables(parts).group_by("value").aggregate([("count", "sum")])
        self._merged = pa.table({"value": summed["value"], "count": summed["count_sum"]})
        self._pending = []
        self._pending_values = 0


@dataclass(frozen=True)
class RunningMoments:
    """Count, mean and sum of squared deviations of a set of values, mergeable across batches.

    Merging uses the pairwise update of Chan, Golub and LeVeque ("Algorithms for computing the sample
    variance", 1983), which avoids the cancellation of a sum of squares minus a squared sum.

    Example:
        >>> a = RunningMoments.from_values(np.array([1.0, 2.0]))
        >>> b = RunningMoments.from_values(np.array([3.0, 4.0]))
        >>> a.merge(b).mean, a.merge(b).std
        (2.5, 1.118033988749895)
    """

    count: int = 0
    mean: float = 0.0
    # Sum of squared deviations from the mean.
    m2: float = 0.0

    @classmethod
    def from_values(cls, values: np.ndarray) -> RunningMoments:
        """Return the moments of a 1-D float array (the caller removes NaN and infinities)."""
        if values.size == 0:
            return cls()
        mean = float(values.mean())
        return cls(int(values.size), mean, float(np.square(values - mean).sum()))

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Return the moments of the union of both value sets."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / count
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / count
        return RunningMoments(count, mean, m2)

    @property
    def std(self) -> float:
        """Population standard deviation (``ddof=0``, as ``numpy.std``); 0 without values."""
        return math.sqrt(self.m2 / self.count) if self.count else 0.0


class Encoder:
    """Interface of a fitted column encoder."""

    kind: ClassVar[str]

    def fit(self, column: pa.ChunkedArray | pa.Array) -> Encoder:
        return self

    def transform(self, column: pa.ChunkedArray | pa.Array) -> Encoded:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class VocabularyEncoder(Encoder):
    """Map categorical values to int64 vocabulary ids with reserved padding (0) and OOV (1) ids.

    Values are compared as text, so integer ids of any size keep their identity (an id above 2^53 is
    never rounded through a float). Nulls are the value :data:`MISSING_KEY`.

    Example:
        >>> enc = VocabularyEncoder(min_count=1).fit(pa.array(["a", "b", "a"]))
        >>> enc.transform(pa.array(["a", "zzz", None])).values.tolist()
        [2, 1, 1]
    """

    kind: ClassVar[str] = "vocabulary"
    min_count: int = 1
    vocabulary: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Number of ids, the two reserved ones included."""
        return len(self.vocabulary) + FIRST_VALUE_ID

    def fit(self, column: pa.ChunkedArray | pa.Array) -> VocabularyEncoder:
        text = pc.fill_null(_as_text(column), MISSING_KEY)
        counts = pc.value_counts(text)
        self._set_vocabulary(pa.table({"value": counts.field("values"), "count": counts.field("counts")}))
        return self

    def fit_counts(self, counts: VocabularyCounts) -> VocabularyEncoder:
        """Fit the vocabulary from counts merged over batches of rows (see :class:`VocabularyCounts`).

        The ids equal those :meth:`fit` gives on the concatenated batches.
        """
        self._set_vocabulary(counts.table())
        return self

    def _set_vocabulary(self, counts: pa.Table) -> None:
        """Keep the values of a ``value``/``count`` table seen ``min_count`` times or more, in id order."""
        table = counts.filter(pc.greater_equal(counts["count"], self.min_count))
        # Most frequent first, ties by value, so that the same data gives the same ids everywhere.
        table = table.sort_by([("count", "descending"), ("value", "ascending")])
        self.vocabulary = table["value"].to_pylist()

    def transform(self, column: pa.ChunkedArray | pa.Array) -> Encoded:
        text = pc.fill_null(_as_text(column), MISSING_KEY)
        index = pc.index_in(text, value_set=pa.array(self.vocabulary, type=pa.string()))
        ids = pc.fill_null(pc.add(pc.cast(index, pa.int64()), FIRST_VALUE_ID), OOV_ID)
        values = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=np.int64)
        return Encoded(values, np.zeros(len(values), dtype=bool))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "min_count": self.min_count, "vocabulary": self.vocabulary}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VocabularyEncoder:
        return cls(min_count=int(data["min_count"]), vocabulary=list(data["vocabulary"]))


@dataclass
class RawIdEncoder(Encoder):
    """Pass categorical values through as int64 for embeddings that hash ids themselves.

    Integer values (typed, or text that is all digits) keep their exact int64 value. Any other text is
    turned into int64 by :func:`mtrank.data.stable_hash.stable_hash_strings`, which gives the same
    value in every process. No vocabulary is stored, so unseen ids keep their own identity.
    """

    kind: ClassVar[str] = "raw"

    def transform(self, column: pa.ChunkedArray | pa.Array) -> Encoded:
        from mtrank.data.stable_hash import stable_hash_strings

        array = _as_array(column)
        if pa.types.is_integer(array.type):
            values = pc.cast(array, pa.int64())
            nulls = np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            out = np.asarray(pc.fill_null(values, 0).to_numpy(zero_copy_only=False), dtype=np.int64)
            if nulls.any():
                out[nulls] = stable_hash_strings(np.array([MISSING_KEY], dtype=object))[0]
            return Encoded(out, np.zeros(len(out), dtype=bool))
        text = pc.fill_null(_as_text(array), MISSING_KEY)
        is_int = np.asarray(
            pc.fill_null(pc.match_substring_regex(text, _INTEGER_PATTERN), False).to_numpy(
                zero_copy_only=False
            ),
            dtype=bool,
        )
        out = np.empty(len(text), dtype=np.int64)
        if is_int.any():
            ints = pc.cast(pc.filter(text, pa.array(is_int)), pa.int64(), safe=True)
            out[is_int] = np.asarray(ints.to_numpy(zero_copy_only=False), dtype=np.int64)
        if (~is_int).any():
            strings = np.asarray(
                pc.filter(text, pa.array(~is_int)).to_numpy(zero_copy_only=False), dtype=object
            )
            out[~is_int] = stable_hash_strings(strings)
        return Encoded(out, np.zeros(len(out), dtype=bool))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RawIdEncoder:
        return cls()


@dataclass
class NumericEncoder(Encoder):
    """Parse a numeric column, apply ``log1p`` if asked, and standardise with training statistics.

    Missing values become the training mean (0 after standardisation). Text that is not a number, and
    negative values under ``log1p``, are invalid rows.
    """

    kind: ClassVar[str] = "numeric"
    transform_name: Literal["none", "log1p"] = "none"
    standardize: bool = True
    mean: float = 0.0
    std: float = 1.0

    def _parse(self, column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, str]:
        values, _missing, invalid = parse_float(column)
        reason = "not a number or out of float32 range"
        if self.transform_name == "log1p":
            negative = values < 0
            if negative.any():
                invalid = invalid | negative
                reason = "not a number, out of float32 range, or negative under log1p"
            with np.errstate(invalid="ignore"):
                values = np.log1p(np.where(negative, np.nan, values))
        return values, invalid, reason

    def fit(self, column: pa.ChunkedArray | pa.Array) -> NumericEncoder:
        values, _invalid, _ = self._parse(column)
        finite = values[np.isfinite(values)]
        self.mean = float(finite.mean()) if finite.size else 0.0
        std = float(finite.std()) if finite.size else 1.0
        self.std = std if std > 0 and math.isfinite(std) else 1.0
        return self

    def moments(self, column: pa.ChunkedArray | pa.Array) -> RunningMoments:
        """Return the moments of one batch of rows, over the values :meth:`fit` would use.

        Merge the results of several batches with :meth:`RunningMoments.merge` and pass the total to
        :meth:`fit_moments`.
        """
        values, _invalid, _ = self._parse(column)
        return RunningMoments.from_values(values[np.isfinite(values)])

    def fit_moments(self, moments: RunningMoments) -> NumericEncoder:
        """Set the mean and standard deviation from moments merged over batches of rows.

        The result equals :meth:`fit` on the concatenated batches up to float64 rounding.
        """
        self.mean = moments.mean if moments.count else 0.0
        std = moments.std if moments.count else 1.0
        self.std = std if std > 0 and math.isfinite(std) else 1.0
        return self

    def transform(self, column: pa.ChunkedArray | pa.Array) -> Encoded:
        values, invalid, reason = self._parse(column)
        values = np.where(np.isfinite(values), values, self.mean)
        if self.standardize:
            values = (values - self.mean) / self.std
        return Encoded(values.astype(np.float32), invalid, reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "transform": self.transform_name,
            "standardize": self.standardize,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NumericEncoder:
        return cls(
            transform_name=data["transform"],
            standardize=bool(data["standardize"]),
            mean=data["mean"],
            std=data["std"],
        )


@dataclass
class LabelEncoder(Encoder):
    """Derive a task label from its source column by the config's label rule.

    Binary rules: ``equals`` (1 where the value equals it), ``greater_than``, or a column already 0/1
    (any other value is invalid). Regression: a number, optionally through ``log1p``. A missing label
    is invalid (the row is skipped) unless ``mask_missing`` is set: then the row stays, and the
    returned ``missing`` mask keeps it out of this task's loss and metrics only.
    """

    kind: ClassVar[str] = "label"
    task_type: Literal["binary", "regression"] = "binary"
    equals: str | None = None
    greater_than: float | None = None
    transform_name: Literal["none", "log1p"] = "none"
    mask_missing: bool = False

    def transform(self, column: pa.ChunkedArray | pa.Array) -> Encoded:
        result = self._transform(column)
        missing = np.asarray(_as_array(column).is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if self.mask_missing:
            result.invalid = result.invalid & ~missing
            result.missing = missing
        return result

    def _transform(self, column: pa.ChunkedArray | pa.Array) -> Encoded:
        array = _as_array(column)
        if self.equals is not None:
            text = _as_text(array)
            missing = np.asarray(text.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            hit = pc.fill_null(pc.equal(text, pa.scalar(self.equals)), False)
            values = np.asarray(hit.to_numpy(zero_copy_only=False), dtype=np.float32)
            return Encoded(values, missing, "missing label")
        values, missing, invalid = parse_float(array)
        reason = "missing, not a number or out of float32 range"
        if self.greater_than is not None:
            labels = (values > self.greater_than).astype(np.float32)
        elif self.task_type == "binary":
            not_binary = ~(missing | invalid) & ~np.isin(values, (0.0, 1.0))
            invalid = invalid | not_binary
            reason = "missing or not 0/1"
            labels = np.nan_to_num(values).astype(np.float32)
        else:
            labels = values
            if self.transform_name == "log1p":
                negative = values < 0
                invalid = invalid | negative
                reason = "missing, not a number, or negative under log1p"
                with np.errstate(invalid="ignore"):
                    labels = np.log1p(np.where(negative, 0.0, values))
            labels = np.nan_to_num(labels).astype(np.float32)
        return Encoded(labels, missing | invalid, reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "task_type": self.task_type,
            "equals": self.equals,
            "greater_than": self.greater_than,
            "transform": self.transform_name,
            "mask_missing": self.mask_missing,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelEncoder:
        return cls(
            task_type=data["task_type"],
            equals=data["equals"],
            greater_than=data["greater_than"],
            transform_name=data["transform"],
            mask_missing=bool(data.get("mask_missing", False)),
        )


@dataclass
class PositionEncoder(Encoder):
    """Map display positions to shallow-tower ids.

    Id 0 is "missing" (a null, a dropped position, or any position at serving); positions
    ``first_position .. max_position`` get ids ``1 .. N``; positions above ``max_position`` share the
    overflow id ``N + 1``. A position below ``first_position`` or not an integer is invalid.
    """

    kind: ClassVar[str] = "position"
    first_position: int = 1
    max_position: int = 20

    @property
    def num_positions(self) -> int:
        """N, the positions with an id of their own."""
        return self.max_position - self.first_position + 1

    @property
    def size(self) -> int:
        """Number of ids: missing, N positions and overflow."""
        return self.num_positions + 2

    def transform(self, column: pa.ChunkedArray | pa.Array) -> Encoded:
        values, missing, invalid = parse_float(column)
        below = values < self.first_position
        fractional = np.isfinite(values) & (np.floor(values) != values)
        invalid = invalid | below | fractional
        ids = np.where(np.isfinite(values), values - self.first_position + 1, MISSING_POSITION_ID)
        ids = np.minimum(ids, self.num_positions + 1)
        ids[missing | invalid] = MISSING_POSITION_ID
        return Encoded(ids.astype(np.int64), invalid, f"not an integer position >= {self.first_position}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "first_position": self.first_position, "max_position": self.max_position}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PositionEncoder:
        return cls(first_position=int(data["first_position"]), max_position=int(data["max_position"]))


ENCODER_TYPES: dict[str, type[Any]] = {
    cls.kind: cls for cls in (VocabularyEncoder, RawIdEncoder, NumericEncoder, LabelEncoder, PositionEncoder)
}


def encoder_from_dict(data: dict[str, Any]) -> Encoder:
    """Rebuild an encoder saved by ``to_dict``."""
    return ENCODER_TYPES[data["kind"]].from_dict(data)
