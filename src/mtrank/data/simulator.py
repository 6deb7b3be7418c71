"""Simulate click logs with known position bias, on synthetic data or on real KuaiRand impressions.

Both modes follow the examination hypothesis of the position-based click model: an impression is
clicked when the user examines its position and finds the item relevant, two independent events, so
``P(click) = P(examined | device, position) * P(relevant | user, item)``. Examination decays with
position as a power law whose exponent depends on the device (:class:`DeviceProfile`). The logging
policy ranks each list by a noisy copy of true relevance, so relevant items sit at top positions more
often than chance. A model that reads raw clicks therefore confuses position with relevance, and a
debiasing model has to undo that.

The policy's noise has two parts. ``logging_noise`` is drawn afresh for every impression, so an
item's average position still rises with its relevance and a model without debiasing ranks by
relevance in expectation. ``logging_item_error`` is drawn once per item and kept for the whole log,
like the systematic mistakes of the previous ranker that served the traffic. The items it favours
sit higher than their relevance earns and draw more clicks. A model that ignores position learns
that error as relevance, which is the case a position-bias tower exists for.

Every log keeps the ground truth in columns named ``true_*`` (``true_relevance``,
``true_examination``). They exist only to evaluate a debiasing model. Never use them as features,
because they reveal the answer the model is meant to learn.

Sources:
    Joachims, Swaminathan and Schnabel, "Unbiased Learning-to-Rank with Biased Feedback", WSDM 2017
    (arXiv:1608.04468): position-based propensities and the power-law curve ``(1 / rank) ** eta``
    for simulated examination.
    Wang, Golbandi, Bendersky, Metzler and Najork, "Position Bias Estimation for Unbiased Learning
    to Rank in Personal Search", WSDM 2018: click = examination x relevance, with examination
    depending on position only, the model that regression-EM debiasing assumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard, cast, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtrank.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

LoggingPolicy = Literal["noisy_relevance", "random"]
LOGGING_POLICIES: tuple[str, ...] = get_args(LoggingPolicy)

GROUND_TRUTH_COLUMNS: tuple[str, ...] = ("true_relevance", "true_examination")
"""Columns holding simulation ground truth, for evaluation only and never to be used as features."""

METADATA_KEY = b"mtrank.simulation"
"""Parquet schema metadata key under which the simulation settings are stored as JSON."""

# Default examination curves: exam(p) = top_examination * (1 / p) ** eta. eta = 1 is the base
# setting of Joachims et al. 2017. The other exponents are illustrative, not measured: a phone shows
# one or two items per screen, so attention falls off faster than on a tablet, and a desktop page
# shows most of a ten-item list at once.
PHONE_ETA = 1.5
TABLET_ETA = 1.0
DESKTOP_ETA = 0.6
# Illustrative mobile-heavy traffic mix, not measured on any platform.
PHONE_SHARE = 0.6
TABLET_SHARE = 0.1
DESKTOP_SHARE = 0.3
# Users sometimes scroll past even the top slot without looking at it. A value below 1 also keeps
# the log-odds of examination at position 1 finite for the evaluation table.
DEFAULT_TOP_EXAMINATION = 0.9

# Shares must sum to 1 up to this rounding error.
SHARE_SUM_TOLERANCE = 1e-6
# Bisection searches the relevance bias in [-limit, limit], and sigmoid(30) differs from 1 by about 1e-13.
BIAS_SEARCH_LIMIT = 30.0
BIAS_SEARCH_STEPS = 80
# Rounds of resampling repeated items in a list before falling back to a full permutation per row.
DISTINCT_ITEM_ROUNDS = 16

KUAIRAND_LOG_FILE = "processed_standard_kcore_15.csv"
KUAIRAND_USER_FEATURES_FILE = "user_features_pure.csv"
# Real columns read from the KuaiRand log, which is tab-separated despite its .csv name.
KUAIRAND_LOG_TYPES: dict[str, pa.DataType] = {
    "user_id": pa.int64(),
    "video_id": pa.int64(),
    "date": pa.int64(),
    "hourmin": pa.int64(),
    "time_ms": pa.int64(),
    "long_view": pa.int64(),
    "play_time_ms": pa.int64(),
    "duration_ms": pa.int64(),
    "label": pa.int64(),
}
# Real user features joined from KuaiRand-Pure's user file (comma-separated) by user_id.
KUAIRAND_USER_FEATURE_TYPES: dict[str, pa.DataType] = {
    "user_id": pa.int64(),
    "user_active_degree": pa.string(),
    "is_lowactive_period": pa.int64(),
    "register_days_range": pa.string(),
    "follow_user_num_range": pa.string(),
    "fans_user_num_range": pa.string(),
    "friend_user_num_range": pa.string(),
}
# Relevance given the real like/hate label. A liked video is still skipped now and then and a hated
# one is still sometimes clicked before the user judges it, so relevance stays a probability and
# clicks at a position are never a fixed function of the label.
# SimulationConfig fields that the semi-synthetic KuaiRand mode reads; the others do not apply.
KUAIRAND_SETTINGS: tuple[str, ...] = (
    "list_size",
    "devices",
    "logging_policy",
    "logging_noise",
    "logging_item_error",
    "logging_duration_weight",
    "click_noise",
    "seed",
)
DEFAULT_LIKED_RELEVANCE = 0.9
DEFAULT_HATED_RELEVANCE = 0.1


@dataclass(frozen=True)
class DeviceProfile:
    """Examination curve and traffic share of one device type.

    The examination probability at 1-based position ``p`` is ``top_examination * (1 / p) ** eta``,
    the power-law position bias of Joachims et al. 2017 scaled by the chance of examining the top slot.

    Attributes:
        name: value written to the ``device`` column.
        eta: decay exponent. 0 means no position bias, and larger values decay faster.
        share: fraction of requests served on this device. The shares of all devices sum to 1.
        top_examination: examination probability at position 1, in ``(0, 1]``.
    """

    name: str
    eta: float
    share: float
    top_examination: float = DEFAULT_TOP_EXAMINATION

    def examination(self, positions: np.ndarray) -> np.ndarray:
        """Return the examination probability at each 1-based position (any shape, same shape out)."""
        return self.top_examination * np.power(1.0 / np.asarray(positions, dtype=np.float64), self.eta)


DEFAULT_DEVICES: tuple[DeviceProfile, ...] = (
    DeviceProfile("phone", eta=PHONE_ETA, share=PHONE_SHARE),
    DeviceProfile("tablet", eta=TABLET_ETA, share=TABLET_SHARE),
    DeviceProfile("desktop", eta=DESKTOP_ETA, share=DESKTOP_SHARE),
)


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of the click-log simulator, validated when the object is built.

    True relevance is ``P(relevant) = sigmoid(u_user . v_item + affinity[segment, category]
    + quality_weight * item_quality + bias)``. Set exactly one of ``relevance_bias``, which fixes the
    bias, and ``target_click_rate``, which solves the bias so that the expected click rate of the
    simulated log equals the target.

    Attributes:
        num_users: number of users, with ids ``0 .. num_users - 1``.
        num_items: number of items, with ids ``0 .. num_items - 1``.
        num_requests: number of requests (lists). The log has ``num_requests * list_size`` rows.
        list_size: K, items per list, shown at positions ``1 .. K``. At most ``num_items``.
        latent_dim: width of the latent user and item factors.
        devices: device types with their examination curves and traffic shares.
        latent_scale: standard deviation of the dot product ``u_user . v_item`` on the logit scale.
        num_user_segments: number of values of the ``user_segment`` feature.
        num_item_categories: number of values of the ``item_category`` feature.
        affinity_scale: standard deviation of the segment-by-category affinity on the logit scale.
        quality_weight: logit change per unit of ``item_quality`` (a standard normal item feature).
        target_click_rate: expected click rate the relevance bias is solved for, in ``(0, 1)``.
        relevance_bias: fixed logit bias, used when ``target_click_rate`` is ``None``.
        logging_policy: ``noisy_relevance`` ranks each list by the relevance logit plus Gaussian
            noise; ``random`` shuffles each list uniformly (an unbiased log for comparison).
        logging_noise: standard deviation of the Gaussian noise of ``noisy_relevance``, drawn afresh
            per impression; 0 ranks by true relevance exactly, large values approach a random order.
        logging_item_error: standard deviation of a Gaussian error of ``noisy_relevance`` drawn once
            per item and added to every impression of that item, the persistent mistakes of a
            previous ranker. 0 (the default) means the policy has no systematic error. Only valid
            with ``noisy_relevance``.
        logging_duration_weight: semi-synthetic KuaiRand mode only: logit added to the logging score
            per standard deviation of the video's log duration, a previous ranker's duration bias
            (rankers trained for watch time favour long videos; Zhan et al., KDD 2022). It does not
            touch relevance. 0 (the default) means no duration bias. Only valid with
            ``noisy_relevance``; the synthetic mode has no duration and rejects a value other than 0.
        click_noise: probability that an examined but irrelevant item is clicked anyway, in ``[0, 1)``.
            The click probability is ``exam * (rel + (1 - rel) * click_noise)``.
        like_rate: probability of a like given that the item is relevant. Likes ignore position.
        watch_time_median_s: median watch time in seconds of an irrelevant item.
        watch_time_relevant_factor: ratio of the median watch time of a relevant item to an
            irrelevant one.
        watch_time_sigma: standard deviation of log watch time around its median.
        seed: seed of all random draws. The same config gives the same table.
    """

    num_users: int = 10_000
    num_items: int = 5_000
    num_requests: int = 20_000
    list_size: int = 10
    latent_dim: int = 8
    devices: tuple[DeviceProfile, ...] = DEFAULT_DEVICES
    latent_scale: float = 1.0
    num_user_segments: int = 8
    num_item_categories: int = 20
    affinity_scale: float = 0.5
    quality_weight: float = 0.5
    # 10% lies inside the 5-20% click rates typical of feed and ad logs.
    target_click_rate: float | None = 0.10
    relevance_bias: float | None = None
    logging_policy: LoggingPolicy = "noisy_relevance"
    logging_noise: float = 1.0
    logging_item_error: float = 0.0
    logging_duration_weight: float = 0.0
    click_noise: float = 0.0
    like_rate: float = 0.3
    watch_time_median_s: float = 8.0
    watch_time_relevant_factor: float = 3.0
    watch_time_sigma: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        # Lists from YAML or the CLI become tuples so that the config stays hashable.
        object.__setattr__(self, "devices", tuple(self.devices))
        problems = _validate_config(self)
        if problems:
            raise ConfigError(problems, source="SimulationConfig")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "SimulationConfig") -> SimulationConfig:
        """Build a config from plain values, such as a YAML section, rejecting unknown keys.

        Args:
            values: field names to values. ``devices`` is a list of mappings with the keys of
                :class:`DeviceProfile`. Missing keys keep their defaults.
            source: where the values come from (a file name), named in the error.

        Returns:
            The validated config.

        Raises:
            ConfigError: a key is unknown or a value is invalid. The message lists every problem,
                unknown keys and invalid values together.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        problems = [
            f"unknown key `{key}`; valid keys: {', '.join(known)}" for key in values if key not in known
        ]
        kwargs = {key: value for key, value in values.items() if key in known}
        if "devices" in kwargs:
            devices, device_problems = _devices_from_values(kwargs["devices"])
            problems.extend(device_problems)
            if device_problems:
                del kwargs["devices"]
            else:
                kwargs["devices"] = devices
        config: SimulationConfig | None = None
        try:
            config = cls(**kwargs)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems or config is None:
            raise ConfigError(problems, source=source)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-compatible values, the inverse of :meth:`from_dict`."""
        values = dataclasses.asdict(self)
        values["devices"] = [dataclasses.asdict(device) for device in self.devices]
        return values


