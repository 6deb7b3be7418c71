"""From a run config to encoded train, validation and test tensors.

Steps: read the needed columns (and join a side table), find rows that cannot be parsed (skip and
log them, or raise), split, fit the encoders on the training rows only, and encode every split in
whole-column passes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mtrank.config.schema import CategoricalFeature, ColumnSplit, DataConfig, FilesSplit, RowFilter, RunConfig
from mtrank.data.encoders import (
    Encoder,
    LabelEncoder,
    NumericEncoder,
    PositionEncoder,
    RawIdEncoder,
    VocabularyEncoder,
    encoder_from_dict,
    parse_float,
)
from mtrank.data.readers import read_column_names, read_table
from mtrank.data.registry import resolve_path
from mtrank.data.tensors import Batch, EncodedData
from mtrank.errors import DataError

logger = logging.getLogger(__name__)

ROW_COLUMN = "__row__"
# Columns with this prefix hold simulated ground truth: kept for evaluation, never fed to the model.
TRUTH_PREFIX = "true_"
# Evaluation-only copy of the encoded position ids.
POSITION_EXTRA = "position_id"
# How many invalid rows a log message or error quotes.
MAX_EXAMPLES = 3


@dataclass
class FeatureEncoders:
    """All fitted encoders of a run, saved as ``encoders.json`` beside the weights.

    Attributes:
        categorical: feature name -> (source column, encoder), in config order.
        numeric: feature name -> (source column, encoder), in config order.
        labels: task name -> (source column, encoder), in config order.
        position: (column, encoder) of the shallow tower's position, or ``None``.
        device: device column -> encoder, in config order.
        group_column: column that groups rows for GAUC, or ``None``.
    """

    categorical: dict[str, tuple[str, Encoder]] = field(default_factory=dict)
    numeric: dict[str, tuple[str, NumericEncoder]] = field(default_factory=dict)
    labels: dict[str, tuple[str, LabelEncoder]] = field(default_factory=dict)
    position: tuple[str, PositionEncoder] | None = None
    device: dict[str, VocabularyEncoder] = field(default_factory=dict)
    group_column: str | None = None

    @classmethod
    def from_config(cls, config: RunConfig) -> FeatureEncoders:
        """Create unfitted encoders for every feature, label and shallow-tower column of ``config``."""
        from mtrank.embeddings import EMBEDDING_KINDS

        encoders = cls(group_column=config.evaluation.group_column)
        for feature in config.features:
            if isinstance(feature, CategoricalFeature):
                factory = EMBEDDING_KINDS.get(feature.embedding.kind)
                needs_vocabulary = getattr(factory, "needs_vocabulary", True)
                encoder: Encoder = (
                    VocabularyEncoder(min_count=feature.min_count) if needs_vocabulary else RawIdEncoder()
                )
                encoders.categorical[feature.name] = (feature.source, encoder)
            else:
                encoders.numeric[feature.name] = (
                    feature.source,
                    NumericEncoder(transform_name=feature.transform, standardize=feature.standardize),
                )
        for task in config.tasks:
            rule = task.label
            encoders.labels[task.name] = (
                rule.column,
                LabelEncoder(
                    task_type=task.type,
                    equals=None if rule.equals is None else str(rule.equals),
                    greater_than=rule.greater_than,
                    transform_name=rule.transform,
                    mask_missing=config.data.missing_labels == "mask",
                ),
            )
        bias = config.model.position_bias
        if bias is not None:
            encoders.position = (bias.position, PositionEncoder(bias.first_position, bias.max_position))
            encoders.device = {column: VocabularyEncoder(min_count=1) for column in bias.device}
        return encoders

    def input_columns(self) -> list[str]:
        """Columns the model reads (features and shallow-tower inputs), without labels."""
        columns = [source for source, _ in self.categorical.values()]
        columns += [source for source, _ in self.numeric.values()]
        if self.position is not None:
            columns.append(self.position[0])
        columns += list(self.device)
        return list(dict.fromkeys(columns))

    def label_columns(self) -> list[str]:
        return list(dict.fromkeys(source for source, _ in self.labels.values()))

    def fit(self, table: pa.Table) -> FeatureEncoders:
        """Fit every encoder on ``table`` (the training rows)."""
        for source, encoder in self.categorical.values():
            encoder.fit(table[source])
        for source, encoder in self.numeric.values():
            encoder.fit(table[source])
        for column, encoder in self.device.items():
            encoder.fit(table[column])
        return self

    def find_invalid(self, table: pa.Table, *, with_labels: bool) -> dict[str, tuple[np.ndarray, str]]:
        """Return, per column with unparsable rows, the invalid-row mask and the reason."""
        problems: dict[str, tuple[np.ndarray, str]] = {}
        checks: list[tuple[str, Encoder]] = [(source, enc) for source, enc in self.numeric.values()]
        if self.position is not None and self.position[0] in table.column_names:
            checks.append(self.position)
        if with_labels:
            checks += [(source, enc) for source, enc in self.labels.values()]
        for source, encoder in checks:
            result = encoder.transform(table[source])
            if result.invalid.any():
                previous = problems.get(source)
                mask = result.invalid if previous is None else previous[0] | result.invalid
                problems[source] = (mask, result.reason)
        return problems

    def encode(self, table: pa.Table, *, with_labels: bool = True, with_position: bool = True) -> EncodedData:
        """Encode ``table`` into tensors; call after :meth:`fit` and after invalid rows are removed.

        Args:
            table: rows to encode; must hold :meth:`input_columns` (and label columns if ``with_labels``).
                The position column may be absent: positions are then missing, as at serving time.
            with_labels: encode the task labels too.
            with_position: read the position column when present; ``False`` forces missing positions.
        """
        num_rows = table.num_rows
        categorical = np.zeros((num_rows, len(self.categorical)), dtype=np.int64)
        for j, (source, encoder) in enumerate(self.categorical.values()):
            categorical[:, j] = encoder.transform(table[source]).values
        numeric = np.zeros((num_rows, len(self.numeric)), dtype=np.float32)
        for j, (source, encoder) in enumerate(self.numeric.values()):
            numeric[:, j] = encoder.transform(table[source]).values
        labels = label_mask = None
        if with_labels:
            label_array = np.zeros((num_rows, len(self.labels)), dtype=np.float32)
            mask_array = np.ones((num_rows, len(self.labels)), dtype=np.float32)
            for j, (source, encoder) in enumerate(self.labels.values()):
                result = encoder.transform(table[source])
                label_array[:, j] = result.values
                if result.missing is not None:
                    mask_array[:, j] = ~result.missing
            labels = torch.from_numpy(label_array)
            if (mask_array < 1).any():
                label_mask = torch.from_numpy(mask_array)
        position = device = None
        extras: dict[str, np.ndarray] = {}
        if self.position is not None:
            column, encoder = self.position
            position_ids = encoder.transform(table[column]).values if column in table.column_names else None
            if position_ids is not None:
                # Kept for evaluation (learned bias per position) even when the model must not see it.
                extras[POSITION_EXTRA] = position_ids
            if with_position and position_ids is not None:
                position = torch.from_numpy(position_ids)
            else:
                position = torch.zeros(num_rows, dtype=torch.int64)
            device_ids = np.zeros((num_rows, len(self.device)), dtype=np.int64)
            for j, (column, encoder) in enumerate(self.device.items()):
                device_ids[:, j] = encoder.transform(table[column]).values
            device = torch.from_numpy(device_ids)
        batch = Batch(
            categorical=torch.from_numpy(categorical),
            numeric=torch.from_numpy(numeric),
            labels=labels,
            position=position,
            device=device,
            label_mask=label_mask,
        )
        row_ids = (
            np.asarray(table[ROW_COLUMN].to_numpy(), dtype=np.int64)
            if ROW_COLUMN in table.column_names
            else np.arange(num_rows, dtype=np.int64)
        )
        groups = None
        if self.group_column and self.group_column in table.column_names:
            groups = np.asarray(
                pc.fill_null(pc.cast(table[self.group_column], pa.string()), "").to_numpy(
                    zero_copy_only=False
                )
            )
        for name in table.column_names:
            if name.startswith(TRUTH_PREFIX):
                extras[name] = parse_float(table[name])[0]
        return EncodedData(batch=batch, row_ids=row_ids, groups=groups, extras=extras)

    def vocabulary_sizes(self) -> dict[str, int | None]:
        """Feature name -> number of ids (``None`` for raw-id features that need no vocabulary)."""
        return {
            name: (enc.size if isinstance(enc, VocabularyEncoder) else None)
            for name, (_source, enc) in self.categorical.items()
        }

    def to_dict(self) -> dict[str, Any]:
        def entries(items: Mapping[str, tuple[str, Encoder]]) -> list[dict[str, Any]]:
            return [{"name": n, "column": s, "encoder": e.to_dict()} for n, (s, e) in items.items()]

        return {
            "format": 1,
            "categorical": entries(self.categorical),
            "numeric": entries(self.numeric),
            "labels": entries(self.labels),
            "position": (
                {"column": self.position[0], "encoder": self.position[1].to_dict()} if self.position else None
            ),
            "device": [{"column": c, "encoder": e.to_dict()} for c, e in self.device.items()],
            "group_column": self.group_column,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureEncoders:
        def entries(items: list[dict[str, Any]]) -> dict[str, tuple[str, Any]]:
            return {item["name"]: (item["column"], encoder_from_dict(item["encoder"])) for item in items}

        position = data.get("position")
        return cls(
            categorical=entries(data["categorical"]),
            numeric=entries(data["numeric"]),
            labels=entries(data["labels"]),
            position=(position["column"], cast(PositionEncoder, encoder_from_dict(position["encoder"])))
            if position
            else None,
            device={
                item["column"]: cast(VocabularyEncoder, encoder_from_dict(item["encoder"]))
                for item in data["device"]
            },
            group_column=data.get("group_column"),
        )

    def save(self, path: Path) -> None:
        """Write the encoders as JSON."""
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> FeatureEncoders:
        """Read encoders written by :meth:`save`."""
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


@dataclass
class PreparedData:
    """Encoded splits and the encoders fitted on the training split."""

    train: EncodedData
    valid: EncodedData | None
    test: EncodedData
    encoders: FeatureEncoders
    skipped_rows: int = 0


def _split_file_layout(data: DataConfig, split: FilesSplit) -> DataConfig:
    """Return the data config to read a files split's valid and test files with, header per ``split.header``.

    Header-less split files of a training file with a header (Avazu's sample) take the training
    file's header names unless ``data.column_names`` lists them.
    """
    if split.header is None or split.header == data.header:
        return data
    names = data.column_names
    if not split.header and not names:
        names = read_column_names(resolve_path(data.path), file_format=data.format, separator=data.separator)
    return data.model_copy(update={"header": split.header, "column_names": names})


def read_source(data: DataConfig, path: str, columns: list[str]) -> pa.Table:
    """Read ``columns`` of one log file (joining the side table if configured) with a row-number column.

    The config's row filters are applied after the join, so they may test side-table columns.
    """
    resolved = resolve_path(path)
    columns = list(dict.fromkeys([*columns, *(f.column for f in data.filters)]))
    join = data.join
    own_columns = columns
    side_columns: list[str] = []
    side_path: Path | None = None
    if join is not None:
        side_path = resolve_path(join.path)
        side_names = read_table(
            side_path, file_format=join.format, separator=join.separator, columns=None, strip=data.strip
        ).column_names
        available = set(join.columns or side_names)
        side_columns = [c for c in columns if c in available and c != join.key]
        own_columns = [c for c in columns if c not in side_columns]
        if join.key not in own_columns:
            own_columns.append(join.key)
    table = read_table(
        resolved,
        file_format=data.format,
        header=data.header,
        column_names=data.column_names,
        separator=data.separator,
        columns=own_columns,
        strip=data.strip,
        missing_values=data.missing_values,
    )
    table = table.append_column(ROW_COLUMN, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    if join is not None and side_path is not None and side_columns:
        side = read_table(
            side_path,
            file_format=join.format,
            separator=join.separator,
            columns=[join.key, *side_columns],
            strip=data.strip,
            missing_values=data.missing_values,
        )
        side = unique_keys(side, join.key, side_path)
        table = table.join(side, keys=join.key, join_type="left outer", coalesce_keys=True)
        # Arrow joins do not keep row order; restore the file order.
        table = table.sort_by(ROW_COLUMN)
        unmatched = int(pc.sum(pc.is_null(table[side_columns[0]])).as_py() or 0)
        if unmatched:
            logger.warning(
                "%d of %d rows of %s have no match for `%s` in %s; their side features are missing",
                unmatched,
                table.num_rows,
                resolved,
                join.key,
                side_path,
            )
    return apply_filters(table, data.filters, str(resolved))


def filter_mask(table: pa.Table, filters: Sequence[RowFilter]) -> np.ndarray:
    """Return the ``(N,)`` mask of rows that pass every filter, values compared as text."""
    keep = np.ones(table.num_rows, dtype=bool)
    for row_filter in filters:
        text = pc.cast(table[row_filter.column], pa.string())
        if row_filter.equals is not None:
            passed = pc.equal(text, str(row_filter.equals))
        elif row_filter.not_equals is not None:
            passed = pc.not_equal(text, str(row_filter.not_equals))
        else:
            values = pa.array(
                [str(v) for v in (row_filter.isin or row_filter.not_in or [])], type=pa.string()
            )
            passed = pc.is_in(text, value_set=values)
            if row_filter.not_in is not None:
                passed = pc.invert(passed)
        keep &= np.asarray(pc.fill_null(passed, False).to_numpy(zero_copy_only=False), dtype=bool)
    return keep


def apply_filters(table: pa.Table, filters: list[RowFilter], source: str) -> pa.Table:
    """Keep the rows that pass every filter (compared as text), logging how many were removed."""
    if not filters:
        return table
    keep = filter_mask(table, filters)
    logger.info("%s: row filters kept %d of %d rows", source, int(keep.sum()), table.num_rows)
    return table.filter(pa.array(keep))


def unique_keys(side: pa.Table, key: str, path: Path) -> pa.Table:
    counts = pc.value_counts(side[key])
    duplicated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(duplicated):
        raise DataError(
            f"{path}: join key `{key}` is not unique (e.g. {duplicated[0].as_py()!r} appears more than once); "
            "a side table needs one row per key"
        )
    return side


def drop_invalid(
    table: pa.Table, encoders: FeatureEncoders, *, source: str, on_invalid: str, with_labels: bool = True
) -> tuple[pa.Table, int]:
    """Remove rows that cannot be parsed, logging counts and examples, or raise when ``on_invalid`` is ``error``.

    Returns:
        The table without invalid rows, and how many were removed.

    Raises:
        DataError: ``on_invalid`` is ``error`` and a row is invalid; names the file, row, column and value.
    """
    problems = encoders.find_invalid(table, with_labels=with_labels)
    if not problems:
        return table, 0
    rows = (
        np.asarray(table[ROW_COLUMN].to_numpy(), dtype=np.int64) if ROW_COLUMN in table.column_names else None
    )
    combined = np.zeros(table.num_rows, dtype=bool)
    for column, (mask, reason) in problems.items():
        combined |= mask
        positions = np.flatnonzero(mask)[:MAX_EXAMPLES]
        examples = ", ".join(
            f"row {int(rows[p]) if rows is not None else int(p)}: {table[column][int(p)].as_py()!r}"
            for p in positions
        )
        if on_invalid == "error":
            first = int(positions[0])
            row = int(rows[first]) if rows is not None else first
            raise DataError(
                f"{source}: data row {row} (0-based, header excluded), column `{column}`: invalid value "
                f"{table[column][first].as_py()!r} ({reason}); fix the data or set `data.on_invalid: skip` to "
                "drop such rows with a count in the log"
            )
        logger.warning(
            "%s: skipping %d row(s) with invalid `%s` (%s); examples: %s",
            source,
            int(mask.sum()),
            column,
            reason,
            examples,
        )
    kept = table.filter(pa.array(~combined))
    skipped = int(combined.sum())
    logger.warning(
        "%s: skipped %d of %d rows in total; %d remain", source, skipped, table.num_rows, kept.num_rows
    )
    return kept, skipped


def _split_random(num_rows: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_rows)
    num_test = int(round(num_rows * test_fraction))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def _hold_out(index: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``index`` into (kept, held-out) with a seeded shuffle."""
    if fraction <= 0:
        return index, index[:0]
    order = np.random.default_rng(seed + 1).permutation(len(index))
    num_held = int(round(len(index) * fraction))
    return np.sort(index[order[num_held:]]), np.sort(index[order[:num_held]])


def _split_by_column(table: pa.Table, split: ColumnSplit, source: str) -> tuple[np.ndarray, np.ndarray]:
    if split.column not in table.column_names:
        raise DataError(f"{source}: split column `{split.column}` is missing")
    if isinstance(split.train_max, str):
        values = pc.cast(table[split.column], pa.string())
        is_train = pc.less_equal(values, split.train_max)
    else:
        parsed, _missing, _invalid = parse_float(table[split.column])
        if np.isnan(parsed).any():
            bad = int(np.flatnonzero(np.isnan(parsed))[0])
            raise DataError(
                f"{source}: split column `{split.column}` has a missing or non-numeric value at data row {bad}: "
                f"{table[split.column][bad].as_py()!r}; clean the column or split by a text `train_max`"
            )
        is_train = pa.array(parsed <= float(split.train_max))
    mask = np.asarray(pc.fill_null(is_train, False).to_numpy(zero_copy_only=False), dtype=bool)
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def prepare_data(config: RunConfig, encoders: FeatureEncoders | None = None) -> PreparedData:
    """Read, clean, split, fit and encode the data a run config describes.

    Args:
        config: the run config.
        encoders: encoders fitted earlier (a trained run's ``encoders.json``); when given they are
            used as they are and not refitted.

    Returns:
        :class:`PreparedData` with train, validation (``None`` when ``valid_fraction`` is 0 and no
        validation file is given) and test splits.

    Raises:
        DataError: a file or column is missing, a split is empty, or (with ``on_invalid: error``) a row
            cannot be parsed.
    """
    fitted = encoders is not None
    encoders = encoders if encoders is not None else FeatureEncoders.from_config(config)
    return split_and_encode(config.data, encoders, fit=not fitted)


def split_and_encode(data: DataConfig, encoders: FeatureEncoders, *, fit: bool) -> PreparedData:
    """Read the files ``data`` names, drop invalid rows, split, optionally fit ``encoders``, and encode.

    Args:
        data: where the data is and how to split it.
        encoders: the encoders; they also name the columns to read (features, labels, group column).
        fit: fit the encoders on the training rows; ``False`` uses them as they are (evaluation of a
            trained run, fine-tuning on a base run's vocabularies).

    Returns:
        :class:`PreparedData` with the encoders passed in.

    Raises:
        DataError: see :func:`prepare_data`.
    """
    columns = encoders.input_columns() + encoders.label_columns()
    if encoders.group_column:
        columns.append(encoders.group_column)
    split = data.split
    if isinstance(split, ColumnSplit):
        columns.append(split.column)
    columns = list(dict.fromkeys(columns))

    table = read_source(data, data.path, columns + _truth_columns(data, data.path))
    table, skipped = drop_invalid(table, encoders, source=data.path, on_invalid=data.on_invalid)
    valid_table: pa.Table | None = None
    if isinstance(split, FilesSplit):
        train_table = table
        split_data = _split_file_layout(data, split)
        test_table = read_source(split_data, split.test_path, columns + _truth_columns(data, split.test_path))
        test_table, skipped_test = drop_invalid(
            test_table, encoders, source=split.test_path, on_invalid=data.on_invalid
        )
        skipped += skipped_test
        if split.valid_path:
            valid_table = read_source(split_data, split.valid_path, columns)
            valid_table, skipped_valid = drop_invalid(
                valid_table, encoders, source=split.valid_path, on_invalid=data.on_invalid
            )
            skipped += skipped_valid
        else:
            keep, held = _hold_out(np.arange(train_table.num_rows), split.valid_fraction, split.seed)
            valid_table = train_table.take(held) if len(held) else None
            train_table = train_table.take(keep)
    else:
        if isinstance(split, ColumnSplit):
            train_index, test_index = _split_by_column(table, split, data.path)
        else:
            train_index, test_index = _split_random(table.num_rows, split.test_fraction, split.seed)
        train_index, valid_index = _hold_out(train_index, split.valid_fraction, split.seed)
        train_table = table.take(train_index)
        test_table = table.take(test_index)
        valid_table = table.take(valid_index) if len(valid_index) else None

    for name, part in (("train", train_table), ("test", test_table)):
        if part.num_rows == 0:
            raise DataError(
                f"the {name} split of {data.path} is empty; check `data.filters` and `data.split` ({split.method})"
            )

    if fit:
        encoders.fit(train_table)
    logger.info(
        "data: %d train, %d validation, %d test rows; %d skipped as invalid",
        train_table.num_rows,
        valid_table.num_rows if valid_table is not None else 0,
        test_table.num_rows,
        skipped,
    )
    return PreparedData(
        train=encoders.encode(train_table),
        valid=encoders.encode(valid_table) if valid_table is not None else None,
        test=encoders.encode(test_table),
        encoders=encoders,
        skipped_rows=skipped,
    )


def _truth_columns(data: DataConfig, path: str) -> list[str]:
    """Names of ground-truth columns present in a Parquet file (simulated logs carry them)."""
    resolved = resolve_path(path)
    if not resolved.is_file():
        return []  # the read that follows raises the error that names the missing file
    if resolved.suffix.lower() != ".parquet" and data.format != "parquet":
        return []
    import pyarrow.parquet as pq

    return [name for name in pq.read_schema(resolved).names if name.startswith(TRUTH_PREFIX)]


SEPARATORS = (",", "\t", ";", "|")


def scoring_layout(data: DataConfig, path: str, columns: list[str]) -> DataConfig:
    """Return ``data`` adjusted to the layout of a file to score, which may differ from the training file.

    Parquet is recognised by its magic bytes. For text files the first line is sniffed. A separator
    whose split contains every needed column means a header. Otherwise, a split with as many fields
    as the training config's ``column_names`` means a header-less file laid out like the training file.
    """
    from mtrank.data.readers import first_line, is_parquet

    resolved = resolve_path(path)
    if not resolved.is_file():
        raise DataError(f"data file not found: {resolved}; check the --data path")
    if is_parquet(resolved):
        return data.model_copy(update={"format": "parquet"})
    line = first_line(resolved)
    own = data.separator or ("\t" if data.format == "tsv" else ",")
    candidates = list(dict.fromkeys([own, *SEPARATORS]))
    for separator in candidates:
        fields = [field.strip().strip('"') for field in line.split(separator)]
        if set(columns) <= set(fields):
            return data.model_copy(update={"format": "csv", "separator": separator, "header": True})
    if data.column_names:
        for separator in candidates:
            if len(line.split(separator)) == len(data.column_names):
                return data.model_copy(update={"format": "csv", "separator": separator, "header": False})
    best = max(candidates, key=lambda sep: len(line.split(sep)))
    return data.model_copy(update={"format": "csv", "separator": best, "header": True})


def encode_for_scoring(
    encoders: FeatureEncoders, data: DataConfig, path: str, *, with_labels: bool
) -> tuple[EncodedData, int]:
    """Read and encode a file for evaluation or prediction with already-fitted encoders.

    Label columns are read only when ``with_labels`` is set; the position column is never required.
    """
    columns = [c for c in encoders.input_columns() if encoders.position is None or c != encoders.position[0]]
    if with_labels:
        columns += encoders.label_columns()
        if encoders.group_column:
            columns.append(encoders.group_column)
    else:
        # Scoring scores every row: the training run's row filters select a scenario, not valid input.
        data = data.model_copy(update={"filters": []})
    columns = list(dict.fromkeys(columns))
    data = scoring_layout(data, path, columns)
    truth = _truth_columns(data, path)
    if truth and encoders.position is not None:
        # A simulated log: read the position too, for the learned-bias table (never for scoring).
        columns.append(encoders.position[0])
    table = read_source(data, path, columns + truth)
    table, skipped = drop_invalid(
        table, encoders, source=path, on_invalid=data.on_invalid, with_labels=with_labels
    )
    return encoders.encode(table, with_labels=with_labels, with_position=False), skipped
