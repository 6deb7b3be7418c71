"""Dynamic Weight Average against Liu et al. (CVPR 2019), with values computed by hand.

w_i(t) = T * exp(r_i(t-1) / Temp) / sum_j exp(r_j(t-1) / Temp), r_i(t-1) = L_i(t-1) / L_i(t-2).
"""

from __future__ import annotations

import math

import pytest
import torch

from mtrank.balancing import DWABalancer, build_balancer
from mtrank.errors import ConfigError


def make_balancer(num_tasks: int, **options: float) -> DWABalancer:
    names = [f"task{i}" for i in range(num_tasks)]
    balancer = build_balancer("dwa", names, ["binary"] * num_tasks, dict(options))
    assert isinstance(balancer, DWABalancer)
    return balancer


def test_first_two_epochs_use_ones() -> None:
    balancer = make_balancer(2)
    assert balancer.weights().tolist() == [1.0, 1.0]
    balancer.end_epoch(torch.tensor([1.0, 2.0]))
    assert balancer.weights().tolist() == [1.0, 1.0]


def test_weights_match_hand_computation() -> None:
    balancer = make_balancer(2)
    balancer.end_epoch(torch.tensor([1.0, 2.0]))
    balancer.end_epoch(torch.tensor([0.5, 2.0]))
    weights = balancer.weights()
    # r = (0.5 / 1, 2 / 2) = (0.5, 1); Temp 2: exp(0.25) = 1.284025, exp(0.5) = 1.648721, sum 2.932747.
    # w = 2 * (1.284025, 1.648721) / 2.932747 = (0.875647, 1.124353).
    assert weights[0].item() == pytest.approx(0.875647, rel=1e-5)
    assert weights[1].item() == pytest.approx(1.124353, rel=1e-5)


def test_uses_last_two_epochs_only() -> None:
    balancer = make_balancer(3, temperature=1.0)
    balancer.end_epoch(torch.tensor([9.0, 9.0, 9.0]))
    balancer.end_epoch(torch.tensor([2.0, 4.0, 1.0]))
    balancer.end_epoch(torch.tensor([1.0, 4.0, 1.0]))
    weights = balancer.weights()
    # r = (1/2, 4/4, 1/1) = (0.5, 1, 1); Temp 1: exp(0.5) = 1.648721, e = 2.718282, sum 7.085285.
    # w = 3 * (1.648721, 2.718282, 2.718282) / 7.085285 = (0.698087, 1.150957, 1.150957).
    assert weights[0].item() == pytest.approx(0.698087, rel=1e-5)
    assert weights[1].item() == pytest.approx(1.150957, rel=1e-5)
    assert weights[2].item() == pytest.approx(1.150957, rel=1e-5)
    assert weights.sum().item() == pytest.approx(3.0, rel=1e-6)


def test_combine_applies_epoch_weights() -> None:
    balancer = make_balancer(2)
    balancer.end_epoch(torch.tensor([1.0, 2.0]))
    balancer.end_epoch(torch.tensor([0.5, 2.0]))
    total = balancer.combine(torch.tensor([1.0, 1.0]))
    assert total.item() == pytest.approx(2.0, rel=1e-6)
    total = balancer.combine(torch.tensor([2.0, 0.0]))
    assert total.item() == pytest.approx(2 * 0.875647, rel=1e-5)


def test_zero_previous_loss_gives_ratio_one() -> None:
    balancer = make_balancer(2)
    balancer.end_epoch(torch.tensor([0.0, 1.0]))
    balancer.end_epoch(torch.tensor([0.5, 1.0]))
    # Both ratios are 1 (task0 by rule, task1 by value), so the weights stay equal.
    assert balancer.weights().tolist() == pytest.approx([1.0, 1.0])


def test_non_finite_epoch_loss_raises() -> None:
    balancer = make_balancer(2)
    with pytest.raises(ValueError, match="must be finite"):
        balancer.end_epoch(torch.tensor([math.nan, 1.0]))


def test_wrong_shape_epoch_loss_raises() -> None:
    balancer = make_balancer(2)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        balancer.end_epoch(torch.tensor([1.0, 1.0, 1.0]))


def test_non_positive_temperature_raises() -> None:
    with pytest.raises(ConfigError, match="`temperature` must be a positive number, got 0.0"):
        make_balancer(2, temperature=0.0)


def test_state_dict_restores_history() -> None:
    balancer = make_balancer(2)
    balancer.end_epoch(torch.tensor([1.0, 2.0]))
    restored = make_balancer(2)
    restored.load_state_dict(balancer.state_dict())
    restored.end_epoch(torch.tensor([0.5, 2.0]))
    assert restored.weights()[0].item() == pytest.approx(0.875647, rel=1e-5)
