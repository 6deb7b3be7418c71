"""Tests of the column encoders: reserved ids, exact int64 ids, numeric parsing and label rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from mtrank.data.encoders import (
    FIRST_VALUE_ID,
    MISSING_POSITION_ID,
    OOV_ID,
    PADDING_ID,
    LabelEncoder,
    NumericEncoder,
    PositionEncoder,
    RawIdEncoder,
    VocabularyEncoder,
    encoder_from_dict,
    parse_float,
)

# 2^53 + 1 is the smallest positive integer that float64 cannot represent: it rounds to 2^53 (IEEE 754
# round-half-to-even), so a float64 path would merge the two ids.
BIG_ID = 2**53 + 1
BIG_NEIGHBOUR = 2**53


def test_big_ids_collide_as_float64() -> None:
    # The premise of the exact-id tests below: a float64 path would merge these two ids.
    assert float(BIG_ID) == float(BIG_NEIGHBOUR)
    assert np.array([BIG_ID], dtype=np.int64).astype(np.float64)[0] == BIG_NEIGHBOUR


def test_vocabulary_reserves_padding_and_oov() -> None:
    encoder = VocabularyEncoder().fit(pa.array(["b", "a", "b", "c", "b", "a"]))

    ids = encoder.transform(pa.array(["b", "a", "c"])).values

    assert (PADDING_ID, OOV_ID, FIRST_VALUE_ID) == (0, 1, 2)
    assert ids.tolist() == [2, 3, 4]
    assert encoder.size == 5


def test_vocabulary_orders_by_count_then_value() -> None:
    encoder = VocabularyEncoder().fit(pa.array(["z", "y", "y", "x", "z"]))

    assert encoder.vocabulary == ["y", "z", "x"]


def test_unseen_value_maps_to_oov() -> None:
    encoder = VocabularyEncoder().fit(pa.array(["a", "b"]))

    result = encoder.transform(pa.array(["never seen", "a", "another"]))

    assert result.values.tolist() == [OOV_ID, 2, OOV_ID]
    assert result.values.dtype == np.int64
    assert not result.invalid.any()


def test_rare_value_below_min_count_maps_to_oov() -> None:
    encoder = VocabularyEncoder(min_count=2).fit(pa.array(["a", "a", "b"]))

    assert encoder.transform(pa.array(["a", "b"])).values.tolist() == [2, OOV_ID]


def test_missing_value_is_its_own_id_when_seen() -> None:
    encoder = VocabularyEncoder().fit(pa.array(["a", None, None]))

    ids = encoder.transform(pa.array([None, "a"])).values

    assert ids.tolist() == [2, 3]


def test_missing_value_unseen_maps_to_oov() -> None:
    encoder = VocabularyEncoder().fit(pa.array(["a"]))

    assert encoder.transform(pa.array([None], pa.string())).values.tolist() == [OOV_ID]


def test_vocabulary_keeps_big_text_ids_apart() -> None:
    encoder = VocabularyEncoder().fit(pa.array([str(BIG_ID), str(BIG_NEIGHBOUR), str(BIG_ID)]))

    ids = encoder.transform(pa.array([str(BIG_ID), str(BIG_NEIGHBOUR)])).values

    assert ids[0] != ids[1]


def test_vocabulary_keeps_big_int64_ids_apart() -> None:
    column = pa.array([BIG_ID, BIG_NEIGHBOUR, BIG_ID], pa.int64())
    encoder = VocabularyEncoder().fit(column)

    ids = encoder.transform(pa.array([BIG_NEIGHBOUR, BIG_ID], pa.int64())).values

    assert encoder.vocabulary == [str(BIG_ID), str(BIG_NEIGHBOUR)]
    assert ids.tolist() == [3, 2]
    assert ids.dtype == np.int64


def test_raw_ids_exact_from_text() -> None:
    values = RawIdEncoder().transform(pa.array([str(BIG_ID), str(BIG_NEIGHBOUR), "-5"])).values

    assert values.dtype == np.int64
    assert values.tolist() == [BIG_ID, BIG_NEIGHBOUR, -5]


def test_raw_ids_exact_from_int64() -> None:
    values = RawIdEncoder().transform(pa.array([BIG_ID, 2**63 - 1], pa.int64())).values

    assert values.tolist() == [BIG_ID, 2**63 - 1]


def test_raw_ids_hash_text_deterministically() -> None:
    encoder = RawIdEncoder()

    first = encoder.transform(pa.array(["phone", "tablet", "phone"])).values
    second = RawIdEncoder().transform(pa.array(["phone"])).values

    assert first[0] == first[2]
    assert first[0] != first[1]
    assert first[0] == second[0]


def test_numeric_standardised_with_training_stats() -> None:
    encoder = NumericEncoder().fit(pa.array(["1", "2", "3", "4"]))

    values = encoder.transform(pa.array(["1", "4"])).values

    assert encoder.mean == pytest.approx(2.5)
    assert encoder.std == pytest.approx(math.sqrt(1.25))
    assert values.tolist() == pytest.approx([-1.5 / math.sqrt(1.25), 1.5 / math.sqrt(1.25)])


def test_numeric_missing_becomes_mean() -> None:
    encoder = NumericEncoder().fit(pa.array(["1", "3"]))

    result = encoder.transform(pa.array([None, "3"], pa.string()))

    assert result.values.tolist() == pytest.approx([0.0, 1.0])
    assert result.invalid.tolist() == [False, False]


def test_numeric_text_marked_invalid() -> None:
    encoder = NumericEncoder().fit(pa.array(["1", "3"]))

    result = encoder.transform(pa.array(["abc", "2", "1e3", ".5"]))

    assert result.invalid.tolist() == [True, False, False, False]
    assert result.reason == "not a number or out of float32 range"


def test_numeric_log1p_rejects_negatives() -> None:
    encoder = NumericEncoder(transform_name="log1p", standardize=False).fit(pa.array(["0", "3"]))

    result = encoder.transform(pa.array(["-1", "3"]))

    assert result.invalid.tolist() == [True, False]
    assert result.values[1] == pytest.approx(math.log1p(3.0))


def test_numeric_constant_column_keeps_unit_std() -> None:
    encoder = NumericEncoder().fit(pa.array([5.0, 5.0]))

    assert encoder.std == 1.0


def test_label_equals_rule() -> None:
    encoder = LabelEncoder(equals="50000+.")

    result = encoder.transform(pa.array(["- 50000.", "50000+.", None]))

    assert result.values.tolist() == [0.0, 1.0, 0.0]
    assert result.invalid.tolist() == [False, False, True]


def test_label_greater_than_rule() -> None:
    result = LabelEncoder(greater_than=10.0).transform(pa.array(["5", "10", "11"]))

    assert result.values.tolist() == [0.0, 0.0, 1.0]


def test_binary_label_outside_zero_one_invalid() -> None:
    result = LabelEncoder().transform(pa.array(["0", "1", "2", "yes"]))

    assert result.invalid.tolist() == [False, False, True, True]
    assert result.reason == "missing or not 0/1"


def test_regression_label_log1p() -> None:
    result = LabelEncoder(task_type="regression", transform_name="log1p").transform(
        pa.array(["0", "9", "-2"])
    )

    assert result.values[:2].tolist() == pytest.approx([0.0, math.log1p(9.0)])
    assert result.invalid.tolist() == [False, False, True]


def test_position_ids_overflow_and_missing() -> None:
    encoder = PositionEncoder(first_position=1, max_position=3)

    result = encoder.transform(pa.array(["1", "3", "4", "99", None, "0", "1.5"]))

    assert encoder.size == 5
    assert result.values.tolist() == [
        1,
        3,
        4,
        4,
        MISSING_POSITION_ID,
        MISSING_POSITION_ID,
        MISSING_POSITION_ID,
    ]
    assert result.invalid.tolist() == [False, False, False, False, False, True, True]


def test_position_zero_based() -> None:
    result = PositionEncoder(first_position=0, max_position=2).transform(pa.array([0, 2], pa.int64()))

    assert result.values.tolist() == [1, 3]


@pytest.mark.parametrize(
    "encoder",
    [
        VocabularyEncoder(min_count=2, vocabulary=["a", str(BIG_ID)]),
        RawIdEncoder(),
        NumericEncoder(transform_name="log1p", standardize=True, mean=1.5, std=0.5),
        LabelEncoder(task_type="binary", equals="yes"),
        LabelEncoder(task_type="regression", transform_name="log1p"),
        PositionEncoder(first_position=0, max_position=9),
    ],
)
def test_encoder_json_round_trip(encoder) -> None:
    restored = encoder_from_dict(json.loads(json.dumps(encoder.to_dict())))

    assert restored == encoder


# --- values beyond float32 ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1e308", "-1e40", "1e400"])
def test_numeric_beyond_float32_is_invalid(text: str) -> None:
    encoder = NumericEncoder().fit(pa.array(["1", "2", "3"]))
    result = encoder.transform(pa.array(["1", text]))
    assert result.invalid.tolist() == [False, True]


def test_numeric_float32_max_is_valid() -> None:
    encoder = NumericEncoder(standardize=False).fit(pa.array(["1"]))
    assert not encoder.transform(pa.array(["3.4e38"])).invalid.any()


def test_typed_infinity_invalid_and_nan_missing() -> None:
    values, missing, invalid = parse_float(pa.array([1.0, float("inf"), float("nan"), None]))
    assert invalid.tolist() == [False, True, False, False]
    assert missing.tolist() == [False, False, True, True]


def test_fit_ignores_out_of_range_values() -> None:
    # One huge value would otherwise dominate the mean and squeeze every other value to the same input.
    encoder = NumericEncoder().fit(pa.array(["1", "2", "3", "1e40"]))
    assert encoder.mean == pytest.approx(2.0)
