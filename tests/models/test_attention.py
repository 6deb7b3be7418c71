"""FieldAttention: shapes, agreement with PyTorch's attention, residuals, prefixes and input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

from mtrank.errors import ConfigError
from mtrank.models.attention import FieldAttention, FieldAttentionLayer


def _layer(**overrides) -> FieldAttentionLayer:
    torch.manual_seed(0)
    settings = {"num_heads": 2, "head_dim": 3, "residual": False, "activation": "identity"}
    settings.update(overrides)
    return FieldAttentionLayer(5, **settings).eval()


def _reference(layer: FieldAttentionLayer, x: torch.Tensor, prefix=None) -> torch.Tensor:
    """Multi-head attention computed with torch.nn.functional.scaled_dot_product_attention."""
    batch, fields, _ = x.shape
    query, key, value = layer.query(x), layer.key(x), layer.value(x)
    if prefix is not None:
        key = torch.cat([prefix[0].expand(batch, -1, -1), key], dim=1)
        value = torch.cat([prefix[1].expand(batch, -1, -1), value], dim=1)

    def heads(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(batch, tensor.shape[1], layer.num_heads, layer.head_dim).transpose(1, 2)

    out = functional.scaled_dot_product_attention(heads(query), heads(key), heads(value))
    return out.transpose(1, 2).reshape(batch, fields, layer.out_dim)


def test_layer_matches_pytorch_attention() -> None:
    layer = _layer()
    x = torch.randn(4, 6, 5)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-6)


def test_layer_with_prefix_matches_pytorch_attention() -> None:
    layer = _layer()
    x = torch.randn(4, 6, 5)
    prefix = (torch.randn(3, 6), torch.randn(3, 6))
    torch.testing.assert_close(layer(x, *prefix), _reference(layer, x, prefix), rtol=1e-5, atol=1e-6)


def test_batch_of_one() -> None:
    attention = FieldAttention(5, num_layers=2, num_heads=2, head_dim=3)
    out = attention(torch.randn(1, 4, 5))
    assert out.shape == (1, 4, 6)


def test_batch_of_one_with_prefix() -> None:
    layer = _layer()
    out = layer(torch.randn(1, 4, 5), torch.randn(7, 6), torch.randn(7, 6))
    assert out.shape == (1, 4, 6)


@pytest.mark.parametrize("prefix_length", [1, 2, 9])
def test_prefix_length_keeps_output_shape(prefix_length: int) -> None:
    layer = _layer()
    prefix = (torch.randn(prefix_length, 6), torch.randn(prefix_length, 6))
    assert layer(torch.randn(3, 4, 5), *prefix).shape == (3, 4, 6)


def test_samples_are_independent() -> None:
    layer = _layer()
    x = torch.randn(3, 4, 5)
    prefix = (torch.randn(2, 6), torch.randn(2, 6))
    together = layer(x, *prefix)
    alone = torch.cat([layer(x[i : i + 1], *prefix) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


def test_residual_projection_only_when_widths_differ() -> None:
    projected = FieldAttentionLayer(5, num_heads=2, head_dim=3)
    identity = FieldAttentionLayer(6, num_heads=2, head_dim=3)
    assert isinstance(projected.residual_projection, nn.Linear)
    assert isinstance(identity.residual_projection, nn.Identity)


def test_residual_is_added() -> None:
    with_residual = _layer(residual=True)
    without = _layer(residual=False)
    x = torch.randn(2, 4, 5)
    expected = without(x) + with_residual.residual_projection(x)
    torch.testing.assert_close(with_residual(x), expected, rtol=0, atol=1e-6)


def test_layer_norm_normalises_output() -> None:
    layer = _layer(layer_norm=True)
    out = layer(torch.randn(2, 4, 5) * 10)
    torch.testing.assert_close(out.mean(dim=-1), torch.zeros(2, 4), rtol=0, atol=1e-5)


def test_stack_widths() -> None:
    attention = FieldAttention(5, num_layers=3, num_heads=2, head_dim=4)
    widths = [(layer.in_dim, layer.out_dim) for layer in attention.attention_layers()]
    assert widths == [(5, 8), (8, 8), (8, 8)]
    assert attention.out_dim == 8


def test_provider_supplies_prefix() -> None:
    layer = _layer()
    x = torch.randn(2, 4, 5)
    prefix = (torch.randn(3, 6), torch.randn(3, 6))
    expected = layer(x, *prefix)
    layer.prefix_provider = lambda: prefix
    assert torch.equal(layer(x), expected)


def test_provider_returning_none_means_no_prefix() -> None:
    layer = _layer()
    x = torch.randn(2, 4, 5)
    expected = layer(x)
    layer.prefix_provider = lambda: None
    assert torch.equal(layer(x), expected)


def test_explicit_prefix_overrides_provider() -> None:
    layer = _layer()
    x = torch.randn(2, 4, 5)
    prefix = (torch.randn(3, 6), torch.randn(3, 6))
    expected = layer(x, *prefix)
    layer.prefix_provider = lambda: (torch.zeros(5, 6), torch.zeros(5, 6))
    assert torch.equal(layer(x, *prefix), expected)


def test_prefix_gradient_reaches_prefix() -> None:
    layer = _layer()
    key = torch.randn(3, 6, requires_grad=True)
    value = torch.randn(3, 6, requires_grad=True)
    layer(torch.randn(2, 4, 5), key, value).sum().backward()
    assert key.grad is not None
    assert value.grad is not None
    assert torch.count_nonzero(key.grad) > 0
    assert torch.count_nonzero(value.grad) > 0


def test_wrong_input_shape_rejected() -> None:
    with pytest.raises(ValueError, match=r"expects input of shape \(B, F, 5\), got \(2, 5\)"):
        _layer()(torch.randn(2, 5))


def test_single_prefix_rejected() -> None:
    with pytest.raises(ValueError, match="give both `prefix_key` and `prefix_value`"):
        _layer()(torch.randn(2, 4, 5), torch.randn(3, 6))


def test_prefix_width_rejected() -> None:
    with pytest.raises(ValueError, match=r"`prefix_value` must have shape \(P, 6\), got \(3, 5\)"):
        _layer()(torch.randn(2, 4, 5), torch.randn(3, 6), torch.randn(3, 5))


def test_prefix_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="`prefix_key` has 3 rows but `prefix_value` has 2"):
        _layer()(torch.randn(2, 4, 5), torch.randn(3, 6), torch.randn(2, 6))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_layers": 0}, "`num_layers` of field attention must be at least 1, got 0"),
        ({"num_heads": 0}, "`num_heads` of field attention must be at least 1, got 0"),
        ({"head_dim": -1}, "`head_dim` of field attention must be at least 1, got -1"),
        ({"dropout": 1.0}, r"`dropout` of field attention must lie in \[0, 1\), got 1.0"),
        ({"activation": "nope"}, "unknown activation `nope`"),
    ],
)
def test_invalid_settings_rejected(settings: dict, message: str) -> None:
    arguments = {"num_layers": 2, "num_heads": 2, "head_dim": 3}
    arguments.update(settings)
    with pytest.raises(ConfigError, match=message):
        FieldAttention(5, **arguments)