# ---------------------------------------------------------------------------------------------------
# Validation


def _is_int(value: object) -> TypeGuard[int | np.integer]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> TypeGuard[int | float | np.integer | np.floating]:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_positive_int(problems: list[str], name: str, value: object) -> None:
    if not _is_int(value) or value < 1:
        problems.append(f"`{name}` must be a positive integer, got {value!r}")


def _check_real(
    problems: list[str],
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Append a problem unless ``value`` is a finite number inside the interval."""
    valid = False
    if _is_real(value) and math.isfinite(value):
        number = float(value)
        above = number > low if low_open else number >= low
        below = number < high if high_open else number <= high
        valid = above and below
    if not valid:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        problems.append(f"`{name}` must be a finite number in {left}{low}, {high}{right}, got {value!r}")


def _validate_devices(devices: tuple[object, ...]) -> list[str]:
    problems: list[str] = []
    if not devices:
        return ["`devices` must list at least one device, got an empty list"]
    names: list[str] = []
    for index, device in enumerate(devices):
        path = f"devices[{index}]"
        if not isinstance(device, DeviceProfile):
            problems.append(f"`{path}` must be a DeviceProfile, got {type(device).__name__}")
            continue
        if not isinstance(device.name, str) or not device.name:
            problems.append(f"`{path}.name` must be a non-empty string, got {device.name!r}")
        names.append(device.name)
        _check_real(problems, f"{path}.eta", device.eta, low=0.0)
        _check_real(problems, f"{path}.share", device.share, low=0.0, high=1.0, low_open=True)
        _check_real(
            problems, f"{path}.top_examination", device.top_examination, low=0.0, high=1.0, low_open=True
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"`devices` names must be unique; repeated: {', '.join(duplicates)}")
    shares = [
        device.share for device in devices if isinstance(device, DeviceProfile) and _is_real(device.share)
    ]
    if len(shares) == len(devices) and abs(sum(shares) - 1.0) > SHARE_SUM_TOLERANCE:
        problems.append(f"`devices` shares must sum to 1, got {sum(shares):.6g}; rescale the `share` values")
    return problems


def _validate_config(config: SimulationConfig) -> list[str]:
    problems: list[str] = []
    for name in (
        "num_users",
        "num_items",
        "num_requests",
        "list_size",
        "latent_dim",
        "num_user_segments",
        "num_item_categories",
    ):
        _check_positive_int(problems, name, getattr(config, name))
    sizes_valid = _is_int(config.list_size) and _is_int(config.num_items) and config.num_items >= 1
    if sizes_valid and config.list_size > config.num_items:
        problems.append(
            f"`list_size` ({config.list_size}) must not exceed `num_items` ({config.num_items}), "
            "because a list shows distinct items"
        )

    if not _is_int(config.seed) or config.seed < 0:
        problems.append(f"`seed` must be a non-negative integer, got {config.seed!r}")
    problems.extend(_validate_devices(config.devices))

    _check_real(problems, "latent_scale", config.latent_scale, low=0.0)
    _check_real(problems, "affinity_scale", config.affinity_scale, low=0.0)
    _check_real(problems, "quality_weight", config.quality_weight)
    if (config.target_click_rate is None) == (config.relevance_bias is None):
        problems.append(
            "set exactly one of `target_click_rate` and `relevance_bias`, got "
            f"target_click_rate={config.target_click_rate!r}, relevance_bias={config.relevance_bias!r} "
            "(target_click_rate defaults to 0.1: set it to null to fix the bias instead)"
        )
    if config.target_click_rate is not None:
        _check_real(
            problems,
            "target_click_rate",
            config.target_click_rate,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
        )
    if config.relevance_bias is not None:
        _check_real(problems, "relevance_bias", config.relevance_bias)

    if config.logging_policy not in LOGGING_POLICIES:
        problems.append(
            f"`logging_policy` must be one of {', '.join(LOGGING_POLICIES)}, got {config.logging_policy!r}"
        )
    _check_real(problems, "logging_noise", config.logging_noise, low=0.0)
    _check_real(problems, "logging_item_error", config.logging_item_error, low=0.0)
    _check_real(problems, "logging_duration_weight", config.logging_duration_weight)
    for name in ("logging_item_error", "logging_duration_weight"):
        value = getattr(config, name)
        if config.logging_policy == "random" and _is_real(value) and value:
            problems.append(
                f"`{name}` ({value}) applies only to the noisy_relevance policy; "
                "set it to 0 or use logging_policy: noisy_relevance"
            )
    _check_real(problems, "click_noise", config.click_noise, low=0.0, high=1.0, high_open=True)

    _check_real(problems, "like_rate", config.like_rate, low=0.0, high=1.0)
    _check_real(problems, "watch_time_median_s", config.watch_time_median_s, low=0.0, low_open=True)
    _check_real(
        problems, "watch_time_relevant_factor", config.watch_time_relevant_factor, low=0.0, low_open=True
    )
    _check_real(problems, "watch_time_sigma", config.watch_time_sigma, low=0.0)
    return problems


def _devices_from_values(values: object) -> tuple[tuple[DeviceProfile, ...], list[str]]:
    """Convert a list of device mappings (or ready profiles) into profiles, collecting problems."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        return (), [f"`devices` must be a list of devices, got {type(values).__name__}"]
    known = [f.name for f in dataclasses.fields(DeviceProfile)]
    required = [f.name for f in dataclasses.fields(DeviceProfile) if f.default is dataclasses.MISSING]
    devices: list[DeviceProfile] = []
    problems: list[str] = []
    for index, value in enumerate(values):
        if isinstance(value, DeviceProfile):
            devices.append(value)
            continue
        if not isinstance(value, Mapping):
            problems.append(
                f"`devices[{index}]` must be a mapping with keys {', '.join(known)}, got {value!r}"
            )
            continue
        unknown = [key for key in value if key not in known]
        missing = [key for key in required if key not in value]
        problems.extend(
            f"unknown key `devices[{index}].{key}`; valid keys: {', '.join(known)}" for key in unknown
        )
        problems.extend(f"missing key `devices[{index}].{key}`" for key in missing)
        if not unknown and not missing:
            devices.append(DeviceProfile(**value))
    return tuple(devices), problems


# ---------------------------------------------------------------------------------------------------
# Examination model


def _examination_table(devices: Sequence[DeviceProfile], list_size: int) -> np.ndarray:
    """Return examination probabilities of shape ``(num_devices, list_size)``, column j for position j + 1."""
    positions = np.arange(1, list_size + 1, dtype=np.float64)
    return np.stack([device.examination(positions) for device in devices])


def examination_probabilities(config: SimulationConfig) -> dict[tuple[str, int], float]:
    """Return the true examination probability per ``(device, position)``, positions 1-based.

    Args:
        config: the simulation settings, of which only ``devices`` and ``list_size`` are read.

    Returns:
        A mapping from ``(device name, position)`` to the probability, for every device and every
        position ``1 .. list_size``.
    """
    table = _examination_table(config.devices, config.list_size)
    return {
        (device.name, position): float(table[row, position - 1])
        for row, device in enumerate(config.devices)
        for position in range(1, config.list_size + 1)
    }


def true_examination_log_odds(config: SimulationConfig) -> dict[tuple[str, int], float]:
    """Return the true log-odds of examination per ``(device, position)``, for evaluation tables.

    A position-bias tower is identified only up to a constant shared with the relevance logit, so
    compare differences between cells (for example each cell minus ``(device, 1)``), not raw values.

    Args:
        config: the simulation settings, of which only ``devices`` and ``list_size`` are read.

    Returns:
        A mapping from ``(device name, position)`` to ``log(e / (1 - e))``, where ``e`` is the
        examination probability. The value is ``math.inf`` where ``e`` is 1 (``top_examination = 1``
        at position 1).
    """
    log_odds: dict[tuple[str, int], float] = {}
    for key, probability in examination_probabilities(config).items():
        log_odds[key] = math.inf if probability >= 1.0 else math.log(probability) - math.log1p(-probability)
    return log_odds


# ---------------------------------------------------------------------------------------------------
# Shared simulation steps


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warning for large negative logits.
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


def _spawn_generators(seed: int, count: int) -> list[np.random.Generator]:
    """Return independent generators, one per simulation stage.

    Separate streams keep each stage's draws fixed when another stage draws more or fewer numbers,
    for example when ``num_items`` changes.
    """
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(count)]


