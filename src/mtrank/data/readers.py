"""Read CSV, gzip CSV, TSV and Parquet logs into pyarrow tables."""

from __future__ import annotations

import csv
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
    if kind == "parquet" or (file_format == "auto" and is_parquet(path)):
        table = _read_parquet(path, columns)
    else:
        table = _read_text(path, kind, header, column_names, separator, columns)
    return clean_text_columns(table, strip=strip, missing_values=missing_values)


def read_column_names(
    path: str | Path, *, file_format: FileFormat = "auto", separator: str | None = None
) -> list[str]:
    """Return the column names of a Parquet file or of a text file's header line, without reading rows.

    Raises:
        DataError: the file is missing or its header cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; check the path in the config or set MTRANK_DATA_DIR")
    kind = detect_format(path, file_format)
    if kind == "parquet" or (file_format == "auto" and is_parquet(path)):
        try:
            return list(pq.read_schema(path).names)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"cannot read Parquet file {path}: {exc}") from None
    return _header_names(path, separator or ("\t" if kind == "tsv" else ","))


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
        line = first_line(path)
        fields = len(next(csv.reader([line], delimiter=delimiter), []))
        if line and fields != len(column_names):
            raise DataError(
                f"{path}: the first row has {fields} fields but `data.column_names` lists "
                f"{len(column_names)} names; give one name per field, in file order"
            )
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
        return pacsv.read_csv(
            _source(path), read_options=read_options, parse_options=parse, convert_options=convert
        )
    except pa.ArrowInvalid as exc:
        raise DataError(
            f"cannot parse {path}: {exc}; check `data.separator` and `data.header` (a row with a different "
            "number of fields is the usual cause)"
        ) from None


GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: Path) -> bool:
    """Return whether the file starts with the gzip magic bytes, whatever its name."""
    with path.open("rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def is_parquet(path: Path) -> bool:
    """Return whether the file starts with Parquet's magic bytes ``PAR1``."""
    with path.open("rb") as handle:
        return handle.read(4) == b"PAR1"


def _source(path: Path) -> Path | pa.NativeFile:
    """Return what pyarrow's CSV reader should open: the path, or a gzip stream for a gzip file without .gz."""
    if is_gzip(path) and path.suffix.lower() != ".gz":
        return pa.input_stream(str(path), compression="gzip")
    return path


def first_line(path: Path, max_bytes: int = 1 << 16) -> str:
    """Return the first line of a text file (decompressed when gzip), for sniffing its layout."""
    with pa.input_stream(str(path), compression="gzip" if is_gzip(path) else None) as stream:
        head = stream.read(max_bytes)
    return head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")


def _header_names(path: Path, delimiter: str) -> list[str]:
    # Malformed data rows are skipped here so that the full read, not this header read, reports them.
    try:
        reader = pacsv.open_csv(
            _source(path),
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
        hint = "Fix the column names in the config (`data.column_names` for header-less files)"
        if len(available) == 1 and any(sep in available[0] for sep in (",", "\t", ";", "|")):
            hint = "The whole header was read as one column, so the separator is wrong: set `data.separator`"
        raise DataError(
            f"{path} has no column(s) {', '.join(missing)}; it has: {', '.join(available)}. {hint}"
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
