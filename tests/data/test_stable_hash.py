"""Tests of stable_hash_strings: FNV-1a values, input kinds, nulls, errors and cross-process determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from mtrank.data.stable_hash import NULL_HASH, stable_hash_strings
from mtrank.errors import DataError

# 64-bit FNV-1a test vectors from the FNV reference test suite (Landon Curt Noll's FNV page,
# also in IETF draft-eastlake-fnv): "", "a" and "foobar".
FNV1A_64_VECTORS = {
    "": 0xCBF29CE484222325,
    "a": 0xAF63DC4C8601EC8C,
    "foobar": 0x85944171F73967E8,
}

SAMPLE_STRINGS = ["", "a", "foobar", "café", "日本語", "🙂 emoji", "x" * 5000, "user_123", "user_124", " "]


def fnv1a_64_reference(text: str) -> int:
    """Byte-at-a-time FNV-1a in Python integers, returned as a signed int64 value."""
    value = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        value ^= byte
        value = (value * 0x100000001B3) % 2**64
    return value - 2**64 if value >= 2**63 else value


def as_signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


@pytest.mark.parametrize("text", sorted(FNV1A_64_VECTORS))
def test_fnv1a_published_vectors(text: str) -> None:
    assert int(stable_hash_strings([text])[0]) == as_signed(FNV1A_64_VECTORS[text])


def test_matches_bytewise_reference() -> None:
    hashed = stable_hash_strings(np.array(SAMPLE_STRINGS, dtype=object))
    expected = [fnv1a_64_reference(text) for text in SAMPLE_STRINGS]
    assert hashed.tolist() == expected


def test_returns_int64() -> None:
    assert stable_hash_strings(["a", "b"]).dtype == np.int64


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda values: np.array(values, dtype=object), id="numpy-object"),
        pytest.param(lambda values: np.array(values, dtype=str), id="numpy-unicode"),
        pytest.param(list, id="list"),
        pytest.param(lambda values: pa.array(values, type=pa.string()), id="arrow-string"),
        pytest.param(lambda values: pa.array(values, type=pa.large_string()), id="arrow-large-string"),
        pytest.param(
            lambda values: pa.array(values, type=pa.string_view()),
            id="arrow-string-view",
            marks=pytest.mark.skipif(
                not hasattr(pa, "string_view"), reason="pyarrow < 16 has no string_view"
            ),
        ),
        pytest.param(lambda values: pa.array(values).dictionary_encode(), id="arrow-dictionary"),
        pytest.param(lambda values: pa.chunked_array([values[:4], values[4:]]), id="arrow-chunked"),
        pytest.param(lambda values: pa.array(["skip", *values])[1:], id="arrow-sliced"),
    ],
)
def test_input_kinds_agree(make_input) -> None:  # type: ignore[no-untyped-def]
    expected = [fnv1a_64_reference(text) for text in SAMPLE_STRINGS]
    assert stable_hash_strings(make_input(SAMPLE_STRINGS)).tolist() == expected


def test_repeated_values_hash_equally() -> None:
    hashed = stable_hash_strings(["b", "a", "b", "a", "b"])
    assert hashed.tolist() == [fnv1a_64_reference(text) for text in ["b", "a", "b", "a", "b"]]


def test_nulls_map_to_reserved_value() -> None:
    hashed = stable_hash_strings(np.array(["a", None, float("nan"), ""], dtype=object))
    assert hashed.tolist()[1:3] == [NULL_HASH, NULL_HASH]


def test_empty_string_is_not_null() -> None:
    assert int(stable_hash_strings([""])[0]) != NULL_HASH


def test_arrow_nulls_map_to_reserved_value() -> None:
    hashed = stable_hash_strings(pa.array(["a", None, "b"]))
    assert int(hashed[1]) == NULL_HASH


def test_all_null_column() -> None:
    hashed = stable_hash_strings(np.array([None, None], dtype=object))
    assert hashed.tolist() == [NULL_HASH, NULL_HASH]


def test_empty_input() -> None:
    assert stable_hash_strings(np.array([], dtype=object)).shape == (0,)


def test_distinct_strings_get_distinct_hashes() -> None:
    values = np.array([f"item-{index}" for index in range(100_000)], dtype=object)
    assert np.unique(stable_hash_strings(values)).size == 100_000


def test_rejects_integer_numpy_array() -> None:
    with pytest.raises(DataError, match="dtype `int64`"):
        stable_hash_strings(np.array([1, 2, 3], dtype=np.int64))


def test_rejects_integer_arrow_array() -> None:
    with pytest.raises(DataError, match="type `int64`"):
        stable_hash_strings(pa.array([1, 2, 3]))


def test_rejects_mixed_object_array() -> None:
    with pytest.raises(DataError, match="only strings and nulls"):
        stable_hash_strings(np.array(["a", 3], dtype=object))


def test_rejects_two_dimensional_array() -> None:
    with pytest.raises(DataError, match=r"1-D array, got shape \(2, 2\)"):
        stable_hash_strings(np.array([["a", "b"], ["c", "d"]], dtype=object))


_SUBPROCESS_SCRIPT = """
import json
import numpy as np
from mtrank.data.stable_hash import stable_hash_strings
values = np.array(json.loads({values!r}), dtype=object)
print(json.dumps(stable_hash_strings(values).tolist()))
"""


def _hash_in_subprocess(values: list[str | None], hash_seed: str) -> list[int]:
    environment = dict(os.environ, PYTHONHASHSEED=hash_seed)
    script = _SUBPROCESS_SCRIPT.format(values=json.dumps(values))
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(completed.stdout)


def test_same_hashes_across_processes_and_hash_seeds() -> None:
    values: list[str | None] = [*SAMPLE_STRINGS[:7], None, "last"]
    first = _hash_in_subprocess(values, hash_seed="0")
    second = _hash_in_subprocess(values, hash_seed="987654321")
    assert first == second


def test_subprocess_hashes_match_this_process() -> None:
    values: list[str | None] = ["alpha", "beta", None]
    in_process = stable_hash_strings(np.array(values, dtype=object)).tolist()
    assert _hash_in_subprocess(values, hash_seed="42") == in_process
