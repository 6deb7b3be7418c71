"""Training from a Parquet log larger than memory, read row group by row group.

With ``data.streaming.enabled`` set, :func:`prepare_streaming_data` replaces
:func:`mtrank.data.pipeline.prepare_data` in three steps:

1. A scan reads every row of the training file once, in batches of ``data.streaming.read_rows``
   rows. Batch by batch it applies the row filters, drops invalid rows, splits, accumulates
   vocabulary counts and numeric moments (:class:`EncoderStatistics`) and counts the training rows
   of each row group. Memory grows with the vocabularies, not with the rows.
2. Validation and test rows are encoded batch by batch into one in-memory
   :class:`~mtrank.data.tensors.EncodedData` per split, so metrics come from the predictions of
   every row. An encoded row takes 8 bytes per categorical feature and 4 per numeric feature and
   task, plus a Python string per row when ``evaluation.group_column`` is set.
3. :class:`ParquetTrainStream` reads the training rows again in every epoch and yields encoded
   batches through a seeded shuffle buffer. Each rank of a distributed run reads its own row groups.

Differences from the in-memory pipeline, which reads the same files into one table:

- Splits: only ``files`` and ``column``. The rows of a held-out validation split (``valid_fraction``
  of the training file) are chosen by a seeded hash of each row's number (:func:`holdout_mask`), not
  by a permutation of all rows. The held-out count therefore varies around the fraction, and the
  rows differ from those the in-memory pipeline holds out with the same seed.
- Batches: the rows of an epoch come in another order, so a streamed run does not reproduce the
  in-memory run of the same seed.
- Reading: all files must be Parquet. A side table (``data.join``) is read into memory once.

Example:
    >>> from mtrank.config import load_config  # doctest: +SKIP
    >>> prepared = prepare_streaming_data(load_config("run.yaml"))  # doctest: +SKIP
    >>> for batch in prepared.train.iter_batches(epoch=1):  # doctest: +SKIP
    ...     ...
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mtrank.config.schema import ColumnSplit, DataConfig, FilesSplit, RunConfig
from mtrank.data.encoders import Encoder, RunningMoments, VocabularyCounts, VocabularyEncoder, parse_float
from mtrank.data.pipeline import (
    MAX_EXAMPLES,
    ROW_COLUMN,
    TRUTH_PREFIX,
    FeatureEncoders,
    filter_mask,
    unique_keys,
)
from mtrank.data.readers import clean_text_columns, is_parquet, read_column_names, read_table
from mtrank.data.registry import resolve_path
from mtrank.data.tensors import Batch, EncodedData
from mtrank.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# SplitMix64 finaliser constants (Steele, Lea and Flood, "Fast splittable pseudorandom number
# generators", OOPSLA 2014). They turn consecutive row numbers into uncorrelated 64-bit values.
_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MIX_2 = np.uint64(0x94D049BB133111EB)
# 2^-53: the top 53 bits of a 64-bit hash, times this, give a float64 uniform on [0, 1).
_UNIT_SCALE = 2.0**-53
# Seed-sequence tags, so that the row-group order and the shuffle buffer of an epoch draw from
# independent streams.
_PLAN_STREAM = 0
_BUFFER_STREAM = 1


# ----------------------------------------------------------------------------------------------------
# the interface the trainer iterates


class BatchStream(Protocol):
    """Training data that is read anew in every epoch instead of being held in memory.

    ``len()`` counts the rows of one epoch over all ranks. Every rank gets the same number of
    batches per epoch, so that data-parallel ranks take the same number of steps.

    Attributes:
        rank: the rank whose rows the stream yields.
        world_size: the number of ranks the rows are dealt to.
    """

    rank: int
    world_size: int

    def __len__(self) -> int: ...

    def num_batches(self, epoch: int, *, min_rows_per_batch: int = 1) -> int:
        """Return how many batches :meth:`iter_batches` yields in ``epoch`` on this rank."""
        ...

    def iter_batches(self, epoch: int, *, min_rows_per_batch: int = 1) -> Iterator[Batch]:
        """Yield this rank's training batches of ``epoch`` (1-based)."""
        ...


# ----------------------------------------------------------------------------------------------------
# encoder fitting


