"""Tests of the log readers on real CSV, gzip CSV, TSV and Parquet files."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtrank.data.readers import detect_format, read_table
from mtrank.errors import DataError

ROWS = [["u1", "3", "1"], ["u2", "?", "0"], ["u3", "", "1"]]
EXPECTED = {"user": ["u1", "u2", "u3"], "clicks": ["3", None, None], "label": ["1", "0", "1"]}


def write_text(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "separator"),
    [("log.csv", ","), ("log.csv.gz", ","), ("log.tsv", "\t"), ("log.txt", ",")],
)
def test_text_formats_read_alike(tmp_path: Path, name: str, separator: str) -> None:
    lines = [separator.join(["user", "clicks", "label"])] + [separator.join(row) for row in ROWS]
    path = write_text(tmp_path / name, lines)

    table = read_table(path)

    assert table.to_pydict() == EXPECTED


def test_parquet_keeps_stored_types(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pq.write_table(
        pa.table({"user": ["u1", "u2"], "clicks": pa.array([3, None], pa.int64()), "score": [0.5, 1.5]}), path
    )

    table = read_table(path)

    assert table.schema.field("clicks").type == pa.int64()
    assert table.schema.field("score").type == pa.float64()
    assert table.to_pydict() == {"user": ["u1", "u2"], "clicks": [3, None], "score": [0.5, 1.5]}


def test_parquet_missing_markers_become_null(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"city": [" paris ", "?", ""]}), path)

    table = read_table(path)

    assert table.column("city").to_pylist() == ["paris", None, None]


def test_text_columns_read_as_text(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", ["id,score", "9007199254740993,0.1", "7,2"])

    table = read_table(path)

    assert table.schema.field("id").type == pa.string()
    assert table.column("id").to_pylist() == ["9007199254740993", "7"]


def test_headerless_file_with_column_names(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", [",".join(row) for row in ROWS])

    table = read_table(path, header=False, column_names=["user", "clicks", "label"])

    assert table.to_pydict() == EXPECTED


def test_headerless_gzip_file(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.data.gz", [",".join(row) for row in ROWS])

    table = read_table(path, header=False, column_names=["user", "clicks", "label"], columns=["label"])

    assert table.column_names == ["label"]
    assert table.column("label").to_pylist() == ["1", "0", "1"]


def test_headerless_without_names_rejected(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", ["a,b"])

    with pytest.raises(DataError, match=r"log\.csv has no header; list its columns in `data\.column_names`"):
        read_table(path, header=False)


def test_spaces_stripped(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", ["user,city", " u1 ,  Never married", "u2, ? "])

    table = read_table(path)

    assert table.column("user").to_pylist() == ["u1", "u2"]
    assert table.column("city").to_pylist() == ["Never married", None]


def test_spaces_kept_without_strip(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", ["user,city", " u1 , ?"])

    table = read_table(path, strip=False)

    assert table.column("user").to_pylist() == [" u1 "]
    assert table.column("city").to_pylist() == [" ?"]


def test_custom_missing_values(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", ["user,city", "u1,NA", "u2,?"])

    table = read_table(path, missing_values=["NA"])

    assert table.column("city").to_pylist() == [None, "?"]


def test_explicit_separator(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", ["user;city", "u1;paris"])

    table = read_table(path, separator=";")

    assert table.to_pydict() == {"user": ["u1"], "city": ["paris"]}


def test_selected_columns_only(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", ["user,clicks,label"] + [",".join(row) for row in ROWS])

    table = read_table(path, columns=["label", "user"])

    assert sorted(table.column_names) == ["label", "user"]


def test_missing_file_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"

    with pytest.raises(DataError, match=r"data file not found: .*absent\.csv"):
        read_table(path)


def test_missing_column_named(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", ["user,label", "u1,1"])

    with pytest.raises(DataError, match=r"log\.csv has no column\(s\) clicks; it has: user, label"):
        read_table(path, columns=["user", "clicks"])


def test_missing_parquet_column_named(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": ["u1"]}), path)

    with pytest.raises(DataError, match=r"log\.parquet has no column\(s\) label; it has: user"):
        read_table(path, columns=["label"])


def test_damaged_parquet_named(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    path.write_bytes(b"not a parquet file")

    with pytest.raises(DataError, match=r"cannot read Parquet file .*log\.parquet"):
        read_table(path)


def test_ragged_row_rejected(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", ["user,label", "u1,1,extra"])

    with pytest.raises(DataError, match=r"cannot parse .*log\.csv.*check `data\.separator`"):
        read_table(path)


@pytest.mark.parametrize(
    ("name", "declared", "expected"),
    [
        ("log.parquet", "auto", "parquet"),
        ("log.pq", "auto", "parquet"),
        ("log.tsv.gz", "auto", "tsv"),
        ("census-income.test.gz", "auto", "csv"),
        ("log.tsv", "csv", "csv"),
    ],
)
def test_detect_format(name: str, declared: str, expected: str) -> None:
    assert detect_format(Path(name), declared) == expected  # type: ignore[arg-type]


def test_headerless_field_count_mismatch_named(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("1,a,x,0.5\n2,b,y,0.7\n", encoding="utf-8")
    with pytest.raises(DataError, match="the first row has 4 fields but `data.column_names` lists 3 names"):
        read_table(path, header=False, column_names=["id", "item", "city"])
