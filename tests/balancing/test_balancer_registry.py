"""The balancer registry, option checks, and the contract every registered balancer must meet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtrank.balancing import LossBalancer, balancer_names, balancer_option_names, build_balancer
from mtrank.errors import ConfigError

NAMES = ["click", "like"]
TYPES = ["binary", "regression"]


def test_names_registered() -> None:
    assert balancer_names() == ["dwa", "fixed", "gradnorm", "uncertainty"]


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(
        ConfigError,
        match="unknown loss balancer `gradnrom`; choose one of: dwa, fixed, gradnorm, uncertainty",
    ):
        build_balancer("gradnrom", NAMES, TYPES)


def test_name_is_case_insensitive() -> None:
    assert build_balancer("GradNorm", NAMES, TYPES).name == "gradnorm"


def test_unknown_option_lists_accepted() -> None:
    with pytest.raises(
        ConfigError, match="unknown option `temp` for loss balancer `dwa`; accepted: temperature"
    ):
        build_balancer("dwa", NAMES, TYPES, {"temp": 2.0})


def test_option_names() -> None:
    assert balancer_option_names("gradnorm") == ["alpha", "lr", "optimizer"]


def test_invalid_tasks_listed_together() -> None:
    with pytest.raises(ConfigError) as caught:
        build_balancer("fixed", ["click", "click"], ["binary", "ranking"])
    problems = caught.value.problems
    assert problems[0] == "task names must be unique, got repeated ['click']"
    assert problems[1] == "task `click` has unknown type `ranking`; choose one of: binary, regression"


def test_type_count_mismatch_raises() -> None:
    with pytest.raises(ConfigError, match="2 names, 1 types"):
        build_balancer("fixed", NAMES, ["binary"])


def test_empty_tasks_raise() -> None:
    with pytest.raises(ConfigError, match="at least one task"):
        build_balancer("fixed", [], [])


def _one_training_step(balancer: LossBalancer) -> torch.Tensor:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in NAMES])
    inputs = torch.randn(16, 4)
    hidden = torch.relu(shared(inputs))
    outputs = [head(hidden).squeeze(1) for head in heads]
    losses = [
        nn.functional.binary_cross_entropy_with_logits(outputs[0], (inputs[:, 0] > 0).float()),
        nn.functional.mse_loss(outputs[1], inputs[:, 1]),
    ]
    total = balancer.combine(losses, [shared.weight])
    total.backward()
    balancer.step()
    balancer.end_epoch(torch.stack(losses).detach())
    return total


@pytest.mark.parametrize("name", balancer_names())
def test_contract_combine_returns_finite_scalar(name: str) -> None:
    total = _one_training_step(build_balancer(name, NAMES, TYPES))
    assert total.shape == ()
    assert bool(torch.isfinite(total))


@pytest.mark.parametrize("name", balancer_names())
def test_contract_weights_positive(name: str) -> None:
    balancer = build_balancer(name, NAMES, TYPES)
    _one_training_step(balancer)
    weights = balancer.weights()
    assert weights.shape == (2,)
    assert bool((weights > 0).all())


@pytest.mark.parametrize("name", balancer_names())
def test_contract_stats_keys(name: str) -> None:
    balancer = build_balancer(name, NAMES, TYPES)
    assert balancer.last_stats() == {}
    _one_training_step(balancer)
    stats = balancer.last_stats()
    for task in NAMES:
        assert f"loss/{task}" in stats
        assert f"weight/{task}" in stats
    if balancer.needs_shared_parameters:
        assert "gradnorm/grad_norm/click" in stats
        assert "gradnorm/target/like" in stats


@pytest.mark.parametrize("name", balancer_names())
def test_contract_state_dict_round_trip(name: str) -> None:
    balancer = build_balancer(name, NAMES, TYPES)
    _one_training_step(balancer)
    _one_training_step(balancer)
    restored = build_balancer(name, NAMES, TYPES)
    restored.load_state_dict(balancer.state_dict())
    restored.load_optimizer_state_dict(balancer.optimizer_state_dict())
    assert torch.equal(restored.weights(), balancer.weights())
    assert all(isinstance(value, torch.Tensor) for value in balancer.state_dict().values())


@pytest.mark.parametrize("name", balancer_names())
def test_contract_rejects_wrong_loss_shape(name: str) -> None:
    balancer = build_balancer(name, NAMES, TYPES)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        balancer.combine(torch.ones(2, 1), [nn.Parameter(torch.ones(1))])