class EncoderStatistics:
    """Vocabulary counts and numeric moments of a run's encoders, accumulated over batches of rows.

    :meth:`fit` then fits the encoders as :meth:`FeatureEncoders.fit` would on all batches at once:
    the same vocabulary ids, and means and standard deviations equal up to float64 rounding.

    Args:
        encoders: the unfitted encoders; :meth:`fit` fits them in place.

    Raises:
        TypeError: an encoder has its own ``fit`` but no batch-wise statistics here.

    Example:
        >>> from mtrank.data.encoders import VocabularyEncoder
        >>> encoders = FeatureEncoders(categorical={"city": ("city", VocabularyEncoder())})
        >>> statistics = EncoderStatistics(encoders)
        >>> statistics.update(pa.table({"city": ["b", "a"]}))
        >>> statistics.update(pa.table({"city": ["b"]}))
        >>> statistics.fit().categorical["city"][1].vocabulary
        ['b', 'a']
    """

    def __init__(self, encoders: FeatureEncoders) -> None:
        self.encoders = encoders
        self.counts: dict[str, tuple[str, VocabularyCounts]] = {}
        self.moments: dict[str, tuple[str, RunningMoments]] = {}
        vocabularies: list[tuple[str, str, Encoder]] = [
            (f"categorical/{name}", source, encoder)
            for name, (source, encoder) in encoders.categorical.items()
        ]
        vocabularies += [(f"device/{column}", column, encoder) for column, encoder in encoders.device.items()]
        for key, source, encoder in vocabularies:
            if isinstance(encoder, VocabularyEncoder):
                self.counts[key] = (source, VocabularyCounts())
            elif type(encoder).fit is not Encoder.fit:
                raise TypeError(
                    f"encoder {type(encoder).__name__} of `{source}` has its own fit but no batch-wise "
                    "statistics, so it cannot be fitted on streamed rows"
                )
        for name, (source, _encoder) in encoders.numeric.items():
            self.moments[name] = (source, RunningMoments())

    def update(self, table: pa.Table) -> None:
        """Add one batch of training rows (invalid rows already removed)."""
        for source, counts in self.counts.values():
            counts.update(table[source])
        for name, (source, moments) in self.moments.items():
            _, encoder = self.encoders.numeric[name]
            self.moments[name] = (source, moments.merge(encoder.moments(table[source])))

    def fit(self) -> FeatureEncoders:
        """Fit the encoders from the statistics so far and return them."""
        for name, (_source, encoder) in self.encoders.categorical.items():
            key = f"categorical/{name}"
            if key in self.counts and isinstance(encoder, VocabularyEncoder):
                encoder.fit_counts(self.counts[key][1])
        for column, device_encoder in self.encoders.device.items():
            device_encoder.fit_counts(self.counts[f"device/{column}"][1])
        for name, (_source, numeric) in self.encoders.numeric.items():
            numeric.fit_moments(self.moments[name][1])
        return self.encoders


# ----------------------------------------------------------------------------------------------------
# row selection


