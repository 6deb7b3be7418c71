"""Batch scoring over a trained run's artifact directory.

Scoring encodes categorical values with :class:`ServingVocabularyEncoder`, which finds a training
category whether a number arrives as ``3``, ``3.0``, ``"3"`` or ``"3.0"``. The HTTP service in
:mod:`mtrank.serving.app` scores through the same encoders.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtrank.data.encoders import MISSING_KEY, Encoded, Encoder, VocabularyEncoder, parse_float
from mtrank.data.pipeline import MAX_EXAMPLES, FeatureEncoders, encode_for_scoring
from mtrank.errors import DataError
from mtrank.training.evaluation import predict
from mtrank.training.run import LoadedRun, load_run

logger = logging.getLogger(__name__)


def _as_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Return ``column`` as one string array, cast as the training encoders cast typed columns."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array if array.type == pa.string() else pc.cast(array, pa.string())


def _is_number(text: pa.Array) -> np.ndarray:
    """Return the ``(N,)`` mask of values that training would parse as a number (numeric features' syntax)."""
    _values, missing, invalid = parse_float(text)
    return ~missing & ~invalid


def _decimal(text: str) -> Decimal | None:
    """Return the exact value of numeric text, or ``None`` when its exponent is beyond ``Decimal``."""
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


@dataclass
class ServingVocabularyEncoder(VocabularyEncoder):
    """A fitted vocabulary that also finds a category sent in another numeric form.

    Training compares categorical values as text. A CSV column keeps the file's text (``"3"`` or
    ``"3.0"``), and a typed Parquet column is cast to text by pyarrow (``3.0`` becomes ``"3"``). A
    client may send the same value as ``3``, ``3.0``, ``"3"`` or ``"3.0"``. Each value is looked up
    in three steps:

    1. Its text, as in training, so every training value keeps its training id.
    2. Otherwise, when the text is a number in the syntax of numeric features, the vocabulary key
       with the same decimal value (``"3"``, ``"3.0"`` and ``"3e0"`` are equal). When several keys
       have that value, the key with the lowest id wins, which is the most frequent in training.
    3. Otherwise the out-of-vocabulary id, as in training.

    When every training value of the column was a number, a value that is not a number (``"abc"``,
    ``true``) can never match. Such values are counted in a logged warning.

    Attributes:
        column: the source or device column, named in log messages.
    """

    column: str = ""
    _vocabulary_array: pa.Array = field(init=False, repr=False, compare=False)
    _keys_by_value: dict[Decimal, str] = field(init=False, repr=False, compare=False)
    _numbers_only: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index_vocabulary()

    @classmethod
    def from_encoder(cls, encoder: VocabularyEncoder, column: str) -> ServingVocabularyEncoder:
        """Wrap a fitted vocabulary. The vocabulary list is copied, so ids stay the same."""
        return cls(min_count=encoder.min_count, vocabulary=list(encoder.vocabulary), column=column)

    def fit(self, column: pa.ChunkedArray | pa.Array) -> ServingVocabularyEncoder:
        super().fit(column)
        self._index_vocabulary()
        return self

    def _index_vocabulary(self) -> None:
        self._vocabulary_array = pa.array(self.vocabulary, type=pa.string())
        is_number = _is_number(self._vocabulary_array)
        self._keys_by_value = {}
        for key, number in zip(self.vocabulary, is_number.tolist(), strict=True):
            value = _decimal(key) if number else None
            if value is not None:
                # The vocabulary is in id order, so the first key of a value has the lowest id.
                self._keys_by_value.setdefault(value, key)
        others = {key for key, number in zip(self.vocabulary, is_number.tolist(), strict=True) if not number}
        self._numbers_only = bool(is_number.any()) and others <= {MISSING_KEY}

    def vocabulary_keys(self, column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Map each value to the vocabulary key it matches by the steps in the class docstring.

        Args:
            column: ``(N,)`` values of any type. Nulls stay null.

        Returns:
            ``(N,)`` text: the matched key, or the value's own text when nothing matches. And the
            ``(N,)`` mask of values that are not numbers although every training value was one.
        """
        text = _as_text(column)
        not_number = np.zeros(len(text), dtype=bool)
        # A null is the missing category, which the vocabulary lookup handles, so it is never unmatched.
        unmatched = pc.and_(pc.invert(pc.is_in(text, value_set=self._vocabulary_array)), pc.is_valid(text))
        if not pc.any(unmatched).as_py():
            return text, not_number
        candidates = pc.unique(text.filter(unmatched))  # each distinct unmatched text once
        is_number = _is_number(candidates)
        replacements: list[str | None] = []
        for candidate, number in zip(candidates.to_pylist(), is_number.tolist(), strict=True):
            value = _decimal(candidate) if number else None
            replacements.append(self._keys_by_value.get(value) if value is not None else None)
        position = pc.index_in(text, value_set=candidates)  # (N,), null where the text matched
        keys = pc.coalesce(pc.take(pa.array(replacements, type=pa.string()), position), text)
        if self._numbers_only and not is_number.all():
            not_numbers = candidates.filter(pa.array(~is_number))
            not_number = np.asarray(
                pc.fill_null(pc.is_in(text, value_set=not_numbers), False).to_numpy(zero_copy_only=False),
                dtype=bool,
            )
        return keys, not_number

    def transform(self, column: pa.ChunkedArray | pa.Array) -> Encoded:
        keys, not_number = self.vocabulary_keys(column)
        if not_number.any():
            examples = pc.unique(keys.filter(pa.array(not_number))).to_pylist()[:MAX_EXAMPLES]
            logger.warning(
                "column `%s`: %d value(s) are not numbers, but every training value of this column was a "
                "number, so they were encoded as the out-of-vocabulary id (examples: %s). Send the "
                "category as a number or numeric text",
                self.column,
                int(not_number.sum()),
                ", ".join(repr(value) for value in examples),
            )
        return super().transform(keys)


def serving_encoders(encoders: FeatureEncoders) -> FeatureEncoders:
    """Return a copy of ``encoders`` whose vocabularies are :class:`ServingVocabularyEncoder` objects.

    Every training value keeps its id. The other encoders (numeric, hashing, labels, position) are
    shared with ``encoders``.

    Args:
        encoders: a run's fitted encoders.

    Returns:
        The encoders to score with.
    """
    categorical: dict[str, tuple[str, Encoder]] = {}
    for name, (source, encoder) in encoders.categorical.items():
        if isinstance(encoder, VocabularyEncoder):
            encoder = ServingVocabularyEncoder.from_encoder(encoder, source)
        categorical[name] = (source, encoder)
    device: dict[str, VocabularyEncoder] = {
        column: ServingVocabularyEncoder.from_encoder(encoder, column)
        for column, encoder in encoders.device.items()
    }
    return dataclasses.replace(encoders, categorical=categorical, device=device)


class Scorer:
    """Score rows with a trained ranker; one named output per task.

    Position is never read: at serving time the shallow tower receives the missing position and the
    device, as the ranker does in eval mode.

    Attributes:
        run: the loaded run.
        encoders: the run's encoders for scoring, from :func:`serving_encoders`.
        task_names: output columns, one per task.
        loss_kinds: the loss of each task, which decides whether its score is a probability.
    """

    def __init__(self, run: LoadedRun) -> None:
        self.run = run
        self.encoders = serving_encoders(run.encoders)
        self.task_names = run.config.task_names()
        self.loss_kinds = [t.loss or "bce" for t in run.config.tasks]

    @classmethod
    def from_run(cls, run_dir: str | Path, *, peft: str | Path | None = None) -> Scorer:
        """Load a scorer from a run directory, optionally with a fine-tuned PEFT set.

        Args:
            run_dir: the run folder.
            peft: a PEFT set name under ``RUN/peft/`` or a set folder; its new tasks become extra
                output columns after the base tasks.
        """
        return cls(load_run(Path(run_dir), peft=peft))

    def score_path(self, path: str, *, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """Score a file; return ``(row_ids, predictions (N, T))``; invalid rows are skipped and logged."""
        data, _skipped = encode_for_scoring(self.encoders, self.run.config.data, path, with_labels=False)
        return data.row_ids, predict(self.run.model, data, self.loss_kinds, batch_size)

    def score_file(self, path: str, out: Path, *, batch_size: int = 8192) -> int:
        """Score ``path`` and write ``row`` plus one column per task to ``out`` (.csv or .parquet).

        Returns:
            The number of rows written.
        """
        suffix = out.suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise DataError(f"--out {out}: use a .csv or .parquet file name")
        rows, predictions = self.score_path(path, batch_size=batch_size)
        if len(rows) == 0:
            raise DataError(
                f"{path}: no row could be scored (all were invalid or the file is empty); see the log"
            )
        columns = {"row": pa.array(rows)}
        for t, name in enumerate(self.task_names):
            columns[name] = pa.array(predictions[:, t])
        table = pa.table(columns)
        out.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".parquet":
            pq.write_table(table, out)
        else:
            pacsv.write_csv(table, out)
        logger.info("wrote %d predictions to %s", table.num_rows, out)
        return table.num_rows
