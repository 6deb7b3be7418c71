"""Prefix-tuning: missing-attention error, prefix shapes, collapse, agreement with explicit prefixes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtrank.errors import ConfigError
from mtrank.models.attention import FieldAttention
from mtrank.peft import PeftModel, PrefixEncoder, load_peft_set, save_peft_set


def _attention_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(FieldAttention(6, num_layers=3, num_heads=2, head_dim=4, layer_norm=True)).eval()


def test_prefix_without_attention_rejected(make_ranker) -> None:
    peft = PeftModel(make_ranker(attention=False))
    with pytest.raises(
        ConfigError, match=r"prefix-tuning needs the field-attention block.*`model\.attention`"
    ):
        peft.inject("scenario", "prefix")


def test_prefix_has_one_pair_per_layer() -> None:
    peft = PeftModel(_attention_model())
    peft.inject("scenario", "prefix", options={"length": 5})
    encoder = peft.standalone_modules["scenario"]
    shapes = [(tuple(key.shape), tuple(value.shape)) for key, value in encoder.all_prefixes()]
    assert isinstance(encoder, PrefixEncoder)
    assert shapes == [((5, 8), (5, 8))] * 3


def test_prefix_changes_outputs_and_keeps_shape() -> None:
    model = _attention_model()
    x = torch.randn(4, 7, 6)
    with torch.no_grad():
        before = model(x)
        peft = PeftModel(model)
        peft.inject("scenario", "prefix", options={"length": 2})
        after = peft(x)
    assert after.shape == before.shape
    assert not torch.equal(after, before)


def test_prefix_equals_explicit_layer_prefixes() -> None:
    model = _attention_model()
    peft = PeftModel(model)
    peft.inject("scenario", "prefix", options={"length": 3})
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        through_provider = peft(x)
        prefixes = peft.standalone_modules["scenario"].all_prefixes()
        hidden = x
        for layer, (key, value) in zip(model[0].layers, prefixes, strict=True):
            hidden = layer.forward(hidden, key, value)
    assert torch.equal(through_provider, hidden)


def test_collapse_keeps_outputs_and_drops_mlp() -> None:
    peft = PeftModel(_attention_model())
    peft.inject("scenario", "prefix", options={"length": 3})
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        before = peft(x)
    peft.collapse_prefix("scenario")
    with torch.no_grad():
        after = peft(x)
    encoder = peft.standalone_modules["scenario"]
    keys = sorted(key.rsplit("/", 1)[-1] for key in peft.set_state_dict("scenario"))
    assert torch.equal(after, before)
    assert encoder.mlp is None
    assert keys == ["keys.0", "keys.1", "keys.2", "values.0", "values.1", "values.2"]


def test_collapsed_prefix_trains_and_reloads(tmp_path) -> None:
    peft = PeftModel(_attention_model())
    peft.inject("scenario", "prefix", options={"length": 3})
    peft.collapse_prefix("scenario")
    optimizer = torch.optim.Adam(peft.trainable_parameters(), lr=0.05)
    x = torch.randn(3, 5, 6)
    peft.train()
    loss = peft(x).square().mean()
    loss.backward()
    optimizer.step()
    peft.eval()
    with torch.no_grad():
        expected = peft(x)
    save_peft_set(peft, "scenario", tmp_path, base_run="base")
    reloaded = load_peft_set(_attention_model(), tmp_path, "scenario")
    with torch.no_grad():
        actual = reloaded(x)
    assert reloaded.spec("scenario").prefix_collapsed
    assert torch.equal(actual, expected)


def test_disable_removes_prefix_providers() -> None:
    model = _attention_model()
    peft = PeftModel(model)
    peft.inject("scenario", "prefix")
    providers_on = [layer.prefix_provider is not None for layer in model[0].layers]
    peft.disable()
    providers_off = [layer.prefix_provider is None for layer in model[0].layers]
    assert providers_on == [True, True, True]
    assert providers_off == [True, True, True]


def test_prefix_targets_one_of_two_blocks() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "user": FieldAttention(4, num_layers=1, num_heads=1, head_dim=4),
            "item": FieldAttention(4, num_layers=2, num_heads=1, head_dim=4),
        }
    )
    peft = PeftModel(model)
    spec = peft.inject("scenario", "prefix", ["item"])
    assert spec.resolved_targets == ["item"]
    assert model["user"].layers[0].prefix_provider is None
    assert len(peft.standalone_modules["scenario"].layers) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"length": 0}, "option `length` must be an integer >= 1, got 0"),
        ({"hidden_dim": -2}, "option `hidden_dim` must be an integer >= 1, got -2"),
        ({"activation": "nope"}, "option `activation` is 'nope'"),
        ({"prefix_len": 4}, "unknown option `prefix_len` for PEFT method `prefix`"),
    ],
)
def test_invalid_options_rejected(options: dict, message: str) -> None:
    peft = PeftModel(_attention_model())
    with pytest.raises(ConfigError, match=message):
        peft.inject("scenario", "prefix", options=options)


def test_prefix_on_ranker_with_batch_of_one(make_ranker, make_ids) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("scenario", "prefix", options={"length": 4})
    ids = make_ids(3, batch_size=1)
    with torch.no_grad():
        logits = peft(ids)
    assert logits.shape == (1, 2)