def _logging_order(
    logits: np.ndarray,
    policy: LoggingPolicy,
    noise: float,
    rng: np.random.Generator,
    item_error: np.ndarray | None = None,
) -> np.ndarray:
    """Return ``(R, K)`` column indices, where entry ``[r, j]`` is the candidate shown at position ``j + 1``.

    Args:
        logits: ``(R, K)`` relevance logits of the candidates of each request.
        policy: ``noisy_relevance`` sorts by ``logit + item_error + noise * N(0, 1)`` descending.
            ``random`` sorts by uniform keys, which is a uniform shuffle.
        noise: standard deviation of the Gaussian noise of ``noisy_relevance``.
        rng: generator of the noise or the shuffle keys.
        item_error: ``(R, K)`` persistent logging error of each candidate's item, or ``None`` for none.
    """
    if policy == "random":
        keys = rng.random(logits.shape)
    else:
        scores = logits + noise * rng.standard_normal(logits.shape)
        if item_error is not None:
            scores = scores + item_error
        keys = -scores
    return np.argsort(keys, axis=1, kind="stable")


def _item_logging_error(
    item_index: np.ndarray, num_items: int, scale: float, rng: np.random.Generator
) -> np.ndarray | None:
    """Return the persistent logging error of each entry of ``item_index`` (any shape), or ``None``.

    One ``N(0, scale)`` value is drawn per item index ``0 .. num_items - 1``, so every impression of
    an item carries the same error. ``None`` when ``scale`` is 0, which leaves the other draws of
    the simulation unchanged.
    """
    if scale == 0:
        return None
    return (scale * rng.standard_normal(num_items))[item_index]


