"""Uncertainty weighting against the per-task forms of Kendall et al. (CVPR 2018), computed by hand.

regression: 0.5 * exp(-s) * L + 0.5 * s, so d/ds = -0.5 * exp(-s) * L + 0.5 and the minimum is s* = log(L).
binary:           exp(-s) * L + 0.5 * s, so d/ds =       -exp(-s) * L + 0.5 and the minimum is s* = log(2L).
"""

from __future__ import annotations

import math

import pytest
import torch

from mtrank.balancing import UncertaintyBalancer, build_balancer
from mtrank.errors import ConfigError


def make_balancer(task_types: list[str], **options: float | str) -> UncertaintyBalancer:
    names = [f"task{i}" for i in range(len(task_types))]
    balancer = build_balancer("uncertainty", names, task_types, dict(options))
    assert isinstance(balancer, UncertaintyBalancer)
    return balancer


def test_combined_loss_matches_forms() -> None:
    balancer = make_balancer(["regression", "binary"], initial_log_variance=math.log(2.0))
    total = balancer.combine(torch.tensor([0.8, 0.3]))
    # s = log 2 for both, so exp(-s) = 0.5 and 0.5 * s = 0.346574.
    # regression 0.5 * 0.5 * 0.8 + 0.346574 = 0.2 + 0.346574; binary 0.5 * 0.3 + 0.346574 = 0.15 + 0.346574.
    # Sum: 0.35 + log 2.
    assert total.item() == pytest.approx(0.35 + math.log(2.0), rel=1e-6)


def test_log_variance_gradient_by_hand() -> None:
    balancer = make_balancer(["regression", "binary"])
    balancer.combine(torch.tensor([0.1, 0.1])).backward()
    grad = balancer.log_variances.grad
    # At s = 0: regression -0.5 * 0.1 + 0.5 = 0.45; binary -0.1 + 0.5 = 0.4.
    assert grad[0].item() == pytest.approx(0.45, rel=1e-6)
    assert grad[1].item() == pytest.approx(0.4, rel=1e-6)


def test_weights_are_precision_factors() -> None:
    balancer = make_balancer(["regression", "binary"], initial_log_variance=-1.0)
    weights = balancer.weights()
    # c * exp(-s) = (0.5 * e, 1 * e).
    assert weights[0].item() == pytest.approx(0.5 * math.e, rel=1e-6)
    assert weights[1].item() == pytest.approx(math.e, rel=1e-6)


def test_small_losses_keep_adapting() -> None:
    # Losses of 0.1 need negative log-variances: s* = log(0.1) = -2.3026 and log(0.2) = -1.6094.
    # A lower bound of 0 on s would freeze both weights at their starting values.
    balancer = make_balancer(["regression", "binary"], lr=0.05)
    losses = torch.tensor([0.1, 0.1])
    for _ in range(600):
        balancer.combine(losses).backward()
        balancer.step()
    log_variances = balancer.log_variances.detach()
    assert log_variances[0].item() == pytest.approx(math.log(0.1), abs=0.05)
    assert log_variances[1].item() == pytest.approx(math.log(0.2), abs=0.05)
    # The weights approach 1 / (2 * L) = 5 for both forms.
    assert balancer.weights()[0].item() == pytest.approx(5.0, rel=0.06)
    assert balancer.weights()[1].item() == pytest.approx(5.0, rel=0.06)


def test_step_clears_gradients() -> None:
    balancer = make_balancer(["binary"], lr=0.5, optimizer="sgd")
    balancer.combine(torch.tensor([0.1])).backward()
    balancer.step()
    # One SGD step: s = 0 - 0.5 * 0.4 = -0.2.
    assert balancer.log_variances.item() == pytest.approx(-0.2, rel=1e-6)
    assert balancer.log_variances.grad is None


def test_stats_include_log_variance() -> None:
    balancer = make_balancer(["binary", "regression"])
    balancer.combine(torch.tensor([0.5, 2.0]))
    stats = balancer.last_stats()
    assert stats["uncertainty/log_variance/task0"] == 0.0
    assert stats["weight/task1"] == pytest.approx(0.5)
    assert stats["loss/task1"] == pytest.approx(2.0)


def test_invalid_options_raise() -> None:
    with pytest.raises(ConfigError, match="`optimizer` must be one of adam, sgd"):
        make_balancer(["binary"], optimizer="rmsprop")