def holdout_mask(row_numbers: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Mark each row for the held-out split with probability ``fraction``, by a seeded hash of its number.

    The decision depends only on the row number and the seed, so every batch size, row-group order
    and rank makes the same choice, and no per-row state is kept.

    Args:
        row_numbers: ``(N,)`` int64 row numbers in the file.
        fraction: probability that a row is held out, in ``[0, 1)``.
        seed: the split's seed.

    Returns:
        ``(N,)`` bool mask, ``True`` for held-out rows.

    Example:
        >>> mask = holdout_mask(np.arange(100_000), 0.1, seed=3)
        >>> bool(abs(mask.mean() - 0.1) < 0.005)
        True
    """
    if fraction <= 0:
        return np.zeros(len(row_numbers), dtype=bool)
    key = np.random.SeedSequence(seed % 2**64).generate_state(1, dtype=np.uint64)[0]
    with np.errstate(over="ignore"):
        # uint64 arithmetic wraps modulo 2^64, as SplitMix64 requires.
        z = np.asarray(row_numbers, dtype=np.int64).astype(np.uint64) * _SPLITMIX_GAMMA + key
        z = (z ^ (z >> np.uint64(30))) * _SPLITMIX_MIX_1
        z = (z ^ (z >> np.uint64(27))) * _SPLITMIX_MIX_2
        z = z ^ (z >> np.uint64(31))
    unit = (z >> np.uint64(11)).astype(np.float64) * _UNIT_SCALE
    return unit < fraction


@dataclass
class SplitMasks:
    """Rows of one batch of the training file that belong to each split, as ``(N,)`` bool masks."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def split_training_file(table: pa.Table, data: DataConfig, source: str) -> SplitMasks:
    """Assign the rows of one batch of ``data.path`` to the train, validation and test splits.

    ``files`` split: every row trains, except the held-out validation rows when no ``valid_path`` is
    given. ``column`` split: rows with ``column <= train_max`` train (minus the held-out validation
    rows) and the others test, compared as in :func:`mtrank.data.pipeline.split_and_encode`.

    Args:
        table: a batch of rows with the :data:`~mtrank.data.pipeline.ROW_COLUMN` row numbers.
        data: the data config; its split must be ``files`` or ``column``.
        source: the file name for error messages.

    Raises:
        DataError: a numeric split column has a missing or non-numeric value.
        ConfigError: the split is neither ``files`` nor ``column``.
    """
    split = data.split
    rows = np.asarray(table[ROW_COLUMN].to_numpy(), dtype=np.int64)
    if isinstance(split, FilesSplit):
        in_train = np.ones(table.num_rows, dtype=bool)
        fraction = split.valid_fraction if split.valid_path is None else 0.0
    elif isinstance(split, ColumnSplit):
        in_train = _column_split_mask(table, split, rows, source)
        fraction = split.valid_fraction
    else:
        raise ConfigError([_split_problem(split.method)])
    held_out = in_train & holdout_mask(rows, fraction, split.seed)
    return SplitMasks(train=in_train & ~held_out, valid=held_out, test=~in_train)


def _column_split_mask(table: pa.Table, split: ColumnSplit, rows: np.ndarray, source: str) -> np.ndarray:
    """Return the rows with ``split.column <= split.train_max``, compared as text when ``train_max`` is text."""
    column = table[split.column]
    if isinstance(split.train_max, str):
        is_train = pc.less_equal(pc.cast(column, pa.string()), split.train_max)
        return np.asarray(pc.fill_null(is_train, False).to_numpy(zero_copy_only=False), dtype=bool)
    parsed, _missing, _invalid = parse_float(column)
    bad = np.flatnonzero(np.isnan(parsed))
    if len(bad):
        position = int(bad[0])
        raise DataError(
            f"{source}: split column `{split.column}` has a missing or non-numeric value at data row "
            f"{int(rows[position])}: {column[position].as_py()!r}; clean the column or split by a text `train_max`"
        )
    return np.asarray(parsed <= float(split.train_max), dtype=bool)


def _split_problem(method: str) -> str:
    return (
        f"data.split.method: streaming supports the `files` and `column` splits, got `{method}`; "
        "split by a column or into files, or set `data.streaming.enabled: false`"
    )


# ----------------------------------------------------------------------------------------------------
# reading


@dataclass
class ReadCounts:
    """Row counts of one pass over a file, for its log messages."""

    rows_read: int = 0
    rows_kept: int = 0
    unmatched: int = 0


class ParquetLog:
    """One Parquet log file, read in batches with the config's text cleaning, side-table join and filters.

    The file's metadata (row groups and their sizes) is read when the object is made. Every
    :meth:`read` opens the file anew, so one object serves every epoch.

    Args:
        data: the data config (cleaning, join, filters).
        path: the file, as the config names it.
        columns: every column any pass will request; checked against the file and the side table.

    Raises:
        DataError: the file is missing, is not Parquet, lacks a column, or the side table's key is
            not unique.
    """

    def __init__(self, data: DataConfig, path: str, columns: Sequence[str]) -> None:
        self.data = data
        self.path = resolve_path(path)

        if not self.path.is_file():
            raise DataError(
                f"data file not found: {self.path}; check the path in `data` or set MTRANK_DATA_DIR"
            )
        if not is_parquet(self.path):
            raise DataError(
                f"{self.path} is not a Parquet file, and `data.streaming.enabled` reads Parquet only; "
                "convert it (e.g. pyarrow.parquet.write_table) or set `data.streaming.enabled: false`"
            )
        try:
            metadata = pq.read_metadata(self.path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"cannot read Parquet file {self.path}: {exc}") from None
        self.names: list[str] = list(metadata.schema.to_arrow_schema().names)
        self.row_group_rows = np.array(
            [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)], dtype=np.int64
        )
        # File row number of each row group's first row.
        self.row_group_starts = np.concatenate([[0], np.cumsum(self.row_group_rows)[:-1]]).astype(np.int64)

        self.side: pa.Table | None = None
        self.side_path: Path | None = None
        self.side_names: set[str] = set()
        if data.join is not None:
            self.side_path = resolve_path(data.join.path)
            side_names = read_column_names(
                self.side_path, file_format=data.join.format, separator=data.join.separator
            )
            self.side_names = set(data.join.columns or side_names)

        requested = self._with_filter_columns(columns)
        self._check_columns(requested)
        if data.join is not None:
            self.side = self._read_side_table(requested)

    def _read_side_table(self, columns: Sequence[str]) -> pa.Table | None:
        """Read the side table's key and the requested side columns, or return ``None`` when none is requested."""
        join = self.data.join
        assert join is not None and self.side_path is not None  # only called with a join
        if join.key not in self.names:
            raise DataError(
                f"{self.path} has no join key column `{join.key}`; it has: {', '.join(self.names)}. "
                "Fix `data.join.key`"
            )
        side_columns = self._side_columns(columns)
        if not side_columns:
            return None
        side = read_table(
            self.side_path,
            file_format=join.format,
            separator=join.separator,
            columns=[join.key, *side_columns],
            strip=self.data.strip,
            missing_values=self.data.missing_values,
        )
        # The in-memory pipeline's own check, so both reject the same side tables.
        return unique_keys(side, join.key, self.side_path)

    @property
    def num_row_groups(self) -> int:
        """Row groups in the file."""
        return len(self.row_group_rows)

    def read(
        self, columns: Sequence[str], row_groups: Iterable[int], read_rows: int, counts: ReadCounts
    ) -> Iterator[tuple[int, pa.Table]]:
        """Yield ``(row_group, batch)`` pairs of at most ``read_rows`` file rows, in the order of ``row_groups``.

        Each batch has the requested columns (side-table columns joined), the
        :data:`~mtrank.data.pipeline.ROW_COLUMN` row numbers, and only the rows that pass the
        filters; ``counts`` adds up the rows read and kept.
        """
        requested = self._with_filter_columns(columns)
        side_columns = self._side_columns(requested)
        own_columns = [c for c in requested if c not in side_columns]
        join = self.data.join
        if join is not None and side_columns and join.key not in own_columns:
            own_columns.append(join.key)
        with pq.ParquetFile(self.path) as parquet:
            for group in row_groups:
                start = int(self.row_group_starts[group])
                for record_batch in parquet.iter_batches(
                    batch_size=read_rows, row_groups=[group], columns=own_columns
                ):
                    table = pa.Table.from_batches([record_batch])
                    table = clean_text_columns(
                        table, strip=self.data.strip, missing_values=self.data.missing_values
                    )
                    rows = np.arange(start, start + table.num_rows, dtype=np.int64)
                    start += table.num_rows
                    table = table.append_column(ROW_COLUMN, pa.array(rows))
                    yield group, self._join_and_filter(table, side_columns, counts)

    def _join_and_filter(self, table: pa.Table, side_columns: list[str], counts: ReadCounts) -> pa.Table:
        counts.rows_read += table.num_rows
        join = self.data.join
        if join is not None and side_columns and self.side is not None:
            side = self.side.select([join.key, *side_columns])
            # Arrow joins do not keep row order, so the row numbers restore it.
            table = table.join(side, keys=join.key, join_type="left outer", coalesce_keys=True)
            table = table.sort_by(ROW_COLUMN)
            counts.unmatched += int(pc.sum(pc.is_null(table[side_columns[0]])).as_py() or 0)
        if self.data.filters:
            table = table.filter(pa.array(filter_mask(table, self.data.filters)))
        counts.rows_kept += table.num_rows
        return table

    def log_counts(self, counts: ReadCounts) -> None:
        """Log the join and filter counts of one pass, as :func:`mtrank.data.pipeline.read_source` does."""
        if counts.unmatched and self.data.join is not None:
            logger.warning(
                "%d of %d rows of %s have no match for `%s` in %s; their side features are missing",
                counts.unmatched,
                counts.rows_read,
                self.path,
                self.data.join.key,
                self.side_path,
            )
        if self.data.filters:
            logger.info("%s: row filters kept %d of %d rows", self.path, counts.rows_kept, counts.rows_read)

    def _with_filter_columns(self, columns: Sequence[str]) -> list[str]:
        return list(dict.fromkeys([*columns, *(f.column for f in self.data.filters)]))

    def _side_columns(self, columns: Sequence[str]) -> list[str]:
        join = self.data.join
        if join is None:
            return []
        return [c for c in columns if c in self.side_names and c != join.key]

    def _check_columns(self, columns: Sequence[str]) -> None:
        available = set(self.names) | self.side_names
        missing = [c for c in columns if c not in available]
        if missing:
            raise DataError(
                f"{self.path} has no column(s) {', '.join(missing)}; it has: {', '.join(self.names)}. "
                "Fix the column names in the config"
            )


