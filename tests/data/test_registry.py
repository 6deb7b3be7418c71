"""Tests of the dataset registry: local lookup, offline errors and checksums. No test touches the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtrank.data.registry import DATASETS, is_available, locate, resolve_path, sha256_of
from mtrank.errors import DatasetNotFoundError

CENSUS = "census-income-kdd"
CENSUS_TEST = "census-income.test.gz"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Forbid downloads and point the download cache at an empty folder; return that folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MTRANK_OFFLINE", "1")
    monkeypatch.setenv("MTRANK_CACHE_DIR", str(cache))
    return cache


def test_local_file_found_under_data_dir(monkeypatch, offline, shared_data_dir: Path) -> None:
    monkeypatch.setenv("MTRANK_DATA_DIR", str(shared_data_dir))

    path = locate(CENSUS, CENSUS_TEST)

    assert path == shared_data_dir / CENSUS / CENSUS_TEST


def test_local_census_checksum_matches_registry(monkeypatch, offline, shared_data_dir: Path) -> None:
    monkeypatch.setenv("MTRANK_DATA_DIR", str(shared_data_dir))

    digest = sha256_of(locate(CENSUS, CENSUS_TEST))

    assert digest == DATASETS[CENSUS].file(CENSUS_TEST).sha256


def test_offline_missing_file_says_where_to_put_it(monkeypatch, offline, tmp_path: Path) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setenv("MTRANK_DATA_DIR", str(empty))

    with pytest.raises(DatasetNotFoundError) as caught:
        locate(CENSUS, CENSUS_TEST)

    message = str(caught.value)
    assert f"{CENSUS}/{CENSUS_TEST} is not on disk" in message
    assert f"looked in {empty / CENSUS / CENSUS_TEST} or {offline / CENSUS / CENSUS_TEST}" in message
    assert f"put it at {empty / CENSUS / CENSUS_TEST}" in message
    assert DATASETS[CENSUS].homepage in message


def test_download_cache_used_when_data_dir_unset(monkeypatch, offline) -> None:
    monkeypatch.delenv("MTRANK_DATA_DIR", raising=False)
    cached = offline / CENSUS / CENSUS_TEST
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached copy")

    assert locate(CENSUS, CENSUS_TEST) == cached


def test_data_dir_preferred_over_cache(monkeypatch, offline, tmp_path: Path) -> None:
    local = tmp_path / "data" / CENSUS / CENSUS_TEST
    local.parent.mkdir(parents=True)
    local.write_bytes(b"local copy")
    cached = offline / CENSUS / CENSUS_TEST
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached copy")
    monkeypatch.setenv("MTRANK_DATA_DIR", str(tmp_path / "data"))

    assert locate(CENSUS, CENSUS_TEST) == local


def test_is_available_false_when_missing(monkeypatch, offline, tmp_path: Path) -> None:
    monkeypatch.setenv("MTRANK_DATA_DIR", str(tmp_path))

    assert is_available(CENSUS, CENSUS_TEST) is False


def test_unknown_dataset_lists_known(offline) -> None:
    with pytest.raises(
        DatasetNotFoundError, match=r"unknown dataset `census`; known datasets: census-income-kdd"
    ):
        locate("census", CENSUS_TEST)


def test_unknown_file_lists_files(offline) -> None:
    with pytest.raises(
        DatasetNotFoundError,
        match=r"dataset `census-income-kdd` has no file `train\.csv`; its files are: census-income\.test\.gz",
    ):
        locate(CENSUS, "train.csv")


def test_dataset_path_resolved_through_registry(monkeypatch, offline, shared_data_dir: Path) -> None:
    monkeypatch.setenv("MTRANK_DATA_DIR", str(shared_data_dir))

    assert resolve_path(f"dataset:{CENSUS}/{CENSUS_TEST}") == shared_data_dir / CENSUS / CENSUS_TEST


def test_plain_path_expands_variables(monkeypatch) -> None:
    monkeypatch.setenv("MTRANK_TEST_ROOT", "/srv/logs")

    assert resolve_path("${MTRANK_TEST_ROOT}/day1.csv") == Path("/srv/logs/day1.csv")


def test_every_pinned_checksum_is_sha256() -> None:
    pinned = [entry.sha256 for dataset in DATASETS.values() for entry in dataset.files if entry.sha256]

    assert pinned
    assert all(len(digest) == 64 and int(digest, 16) >= 0 for digest in pinned)
