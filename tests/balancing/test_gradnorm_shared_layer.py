"""Selection of GradNorm's shared layer W through the model's `last_shared_parameters()`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtrank.balancing import default_shared_parameters
from mtrank.errors import ConfigError


class TwoExpertModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(2)]
        )
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(2)])

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [expert[2].weight for expert in self.experts]


class NoSharedLayerModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)


def test_returns_named_expert_weights() -> None:
    pairs = default_shared_parameters(TwoExpertModel())
    assert [name for name, _ in pairs] == ["experts.0.2.weight", "experts.1.2.weight"]


def test_unwraps_data_parallel() -> None:
    model = TwoExpertModel()
    pairs = default_shared_parameters(nn.DataParallel(model))
    assert pairs[0][1] is model.experts[0][2].weight


def test_missing_method_raises() -> None:
    with pytest.raises(
        ConfigError, match="model `NoSharedLayerModel` has no method `last_shared_parameters\\(\\)`"
    ):
        default_shared_parameters(NoSharedLayerModel())


def test_foreign_parameter_raises() -> None:
    model = TwoExpertModel()
    model.last_shared_parameters = lambda: [nn.Parameter(torch.ones(3))]  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match=r"Parameter of shape \(3,\) that is not a parameter of the model"):
        default_shared_parameters(model)


def test_frozen_parameter_raises() -> None:
    model = TwoExpertModel()
    model.experts[1][2].weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="`experts.1.2.weight` is frozen"):
        default_shared_parameters(model)


def test_empty_selection_raises() -> None:
    model = TwoExpertModel()
    model.last_shared_parameters = lambda: []  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match="returned no parameters"):
        default_shared_parameters(model)