@dataclass
class _ColumnProblems:
    count: int = 0
    reason: str = ""
    examples: list[str] = field(default_factory=list)


class InvalidRows:
    """Drop unparsable rows batch by batch, keeping counts and examples per column for one log message.

    The checks and messages are those of :func:`mtrank.data.pipeline.drop_invalid`, but :meth:`log`
    logs the counts once per pass instead of once per batch.

    Args:
        encoders: the encoders whose parsing decides which rows are invalid.
        source: the file name for messages.
        on_invalid: ``skip`` drops and counts invalid rows; ``error`` raises at the first one.
        with_labels: check the task labels too.
    """

    def __init__(
        self, encoders: FeatureEncoders, source: str, on_invalid: str, *, with_labels: bool = True
    ) -> None:
        self.encoders = encoders
        self.source = source
        self.on_invalid = on_invalid
        self.with_labels = with_labels
        self.rows_checked = 0
        self.skipped = 0
        self.columns: dict[str, _ColumnProblems] = {}

    def drop(self, table: pa.Table) -> pa.Table:
        """Return ``table`` without its invalid rows.

        Raises:
            DataError: ``on_invalid`` is ``error`` and a row is invalid; names the file, row, column
                and value.
        """
        self.rows_checked += table.num_rows
        problems = self.encoders.find_invalid(table, with_labels=self.with_labels)
        if not problems:
            return table
        rows = np.asarray(table[ROW_COLUMN].to_numpy(), dtype=np.int64)
        combined = np.zeros(table.num_rows, dtype=bool)
        for column, (mask, reason) in problems.items():
            combined |= mask
            positions = np.flatnonzero(mask)
            if self.on_invalid == "error":
                first = int(positions[0])
                raise DataError(
                    f"{self.source}: data row {int(rows[first])} (0-based, header excluded), column `{column}`: "
                    f"invalid value {table[column][first].as_py()!r} ({reason}); fix the data or set "
                    "`data.on_invalid: skip` to drop such rows with a count in the log"
                )
            entry = self.columns.setdefault(column, _ColumnProblems())
            entry.count += len(positions)
            # An encoder's reasons differ only by an added clause (log1p adds "or negative"), so the
            # longest one covers every batch, as the in-memory reason covers the whole column.
            if len(reason) > len(entry.reason):
                entry.reason = reason
            for position in positions[: MAX_EXAMPLES - len(entry.examples)]:
                entry.examples.append(f"row {int(rows[position])}: {table[column][int(position)].as_py()!r}")
        self.skipped += int(combined.sum())
        return table.filter(pa.array(~combined))

    def log(self) -> None:
        """Log the invalid rows of the pass: per column with examples, then the total."""
        if not self.skipped:
            return
        for column, entry in self.columns.items():
            logger.warning(
                "%s: skipping %d row(s) with invalid `%s` (%s); examples: %s",
                self.source,
                entry.count,
                column,
                entry.reason,
                ", ".join(entry.examples),
            )
        logger.warning(
            "%s: skipped %d of %d rows in total; %d remain",
            self.source,
            self.skipped,
            self.rows_checked,
            self.rows_checked - self.skipped,
        )


# ----------------------------------------------------------------------------------------------------
# encoded rows: concatenation, slices, in-place writes


def concat_encoded(parts: Sequence[EncodedData]) -> EncodedData:
    """Concatenate encoded rows in order, reading a missing label mask as every label present.

    Raises:
        ValueError: ``parts`` is empty.
    """
    if not parts:
        raise ValueError("concat_encoded needs at least one part")
    if len(parts) == 1:
        return parts[0]
    if any(p.batch.label_mask is not None for p in parts):
        parts = [_with_label_mask(p) for p in parts]
    first = parts[0]

    def cat(name: str) -> torch.Tensor | None:
        tensors = [getattr(p.batch, name) for p in parts]
        return None if tensors[0] is None else torch.cat(tensors, dim=0)

    batch = Batch(
        categorical=torch.cat([p.batch.categorical for p in parts], dim=0),
        numeric=torch.cat([p.batch.numeric for p in parts], dim=0),
        labels=cat("labels"),
        position=cat("position"),
        device=cat("device"),
        label_mask=cat("label_mask"),
    )
    groups = None
    if first.groups is not None:
        groups = np.concatenate([p.groups for p in parts if p.groups is not None])
    return EncodedData(
        batch=batch,
        row_ids=np.concatenate([p.row_ids for p in parts]),
        groups=groups,
        extras={key: np.concatenate([p.extras[key] for p in parts]) for key in first.extras},
    )


