"""Tests of the click-log simulator: determinism, shapes, the examination model and the KuaiRand mode."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtrank.data.simulator import (
    GROUND_TRUTH_COLUMNS,
    METADATA_KEY,
    DeviceProfile,
    SimulationConfig,
    examination_probabilities,
    semi_synthetic_kuairand,
    simulate_click_log,
    true_examination_log_odds,
    write_click_log,
)
from mtrank.errors import ConfigError, DataError

DATA_DIR = Path(
    os.environ.get("MTRANK_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
KUAIRAND_DIR = DATA_DIR / "kuairand-explicit-feedback-subset"

# Equal shares give every (device, position) cell the same number of impressions.
EQUAL_DEVICES = (
    DeviceProfile("phone", eta=1.5, share=1 / 3),
    DeviceProfile("tablet", eta=1.0, share=1 / 3),
    DeviceProfile("desktop", eta=0.6, share=1 / 3),
)
# Sampling-error bound in standard errors. A correct simulator exceeds 4 standard errors in one of
# 30 cells with probability below 0.2%, and with a fixed seed every draw is the same on each run.
Z_BOUND = 4.0

SMALL = SimulationConfig(num_users=300, num_items=500, num_requests=2_000, list_size=8, seed=3)


def _standard_error(probability: float, count: int) -> float:
    return math.sqrt(max(probability * (1.0 - probability), 1e-12) / count)


def _cell_masks(table: pa.Table, device: str, list_size: int) -> list[np.ndarray]:
    devices = table.column("device").to_numpy(zero_copy_only=False)
    positions = table.column("position").to_numpy()
    return [(devices == device) & (positions == position) for position in range(1, list_size + 1)]


@pytest.fixture(scope="module")
def large_biased() -> pa.Table:
    """600,000 impressions logged by the noisy-relevance policy."""
    return simulate_click_log(SimulationConfig(num_requests=60_000, devices=EQUAL_DEVICES, seed=11))


@pytest.fixture(scope="module")
def large_random() -> pa.Table:
    """600,000 impressions logged by the uniformly random policy."""
    config = SimulationConfig(num_requests=60_000, devices=EQUAL_DEVICES, logging_policy="random", seed=12)
    return simulate_click_log(config)


# --- determinism, sizes and columns -------------------------------------------------------------------


def test_same_seed_same_table() -> None:
    first = simulate_click_log(SMALL)
    second = simulate_click_log(dataclasses.replace(SMALL))
    assert first.equals(second)


def test_different_seed_different_table() -> None:
    first = simulate_click_log(SMALL)
    other = simulate_click_log(dataclasses.replace(SMALL, seed=4))
    assert not first.column("click").equals(other.column("click"))
    assert not first.column("item_id").equals(other.column("item_id"))


def test_table_size_and_id_ranges() -> None:
    table = simulate_click_log(SMALL)
    assert table.num_rows == SMALL.num_requests * SMALL.list_size
    assert np.unique(table.column("request_id").to_numpy()).size == SMALL.num_requests
    users = table.column("user_id").to_numpy()
    items = table.column("item_id").to_numpy()
    assert users.min() >= 0
    assert users.max() < SMALL.num_users
    assert items.min() >= 0
    assert items.max() < SMALL.num_items


def test_column_types() -> None:
    schema = simulate_click_log(SMALL).schema
    expected = {
        "request_id": pa.int64(),
        "user_id": pa.int64(),
        "item_id": pa.int64(),
        "user_segment": pa.string(),
        "item_category": pa.string(),
        "item_quality": pa.float64(),
        "device": pa.string(),
        "position": pa.int64(),
        "click": pa.int64(),
        "like": pa.int64(),
        "watch_time": pa.float64(),
        "true_relevance": pa.float64(),
        "true_examination": pa.float64(),
    }
    for name, data_type in expected.items():
        assert schema.field(name).type == data_type, name


def test_positions_one_to_k_per_request() -> None:
    table = simulate_click_log(SMALL)
    positions = table.column("position").to_numpy().reshape(SMALL.num_requests, SMALL.list_size)
    assert positions.min() == 1
    assert positions.max() == SMALL.list_size
    assert (np.sort(positions, axis=1) == np.arange(1, SMALL.list_size + 1)).all()


def test_one_user_and_device_per_request() -> None:
    table = simulate_click_log(SMALL)
    users = table.column("user_id").to_numpy().reshape(SMALL.num_requests, SMALL.list_size)
    devices = (
        table.column("device").to_numpy(zero_copy_only=False).reshape(SMALL.num_requests, SMALL.list_size)
    )
    assert (users == users[:, :1]).all()
    assert (devices == devices[:, :1]).all()


@pytest.mark.parametrize("num_items", [500, 8])
def test_items_distinct_within_request(num_items: int) -> None:
    # num_items == list_size leaves only permutations, which exercises the fallback path.
    config = SimulationConfig(num_users=50, num_items=num_items, num_requests=500, list_size=8)
    items = simulate_click_log(config).column("item_id").to_numpy().reshape(500, 8)
    assert (np.diff(np.sort(items, axis=1), axis=1) > 0).all()


def test_binary_labels_and_probabilities() -> None:
    table = simulate_click_log(SMALL)
    for name in ("click", "like"):
        assert set(np.unique(table.column(name).to_numpy())) <= {0, 1}, name
    for name in GROUND_TRUTH_COLUMNS:
        values = table.column(name).to_numpy()
        assert ((values > 0) & (values <= 1)).all(), name
    assert (table.column("watch_time").to_numpy() > 0).all()


def test_ground_truth_columns_present() -> None:
    table = simulate_click_log(SMALL)
    assert set(GROUND_TRUTH_COLUMNS) == {"true_relevance", "true_examination"}
    for name in GROUND_TRUTH_COLUMNS:
        assert name in table.column_names


def test_metadata_records_config_and_bias() -> None:
    metadata = json.loads(simulate_click_log(SMALL).schema.metadata[METADATA_KEY])
    assert metadata["mode"] == "synthetic"
    assert metadata["config"] == SMALL.to_dict()
    assert math.isfinite(metadata["relevance_bias"])
    assert metadata["ground_truth_columns"] == list(GROUND_TRUTH_COLUMNS)


def test_fixed_relevance_bias_is_used() -> None:
    config = dataclasses.replace(SMALL, target_click_rate=None, relevance_bias=-2.0)
    metadata = json.loads(simulate_click_log(config).schema.metadata[METADATA_KEY])
    assert metadata["relevance_bias"] == -2.0


# --- the examination model and the logging policy --------------------------------------------------------


def test_click_rate_hits_target() -> None:
    table = simulate_click_log(SimulationConfig(target_click_rate=0.08, seed=5))
    click_rate = table.column("click").to_numpy().mean()
    assert abs(click_rate - 0.08) < Z_BOUND * _standard_error(0.08, table.num_rows)


def test_ctr_decays_by_position_per_device(large_biased: pa.Table) -> None:
    clicks = large_biased.column("click").to_numpy()
    for device in EQUAL_DEVICES:
        ctr = [clicks[mask].mean() for mask in _cell_masks(large_biased, device.name, 10)]
        assert all(np.diff(ctr) < 0), f"{device.name}: {np.round(ctr, 4)}"


def test_ctr_matches_examination_times_relevance(large_biased: pa.Table) -> None:
    clicks = large_biased.column("click").to_numpy()
    expected = (
        large_biased.column("true_examination").to_numpy() * large_biased.column("true_relevance").to_numpy()
    )
    for device in EQUAL_DEVICES:
        for position, mask in enumerate(_cell_masks(large_biased, device.name, 10), start=1):
            ctr, mean = clicks[mask].mean(), expected[mask].mean()
            error = _standard_error(mean, int(mask.sum()))
            assert abs(ctr - mean) < Z_BOUND * error, f"{device.name} position {position}: {ctr} vs {mean}"


def test_random_policy_recovers_power_law(large_random: pa.Table) -> None:
    # Under a random order relevance is independent of position, so CTR / mean relevance estimates
    # the examination curve 0.9 * (1 / p) ** eta (DEFAULT_TOP_EXAMINATION with each device's eta).
    clicks = large_random.column("click").to_numpy()
    mean_relevance = large_random.column("true_relevance").to_numpy().mean()
    for device in EQUAL_DEVICES:
        for position, mask in enumerate(_cell_masks(large_random, device.name, 10), start=1):
            curve = 0.9 * (1.0 / position) ** device.eta
            estimate = clicks[mask].mean() / mean_relevance
            error = _standard_error(curve * mean_relevance, int(mask.sum())) / mean_relevance
            assert abs(estimate - curve) < Z_BOUND * error, f"{device.name} position {position}"


def test_phone_decays_faster_than_desktop(large_random: pa.Table) -> None:
    clicks = large_random.column("click").to_numpy()
    ratios = {}
    for device in ("phone", "desktop"):
        masks = _cell_masks(large_random, device, 10)
        ratios[device] = clicks[masks[-1]].mean() / clicks[masks[0]].mean()
    assert ratios["phone"] < ratios["desktop"]


def test_policy_ranks_relevant_items_higher(large_biased: pa.Table) -> None:
    positions = large_biased.column("position").to_numpy()
    relevance = large_biased.column("true_relevance").to_numpy()
    assert np.corrcoef(positions, relevance)[0, 1] < -0.3


def test_random_policy_position_uncorrelated(large_random: pa.Table) -> None:
    positions = large_random.column("position").to_numpy()
    relevance = large_random.column("true_relevance").to_numpy()
    # 600,000 rows: the correlation's standard error is about 0.0013.
    assert abs(np.corrcoef(positions, relevance)[0, 1]) < 0.01


def test_like_and_watch_time_ignore_position(large_random: pa.Table) -> None:
    positions = large_random.column("position").to_numpy()
    likes = large_random.column("like").to_numpy()
    log_watch = np.log(large_random.column("watch_time").to_numpy())
    top, bottom = positions == 1, positions == 10
    like_rate = likes.mean()
    assert abs(likes[top].mean() - likes[bottom].mean()) < Z_BOUND * math.sqrt(2) * _standard_error(
        like_rate, int(top.sum())
    )
    watch_error = math.sqrt(2 * log_watch.var() / top.sum())
    assert abs(log_watch[top].mean() - log_watch[bottom].mean()) < Z_BOUND * watch_error


def test_likes_only_on_relevant_draws() -> None:
    # like_rate = 1 makes like the latent relevance draw itself, whose mean is mean(true_relevance).
    table = simulate_click_log(SimulationConfig(num_requests=20_000, like_rate=1.0, seed=8))
    likes = table.column("like").to_numpy()
    relevance = table.column("true_relevance").to_numpy()
    assert abs(likes.mean() - relevance.mean()) < Z_BOUND * _standard_error(relevance.mean(), table.num_rows)


def test_click_noise_adds_irrelevant_clicks() -> None:
    base = dataclasses.replace(SMALL, num_requests=20_000, target_click_rate=None, relevance_bias=-3.0)
    quiet = simulate_click_log(base).column("click").to_numpy().mean()
    noisy = simulate_click_log(dataclasses.replace(base, click_noise=0.2)).column("click").to_numpy().mean()
    assert noisy > quiet


def test_examination_log_odds_values() -> None:
    log_odds = true_examination_log_odds(SimulationConfig())
    assert len(log_odds) == 3 * 10
    # Golden values from exam(p) = 0.9 * (1 / p) ** eta and log-odds log(e / (1 - e)).
    assert log_odds[("phone", 1)] == pytest.approx(math.log(0.9 / 0.1))
    phone_2 = 0.9 * 2**-1.5
    assert log_odds[("phone", 2)] == pytest.approx(math.log(phone_2 / (1 - phone_2)))
    desktop_10 = 0.9 * 10**-0.6
    assert log_odds[("desktop", 10)] == pytest.approx(math.log(desktop_10 / (1 - desktop_10)))


def test_examination_log_odds_infinite_at_certain_top() -> None:
    config = SimulationConfig(devices=(DeviceProfile("phone", eta=1.0, share=1.0, top_examination=1.0),))
    log_odds = true_examination_log_odds(config)
    assert log_odds[("phone", 1)] == math.inf
    assert log_odds[("phone", 2)] == pytest.approx(0.0)


def test_examination_probabilities_match_column() -> None:
    table = simulate_click_log(SMALL)
    table_probabilities = examination_probabilities(SMALL)
    devices = table.column("device").to_numpy(zero_copy_only=False)
    positions = table.column("position").to_numpy()
    column = table.column("true_examination").to_numpy()
    for (device, position), probability in table_probabilities.items():
        mask = (devices == device) & (positions == position)
        assert np.allclose(column[mask], probability), (device, position)


# --- writing --------------------------------------------------------------------------------------------


def test_write_click_log_round_trip(tmp_path: Path) -> None:
    path = write_click_log(SMALL, tmp_path / "logs" / "clicks.parquet")
    assert path == tmp_path / "logs" / "clicks.parquet"
    stored = pq.read_table(path)
    assert stored.equals(simulate_click_log(SMALL))
    assert METADATA_KEY in stored.schema.metadata
    assert sorted(p.name for p in path.parent.iterdir()) == ["clicks.parquet"]


# --- configuration errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_users": 0}, "`num_users` must be a positive integer"),
        ({"num_requests": 2.5}, "`num_requests` must be a positive integer"),
        ({"list_size": 20, "num_items": 10}, r"`list_size` \(20\) must not exceed `num_items` \(10\)"),
        ({"seed": -1}, "`seed` must be a non-negative integer"),
        ({"devices": ()}, "`devices` must list at least one device"),
        ({"devices": (DeviceProfile("phone", eta=-1.0, share=1.0),)}, r"`devices\[0\]\.eta`"),
        ({"devices": (DeviceProfile("phone", eta=1.0, share=0.5),)}, "`devices` shares must sum to 1"),
        (
            {"devices": (DeviceProfile("phone", 1.0, 0.5), DeviceProfile("phone", 1.0, 0.5))},
            "names must be unique; repeated: phone",
        ),
        (
            {"devices": (DeviceProfile("phone", 1.0, 1.0, top_examination=0.0),)},
            r"`devices\[0\]\.top_examination`",
        ),
        ({"relevance_bias": -1.0}, "set exactly one of `target_click_rate` and `relevance_bias`"),
        ({"target_click_rate": None}, "set exactly one of `target_click_rate` and `relevance_bias`"),
        ({"target_click_rate": 1.5}, "`target_click_rate` must be a finite number in"),
        ({"logging_policy": "best"}, "`logging_policy` must be one of noisy_relevance, random"),
        ({"logging_noise": float("nan")}, "`logging_noise` must be a finite number"),
        ({"click_noise": 1.0}, "`click_noise` must be a finite number"),
        ({"like_rate": -0.1}, "`like_rate` must be a finite number"),
        ({"watch_time_median_s": 0.0}, "`watch_time_median_s` must be a finite number"),
    ],
)
def test_invalid_config_names_field(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SimulationConfig(**changes)  # type: ignore[arg-type]


def test_invalid_config_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        SimulationConfig(num_users=0, num_items=-5, like_rate=2.0)
    assert len(caught.value.problems) == 3


def test_unreachable_click_rate_rejected() -> None:
    # The mean examination of the default curves is about 0.3, so 0.6 clicks per impression is impossible.
    with pytest.raises(ConfigError, match="`target_click_rate` 0.6 is unreachable"):
        simulate_click_log(dataclasses.replace(SMALL, target_click_rate=0.6))


def test_from_dict_builds_devices() -> None:
    config = SimulationConfig.from_dict(
        {"num_requests": 100, "devices": [{"name": "tv", "eta": 0.3, "share": 1.0, "top_examination": 0.8}]}
    )
    assert config.devices == (DeviceProfile("tv", eta=0.3, share=1.0, top_examination=0.8),)
    assert SimulationConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="unknown key `num_user`") as caught:
        SimulationConfig.from_dict({"num_user": 5, "devices": [{"name": "tv", "eta": 1.0, "shares": 1.0}]})
    problems = "\n".join(caught.value.problems)
    assert "unknown key `devices[0].shares`" in problems
    assert "missing key `devices[0].share`" in problems


# --- semi-synthetic mode: small files written here ------------------------------------------------------

LOG_HEADER = [
    "user_id",
    "video_id",
    "date",
    "hourmin",
    "time_ms",
    "is_click",
    "long_view",
    "play_time_ms",
    "duration_ms",
    "label",
]


def _write_small_kuairand(folder: Path, rows_per_user: dict[int, int], *, label: int | str = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "processed_standard_kcore_15.csv", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(LOG_HEADER)
        for user, count in rows_per_user.items():
            for index in range(count):
                # Rows are written newest first, so the reader has to sort them by time.
                time_ms = 1_649_000_000_000 + (count - index) * 1000
                writer.writerow([user, 100 * user + index, 20220410, 1700, time_ms, 1, 1, 5000, 9000, label])


def test_small_kuairand_drops_short_lists(tmp_path: Path) -> None:
    _write_small_kuairand(tmp_path, {7: 25, 9: 7})
    config = SimulationConfig(list_size=10)
    table = semi_synthetic_kuairand(tmp_path, config, join_user_features=False)
    # User 7 fills two lists of 10 (5 rows dropped); user 9's 7 rows fill none.
    assert table.num_rows == 20
    assert set(table.column("user_id").to_numpy()) == {7}


def test_small_kuairand_lists_follow_time(tmp_path: Path) -> None:
    _write_small_kuairand(tmp_path, {7: 25})
    table = semi_synthetic_kuairand(tmp_path, SimulationConfig(list_size=10), join_user_features=False)
    times = table.column("time_ms").to_numpy().reshape(2, 10)
    # The first list contains the user's ten earliest impressions.
    assert times[0].max() < times[1].min()


def test_kuairand_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="KuaiRand log not found"):
        semi_synthetic_kuairand(tmp_path / "absent", SimulationConfig())


def test_kuairand_missing_user_features_raises(tmp_path: Path) -> None:
    _write_small_kuairand(tmp_path, {7: 10})
    with pytest.raises(DataError, match="join_user_features=False"):
        semi_synthetic_kuairand(tmp_path, SimulationConfig(list_size=10))


def test_kuairand_invalid_label_raises(tmp_path: Path) -> None:
    _write_small_kuairand(tmp_path, {7: 10}, label=2)
    with pytest.raises(DataError, match="`label` has 10 values other than 0"):
        semi_synthetic_kuairand(tmp_path, SimulationConfig(list_size=10), join_user_features=False)


def test_kuairand_relevance_order_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`liked_relevance` \\(0.2\\) must exceed `hated_relevance`"):
        semi_synthetic_kuairand(tmp_path, SimulationConfig(), liked_relevance=0.2, hated_relevance=0.3)


# --- semi-synthetic mode on the real KuaiRand subset ----------------------------------------------------


@pytest.fixture(scope="module")
def kuairand_rows() -> list[dict[str, str]]:
    if not (KUAIRAND_DIR / "processed_standard_kcore_15.csv").is_file():
        pytest.skip(f"KuaiRand subset not found in {KUAIRAND_DIR}; set MTRANK_DATA_DIR to the data folder")
    with open(KUAIRAND_DIR / "processed_standard_kcore_15.csv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="module")
def kuairand_log(kuairand_rows: list[dict[str, str]]) -> pa.Table:
    config = SimulationConfig(list_size=10, devices=EQUAL_DEVICES, seed=21)
    return semi_synthetic_kuairand(KUAIRAND_DIR, config)


def test_kuairand_row_count(kuairand_rows: list[dict[str, str]], kuairand_log: pa.Table) -> None:
    # Independent count: each user keeps floor(n / 10) full lists of 10.
    per_user = Counter(row["user_id"] for row in kuairand_rows)
    assert len(kuairand_rows) == 41_828  # rows of the KuaiRand subset file
    assert kuairand_log.num_rows == sum(count // 10 * 10 for count in per_user.values())


def test_kuairand_like_is_real_label(kuairand_rows: list[dict[str, str]], kuairand_log: pa.Table) -> None:
    labels = {
        (int(r["user_id"]), int(r["video_id"]), int(r["time_ms"])): int(r["label"]) for r in kuairand_rows
    }
    keys = zip(
        kuairand_log.column("user_id").to_pylist(),
        kuairand_log.column("item_id").to_pylist(),
        kuairand_log.column("time_ms").to_pylist(),
        strict=True,
    )
    mismatches = sum(
        labels[key] != like for key, like in zip(keys, kuairand_log.column("like").to_pylist(), strict=True)
    )
    assert mismatches == 0


def test_kuairand_relevance_from_label(kuairand_log: pa.Table) -> None:
    likes = kuairand_log.column("like").to_numpy()
    relevance = kuairand_log.column("true_relevance").to_numpy()
    assert np.array_equal(relevance, np.where(likes == 1, 0.9, 0.1))


def test_kuairand_lists_have_one_user(kuairand_log: pa.Table) -> None:
    users = kuairand_log.column("user_id").to_numpy().reshape(-1, 10)
    positions = kuairand_log.column("position").to_numpy().reshape(-1, 10)
    assert (users == users[:, :1]).all()
    assert (positions == np.arange(1, 11)).all()


def test_kuairand_user_features_joined(kuairand_log: pa.Table) -> None:
    # Every one of the subset's 664 users has a row in user_features_pure.csv.
    assert kuairand_log.column("user_active_degree").null_count == 0
    assert kuairand_log.column("fans_user_num_range").null_count == 0


def test_kuairand_policy_ranks_likes_higher(kuairand_log: pa.Table) -> None:
    positions = kuairand_log.column("position").to_numpy()
    relevance = kuairand_log.column("true_relevance").to_numpy()
    assert np.corrcoef(positions, relevance)[0, 1] < -0.2


def test_kuairand_ctr_matches_examination_model(kuairand_log: pa.Table) -> None:
    clicks = kuairand_log.column("click").to_numpy()
    expected = (
        kuairand_log.column("true_examination").to_numpy() * kuairand_log.column("true_relevance").to_numpy()
    )
    for device in EQUAL_DEVICES:
        masks = _cell_masks(kuairand_log, device.name, 10)
        for position, mask in enumerate(masks, start=1):
            ctr, mean = clicks[mask].mean(), expected[mask].mean()
            error = _standard_error(mean, int(mask.sum()))
            assert abs(ctr - mean) < Z_BOUND * error, f"{device.name} position {position}: {ctr} vs {mean}"
        assert clicks[masks[0]].mean() > clicks[masks[-1]].mean(), device.name


def test_kuairand_write(tmp_path: Path, kuairand_rows: list[dict[str, str]]) -> None:
    # The kuairand_rows fixture skips this test when the subset is missing.
    config = SimulationConfig(list_size=10, seed=2)
    path = write_click_log(config, tmp_path / "kuairand.parquet", kuairand_dir=KUAIRAND_DIR)
    metadata = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    assert metadata["mode"] == "semi_synthetic_kuairand"
    assert pq.read_metadata(path).num_rows == semi_synthetic_kuairand(KUAIRAND_DIR, config).num_rows


# --- persistent logging error per item -----------------------------------------------------------------

# Relevance that ignores the item (no latent, affinity or quality terms), so an item's position can
# only depend on the logging policy's own noise.
FLAT_RELEVANCE = {"latent_scale": 0.0, "affinity_scale": 0.0, "quality_weight": 0.0}


def _split_half_position_correlation(table: pa.Table, num_items: int) -> float:
    """Correlate each item's mean position in the first half of the requests with the second half."""
    items = table.column("item_id").to_numpy()
    positions = table.column("position").to_numpy().astype(np.float64)
    half = items.size // 2
    means = []
    for part in (slice(0, half), slice(half, None)):
        sums = np.bincount(items[part], weights=positions[part], minlength=num_items)
        counts = np.bincount(items[part], minlength=num_items)
        means.append(sums / np.maximum(counts, 1))
    return float(np.corrcoef(means[0], means[1])[0, 1])


