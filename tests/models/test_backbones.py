"""Tests of the shared-bottom, MMoE and PLE backbones: shapes, gates, independent experts, batches of one."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mtrank.config import parse_config
from mtrank.errors import ConfigError
from mtrank.models.backbones import PLE, MMoE, SharedBottom
from mtrank.models.builder import build_backbone
from mtrank.models.mlp import MLP

IN_DIM = 12
BACKBONES = ["shared_bottom", "mmoe", "ple"]


def backbone_from_config(config_dict, kind: str, *, tasks=("click", "noise"), batch_norm: bool = False):
    raw = config_dict("log.csv", backbone=kind, tasks=tasks)
    raw["model"]["batch_norm"] = batch_norm
    torch.manual_seed(0)
    return build_backbone(parse_config(raw), IN_DIM)


def test_mmoe_gates_shape_and_sum() -> None:
    torch.manual_seed(0)
    experts = [MLP(IN_DIM, [6]) for _ in range(4)]
    gates = [nn.Linear(IN_DIM, 4) for _ in range(3)]
    backbone = MMoE(experts=experts, gates=gates)

    output = backbone(torch.randn(5, IN_DIM))

    assert output.gates.shape == (5, 3, 4)  # (B, T, E)
    assert torch.allclose(output.gates.sum(dim=-1), torch.ones(5, 3), atol=1e-6)
    assert bool((output.gates > 0).all())
    assert len(output.task_inputs) == 3
    assert output.task_inputs[0].shape == (5, 6)


def test_mmoe_task_input_is_gate_weighted_expert_sum() -> None:
    torch.manual_seed(0)
    experts = [MLP(IN_DIM, [6]) for _ in range(3)]
    backbone = MMoE(experts=experts, gates=[nn.Linear(IN_DIM, 3), nn.Linear(IN_DIM, 3)])
    x = torch.randn(4, IN_DIM)

    output = backbone(x)

    expert_out = torch.stack([e(x) for e in experts], dim=1)  # (B, E, H)
    expected = (output.gates[:, 1, :, None] * expert_out).sum(dim=1)  # task 1: (B, H)
    assert torch.allclose(output.task_inputs[1], expected, atol=1e-6)


def test_mmoe_experts_differ_at_initialisation(config_dict) -> None:
    backbone = backbone_from_config(config_dict, "mmoe")
    x = torch.randn(8, IN_DIM)

    outputs = [expert(x) for expert in backbone.experts]

    assert len(backbone.experts) == 3
    for a, b in itertools.combinations(range(3), 2):
        first = backbone.experts[a].layers[0].weight
        second = backbone.experts[b].layers[0].weight
        assert not torch.equal(first, second), f"experts {a} and {b} start with the same weights"
        assert not torch.allclose(outputs[a], outputs[b]), f"experts {a} and {b} compute the same function"


def test_mmoe_gates_differ_per_task(config_dict) -> None:
    backbone = backbone_from_config(config_dict, "mmoe")

    output = backbone(torch.randn(8, IN_DIM))

    assert not torch.allclose(output.gates[:, 0], output.gates[:, 1])


def test_ple_gates_cover_task_and_shared_experts(config_dict) -> None:
    backbone = backbone_from_config(config_dict, "ple", tasks=("click", "noise", "watch_time"))

    output = backbone(torch.randn(5, IN_DIM))

    assert isinstance(backbone, PLE)
    assert len(backbone.levels) == 2
    assert output.gates.shape == (5, 3, 2)  # (B, T, Et + Es) with Et = Es = 1
    assert torch.allclose(output.gates.sum(dim=-1), torch.ones(5, 3), atol=1e-6)
    assert len(output.task_inputs) == 3
    assert backbone.levels[-1].shared_gate is None
    assert backbone.levels[0].shared_gate.out_features == 3 * 1 + 1  # T * Et + Es


def test_shared_bottom_has_no_gates(config_dict) -> None:
    backbone = backbone_from_config(config_dict, "shared_bottom")

    output = backbone(torch.randn(5, IN_DIM))

    assert isinstance(backbone, SharedBottom)
    assert output.gates is None
    assert torch.equal(output.task_inputs[0], output.task_inputs[1])


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_of_one_row(config_dict, kind: str, mode: str) -> None:
    backbone = backbone_from_config(config_dict, kind)
    backbone.train(mode == "train")

    output = backbone(torch.randn(1, IN_DIM))

    assert [t.shape for t in output.task_inputs] == [(1, backbone.out_dim)] * 2
    if output.gates is not None:
        assert output.gates.shape[:2] == (1, 2)


@pytest.mark.parametrize("kind", BACKBONES)
def test_batch_norm_backbone_scores_one_row_in_eval(config_dict, kind: str) -> None:
    backbone = backbone_from_config(config_dict, kind, batch_norm=True)
    backbone.train()
    backbone(torch.randn(16, IN_DIM))  # fills the running statistics
    backbone.eval()

    output = backbone(torch.randn(1, IN_DIM))

    assert output.task_inputs[0].shape == (1, backbone.out_dim)
    assert torch.isfinite(output.task_inputs[0]).all()


def test_mmoe_rejects_experts_of_different_widths() -> None:
    with pytest.raises(ConfigError, match=r"MMoE experts must share one output width, got \[4, 6\]"):
        MMoE(experts=[MLP(IN_DIM, [4]), MLP(IN_DIM, [6])], gates=[nn.Linear(IN_DIM, 2)])


def test_mmoe_rejects_gate_of_wrong_size() -> None:
    with pytest.raises(ConfigError, match=r"gate 1 has 3 outputs for 2 experts"):
        MMoE(experts=[MLP(IN_DIM, [4]), MLP(IN_DIM, [4])], gates=[nn.Linear(IN_DIM, 2), nn.Linear(IN_DIM, 3)])


@pytest.mark.parametrize("kind", BACKBONES)
def test_last_shared_parameters_are_linear_weights(config_dict, kind: str) -> None:
    backbone = backbone_from_config(config_dict, kind)

    named = backbone.last_shared_parameters()

    assert named
    assert all(name.startswith("backbone.") for name, _ in named)
    assert {name.rsplit(".", 1)[1] for name, _ in named} == {"weight", "bias"}


def test_shared_bottom_without_hidden_layer_has_no_shared_weights() -> None:
    backbone = SharedBottom(bottom=MLP(IN_DIM, []), num_tasks=2)

    with pytest.raises(ConfigError, match=r"`backbone\.bottom` has no linear layer"):
        backbone.last_shared_parameters()