def _with_label_mask(data: EncodedData) -> EncodedData:
    batch = data.batch
    if batch.label_mask is not None or batch.labels is None:
        return data
    mask = torch.ones_like(batch.labels)
    return EncodedData(
        batch=Batch(batch.categorical, batch.numeric, batch.labels, batch.position, batch.device, mask),
        row_ids=data.row_ids,
        groups=data.groups,
        extras=data.extras,
    )


def _slice(data: EncodedData, start: int, stop: int) -> EncodedData:
    """Return rows ``start .. stop - 1`` as views, without copying."""
    batch = data.batch

    def part(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[start:stop]

    return EncodedData(
        batch=Batch(
            batch.categorical[start:stop],
            batch.numeric[start:stop],
            part(batch.labels),
            part(batch.position),
            part(batch.device),
            part(batch.label_mask),
        ),
        row_ids=data.row_ids[start:stop],
        groups=None if data.groups is None else data.groups[start:stop],
        extras={key: value[start:stop] for key, value in data.extras.items()},
    )


def _put(pool: EncodedData, slots: np.ndarray, rows: EncodedData) -> EncodedData:
    """Write ``rows`` into ``pool`` at the ``(R,)`` positions ``slots``, in place where the layout allows.

    Returns the pool, with a label mask added when ``rows`` has one and the pool had none.
    """
    if rows.batch.label_mask is not None and pool.batch.label_mask is None:
        pool = _with_label_mask(pool)
    index = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64))
    for name in ("categorical", "numeric", "labels", "position", "device", "label_mask"):
        target = getattr(pool.batch, name)
        if target is None:
            continue
        source = getattr(rows.batch, name)
        if source is None:  # only the label mask can be absent here: every label is present
            source = torch.ones((len(rows), target.shape[1]), dtype=target.dtype)
        target[index] = source
    pool.row_ids[slots] = rows.row_ids
    return pool


# ----------------------------------------------------------------------------------------------------
# epoch plan


@dataclass(frozen=True)
class EpochPlan:
    """Plan of one epoch: the row groups each rank reads, in read order, and the sizes of its batches.

    Every rank has the same number of batches (:attr:`num_steps`).

    Attributes:
        row_groups: per rank, the row groups to read, in read order.
        batch_sizes: per rank, the rows of each batch; they add up to the rank's training rows.
    """

    row_groups: tuple[tuple[int, ...], ...]
    batch_sizes: tuple[tuple[int, ...], ...]

    @property
    def num_steps(self) -> int:
        """Batches per rank."""
        return len(self.batch_sizes[0]) if self.batch_sizes else 0


def plan_epoch(
    row_group_rows: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    world_size: int = 1,
    generator: np.random.Generator | None = None,
    min_rows_per_batch: int = 1,
) -> EpochPlan:
    """Deal the row groups to ranks and size every rank's batches so that all ranks take the same steps.

    Row groups are visited in a random order (``generator``) or in file order (``None``). Each goes
    to the rank with the fewest rows so far (the lowest rank on ties), so ranks differ by at most one
    row group's rows. The steps S are ``ceil(max rank rows / batch_size)``. A rank with enough rows
    fills ``batch_size`` rows per batch and ends with a smaller one. A rank with fewer rows spreads
    them evenly over the S batches, so its batches are smaller. When a batch would hold fewer than
    ``min_rows_per_batch`` rows, S drops by one and the last batches absorb the rows, so a last batch
    may exceed ``batch_size``.

    Args:
        row_group_rows: ``(G,)`` training rows in each row group.
        batch_size: rows per batch, B.
        world_size: number of ranks, W.
        generator: the epoch's random generator; ``None`` keeps the file order.
        min_rows_per_batch: minimum rows per batch (2 for batch norm in a distributed run).

    Returns:
        The plan of every rank.

    Raises:
        DataError: a rank would get fewer than ``min_rows_per_batch`` rows, because the file has too
            few row groups with training rows for ``world_size`` ranks.

    Example:
        >>> plan = plan_epoch([5, 5, 3], batch_size=4, world_size=2)
        >>> plan.row_groups, plan.batch_sizes
        (((0, 2), (1,)), ((4, 4), (4, 1)))
    """
    counts = np.asarray(row_group_rows, dtype=np.int64)
    order = generator.permutation(len(counts)) if generator is not None else np.arange(len(counts))
    groups: list[list[int]] = [[] for _ in range(world_size)]
    loads = np.zeros(world_size, dtype=np.int64)
    for group in order:
        if counts[group] == 0:
            continue
        rank = int(np.argmin(loads))
        groups[rank].append(int(group))
        loads[rank] += counts[group]
    if int(loads.sum()) == 0:
        return EpochPlan(tuple(tuple(g) for g in groups), tuple(() for _ in groups))
    if int(loads.min()) < min_rows_per_batch:
        with_rows = int(np.count_nonzero(counts))
        raise DataError(
            f"rank {int(np.argmin(loads))} of {world_size} would get {int(loads.min())} training row(s), fewer "
            f"than the {min_rows_per_batch} a batch needs: the file has {with_rows} row group(s) with training "
            "rows. Write the Parquet file with smaller row groups (pyarrow.parquet.write_table(..., "
            "row_group_size=...)) or train with fewer processes"
        )
    steps = math.ceil(int(loads.max()) / batch_size)
    sizes = [_batch_sizes(int(n), steps, batch_size) for n in loads]
    while steps > 1 and min(min(s) for s in sizes) < min_rows_per_batch:
        steps -= 1
        sizes = [_batch_sizes(int(n), steps, batch_size) for n in loads]
    return EpochPlan(tuple(tuple(g) for g in groups), tuple(tuple(s) for s in sizes))


