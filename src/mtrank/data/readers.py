"""Read CSV, gzip CSV, TSV and Parquet logs into pyarrow tables."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtrank.errors import DataError

logger = logging.getLogger(__name__)

FileFormat = Literal["auto", "csv", "tsv", "parquet"]


def detect_format(path: Path, declared: FileFormat = "auto") -> Literal["csv", "tsv", "parquet"]:
    """Return the file format, from ``declared`` or else from the file name's suffixes."""
    if declared != "auto":
        return declared
    suffixes = [s.lower() for s in path.suffixes]
    if ".parquet" in suffixes or ".pq" in suffixes:
        return "parquet"
    if ".tsv" in suffixes:
        return "tsv"
    return "csv"


def read_table(
    path: str | Path,
    *,
    file_format: FileFormat = "auto",
    header: bool = True,
    column_names: Sequence[str] | None = None,
    separator: str | None = None,
    columns: Sequence[str] | None = None,
    strip: bool = True,
    missing_values: Sequence[str] = ("", "?"),
) -> pa.Table:
    """Read one log file into a table whose text columns are stripped and whose missing values are null.

    CSV and TSV columns are read as text so that no id is rounded through a float; the encoders parse
    numbers later and count the rows that fail. Parquet columns keep their stored types.

    Args:
        path: the file; ``.gz`` and other compressions pyarrow recognises are decompressed.
        file_format: ``auto`` picks from the suffix (``.parquet``, ``.tsv``, else csv).
        header: whether the first line holds the column names (text formats only).
        column_names: names for a header-less file, in order.
        separator: field separator; default ``,`` for csv and tab for tsv.
        columns: the columns to keep; all when ``None``.
        strip: strip surrounding white space from text values.
        missing_values: text values that mean missing (after stripping).

    Returns:
        A ``pyarrow.Table`` with the requested columns.

    Raises:
        DataError: the file is missing, unreadable, or lacks a requested column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file not found: {path}; check `data.path` in the config or set MTRANK_DATA_DIR"
        )
    kind = detect_format(path, file_format)
    if kind == "parquet":
        table = _read_parquet(path, columns)
    else:
        table = _read_text(path, kind, header, column_names, separator, columns)
    return clean_text_columns(table, strip=strip, missing_values=missing_values)


def _read_parquet(path: Path, columns: Sequence[str] | None) -> pa.Table:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read Parquet file {path}: {exc}") from None
    _check_columns(path, schema.names, columns)
    return pq.read_table(path, columns=list(columns) if columns is not None else None)


def _read_text(
    path: Path,
    kind: Literal["csv", "tsv"],
    header: bool,
    column_names: Sequence[str] | None,
    separator: str | None,
    columns: Sequence[str] | None,
) -> pa.Table:
    delimiter = separator or ("\t" if kind == "tsv" else ",")
    if header:
        read_options = pacsv.ReadOptions(block_size=1 << 24)
        names = _header_names(path, delimiter)
    else:
        if not column_names:
            raise DataError(f"{path} has no header; list its columns in `data.column_names`")
        read_options = pacsv.ReadOptions(column_names=list(column_names), block_size=1 << 24)
        names = list(column_names)
    _check_columns(path, names, columns)
    wanted = list(columns) if columns is not None else names
    convert = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in wanted},
        include_columns=wanted,
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    parse = pacsv.ParseOptions(delimiter=delimiter)
    try:
        return pacsv.read_csv(path, read_options=read_options, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise DataError(
            f"cannot parse {path}: {exc}; check `data.separator` and `data.header` (a row with a different "
            "number of fields is the usual cause)"
        ) from None


def _header_names(path: Path, delimiter: str) -> list[str]:
    # Malformed data rows are skipped here so that the full read, not this header read, reports them.
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 20),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=lambda _row: "skip"),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"cannot parse the header of {path}: {exc}") from None
    return list(reader.schema.names)


def _check_columns(path: Path, available: Sequence[str], wanted: Sequence[str] | None) -> None:
    if wanted is None:
        return
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(
            f"{path} has no column(s) {', '.join(missing)}; it has: {', '.join(available)}. "
            "Fix the column names in the config (`data.column_names` for header-less files)"
        )


def clean_text_columns(table: pa.Table, *, strip: bool, missing_values: Sequence[str]) -> pa.Table:
    """Strip text columns and turn declared missing markers into nulls, column by column."""
    missing = pa.array(list(missing_values), type=pa.string())
    for i, field in enumerate(table.schema):
        if not pa.types.is_string(field.type) and not pa.types.is_large_string(field.type):
            continue
        column = table.column(i)
        if strip:
            column = pc.utf8_trim_whitespace(column)
        if len(missing):
            column = pc.if_else(pc.is_in(column, value_set=missing), pa.scalar(None, pa.string()), column)
        table = table.set_column(i, field.name, column)
    return table
