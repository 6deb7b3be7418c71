"""Bottleneck adapters: zero start, the residual formula, width inference and option checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtrank.errors import ConfigError
from mtrank.models.attention import FieldAttention
from mtrank.models.mlp import MLP
from mtrank.peft import BottleneckAdapter, PeftModel


def test_fresh_adapter_after_mlp_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"expert": MLP(6, [10, 5], activation="gelu")})
    x = torch.randn(7, 6)
    before = model["expert"](x)
    peft = PeftModel(model)
    peft.inject("tune", "adapter", ["expert"])
    assert torch.equal(peft.base_model["expert"](x), before)


def test_fresh_adapter_after_attention_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(FieldAttention(8, num_layers=2, num_heads=2, head_dim=3))
    x = torch.randn(4, 5, 8)
    before = model(x)
    peft = PeftModel(model)
    peft.inject("tune", "adapter", ["0"], {"bottleneck": 2})
    adapter = peft.base_model[0].peft_modules["tune"]
    assert adapter.width == 6
    assert torch.equal(peft(x), before)


def test_adapter_on_hidden_activation_infers_width() -> None:
    torch.manual_seed(0)
    tower = MLP(6, [12, 4], batch_norm=True, dropout=0.1, output_dim=1)
    # layers: Linear, BatchNorm1d, ReLU, Dropout, Linear, BatchNorm1d, ReLU, Dropout, Linear
    peft = PeftModel(nn.ModuleDict({"tower": tower}))
    peft.inject("tune", "adapter", ["tower.layers.2", "tower.layers.3", "tower.layers.6"])
    widths = [peft.base_model["tower"].layers[index].peft_modules["tune"].width for index in (2, 3, 6)]
    assert widths == [12, 12, 4]


def test_adapter_formula() -> None:
    # Houlsby et al. 2019, Figure 2: h + W_up act(W_down h).
    torch.manual_seed(0)
    adapter = BottleneckAdapter(width=5, bottleneck=2, activation="tanh")
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.up.bias.normal_()
    hidden = torch.randn(3, 4, 5)
    expected = hidden + torch.tanh(hidden @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T
    expected = expected + adapter.up.bias
    torch.testing.assert_close(adapter.adapt(hidden), expected, rtol=0, atol=1e-6)


def test_adapter_up_projection_starts_at_zero() -> None:
    adapter = BottleneckAdapter(width=5, bottleneck=2)
    assert torch.count_nonzero(adapter.up.weight) == 0
    assert torch.count_nonzero(adapter.up.bias) == 0


def test_width_not_inferable_rejected() -> None:
    peft = PeftModel(nn.ModuleDict({"act": nn.ReLU()}))
    with pytest.raises(ConfigError, match=r"cannot infer the output width of `act` \(ReLU\)"):
        peft.inject("tune", "adapter", ["act"])


def test_adapter_rejects_wrong_output_width() -> None:
    adapter = BottleneckAdapter(width=5, bottleneck=2)
    with pytest.raises(ValueError, match=r"adapter of width 5 received an output of shape \(2, 4\)"):
        adapter.adapt(torch.zeros(2, 4))


def test_module_list_is_not_a_target() -> None:
    peft = PeftModel(nn.ModuleDict({"experts": nn.ModuleList([MLP(3, [4]), MLP(3, [4])])}))
    with pytest.raises(
        ConfigError, match="PEFT target `experts` matches no module that method `adapter` can"
    ):
        peft.inject("tune", "adapter", ["experts"])


def test_each_expert_is_a_target() -> None:
    peft = PeftModel(nn.ModuleDict({"experts": nn.ModuleList([MLP(3, [4]), MLP(3, [4])])}))
    spec = peft.inject("tune", "adapter", ["experts.*"])
    assert spec.resolved_targets == ["experts.0", "experts.1"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bottleneck": 0}, "option `bottleneck` must be an integer >= 1, got 0"),
        ({"activation": "swishy"}, "option `activation` is 'swishy'; choose one of: "),
        ({"size": 3}, "unknown option `size` for PEFT method `adapter`; allowed: bottleneck, activation"),
    ],
)
def test_invalid_options_rejected(options: dict, message: str) -> None:
    peft = PeftModel(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ConfigError, match=message):
        peft.inject("tune", "adapter", ["0"], options)


def test_failed_injection_leaves_model_unchanged() -> None:
    model = nn.ModuleDict({"linear": nn.Linear(3, 3), "act": nn.ReLU()})
    peft = PeftModel(model)
    with pytest.raises(ConfigError, match="cannot infer the output width of `act`"):
        peft.inject("tune", "adapter", ["linear", "act"])
    assert isinstance(model["linear"], nn.Linear)
    assert peft.set_names() == []