def _batch_sizes(num_rows: int, steps: int, batch_size: int) -> list[int]:
    """Split ``num_rows`` into ``steps`` batches: full batches then the rest, or evenly when too few rows."""
    if num_rows > (steps - 1) * batch_size:
        return [batch_size] * (steps - 1) + [num_rows - (steps - 1) * batch_size]
    base, extra = divmod(num_rows, steps)
    return [base + 1] * extra + [base] * (steps - extra)


# ----------------------------------------------------------------------------------------------------
# the training stream


class ParquetTrainStream:
    """The training rows of a Parquet log, read, encoded and shuffled anew in every epoch.

    One epoch: :func:`plan_epoch` deals the row groups with training rows to the ranks (in a seeded
    random order when shuffling). This rank reads its row groups in batches of ``read_rows`` rows,
    keeps the training rows, drops invalid rows and encodes them. A shuffle buffer of
    ``shuffle_buffer_rows`` encoded rows then mixes them. Once the buffer is full, each new row
    replaces one drawn uniformly from the buffer, and the drawn rows go out. The rows leave in
    batches of the planned sizes: ``batch_size`` rows except the last (see :func:`plan_epoch`).

    Every training row is yielded exactly once per epoch over all ranks, because the plan deals each
    row group to one rank and an epoch that reads another row count than the scan raises DataError.
    The order depends only on ``(seed, epoch, rank, world_size)``, so a rerun or a resumed run
    repeats it, and epochs differ. Memory contains the buffer, one read batch and the side table,
    never the whole file.

    Args:
        log: the training file.
        data: the data config (split, invalid-row handling).
        encoders: fitted encoders.
        columns: the columns to read (features, labels, split column).
        row_group_rows: ``(G,)`` training rows per row group, from the scan.
        batch_size: rows per batch, B.
        seed: the run seed.
        read_rows: rows per read batch.
        shuffle_buffer_rows: capacity of the shuffle buffer; 0 shuffles within each read batch only.
        shuffle: mix rows and row groups; ``False`` yields the rows in file order.
        rank: this process's rank.
        world_size: number of ranks.

    Raises:
        ValueError: ``rank`` is not in ``0 .. world_size - 1``, or ``batch_size`` or ``read_rows`` is below 1.
    """

    def __init__(
        self,
        log: ParquetLog,
        data: DataConfig,
        encoders: FeatureEncoders,
        columns: Sequence[str],
        row_group_rows: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        read_rows: int,
        shuffle_buffer_rows: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0 .. world_size - 1 = {world_size - 1}, got {rank}")
        if batch_size < 1 or read_rows < 1:
            raise ValueError(f"batch_size and read_rows must be at least 1, got {batch_size} and {read_rows}")
        self.log = log
        self.data = data
        self.encoders = encoders
        self.columns = list(columns)
        self.row_group_rows = np.asarray(row_group_rows, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.read_rows = read_rows
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        # Invalid rows dropped by this rank in the last epoch read.
        self.skipped_rows = 0

    def __len__(self) -> int:
        """Training rows of one epoch over all ranks."""
        return int(self.row_group_rows.sum())

    def plan(self, epoch: int, *, min_rows_per_batch: int = 1) -> EpochPlan:
        """Return the plan of every rank for ``epoch``, which every rank computes alike."""
        generator = np.random.default_rng(self._seed_sequence(epoch, _PLAN_STREAM)) if self.shuffle else None
        return plan_epoch(
            self.row_group_rows,
            batch_size=self.batch_size,
            world_size=self.world_size,
            generator=generator,
            min_rows_per_batch=min_rows_per_batch,
        )

    def num_batches(self, epoch: int, *, min_rows_per_batch: int = 1) -> int:
        """Return how many batches :meth:`iter_batches` yields in ``epoch`` on this rank (the same on every rank)."""
        return self.plan(epoch, min_rows_per_batch=min_rows_per_batch).num_steps

    def iter_batches(self, epoch: int, *, min_rows_per_batch: int = 1) -> Iterator[Batch]:
        """Yield this rank's batches of ``epoch`` (1-based), in the order the class docstring describes.

        Raises:
            DataError: a row is invalid under ``data.on_invalid: error``, or the file no longer has
                the training rows the scan counted.
        """
        for encoded in self.iter_encoded(epoch, min_rows_per_batch=min_rows_per_batch):
            yield encoded.batch

    def iter_encoded(self, epoch: int, *, min_rows_per_batch: int = 1) -> Iterator[EncodedData]:
        """Yield the batches of :meth:`iter_batches` with their file row numbers (``row_ids``).

        Raises:
            DataError: see :meth:`iter_batches`.
        """
        plan = self.plan(epoch, min_rows_per_batch=min_rows_per_batch)
        if plan.num_steps == 0:
            return
        generator = np.random.default_rng(self._seed_sequence(epoch, _BUFFER_STREAM, self.rank))
        invalid = InvalidRows(self.encoders, self.data.path, self.data.on_invalid)
        rows = self._encoded_rows(plan.row_groups[self.rank], invalid)
        if self.shuffle:
            rows = shuffle_buffer(rows, self.shuffle_buffer_rows, generator)
        yield from self._rebatch(rows, plan.batch_sizes[self.rank])
        self.skipped_rows = invalid.skipped
        logger.debug("epoch %d, rank %d: dropped %d invalid row(s)", epoch, self.rank, invalid.skipped)

    def _encoded_rows(self, row_groups: Sequence[int], invalid: InvalidRows) -> Iterator[EncodedData]:
        for _group, table in self.log.read(self.columns, row_groups, self.read_rows, ReadCounts()):
            table = invalid.drop(table)
            masks = split_training_file(table, self.data, self.data.path)
            if not masks.train.all():
                table = table.filter(pa.array(masks.train))
            if table.num_rows:
                encoded = self.encoders.encode(table)
                # Evaluation-only columns are not needed to train.
                yield EncodedData(batch=encoded.batch, row_ids=encoded.row_ids)

    def _rebatch(self, pieces: Iterator[EncodedData], sizes: Sequence[int]) -> Iterator[EncodedData]:
        """Cut the stream of rows into batches of the planned ``sizes``."""
        pending: list[EncodedData] = []
        pending_rows = 0
        index = 0
        for piece in pieces:
            pending.append(piece)
            pending_rows += len(piece)
            while index < len(sizes) and pending_rows >= sizes[index]:
                merged = concat_encoded(pending)
                yield _slice(merged, 0, sizes[index])
                rest = _slice(merged, sizes[index], len(merged))
                pending = [rest] if len(rest) else []
                pending_rows = len(rest)
                index += 1
        if pending_rows or index != len(sizes):
            expected = sum(sizes)
            read = sum(sizes[:index]) + pending_rows
            raise DataError(
                f"{self.data.path}: rank {self.rank} read {read} training rows in this epoch, but the scan "
                f"before training counted {expected}; the file changed during training. Restart the run"
            )

    def _seed_sequence(self, epoch: int, stream: int, rank: int = 0) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.seed % 2**64, epoch, stream, rank])


