"""Fixed task weights."""

from __future__ import annotations

import math

import pytest
import torch

from mtrank.balancing import build_balancer
from mtrank.errors import ConfigError

NAMES = ["click", "like", "watch_time"]
TYPES = ["binary", "binary", "regression"]


def test_default_weights_are_one() -> None:
    balancer = build_balancer("fixed", NAMES, TYPES)
    assert balancer.weights().tolist() == [1.0, 1.0, 1.0]
    assert balancer.combine(torch.tensor([0.5, 0.25, 2.0])).item() == pytest.approx(2.75)


def test_given_weights_apply_by_name() -> None:
    balancer = build_balancer("fixed", NAMES, TYPES, {"weights": {"watch_time": 0.1, "like": 2.0}})
    # 1 * 0.5 + 2 * 0.25 + 0.1 * 2 = 1.2
    assert balancer.combine(torch.tensor([0.5, 0.25, 2.0])).item() == pytest.approx(1.2)
    assert balancer.last_stats()["weight/watch_time"] == pytest.approx(0.1)


def test_unknown_task_in_weights_raises() -> None:
    with pytest.raises(ConfigError, match="unknown task `share`; tasks are: click, like, watch_time"):
        build_balancer("fixed", NAMES, TYPES, {"weights": {"share": 1.0}})


@pytest.mark.parametrize("value", [-1.0, math.inf, "1"])
def test_invalid_weight_raises(value: object) -> None:
    with pytest.raises(ConfigError, match="weight of task `click` must be a finite number >= 0"):
        build_balancer("fixed", NAMES, TYPES, {"weights": {"click": value}})


def test_all_zero_weights_raise() -> None:
    with pytest.raises(ConfigError, match="at least one task weight must be positive"):
        build_balancer("fixed", ["click"], ["binary"], {"weights": {"click": 0.0}})