def test_item_error_makes_positions_persistent_per_item() -> None:
    config = SimulationConfig(
        num_items=200, num_requests=4_000, logging_item_error=2.0, seed=5, **FLAT_RELEVANCE
    )
    # With errors of std 2 against fresh noise of std 1, an item's rank is mostly its error.
    assert _split_half_position_correlation(simulate_click_log(config), 200) > 0.8


def test_fresh_noise_positions_not_persistent() -> None:
    config = SimulationConfig(num_items=200, num_requests=4_000, seed=5, **FLAT_RELEVANCE)
    # Fresh noise only: each item's mean position is an average of random ranks in both halves.
    assert abs(_split_half_position_correlation(simulate_click_log(config), 200)) < 0.2


def test_zero_item_error_keeps_the_log_unchanged() -> None:
    explicit = simulate_click_log(dataclasses.replace(SMALL, logging_item_error=0.0))
    assert explicit.equals(simulate_click_log(SMALL))


def test_item_error_keeps_relevance_and_devices() -> None:
    # A fixed relevance bias: a click-rate target would solve a new bias for the new order.
    fixed = dataclasses.replace(SMALL, target_click_rate=None, relevance_bias=-2.0)
    plain = simulate_click_log(fixed)
    relogged = simulate_click_log(dataclasses.replace(fixed, logging_item_error=1.0))
    # Only the order inside each list changes: the same items, devices and relevance per request.
    key = ["request_id", "item_id"]
    left = plain.select([*key, "true_relevance", "device"]).sort_by([(name, "ascending") for name in key])
    right = relogged.select([*key, "true_relevance", "device"]).sort_by([(name, "ascending") for name in key])
    assert left.equals(right)