def shuffle_buffer(
    pieces: Iterable[EncodedData], capacity: int, generator: np.random.Generator
) -> Iterator[EncodedData]:
    """Mix a stream of encoded rows through a buffer of ``capacity`` rows, yielding every row once.

    The buffer first fills with the leading rows. Then each piece of R incoming rows takes the
    places of R rows drawn uniformly without replacement from the buffer, and the drawn rows are
    yielded. At the end the buffer is yielded in a random order. With ``capacity`` 0, each piece is
    permuted on its own.

    Args:
        pieces: encoded rows in read order.
        capacity: rows the buffer holds.
        generator: the random generator of this epoch and rank.

    Returns:
        An iterator over pieces of shuffled rows of varying sizes, which :class:`ParquetTrainStream`
        cuts into batches.
    """
    pool: EncodedData | None = None
    filling: list[EncodedData] = []
    filled = 0
    for piece in pieces:
        if capacity == 0:
            yield piece.take(generator.permutation(len(piece)))
            continue
        start = 0
        if pool is None:
            start = min(capacity - filled, len(piece))
            filling.append(_slice(piece, 0, start))
            filled += start
            if filled < capacity:
                continue
            # Copied, so that writes into the pool never reach the caller's tensors.
            pool = concat_encoded(filling).take(np.arange(capacity))
            filling = []
        while start < len(piece):
            incoming = _slice(piece, start, min(start + capacity, len(piece)))
            slots = generator.choice(capacity, size=len(incoming), replace=False)
            yield pool.take(slots)
            pool = _put(pool, slots, incoming)
            start += len(incoming)
    if pool is None and filling:
        # Fewer rows than the buffer holds: they were never mixed, so permute them all.
        pool = concat_encoded(filling)
    if pool is not None and len(pool):
        yield pool.take(generator.permutation(len(pool)))


# ----------------------------------------------------------------------------------------------------
# preparation


@dataclass
class StreamingData:
    """The streamed training split, in-memory validation and test splits, and the encoders.

    Attributes:
        train: the training rows, read anew every epoch.
        valid: validation rows, or ``None`` when the split has none.
        test: test rows.
        encoders: the encoders fitted on the training rows (or passed in).
        skipped_rows: invalid rows dropped from all files during preparation.
    """

    train: ParquetTrainStream
    valid: EncodedData | None
    test: EncodedData
    encoders: FeatureEncoders
    skipped_rows: int = 0