def _draw_devices(devices: Sequence[DeviceProfile], count: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``(count,)`` device row indices drawn with the devices' shares."""
    shares = np.array([device.share for device in devices], dtype=np.float64)
    return rng.choice(len(devices), size=count, p=shares / shares.sum())


def _draw_clicks(
    relevance: np.ndarray, examination: np.ndarray, click_noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw relevance and examination independently and click when both hold (or by click noise).

    Args:
        relevance: ``(R, K)`` probabilities that the item is relevant.
        examination: ``(R, K)`` probabilities that the position is examined.
        click_noise: probability that an examined irrelevant item is clicked.
        rng: generator of the three Bernoulli draws.

    Returns:
        ``(click, relevant)``, both ``(R, K)`` booleans. ``relevant`` is the latent relevance draw
        that the relevance-only tasks share with the click.
    """
    relevant = rng.random(relevance.shape) < relevance
    examined = rng.random(relevance.shape) < examination
    noise_click = rng.random(relevance.shape) < click_noise
    click = examined & (relevant | noise_click)
    return click, relevant


def _take_strings(names: Sequence[str], indices: np.ndarray) -> pa.Array:
    """Return a string array with ``names[i]`` for each index in the flat int array ``indices``."""
    return pc.take(pa.array(list(names), type=pa.string()), pa.array(indices, type=pa.int64()))


def _flat(values: np.ndarray) -> np.ndarray:
    """Flatten ``(R, K)`` row-major, the log's row order: request by request, positions ascending."""
    return np.ascontiguousarray(values).reshape(-1)


def _with_metadata(table: pa.Table, metadata: dict[str, Any]) -> pa.Table:
    metadata = {**metadata, "ground_truth_columns": list(GROUND_TRUTH_COLUMNS)}
    # NumPy scalars in a config (np.int64 from a computed size, say) become plain numbers.
    text = json.dumps(metadata, sort_keys=True, default=lambda value: np.asarray(value).item())
    return table.replace_schema_metadata({METADATA_KEY: text.encode()})


# ---------------------------------------------------------------------------------------------------
# Synthetic mode


@dataclass(frozen=True)
class _Population:
    """Latent factors and features of all users and items.

    Shapes: U ``num_users``, I ``num_items``, L ``latent_dim``, S segments, C categories.
    """

    user_factors: np.ndarray  # (U, L)
    item_factors: np.ndarray  # (I, L)
    user_segment: np.ndarray  # (U,) int in [0, S)
    item_category: np.ndarray  # (I,) int in [0, C)
    item_quality: np.ndarray  # (I,) standard normal
    affinity: np.ndarray  # (S, C) logit effect of a segment meeting a category


def _draw_population(config: SimulationConfig, rng: np.random.Generator) -> _Population:
    # Each factor entry has std s with L * s**4 = latent_scale**2, so u . v has std latent_scale.
    factor_std = math.sqrt(config.latent_scale) / config.latent_dim**0.25
    return _Population(
        user_factors=rng.normal(0.0, factor_std, size=(config.num_users, config.latent_dim)),
        item_factors=rng.normal(0.0, factor_std, size=(config.num_items, config.latent_dim)),
        user_segment=rng.integers(0, config.num_user_segments, size=config.num_users),
        item_category=rng.integers(0, config.num_item_categories, size=config.num_items),
        item_quality=rng.standard_normal(config.num_items),
        affinity=rng.normal(
            0.0, config.affinity_scale, size=(config.num_user_segments, config.num_item_categories)
        ),
    )


def _repeated_mask(items: np.ndarray) -> np.ndarray:
    """Return a ``(R, K)`` mask of entries whose item already occurs earlier in sorted order of its row."""
    order = np.argsort(items, axis=1, kind="stable")
    ordered = np.take_along_axis(items, order, axis=1)
    repeated_ordered = np.zeros(items.shape, dtype=bool)
    repeated_ordered[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    mask = np.zeros(items.shape, dtype=bool)
    np.put_along_axis(mask, order, repeated_ordered, axis=1)
    return mask


def _draw_distinct_items(
    num_rows: int, list_size: int, num_items: int, rng: np.random.Generator
) -> np.ndarray:
    """Return ``(num_rows, list_size)`` item ids, distinct within each row, drawn uniformly.

    Repeated entries are redrawn, which ends in a few rounds when ``num_items`` is much larger than
    ``list_size``. Rows still holding a repeat afterwards (only likely when the two are close) take
    the first ``list_size`` entries of a random permutation.
    """
    items = rng.integers(0, num_items, size=(num_rows, list_size))
    for _ in range(DISTINCT_ITEM_ROUNDS):
        repeated = _repeated_mask(items)
        count = int(repeated.sum())
        if count == 0:
            return items
        items[repeated] = rng.integers(0, num_items, size=count)
    rows = np.flatnonzero(_repeated_mask(items).any(axis=1))
    if rows.size:
        # Rows reach this point almost only when num_items is close to list_size, so the
        # (rows, num_items) key matrix stays small.
        items[rows] = np.argsort(rng.random((rows.size, num_items)), axis=1)[:, :list_size]
    return items


def _solve_relevance_bias(
    logits: np.ndarray, examination: np.ndarray, click_noise: float, target_click_rate: float
) -> float:
    """Return the bias at which the expected click rate of these impressions equals the target.

    The expected click rate ``mean(exam * (r + (1 - r) * click_noise))`` with ``r = sigmoid(logit + b)``
    rises monotonically in ``b``, so bisection finds it. Adding ``b`` to every logit leaves each list's
    order unchanged, so the policy's ranking does not depend on the bias.

    Raises:
        ConfigError: ``target_click_rate`` lies outside the rates these examination curves allow.
    """

    def expected_click_rate(bias: float) -> float:
        relevance = _sigmoid(logits + bias)
        return float(np.mean(examination * (relevance + (1.0 - relevance) * click_noise)))

    lowest = expected_click_rate(-BIAS_SEARCH_LIMIT)
    highest = expected_click_rate(BIAS_SEARCH_LIMIT)
    if not lowest < target_click_rate < highest:
        raise ConfigError(
            [
                f"`target_click_rate` {target_click_rate} is unreachable: with these examination curves "
                f"and click_noise the expected click rate lies in ({lowest:.4g}, {highest:.4g}); choose a "
                "target inside it, or raise `top_examination` or lower `eta` of the devices"
            ],
            source="SimulationConfig",
        )
    low, high = -BIAS_SEARCH_LIMIT, BIAS_SEARCH_LIMIT
    for _ in range(BIAS_SEARCH_STEPS):
        middle = 0.5 * (low + high)
        if expected_click_rate(middle) < target_click_rate:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def simulate_click_log(config: SimulationConfig) -> pa.Table:
    """Simulate an impression log of synthetic users and items with known relevance and position bias.

    Each request draws a user uniformly, a device by the devices' shares, and ``list_size`` distinct
    items uniformly. The logging policy orders them (see ``SimulationConfig.logging_policy``), and
    each impression is clicked when it is examined and relevant. ``like`` and ``watch_time`` depend on
    the same relevance draw but never on position or examination.

    Args:
        config: the simulation settings.

    Returns:
        A table of ``num_requests * list_size`` rows ordered by request, then position, with columns
        ``request_id, user_id, item_id`` (int64), ``user_segment, item_category`` (string),
        ``item_quality`` (float64), ``device`` (string), ``position`` (int64, ``1 .. K``),
        ``click, like`` (int64, 0 or 1), ``watch_time`` (float64, seconds) and the ground-truth
        columns ``true_relevance`` and ``true_examination`` (float64 probabilities), which must never be
        used as features. The schema metadata under :data:`METADATA_KEY` stores the settings and the
        relevance bias used, as JSON.

    Raises:
        ConfigError: ``target_click_rate`` cannot be reached with the examination curves, or
            ``logging_duration_weight`` is set (synthetic items have no duration).

    Example:
        >>> table = simulate_click_log(SimulationConfig(num_users=50, num_items=40, num_requests=30))
        >>> table.num_rows
        300
    """
    if config.logging_duration_weight:
        raise ConfigError(
            [
                f"`logging_duration_weight` ({config.logging_duration_weight}) needs video durations, which "
                "only the semi-synthetic KuaiRand mode has; set it to 0 or pass a KuaiRand folder"
            ],
            source="SimulationConfig",
        )
    # A fifth stream for the item errors: SeedSequence children are numbered, so the first four
    # streams, and logs without item errors, stay as they were before that stream existed.
    population_rng, request_rng, policy_rng, outcome_rng, item_error_rng = _spawn_generators(config.seed, 5)
    population = _draw_population(config, population_rng)

    # Requests: user (R,), device (R,), candidate items (R, K).
    users = request_rng.integers(0, config.num_users, size=config.num_requests)
    device_rows = _draw_devices(config.devices, config.num_requests, request_rng)
    candidates = _draw_distinct_items(config.num_requests, config.list_size, config.num_items, request_rng)

    # Relevance logits without the bias: (R, L) . (R, K, L) -> (R, K).
    # NOTE: the gathered item factors take num_requests * list_size * latent_dim floats of memory.
    logits = np.einsum("rl,rkl->rk", population.user_factors[users], population.item_factors[candidates])
    logits += population.affinity[
        population.user_segment[users][:, None], population.item_category[candidates]
    ]
    logits += config.quality_weight * population.item_quality[candidates]

    # Gather items and logits into the order in which the logging policy shows them.
    item_error = _item_logging_error(candidates, config.num_items, config.logging_item_error, item_error_rng)
    order = _logging_order(logits, config.logging_policy, config.logging_noise, policy_rng, item_error)
    items = np.take_along_axis(candidates, order, axis=1)
    logits = np.take_along_axis(logits, order, axis=1)

    examination = _examination_table(config.devices, config.list_size)[device_rows]  # (R, K)
    if config.target_click_rate is not None:
        bias = _solve_relevance_bias(logits, examination, config.click_noise, config.target_click_rate)
    else:
        # Validation guarantees that relevance_bias is set when target_click_rate is not.
        bias = float(cast(float, config.relevance_bias))
    relevance = _sigmoid(logits + bias)

    click, relevant = _draw_clicks(relevance, examination, config.click_noise, outcome_rng)
    like = relevant & (outcome_rng.random(relevant.shape) < config.like_rate)
    log_watch_time = (
        math.log(config.watch_time_median_s)
        + math.log(config.watch_time_relevant_factor) * relevant
        + config.watch_time_sigma * outcome_rng.standard_normal(relevant.shape)
    )

    num_rows = config.num_requests * config.list_size
    flat_items = _flat(items)
    flat_users = np.repeat(users, config.list_size)
    table = pa.table(
        {
            "request_id": np.repeat(np.arange(config.num_requests, dtype=np.int64), config.list_size),
            "user_id": flat_users.astype(np.int64),
            "item_id": flat_items.astype(np.int64),
            "user_segment": _take_strings(
                [f"segment_{i}" for i in range(config.num_user_segments)], population.user_segment[flat_users]
            ),
            "item_category": _take_strings(
                [f"category_{i}" for i in range(config.num_item_categories)],
                population.item_category[flat_items],
            ),
            "item_quality": population.item_quality[flat_items],
            "device": _take_strings(
                [device.name for device in config.devices], np.repeat(device_rows, config.list_size)
            ),
            "position": np.tile(np.arange(1, config.list_size + 1, dtype=np.int64), config.num_requests),
            "click": _flat(click).astype(np.int64),
            "like": _flat(like).astype(np.int64),
            "watch_time": _flat(np.exp(log_watch_time)),
            "true_relevance": _flat(relevance),
            "true_examination": _flat(examination),
        }
    )
    click_rate = float(np.mean(click))
    logger.info(
        "simulated %d impressions in %d requests: click rate %.4f, relevance bias %.4f",
        num_rows,
        config.num_requests,
        click_rate,
        bias,
    )
    return _with_metadata(table, {"mode": "synthetic", "config": config.to_dict(), "relevance_bias": bias})


# ---------------------------------------------------------------------------------------------------
# Semi-synthetic mode on KuaiRand


def _read_kuairand_log(path: Path) -> pa.Table:
    if not path.is_file():
        raise DataError(f"KuaiRand log not found: {path}; pass the folder that contains {KUAIRAND_LOG_FILE}")
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter="\t"),
            convert_options=pacsv.ConvertOptions(
                column_types=KUAIRAND_LOG_TYPES, include_columns=list(KUAIRAND_LOG_TYPES)
            ),
        )
    except (pa.ArrowInvalid, KeyError) as exc:
        raise DataError(
            f"cannot read {path} as the tab-separated KuaiRand log with columns "
            f"{', '.join(KUAIRAND_LOG_TYPES)}: {exc}"
        ) from exc
    for name in table.column_names:
        nulls = table.column(name).null_count
        if nulls:
            raise DataError(
                f"{path}: column `{name}` has {nulls} empty values; the simulator needs every value"
            )
    labels = table.column("label").to_numpy()
    invalid = int(np.count_nonzero((labels != 0) & (labels != 1)))
    if invalid:
        raise DataError(f"{path}: column `label` has {invalid} values other than 0 (hate) and 1 (like)")
    return table


def _read_kuairand_user_features(path: Path) -> pa.Table:
    if not path.is_file():
        raise DataError(
            f"KuaiRand user features not found: {path}; add {KUAIRAND_USER_FEATURES_FILE} to the folder "
            "or pass join_user_features=False"
        )
    try:
        return pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types=KUAIRAND_USER_FEATURE_TYPES, include_columns=list(KUAIRAND_USER_FEATURE_TYPES)
            ),
        )
    except (pa.ArrowInvalid, KeyError) as exc:
        raise DataError(
            f"cannot read {path} as KuaiRand user features with columns "
            f"{', '.join(KUAIRAND_USER_FEATURE_TYPES)}: {exc}"
        ) from exc


