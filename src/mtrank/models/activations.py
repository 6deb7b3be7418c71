"""Activation functions selected by name, case-insensitively."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mtrank.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    # Mish (Misra 2019): x * tanh(softplus(x)); Kang et al. 2021 found it best for the DHE decoder.
    "mish": nn.Mish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def activation_names() -> list[str]:
    """Return the accepted activation names, sorted."""
    return sorted(ACTIVATIONS)


def build_activation(name: str) -> nn.Module:
    """Build a fresh activation module from its name.

    Args:
        name: one of :func:`activation_names`, in any letter case.

    Returns:
        A new ``nn.Module``; calling twice returns two modules (PReLU owns parameters).

    Raises:
        ConfigError: the name is unknown; the message lists the choices.

    Example:
        >>> build_activation("Mish")
        Mish()
    """
    factory = ACTIVATIONS.get(name.lower())
    if factory is None:
        raise ConfigError([f"unknown activation `{name}`; choose one of: {', '.join(activation_names())}"])
    return factory()