def prepare_streaming_data(
    config: RunConfig,
    encoders: FeatureEncoders | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> StreamingData:
    """Scan the training file, fit the encoders, encode validation and test rows, and set up the stream.

    Args:
        config: the run config; ``data.streaming`` sets the read batch and shuffle buffer sizes.
        encoders: encoders fitted earlier; when given they are used as they are and not refitted.
        rank: this process's rank; it reads only its own row groups during training.
        world_size: number of ranks.
        shuffle: shuffle the training rows (``False`` yields them in file order, for tests).

    Returns:
        :class:`StreamingData`.

    Raises:
        ConfigError: the split is ``random``.
        DataError: a file is missing, is not Parquet or lacks a column; a split is empty; or (with
            ``on_invalid: error``) a row cannot be parsed.
    """
    data = config.data
    split = data.split
    if not isinstance(split, (FilesSplit, ColumnSplit)):
        raise ConfigError([_split_problem(split.method)])
    fit = encoders is None
    encoders = encoders if encoders is not None else FeatureEncoders.from_config(config)
    streaming = data.streaming
    model_columns = encoders.input_columns() + encoders.label_columns()
    split_columns = [split.column] if isinstance(split, ColumnSplit) else []
    train_columns = list(dict.fromkeys(model_columns + split_columns))
    group_columns = [encoders.group_column] if encoders.group_column else []
    eval_columns = list(dict.fromkeys(train_columns + group_columns))

    log = ParquetLog(data, data.path, eval_columns + _truth_columns(data.path))
    scan = _scan_training_file(log, data, encoders, train_columns, fit=fit)
    skipped = scan.skipped
    if scan.statistics is not None:
        scan.statistics.fit()

    valid_parts, test_parts = _encode_evaluation_rows(
        log, data, encoders, eval_columns + _truth_columns(data.path), scan.evaluation_row_groups
    )
    if isinstance(split, FilesSplit):
        test_data, skipped_test = _encode_file(data, split.test_path, eval_columns, encoders, truth=True)
        test_parts = [test_data] if test_data is not None else []
        skipped += skipped_test
        if split.valid_path:
            valid_data, skipped_valid = _encode_file(
                data, split.valid_path, eval_columns, encoders, truth=False
            )
            valid_parts = [valid_data] if valid_data is not None else []
            skipped += skipped_valid
    valid = concat_encoded(valid_parts) if valid_parts else None
    test = concat_encoded(test_parts) if test_parts else None

    num_train = int(scan.row_group_rows.sum())
    for name, rows in (("train", num_train), ("test", len(test) if test is not None else 0)):
        if rows == 0:
            raise DataError(
                f"the {name} split of {data.path} is empty; check `data.filters` and `data.split` ({split.method})"
            )
    assert test is not None  # checked just above
    logger.info(
        "data (streamed from %d row groups): %d train, %d validation, %d test rows; %d skipped as invalid",
        log.num_row_groups,
        num_train,
        len(valid) if valid is not None else 0,
        len(test),
        skipped,
    )
    stream = ParquetTrainStream(
        log,
        data,
        encoders,
        train_columns,
        scan.row_group_rows,
        batch_size=config.training.batch_size,
        seed=config.seed,
        read_rows=streaming.read_rows,
        shuffle_buffer_rows=streaming.shuffle_buffer_rows,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
    )
    return StreamingData(train=stream, valid=valid, test=test, encoders=encoders, skipped_rows=skipped)


@dataclass
class _Scan:
    """Result of the pass over the training file."""

    row_group_rows: np.ndarray
    # Row groups with validation or test rows, which a second pass encodes.
    evaluation_row_groups: list[int]
    skipped: int
    # Encoder statistics of the training rows, or None when the encoders came fitted.
    statistics: EncoderStatistics | None


def _scan_training_file(
    log: ParquetLog, data: DataConfig, encoders: FeatureEncoders, columns: Sequence[str], *, fit: bool
) -> _Scan:
    """Read the training file once: count training rows per row group and accumulate encoder statistics."""
    statistics = EncoderStatistics(encoders) if fit else None
    invalid = InvalidRows(encoders, data.path, data.on_invalid)
    counts = ReadCounts()
    row_group_rows = np.zeros(log.num_row_groups, dtype=np.int64)
    evaluation_row_groups: list[int] = []
    for group, table in log.read(columns, range(log.num_row_groups), data.streaming.read_rows, counts):
        table = invalid.drop(table)
        masks = split_training_file(table, data, data.path)
        row_group_rows[group] += int(masks.train.sum())
        if (masks.valid.any() or masks.test.any()) and group not in evaluation_row_groups[-1:]:
            evaluation_row_groups.append(group)
        if statistics is not None and masks.train.any():
            statistics.update(table.filter(pa.array(masks.train)))
    log.log_counts(counts)
    invalid.log()
    return _Scan(row_group_rows, evaluation_row_groups, invalid.skipped, statistics)


def _encode_evaluation_rows(
    log: ParquetLog,
    data: DataConfig,
    encoders: FeatureEncoders,
    columns: Sequence[str],
    row_groups: Sequence[int],
) -> tuple[list[EncodedData], list[EncodedData]]:
    """Encode the validation and test rows of the training file, now that the encoders are fitted.

    Returns:
        The encoded validation parts and test parts, in file order. The scan has logged the invalid
        rows of these row groups already, so they are dropped here without a second message.
    """
    valid_parts: list[EncodedData] = []
    test_parts: list[EncodedData] = []
    invalid = InvalidRows(encoders, data.path, data.on_invalid)
    for _group, table in log.read(columns, row_groups, data.streaming.read_rows, ReadCounts()):
        table = invalid.drop(table)
        masks = split_training_file(table, data, data.path)
        if masks.valid.any():
            valid_parts.append(encoders.encode(table.filter(pa.array(masks.valid))))
        if masks.test.any():
            test_parts.append(encoders.encode(table.filter(pa.array(masks.test))))
    return valid_parts, test_parts


def _encode_file(
    data: DataConfig, path: str, columns: Sequence[str], encoders: FeatureEncoders, *, truth: bool
) -> tuple[EncodedData | None, int]:
    """Encode every row of a validation or test file batch by batch, and count its invalid rows."""
    requested = list(columns) + (_truth_columns(path) if truth else [])
    log = ParquetLog(data, path, requested)
    invalid = InvalidRows(encoders, path, data.on_invalid)
    counts = ReadCounts()
    parts = []
    for _group, table in log.read(requested, range(log.num_row_groups), data.streaming.read_rows, counts):
        table = invalid.drop(table)
        if table.num_rows:
            parts.append(encoders.encode(table))
    log.log_counts(counts)
    invalid.log()
    return (concat_encoded(parts) if parts else None), invalid.skipped


def _truth_columns(path: str) -> list[str]:
    """Return the ground-truth columns of a Parquet file, which simulated logs carry (none if unreadable)."""
    resolved = resolve_path(path)
    if not resolved.is_file() or not is_parquet(resolved):
        return []
    return [name for name in pq.read_schema(resolved).names if name.startswith(TRUTH_PREFIX)]
