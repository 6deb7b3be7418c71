"""LoRA: zero start, the update formula, merge and unmerge, padding rows and option checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtrank.embeddings.table import PADDING_ID, TableEmbedding
from mtrank.errors import ConfigError
from mtrank.peft import LoraEmbedding, LoraLinear, LoraOptions, PeftModel, PeftWrapper


class LinearAndTables(nn.Module):
    """Sum of a linear layer, an nn.Embedding and a TableEmbedding.

    Maps ids ``(B, 2)`` and x ``(B, 6)`` to ``(B, 4)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 4)
        self.embedding = nn.Embedding(12, 4, padding_idx=0)
        self.table = TableEmbedding(vocab_size=9, dim=4, init_std=0.3)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.embedding(ids[:, 0]) + self.table(ids[:, 1])


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack(
        [torch.randint(0, 12, (32,), generator=generator), torch.randint(0, 9, (32,), generator=generator)],
        dim=1,
    )
    return ids, torch.randn(32, 6, generator=generator)


def _randomise_lora(peft: PeftModel) -> None:
    """Give every LoRA factor random values, as training would."""
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in peft.trainable_parameters():
            parameter.normal_(std=0.2)


@pytest.fixture
def lora_model() -> PeftModel:
    torch.manual_seed(0)
    peft = PeftModel(LinearAndTables())
    peft.inject("lora", "lora", ["linear", "embedding", "table"], {"rank": 3, "alpha": 6.0, "dropout": 0.0})
    return peft


def test_lora_wraps_each_target(lora_model: PeftModel) -> None:
    modules = {name: wrapper.peft_modules["lora"] for name, wrapper in lora_model.base_model.named_children()}
    assert isinstance(lora_model.base_model.linear, PeftWrapper)
    assert isinstance(modules["linear"], LoraLinear)
    assert isinstance(modules["embedding"], LoraEmbedding)
    assert isinstance(modules["table"], LoraEmbedding)


def test_zero_factor_follows_reference_convention(lora_model: PeftModel) -> None:
    linear = lora_model.base_model.linear.peft_modules["lora"]
    embedding = lora_model.base_model.embedding.peft_modules["lora"]
    assert torch.count_nonzero(linear.lora_B) == 0
    assert torch.count_nonzero(linear.lora_A) > 0
    assert torch.count_nonzero(embedding.lora_A) == 0
    assert torch.count_nonzero(embedding.lora_B) > 0


def test_fresh_lora_output_is_exactly_base() -> None:
    torch.manual_seed(0)
    model = LinearAndTables()
    ids, x = _inputs()
    before = model(ids, x)
    peft = PeftModel(model)
    peft.inject("lora", "lora", ["linear", "embedding", "table"], {"rank": 3})
    assert torch.equal(peft(ids, x), before)


def test_linear_update_matches_formula(lora_model: PeftModel) -> None:
    # Reference: Hu et al. 2021, eq. (3): h = W0 x + (alpha / r) B A x.
    _randomise_lora(lora_model)
    wrapper = lora_model.base_model.linear
    module = wrapper.peft_modules["lora"]
    x = _inputs()[1]
    base = wrapper.base_layer
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * (x @ module.lora_A.T @ module.lora_B.T)
    torch.testing.assert_close(wrapper(x), expected, rtol=0, atol=1e-6)