def test_item_error_rejected_with_random_policy() -> None:
    with pytest.raises(
        ConfigError, match="`logging_item_error` \\(1.0\\) applies only to the noisy_relevance"
    ):
        SimulationConfig(logging_policy="random", logging_item_error=1.0)


def test_negative_item_error_rejected() -> None:
    with pytest.raises(ConfigError, match="`logging_item_error` must be a finite number"):
        SimulationConfig(logging_item_error=-0.5)


def test_kuairand_item_error_follows_the_video(tmp_path: Path) -> None:
    # Every impression of one user is a like, so the order within a list is the logging noise alone.
    # Forty users watch the same ten videos. With a large error per video, each video takes nearly
    # the same position in every list.
    folder = tmp_path / "kuairand"
    folder.mkdir()
    with open(folder / "processed_standard_kcore_15.csv", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(LOG_HEADER)
        for user in range(40):
            for video in range(10):
                writer.writerow([user, video, 20220410, 1700, 1_649_000_000_000 + video, 1, 1, 5000, 9000, 1])
    config = SimulationConfig(list_size=10, logging_item_error=5.0, seed=2)
    table = semi_synthetic_kuairand(folder, config, join_user_features=False)
    videos = table.column("item_id").to_numpy()
    positions = table.column("position").to_numpy()
    spread = [np.std(positions[videos == video]) for video in range(10)]
    # Fresh noise alone would give a standard deviation near 2.9 (a uniform rank over 1..10).
    assert max(spread) < 1.5


def test_duration_weight_needs_kuairand() -> None:
    with pytest.raises(ConfigError, match="`logging_duration_weight` \\(0.5\\) needs video durations"):
        simulate_click_log(dataclasses.replace(SMALL, logging_duration_weight=0.5))


def test_kuairand_duration_weight_moves_long_videos_up(tmp_path: Path) -> None:
    # All likes, so only the logging noise and the duration term order each list.
    folder = tmp_path / "kuairand"
    folder.mkdir()
    with open(folder / "processed_standard_kcore_15.csv", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(LOG_HEADER)
        for user in range(200):
            for index in range(10):
                duration = 5_000 * (index + 1)
                row = [
                    user,
                    1000 * user + index,
                    20220410,
                    1700,
                    1_649_000_000_000 + index,
                    1,
                    1,
                    5000,
                    duration,
                    1,
                ]
                writer.writerow(row)
    mean_position_of_longest = {}
    for weight in (0.0, 2.0):
        config = SimulationConfig(list_size=10, logging_duration_weight=weight, seed=4)
        table = semi_synthetic_kuairand(folder, config, join_user_features=False)
        longest = table.column("duration_ms").to_numpy() == 50_000
        mean_position_of_longest[weight] = float(table.column("position").to_numpy()[longest].mean())
    # Without the term the longest video sits at 5.5 on average; with it, near the top.
    assert mean_position_of_longest[2.0] < mean_position_of_longest[0.0] - 2.0


def test_kuairand_metadata_records_only_settings_used(tmp_path: Path) -> None:
    _write_small_kuairand(tmp_path, {7: 25})
    table = semi_synthetic_kuairand(tmp_path, SimulationConfig(list_size=10), join_user_features=False)
    metadata = json.loads(table.schema.metadata[METADATA_KEY])
    assert metadata["num_lists"] == 2
    assert "num_users" not in metadata["config"]
    assert metadata["config"]["list_size"] == 10