def _complete_list_rows(user_ids: np.ndarray, list_size: int) -> np.ndarray:
    """Return indices of rows that fill complete lists, for rows already sorted by user then time.

    Each user's impressions are cut into consecutive lists of ``list_size``, and the user's last,
    shorter list is dropped. The kept indices come in order, so they reshape to ``(lists, list_size)``.
    """
    num_rows = user_ids.size
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]])
    sizes = np.diff(np.r_[starts, num_rows])
    rank_in_user = np.arange(num_rows) - np.repeat(starts, sizes)
    complete = (rank_in_user // list_size + 1) * list_size <= np.repeat(sizes, sizes)
    return np.flatnonzero(complete)


def _join_user_features(table: pa.Table, user_ids: np.ndarray, features: pa.Table) -> pa.Table:
    """Append the user feature columns to ``table``, null where a user has no feature row."""
    feature_ids = features.column("user_id").to_numpy()
    sorted_rows = np.argsort(feature_ids, kind="stable")
    sorted_ids = feature_ids[sorted_rows]
    if sorted_ids.size == 0:
        feature_rows = np.zeros(user_ids.shape, dtype=np.int64)
        found = np.zeros(user_ids.shape, dtype=bool)
    else:
        slots = np.minimum(np.searchsorted(sorted_ids, user_ids), sorted_ids.size - 1)
        feature_rows = sorted_rows[slots]
        found = sorted_ids[slots] == user_ids
    missing_users = np.unique(user_ids[~found])
    if missing_users.size:
        logger.warning(
            "%d KuaiRand users have no row in %s; their user feature columns are null",
            missing_users.size,
            KUAIRAND_USER_FEATURES_FILE,
        )
    indices = pa.array(feature_rows, type=pa.int64(), mask=~found)
    for name in KUAIRAND_USER_FEATURE_TYPES:
        if name != "user_id":
            table = table.append_column(name, pc.take(features.column(name), indices))
    return table


def semi_synthetic_kuairand(
    kuairand_dir: str | Path,
    config: SimulationConfig,
    *,
    liked_relevance: float = DEFAULT_LIKED_RELEVANCE,
    hated_relevance: float = DEFAULT_HATED_RELEVANCE,
    join_user_features: bool = True,
) -> pa.Table:
    """Simulate clicks on real KuaiRand impressions, with the real like label as true relevance.

    Reads ``processed_standard_kcore_15.csv`` (tab-separated) from ``kuairand_dir``, sorts each
    user's impressions by time and cuts them into consecutive lists of ``config.list_size``. A user's
    last, shorter list is dropped, and the number of dropped rows is logged. True relevance is
    ``liked_relevance`` for a like (``label = 1``) and ``hated_relevance`` for a hate. The logging
    policy orders each list, a device is drawn per list, and clicks come from the same examination
    model as :func:`simulate_click_log`. Real user features are joined from
    ``user_features_pure.csv`` when ``join_user_features`` is set.

    Only these config fields are used: ``list_size``, ``devices``, ``logging_policy``,
    ``logging_noise``, ``logging_item_error`` (drawn once per video), ``logging_duration_weight``,
    ``click_noise`` and ``seed``.
    The real data fixes users, items, relevance, likes and watch time, so the population,
    relevance-bias, click-rate target, like-rate and watch-time fields play no part. The click rate follows from the real labels: about 0.81 of the
    subset's rows are likes, far above a natural log.

    NOTE: the subset keeps only impressions with a like or a hate, so a user's consecutive
    impressions can span several days and a list is not one real feed session.

    Args:
        kuairand_dir: folder with the KuaiRand subset files.
        config: the simulation settings.
        liked_relevance: true relevance of a liked video, in ``(hated_relevance, 1)``.
        hated_relevance: true relevance of a hated video, in ``(0, liked_relevance)``.
        join_user_features: join KuaiRand-Pure user features by ``user_id``.

    Returns:
        A table ordered by request, then position, with columns ``request_id, user_id, item_id``
        (int64, ``item_id`` is the real ``video_id``), the real ``date, hourmin, time_ms,
        duration_ms`` (int64), the user features when joined (``user_active_degree``,
        ``is_lowactive_period``, ``register_days_range``, ``follow_user_num_range``,
        ``fans_user_num_range``, ``friend_user_num_range``), ``device`` (string), ``position``
        (int64, ``1 .. K``), the simulated ``click`` (int64), the real ``like`` (the label) and
        ``long_view`` (int64), the real ``watch_time`` (float64, seconds of play) and the ground-truth
        columns ``true_relevance`` and ``true_examination``, which must never be used as features. The
        real ``is_click`` is not kept because the simulated ``click`` replaces it.

    Raises:
        ConfigError: ``liked_relevance`` or ``hated_relevance`` is out of range.
        DataError: a file is missing or unreadable, a value is empty, or a label is not 0 or 1.
    """
    problems: list[str] = []
    _check_real(
        problems, "hated_relevance", hated_relevance, low=0.0, high=1.0, low_open=True, high_open=True
    )
    _check_real(
        problems, "liked_relevance", liked_relevance, low=0.0, high=1.0, low_open=True, high_open=True
    )
    if not problems and hated_relevance >= liked_relevance:
        problems.append(
            f"`liked_relevance` ({liked_relevance}) must exceed `hated_relevance` ({hated_relevance})"
        )
    if problems:
        raise ConfigError(problems, source="semi_synthetic_kuairand")

    folder = Path(kuairand_dir)
    log = _read_kuairand_log(folder / KUAIRAND_LOG_FILE)
    user_ids = log.column("user_id").to_numpy()
    by_user_then_time = np.lexsort((log.column("time_ms").to_numpy(), user_ids))
    user_ids = user_ids[by_user_then_time]
    kept = by_user_then_time[_complete_list_rows(user_ids, config.list_size)]
    dropped = log.num_rows - kept.size
    if kept.size == 0:
        raise DataError(
            f"no KuaiRand user has {config.list_size} impressions to fill one list; lower `list_size`"
        )
    logger.info(
        "KuaiRand: %d of %d impressions fill lists of %d; dropped %d rows from users' last, shorter lists",
        kept.size,
        log.num_rows,
        config.list_size,
        dropped,
    )

    # Lists: each row of these (L, K) arrays is one user's consecutive impressions in time order.
    num_lists = kept.size // config.list_size
    rows = kept.reshape(num_lists, config.list_size)
    labels = log.column("label").to_numpy()[rows]
    relevance = np.where(labels == 1, liked_relevance, hated_relevance)
    policy_rng, device_rng, outcome_rng, item_error_rng = _spawn_generators(config.seed, 4)
    # Persistent errors by video: index the videos in sorted id order so the draw is reproducible.
    videos, video_index = np.unique(log.column("video_id").to_numpy()[rows], return_inverse=True)
    item_error = _item_logging_error(
        video_index.reshape(rows.shape), videos.size, config.logging_item_error, item_error_rng
    )
    if config.logging_duration_weight:
        log_duration = np.log1p(log.column("duration_ms").to_numpy()[rows].astype(np.float64))  # (L, K)
        spread = float(np.std(log_duration))
        standardized = (log_duration - log_duration.mean()) / (spread if spread > 0 else 1.0)
        duration_error = config.logging_duration_weight * standardized
        item_error = duration_error if item_error is None else item_error + duration_error
    order = _logging_order(
        np.log(relevance / (1.0 - relevance)),
        config.logging_policy,
        config.logging_noise,
        policy_rng,
        item_error,
    )
    rows = np.take_along_axis(rows, order, axis=1)
    relevance = np.take_along_axis(relevance, order, axis=1)

    device_rows = _draw_devices(config.devices, num_lists, device_rng)
    examination = _examination_table(config.devices, config.list_size)[device_rows]  # (L, K)
    click, _ = _draw_clicks(relevance, examination, config.click_noise, outcome_rng)

    flat_rows = _flat(rows)
    real = log.take(pa.array(flat_rows, type=pa.int64()))
    table = pa.table(
        {
            "request_id": np.repeat(np.arange(num_lists, dtype=np.int64), config.list_size),
            "user_id": real.column("user_id"),
            "item_id": real.column("video_id"),
            "date": real.column("date"),
            "hourmin": real.column("hourmin"),
            "time_ms": real.column("time_ms"),
            "duration_ms": real.column("duration_ms"),
        }
    )
    if join_user_features:
        features = _read_kuairand_user_features(folder / KUAIRAND_USER_FEATURES_FILE)
        table = _join_user_features(table, real.column("user_id").to_numpy(), features)
    outcome_columns = {
        "device": _take_strings(
            [device.name for device in config.devices], np.repeat(device_rows, config.list_size)
        ),
        "position": pa.array(np.tile(np.arange(1, config.list_size + 1, dtype=np.int64), num_lists)),
        "click": pa.array(_flat(click).astype(np.int64)),
        "like": real.column("label"),
        "long_view": real.column("long_view"),
        "watch_time": pc.divide(pc.cast(real.column("play_time_ms"), pa.float64()), 1000.0),
        "true_relevance": pa.array(_flat(relevance)),
        "true_examination": pa.array(_flat(examination)),
    }
    for name, column in outcome_columns.items():
        table = table.append_column(name, column)
    logger.info("KuaiRand semi-synthetic log: %d lists, click rate %.4f", num_lists, float(np.mean(click)))
    metadata = {
        "mode": "semi_synthetic_kuairand",
        # Only the settings this mode reads; the real log fixes users, items and the list count.
        "config": {key: value for key, value in config.to_dict().items() if key in KUAIRAND_SETTINGS},
        "num_lists": int(num_lists),
        "liked_relevance": liked_relevance,
        "hated_relevance": hated_relevance,
        "dropped_rows": int(dropped),
    }
    return _with_metadata(table, metadata)


# ---------------------------------------------------------------------------------------------------
# Writing


def write_click_log(
    config: SimulationConfig, path: str | Path, *, kuairand_dir: str | Path | None = None
) -> Path:
    """Simulate a click log and write it as one Parquet file.

    The file is written under a temporary name and renamed into place, so an interrupted run leaves
    no partial file at ``path``.

    Args:
        config: the simulation settings.
        path: the Parquet file to write. Missing parent folders are created.
        kuairand_dir: when given, write :func:`semi_synthetic_kuairand` on this folder (with its
            default relevance mapping and user features) instead of :func:`simulate_click_log`.

    Returns:
        The path written.

    Raises:
        ConfigError: see :func:`simulate_click_log`.
        DataError: see :func:`semi_synthetic_kuairand`.
    """
    if kuairand_dir is None:
        table = simulate_click_log(config)
    else:
        table = semi_synthetic_kuairand(kuairand_dir, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        pq.write_table(table, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("wrote %d impressions to %s", table.num_rows, path)
    return path


__all__ = [
    "DEFAULT_DEVICES",
    "GROUND_TRUTH_COLUMNS",
    "KUAIRAND_SETTINGS",
    "LOGGING_POLICIES",
    "METADATA_KEY",
    "DeviceProfile",
    "LoggingPolicy",
    "SimulationConfig",
    "examination_probabilities",
    "semi_synthetic_kuairand",
    "simulate_click_log",
    "true_examination_log_odds",
    "write_click_log",
]
