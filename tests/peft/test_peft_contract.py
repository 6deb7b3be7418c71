"""Contract every PEFT method must meet, run for each registered method on a small ranker."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtrank.peft import PeftModel, load_peft_set, peft_method_names, save_peft_set

METHODS = ["adapter", "lora", "prefix"]
ZERO_INIT_METHODS = ["adapter", "lora"]


def _inject(model: nn.Module, method: str, method_setups: dict, name: str = "scenario") -> PeftModel:
    peft = model if isinstance(model, PeftModel) else PeftModel(model)
    targets, options = method_setups[method]
    peft.inject(name, method, targets, options)
    return peft


def test_contract_covers_registry() -> None:
    assert sorted(METHODS) == peft_method_names()


@pytest.mark.parametrize("method", ZERO_INIT_METHODS)
def test_fresh_injection_leaves_outputs_unchanged(method, make_ranker, make_ids, method_setups) -> None:
    model = make_ranker()
    ids = make_ids(1)
    with torch.no_grad():
        before = model(ids)
        peft = _inject(model, method, method_setups)
        after = peft(ids)
    assert torch.equal(after, before)


@pytest.mark.parametrize("method", METHODS)
def test_disable_restores_base_outputs_after_training(
    method, make_ranker, make_ids, train_steps, method_setups
):
    model = make_ranker()
    ids = make_ids(1)
    with torch.no_grad():
        before = model(ids)
    peft = _inject(model, method, method_setups)
    train_steps(peft, 5)
    with torch.no_grad():
        tuned = peft(ids)
    peft.disable()
    with torch.no_grad():
        restored = peft(ids)
    assert not torch.equal(tuned, before)
    assert torch.equal(restored, before)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_exactly_trainable_tensors(
    method, make_ranker, make_ids, method_setups, perturb_zero_parameters
):
    model = make_ranker()
    base_before = {key: value.clone() for key, value in model.state_dict().items()}
    peft = _inject(model, method, method_setups)
    trainable = dict(peft.named_parameters())
    trainable = {name: p for name, p in trainable.items() if p.requires_grad}
    perturb_zero_parameters(list(trainable.values()))
    trainable_before = {name: p.detach().clone() for name, p in trainable.items()}

    optimizer = torch.optim.SGD(peft.trainable_parameters(), lr=0.1)
    peft.train()
    logits = peft(make_ids(2))
    loss = logits.square().mean()
    loss.backward()
    optimizer.step()

    unchanged = [name for name, p in trainable.items() if torch.equal(p.detach(), trainable_before[name])]
    assert unchanged == []
    base_after = peft.base_state_dict()
    assert sorted(base_after) == sorted(base_before)
    changed_base = [key for key, value in base_after.items() if not torch.equal(value, base_before[key])]
    assert changed_base == []


@pytest.mark.parametrize("method", METHODS)
def test_base_batch_norm_in_eval_during_training(method, make_ranker, method_setups) -> None:
    peft = _inject(make_ranker(), method, method_setups)
    peft.train()
    norms = [module for module in peft.base_model.modules() if isinstance(module, nn.BatchNorm1d)]
    assert len(norms) == 4
    assert all(not module.training for module in norms)
    assert peft.training


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_holds_exactly_trainable_parameters(method, make_ranker, method_setups) -> None:
    peft = _inject(make_ranker(), method, method_setups)
    optimizer = torch.optim.Adam(peft.trainable_parameters())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    requiring_grad = {id(p) for p in peft.parameters() if p.requires_grad}
    peft_by_name = {
        id(p)
        for name, p in peft.named_parameters()
        if ".peft_modules." in name or name.startswith("standalone_modules.")
    }
    base_ids = {id(p) for p in peft.base_parameters()}
    assert in_optimizer == requiring_grad
    assert in_optimizer == peft_by_name
    assert in_optimizer.isdisjoint(base_ids)
    assert len(optimizer.param_groups[0]["params"]) == len(in_optimizer)


@pytest.mark.parametrize("method", METHODS)
def test_save_and_reload_gives_identical_outputs(
    method, make_ranker, make_ids, train_steps, method_setups, tmp_path
):
    peft = _inject(make_ranker(seed=3), method, method_setups)
    train_steps(peft, 4)
    ids = make_ids(7)
    with torch.no_grad():
        expected = peft(ids)
    save_peft_set(peft, "scenario", tmp_path, base_run="runs/base-001")

    reloaded = load_peft_set(make_ranker(seed=3), tmp_path, "scenario", expected_base_run="runs/base-001")
    with torch.no_grad():
        actual = reloaded(ids)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize(
    ("first", "second"), [("adapter", "lora"), ("lora", "prefix"), ("prefix", "adapter")]
)
def test_two_sets_switch_outputs(first, second, make_ranker, make_ids, train_steps, method_setups) -> None:
    peft = _inject(make_ranker(), first, method_setups, name="one")
    train_steps(peft, 3, seed=10)
    _inject(peft, second, method_setups, name="two")
    train_steps(peft, 3, seed=20)
    ids = make_ids(5)
    with torch.no_grad():
        peft.set_active("one")
        out_one = peft(ids)
        peft.set_active("two")
        out_two = peft(ids)
        peft.set_active("one")
        out_one_again = peft(ids)
    assert not torch.equal(out_one, out_two)
    assert torch.equal(out_one, out_one_again)
