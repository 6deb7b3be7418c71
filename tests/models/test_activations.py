"""Tests of activations selected by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mtrank.errors import ConfigError
from mtrank.models.activations import activation_names, build_activation
from mtrank.models.mlp import MLP


def test_mish_matches_torch() -> None:
    x = torch.linspace(-30.0, 30.0, 601, dtype=torch.float64)

    assert torch.equal(build_activation("mish")(x), F.mish(x))


def test_mish_matches_definition() -> None:
    # Misra 2019, "Mish: A Self Regularized Non-Monotonic Activation Function": x * tanh(softplus(x)).
    x = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)

    expected = x * torch.tanh(torch.log1p(torch.exp(x)))

    assert torch.allclose(build_activation("mish")(x), expected, atol=1e-12)


def test_unknown_activation_lists_choices() -> None:
    choices = ", ".join(activation_names())

    with pytest.raises(ConfigError, match=rf"unknown activation `swishy`; choose one of: {choices}"):
        build_activation("swishy")


def test_choices_include_common_names() -> None:
    assert {"relu", "gelu", "silu", "mish", "tanh"} <= set(activation_names())


@pytest.mark.parametrize(
    ("name", "kind"), [("MISH", nn.Mish), ("Gelu", nn.GELU), ("ReLU", nn.ReLU), ("SiLU", nn.SiLU)]
)
def test_names_case_insensitive(name: str, kind: type[nn.Module]) -> None:
    assert isinstance(build_activation(name), kind)


def test_each_call_builds_a_fresh_module() -> None:
    first = build_activation("prelu")
    second = build_activation("prelu")

    assert first is not second
    assert first.weight is not second.weight


def test_mlp_uses_named_activation() -> None:
    mlp = MLP(4, [8, 8], activation="Mish")

    kinds = [type(layer) for layer in mlp.layers]

    assert kinds == [nn.Linear, nn.Mish, nn.Linear, nn.Mish]