def test_embedding_update_matches_formula(lora_model: PeftModel) -> None:
    _randomise_lora(lora_model)
    wrapper = lora_model.base_model.embedding
    module = wrapper.peft_modules["lora"]
    ids = torch.tensor([1, 5, 11])
    delta = (module.lora_B @ module.lora_A).T * 2.0  # (V, D)
    expected = wrapper.base_layer.weight[ids] + delta[ids]
    torch.testing.assert_close(wrapper(ids), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", ["linear", "embedding", "table"])
def test_merged_equals_unmerged(lora_model: PeftModel, target: str) -> None:
    _randomise_lora(lora_model)
    ids, x = _inputs(1)
    wrapper = getattr(lora_model.base_model, target)
    inputs = x if target == "linear" else ids[:, 0 if target == "embedding" else 1]
    with torch.no_grad():
        unmerged = wrapper(inputs)
        lora_model.merge_lora("lora")
        merged = wrapper(inputs)
    assert wrapper.peft_modules["lora"].merged
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


def test_merged_model_equals_unmerged_model(lora_model: PeftModel) -> None:
    _randomise_lora(lora_model)
    ids, x = _inputs(2)
    with torch.no_grad():
        unmerged = lora_model(ids, x)
        lora_model.merge_lora("lora")
        merged = lora_model(ids, x)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


def test_unmerge_restores_weights_bitwise(lora_model: PeftModel) -> None:
    _randomise_lora(lora_model)
    before = {key: value.clone() for key, value in lora_model.base_state_dict().items()}
    lora_model.merge_lora("lora")
    merged_weight = lora_model.base_model.linear.base_layer.weight.clone()
    lora_model.unmerge_lora("lora")
    after = lora_model.base_state_dict()
    assert not torch.equal(merged_weight, before["linear.weight"])
    changed = [key for key in before if not torch.equal(after[key], before[key])]
    assert changed == []


def test_unmerge_without_copy_is_close(lora_model: PeftModel) -> None:
    _randomise_lora(lora_model)
    before = lora_model.base_model.linear.base_layer.weight.clone()
    lora_model.merge_lora("lora", keep_original=False)
    lora_model.unmerge_lora("lora")
    torch.testing.assert_close(lora_model.base_model.linear.base_layer.weight, before, rtol=0, atol=1e-6)


def test_disable_after_merge_gives_base_outputs(lora_model: PeftModel) -> None:
    ids, x = _inputs(3)
    lora_model.disable()
    with torch.no_grad():
        base = lora_model(ids, x)
    lora_model.enable("lora")
    _randomise_lora(lora_model)
    lora_model.merge_lora("lora")
    lora_model.disable()
    with torch.no_grad():
        restored = lora_model(ids, x)
    assert torch.equal(restored, base)


@pytest.mark.parametrize("target", ["embedding", "table"])
def test_padding_row_keeps_base_value_after_training(target: str) -> None:
    torch.manual_seed(0)
    peft = PeftModel(LinearAndTables())
    peft.inject("lora", "lora", [target], {"rank": 2})
    wrapper = getattr(peft.base_model, target)
    padding = torch.tensor([0 if target == "embedding" else PADDING_ID])
    base_row = wrapper.base_layer(padding).detach().clone()
    optimizer = torch.optim.Adam(peft.trainable_parameters(), lr=0.1)
    for seed in range(3):
        ids = _inputs(seed)[0][:, 0 if target == "embedding" else 1]
        ids[:4] = padding
        loss = wrapper(ids).square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lora_a = wrapper.peft_modules["lora"].lora_A
    assert torch.count_nonzero(lora_a) > 0
    assert torch.equal(wrapper(padding), base_row)


def test_lora_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    peft = PeftModel(nn.Sequential(nn.Linear(6, 4)))
    peft.inject("lora", "lora", ["0"], {"rank": 2, "dropout": 0.5})
    _randomise_lora(peft)
    x = torch.randn(64, 6)
    peft.eval()
    assert torch.equal(peft(x), peft(x))
    peft.train()
    assert not torch.equal(peft(x), peft(x))


def test_default_alpha_gives_scaling_one() -> None:
    assert LoraOptions(rank=4).scaling == 1.0
    assert LoraOptions(rank=4, alpha=8.0).scaling == 2.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "option `rank` must be an integer >= 1, got 0"),
        ({"rank": 2.5}, "option `rank` must be an integer >= 1, got 2.5"),
        ({"dropout": 1.0}, r"option `dropout` must be a number in \[0, 1\), got 1.0"),
        ({"alpha": -1}, "option `alpha` must be a finite number > 0, got -1"),
        ({"ranks": 4}, "unknown option `ranks` for PEFT method `lora`; allowed: rank, alpha, dropout"),
    ],
)
def test_invalid_options_rejected(options: dict, message: str) -> None:
    peft = PeftModel(LinearAndTables())
    with pytest.raises(ConfigError, match=message):
        peft.inject("lora", "lora", ["linear"], options)


def test_max_norm_embedding_rejected() -> None:
    peft = PeftModel(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)))
    with pytest.raises(ConfigError, match="max_norm is set"):
        peft.inject("lora", "lora", ["0"])


def test_pattern_without_linear_rejected() -> None:
    peft = PeftModel(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(
        ConfigError, match="PEFT target `1` matches no module that method `lora` can target; .*: 0"
    ):
        peft.inject("lora", "lora", ["1"])


def test_merge_adapter_set_rejected() -> None:
    peft = PeftModel(nn.Sequential(nn.Linear(3, 3)))
    peft.inject("tune", "adapter", ["0"])
    with pytest.raises(ConfigError, match="PEFT set `tune` uses `adapter`; only `lora` sets can be merged"):
        peft.merge_lora("tune")
