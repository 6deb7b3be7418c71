"""PeftModel: freezing, set management, switching, trainable modules, counts and removal."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from mtrank.errors import ConfigError
from mtrank.models import attention as attention_module
from mtrank.models.mlp import MLP
from mtrank.peft import PeftModel, PeftWrapper, load_peft_set, save_peft_set
from mtrank.peft import inject as inject_module


def test_construction_freezes_base(make_ranker) -> None:
    peft = PeftModel(make_ranker())
    assert [name for name, p in peft.named_parameters() if p.requires_grad] == []


def test_only_active_set_requires_grad(make_ranker, method_setups) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("one", "adapter", *method_setups["adapter"])
    peft.inject("two", "lora", *method_setups["lora"])
    requiring = {id(p) for p in peft.parameters() if p.requires_grad}
    assert requiring == {id(p) for p in peft.trainable_parameters("two")}
    peft.enable("one")
    requiring = {id(p) for p in peft.parameters() if p.requires_grad}
    assert requiring == {id(p) for p in peft.trainable_parameters("one")}
    peft.disable()
    assert [name for name, p in peft.named_parameters() if p.requires_grad] == []


def test_use_restores_previous_set(make_ranker, make_ids, train_steps, method_setups) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("one", "adapter", *method_setups["adapter"])
    train_steps(peft, 2)
    ids = make_ids(3)
    with torch.no_grad():
        tuned = peft(ids)
        with peft.use(None):
            base = peft(ids)
        again = peft(ids)
    assert peft.active_set == "one"
    assert not torch.equal(base, tuned)
    assert torch.equal(again, tuned)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("new scenario", "invalid PEFT set name 'new scenario'"),
        ("9lives", "invalid PEFT set name '9lives'"),
        ("a.b", "invalid PEFT set name 'a.b'"),
        ("keys", "invalid PEFT set name `keys`: it is reserved by torch.nn.ModuleDict"),
    ],
)
def test_invalid_set_names_rejected(make_ranker, name: str, message: str) -> None:
    peft = PeftModel(make_ranker())
    with pytest.raises(ConfigError, match=message):
        peft.inject(name, "lora", ["experts.*.layers.0"])


def test_duplicate_set_name_rejected(make_ranker) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("one", "lora", ["experts.*.layers.0"])
    with pytest.raises(ConfigError, match="a PEFT set named `one` already exists"):
        peft.inject("one", "adapter", ["experts.*"])


def test_unknown_method_rejected(make_ranker) -> None:
    peft = PeftModel(make_ranker())
    with pytest.raises(ConfigError, match="unknown PEFT method `ia3`; choose one of: adapter, lora, prefix"):
        peft.inject("one", "ia3", ["experts.*"])


def test_unknown_set_rejected(make_ranker) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("one", "lora", ["experts.*.layers.0"])
    with pytest.raises(ConfigError, match="no PEFT set named `two`; injected sets: one"):
        peft.enable("two")


def test_trainable_parameters_need_active_set(make_ranker) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("one", "lora", ["experts.*.layers.0"], activate=False)
    with pytest.raises(ConfigError, match="no PEFT set is active"):
        peft.trainable_parameters()


def test_parameter_counts(make_ranker) -> None:
    model = make_ranker()
    base_count = sum(p.numel() for p in model.parameters())
    peft = PeftModel(model)
    peft.inject("one", "lora", ["experts.*.layers.0"], {"rank": 2})
    counts = peft.parameter_counts()
    # Two experts, each Linear(24, 16): rank 2 adds 2 * 24 + 16 * 2 = 80 values.
    assert counts.trainable == 160
    assert counts.base == base_count
    assert counts.percent_of_base == pytest.approx(100 * 160 / base_count)


def test_base_state_dict_matches_original_names(make_ranker, method_setups) -> None:
    model = make_ranker()
    original = {key: value.clone() for key, value in model.state_dict().items()}
    peft = PeftModel(model)
    for method, (targets, options) in method_setups.items():
        peft.inject(f"set_{method}", method, targets, options)
    state = peft.base_state_dict()
    assert sorted(state) == sorted(original)
    assert [key for key in state if not torch.equal(state[key], original[key])] == []


def test_attributes_read_through_wrappers(make_ranker) -> None:
    model = make_ranker()
    peft = PeftModel(model)
    peft.inject("one", "adapter", ["experts.*"])
    assert isinstance(model.experts[0], PeftWrapper)
    assert model.experts[0].out_dim == 16
    assert peft.towers is model.towers


def test_remove_set_restores_modules(make_ranker, make_ids, train_steps) -> None:
    model = make_ranker()
    ids = make_ids(4)
    with torch.no_grad():
        before = model(ids)
    peft = PeftModel(model)
    peft.inject("one", "lora", ["experts.*.layers.0"])
    peft.inject("two", "adapter", ["experts.*"])
    train_steps(peft, 2)
    peft.remove_set("two")
    assert isinstance(model.experts[0], MLP)
    assert isinstance(model.experts[0].layers[0], PeftWrapper)
    base = peft.unload()
    assert isinstance(base.experts[0].layers[0], nn.Linear)
    assert peft.set_names() == []
    with torch.no_grad():
        assert torch.equal(base(ids), before)


def test_new_task_tower_trains_with_set(make_ranker, make_ids, train_steps, tmp_path) -> None:
    model = make_ranker()
    peft = PeftModel(model)
    peft.inject("scenario", "lora", ["experts.*.layers.0"], {"rank": 2})
    torch.manual_seed(9)
    tower = MLP(16, [8], batch_norm=True, output_dim=1)
    peft.add_trainable_module("scenario", "towers.watch", tower)
    base_before = {key: value.clone() for key, value in peft.base_state_dict().items()}
    tower_before = {key: value.clone() for key, value in tower.state_dict().items()}
    trainable_ids = {id(p) for p in peft.trainable_parameters()}
    assert {id(p) for p in tower.parameters()} <= trainable_ids

    train_steps(peft, 3)
    base_after = peft.base_state_dict()
    assert "towers.watch.layers.0.weight" not in base_after
    assert [key for key in base_after if not torch.equal(base_after[key], base_before[key])] == []
    tower_after = tower.state_dict()
    assert [key for key in tower_after if torch.equal(tower_after[key], tower_before[key])] == []

    ids = make_ids(8)
    with torch.no_grad():
        expected = peft(ids)
    save_peft_set(peft, "scenario", tmp_path, base_run="base")
    fresh = make_ranker()
    fresh.towers["watch"] = MLP(16, [8], batch_norm=True, output_dim=1)
    reloaded = load_peft_set(fresh, tmp_path, "scenario").eval()
    with torch.no_grad():
        actual = reloaded(ids)
    assert actual.shape == (16, 3)
    assert torch.equal(actual, expected)


def test_trainable_module_name_taken_rejected(make_ranker) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("scenario", "lora", ["experts.*.layers.0"])
    with pytest.raises(ConfigError, match="the base model already has a module `towers.click`"):
        peft.add_trainable_module("scenario", "towers.click", MLP(16, [1]))


def test_trainable_module_missing_parent_rejected(make_ranker) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("scenario", "lora", ["experts.*.layers.0"])
    with pytest.raises(
        ConfigError, match="cannot attach `heads.watch`: the base model has no module `heads`"
    ):
        peft.add_trainable_module("scenario", "heads.watch", MLP(16, [1]))


def test_existing_module_trains_with_set(make_ranker) -> None:
    model = make_ranker()
    peft = PeftModel(model)
    peft.inject("scenario", "lora", ["experts.*.layers.0"])
    peft.add_trainable_module("scenario", "towers.like")
    peft.train()
    tower_norm = model.towers["like"].layers[1]
    other_norm = model.towers["click"].layers[1]
    assert all(p.requires_grad for p in model.towers["like"].parameters())
    assert tower_norm.training
    assert not other_norm.training


def test_enable_unmerges_other_set(make_ranker, make_ids, train_steps) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("one", "lora", ["experts.*.layers.0"])
    train_steps(peft, 2)
    peft.inject("two", "adapter", ["experts.*"])
    ids = make_ids(5)
    with torch.no_grad():
        expected_two = peft(ids)
    peft.merge_lora("one")
    peft.enable("two")
    with torch.no_grad():
        actual_two = peft(ids)
    assert torch.equal(actual_two, expected_two)


def test_nested_peft_model_rejected(make_ranker) -> None:
    peft = PeftModel(make_ranker())
    with pytest.raises(ConfigError, match="the model is already a PeftModel"):
        PeftModel(peft)


@pytest.mark.parametrize("module", [inject_module, attention_module])
def test_docstring_examples_run(module) -> None:
    results = doctest.testmod(module, extraglobs={"torch": torch})
    assert results.attempted > 0
    assert results.failed == 0
