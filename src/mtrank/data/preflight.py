"""Check a run config against its data files before training: files found, columns present.

Reading only headers (or Parquet schemas) takes a moment even for large logs, so a typo in a column
name is reported before any row is read, with the columns the file does contain.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from mtrank.config.schema import ColumnSplit, DataConfig, FilesSplit, RunConfig
from mtrank.data.pipeline import FeatureEncoders
from mtrank.data.readers import read_column_names
from mtrank.data.registry import resolve_path
from mtrank.errors import DataError


@dataclass
class FileReport:
    """Columns found in one file that a run reads.

    Attributes:
        role: what the run uses the file for (``data``, ``valid``, ``test``, ``join``).
        path: the resolved path.
        columns: column names of the file, or the configured names of a header-less file.
    """

    role: str
    path: Path
    columns: list[str] = field(default_factory=list)


@dataclass
class PreflightReport:
    """Result of :func:`check_data_files`.

    Attributes:
        files: one entry per file that could be read.
        problems: every problem found, each naming the file, the column and the fix.
    """

    files: list[FileReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _needed_columns(config: RunConfig) -> list[str]:
    encoders = FeatureEncoders.from_config(config)
    columns = encoders.input_columns() + encoders.label_columns()
    if encoders.group_column:
        columns.append(encoders.group_column)
    if isinstance(config.data.split, ColumnSplit):
        columns.append(config.data.split.column)
    columns += [row_filter.column for row_filter in config.data.filters]
    return list(dict.fromkeys(columns))


def _file_columns(data: DataConfig, path: Path, *, header: bool) -> list[str]:
    if not header and data.format != "parquet":
        return list(data.column_names or [])
    return read_column_names(path, file_format=data.format, separator=data.separator)


def _missing_message(role: str, path: Path, column: str, available: list[str]) -> str:
    close = difflib.get_close_matches(column, available, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else f"; the file has: {', '.join(available[:30])}"
    return f"{role} file {path}: column `{column}` not found{hint}"


def check_data_files(config: RunConfig) -> PreflightReport:
    """Check that every file a run reads exists and contains every column the run needs.

    Log files must contain the feature, label, shallow-tower, group, split and filter columns, except
    those a ``data.join`` side table provides. Header-less text files are checked against
    ``data.column_names``. Rows are not read, so invalid values are found only by training.

    Args:
        config: a validated run config.

    Returns:
        The columns of each file read and every problem found (empty when the run can start).
    """
    report = PreflightReport()
    data = config.data
    needed = _needed_columns(config)

    side_columns: set[str] = set()
    if data.join is not None:
        try:
            side_path = resolve_path(data.join.path)
            side_names = read_column_names(
                side_path, file_format=data.join.format, separator=data.join.separator
            )
        except DataError as exc:
            report.problems.append(f"data.join.path: {exc}")
        else:
            report.files.append(FileReport("join", side_path, side_names))
            if data.join.key not in side_names:
                report.problems.append(_missing_message("join", side_path, data.join.key, side_names))
            for column in data.join.columns or []:
                if column not in side_names:
                    report.problems.append(
                        "data.join.columns: " + _missing_message("join", side_path, column, side_names)
                    )
            side_columns = set(data.join.columns or side_names) - {data.join.key}
    join_unreadable = data.join is not None and not any(entry.role == "join" for entry in report.files)

    own_needed = [column for column in needed if column not in side_columns]
    if data.join is not None and data.join.key not in own_needed:
        own_needed.append(data.join.key)

    logs: list[tuple[str, str, bool]] = [("data", data.path, data.header)]
    split = data.split
    if isinstance(split, FilesSplit):
        split_header = data.header if split.header is None else split.header
        logs.append(("test", split.test_path, split_header))
        if split.valid_path:
            logs.append(("valid", split.valid_path, split_header))
    data_columns: list[str] = []
    for role, raw_path, header in logs:
        try:
            path = resolve_path(raw_path)
            if not path.is_file():
                raise DataError(
                    f"file not found: {path}; check the path in the config or set MTRANK_DATA_DIR"
                )
            columns = _file_columns(data, path, header=header)
        except DataError as exc:
            report.problems.append(f"{role} file: {exc}")
            continue
        if role == "data":
            data_columns = columns
        elif not columns:
            # A header-less split file of a training file with a header takes the header's names.
            columns = data_columns
        report.files.append(FileReport(role, path, columns))
        if join_unreadable:
            # Which columns the side table would provide is unknown, so only its problem is reported.
            continue
        for column in own_needed:
            if column not in columns:
                report.problems.append(_missing_message(role, path, column, columns))
    return report


__all__ = ["FileReport", "PreflightReport", "check_data_files"]
