"""GradNorm against the formulas of Chen et al. (ICML 2018), with values computed by hand.

With the shared layer W a parameter vector equal to ones and task losses L_i = c_i * W[i] + d_i,
each loss is L_i = c_i + d_i and its gradient at W is c_i * e_i, so ||grad_W L_i|| = c_i. This lets
a test choose the losses and the gradient norms independently.
"""

from __future__ import annotations

import logging
import math
import statistics

import pytest
import torch
from torch import nn

from mtrank.balancing import GradNormBalancer, build_balancer
from mtrank.balancing.gradnorm import WEIGHT_FLOOR
from mtrank.errors import ConfigError


def linear_losses(shared: nn.Parameter, norms: list[float], values: list[float]) -> list[torch.Tensor]:
    """Return losses equal to ``values`` whose gradient norms at ``shared`` (all ones) are ``norms``."""
    return [
        norm * shared[i] + (value - norm) for i, (norm, value) in enumerate(zip(norms, values, strict=True))
    ]


def make_balancer(num_tasks: int, **options: float | str) -> GradNormBalancer:
    names = [f"task{i}" for i in range(num_tasks)]
    balancer = build_balancer("gradnorm", names, ["regression"] * num_tasks, dict(options))
    assert isinstance(balancer, GradNormBalancer)
    return balancer


def test_targets_two_tasks_alpha_1_5() -> None:
    balancer = make_balancer(2, alpha=1.5)
    shared = nn.Parameter(torch.ones(2))
    # Step 0 records L(0) = (1, 1).
    balancer.combine(linear_losses(shared, [0.5, 0.5], [1.0, 1.0]), [shared])
    # Step t: L(t) = (0.02, 0.98) with gradient norms (0.01, 0.5) and weights still (1, 1).
    balancer.combine(linear_losses(shared, [0.01, 0.5], [0.02, 0.98]), [shared])
    stats = balancer.last_stats()
    # L~ = (0.02, 0.98), mean 0.5, so r = (0.04, 1.96) and r^1.5 = (0.2^3, 1.4^3) = (0.008, 2.744).
    # G = (0.01, 0.5), G_mean = 0.255, target = 0.255 * (0.008, 2.744) = (0.00204, 0.69972).
    assert stats["gradnorm/grad_norm/task0"] == pytest.approx(0.01, rel=1e-5)
    assert stats["gradnorm/grad_norm/task1"] == pytest.approx(0.5, rel=1e-5)
    assert stats["gradnorm/target/task0"] == pytest.approx(0.00204, rel=1e-4)
    assert stats["gradnorm/target/task1"] == pytest.approx(0.69972, rel=1e-4)


def test_targets_three_tasks_alpha_1() -> None:
    balancer = make_balancer(3, alpha=1.0)
    shared = nn.Parameter(torch.ones(3))
    balancer.combine(linear_losses(shared, [1.0, 1.0, 1.0], [2.0, 4.0, 1.0]), [shared])
    balancer.combine(linear_losses(shared, [1.0, 2.0, 3.0], [1.0, 4.0, 0.25]), [shared])
    stats = balancer.last_stats()
    # L~ = (1/2, 4/4, 0.25/1) = (0.5, 1, 0.25), mean 7/12, so r = (6/7, 12/7, 3/7).
    # G = (1, 2, 3), G_mean = 2, target = 2 * r = (12/7, 24/7, 6/7); one common target would be 2.
    assert stats["gradnorm/target/task0"] == pytest.approx(12 / 7, rel=1e-5)
    assert stats["gradnorm/target/task1"] == pytest.approx(24 / 7, rel=1e-5)
    assert stats["gradnorm/target/task2"] == pytest.approx(6 / 7, rel=1e-5)


def test_weight_gradient_uses_detached_target() -> None:
    balancer = make_balancer(2, alpha=1.5)
    shared = nn.Parameter(torch.ones(2))
    balancer.combine(linear_losses(shared, [0.5, 0.5], [1.0, 1.0]), [shared])
    balancer.task_weights.grad = None
    balancer.combine(linear_losses(shared, [0.01, 0.5], [0.02, 0.98]), [shared])
    grad = balancer.task_weights.grad
    assert grad is not None
    # Targets (0.00204, 0.69972) as above. With the target constant,
    # dL_grad/dw_j = sign(G_j - target_j) * ||grad_W L_j|| = (+1 * 0.01, -1 * 0.5) = (0.01, -0.5).
    # Letting the gradient flow through G_mean would add -n_j * (0.008 - 2.744) / 2 = +1.368 * n_j,
    # giving (0.02368, 0.184) instead.
    assert grad[0].item() == pytest.approx(0.01, rel=1e-5)
    assert grad[1].item() == pytest.approx(-0.5, rel=1e-5)


def test_slow_task_weight_rises() -> None:
    balancer = make_balancer(2, alpha=1.5, lr=0.1, optimizer="sgd")
    shared = nn.Parameter(torch.ones(2))
    balancer.combine(linear_losses(shared, [1.0, 1.0], [1.0, 1.0]), [shared])
    balancer.task_weights.grad = None
    # task0 trains fast (L~ = 0.2), task1 not at all (L~ = 1); equal gradient norms 1.
    balancer.combine(linear_losses(shared, [1.0, 1.0], [0.2, 1.0]), [shared])
    balancer.step()
    weights = balancer.weights()
    # r = (0.2, 1) / 0.6 = (1/3, 5/3), targets = 1 * (0.19245, 2.15166), so sign(G - target) = (+1, -1),
    # grad_w = (1, -1), and one SGD step of 0.1 gives w = (0.9, 1.1), which already sums to 2.
    assert weights[0].item() == pytest.approx(0.9, rel=1e-6)
    assert weights[1].item() == pytest.approx(1.1, rel=1e-6)
    assert weights[1] > weights[0]


def test_floor_and_renormalisation() -> None:
    balancer = make_balancer(2, alpha=1.5, lr=5.0, optimizer="sgd")
    shared = nn.Parameter(torch.ones(2))
    balancer.combine(linear_losses(shared, [1.0, 1.0], [1.0, 1.0]), [shared])
    balancer.task_weights.grad = None
    balancer.combine(linear_losses(shared, [1.0, 1.0], [0.2, 1.0]), [shared])
    balancer.step()
    weights = balancer.weights()
    # grad_w = (1, -1) as above; w = (1 - 5, 1 + 5) = (-4, 6) -> clamp (1e-6, 6) -> times 2 / (6 + 1e-6).
    assert weights[0].item() == pytest.approx(2 * WEIGHT_FLOOR / (6 + WEIGHT_FLOOR), rel=1e-4)
    assert weights[0].item() > 0
    assert weights.sum().item() == pytest.approx(2.0, rel=1e-6)


def test_initial_losses_come_from_first_step() -> None:
    balancer = make_balancer(2, alpha=1.0)
    shared = nn.Parameter(torch.ones(2))
    balancer.combine(linear_losses(shared, [1.0, 1.0], [4.0, 2.0]), [shared])
    balancer.combine(linear_losses(shared, [1.0, 1.0], [2.0, 2.0]), [shared])
    balancer.combine(linear_losses(shared, [1.0, 1.0], [1.0, 2.0]), [shared])
    stats = balancer.last_stats()
    # L(0) stays (4, 2): L~ = (0.25, 1), mean 0.625, r = (0.4, 1.6), G_mean = 1, target = r.
    assert balancer.initial_losses.tolist() == [4.0, 2.0]
    assert stats["gradnorm/target/task0"] == pytest.approx(0.4, rel=1e-5)
    assert stats["gradnorm/target/task1"] == pytest.approx(1.6, rel=1e-5)


def test_zero_initial_loss_waits_for_positive() -> None:
    balancer = make_balancer(2, alpha=1.0)
    shared = nn.Parameter(torch.ones(2))
    balancer.combine(linear_losses(shared, [1.0, 1.0], [2.0, 0.0]), [shared])
    assert balancer.has_initial_loss.tolist() == [True, False]
    balancer.combine(linear_losses(shared, [1.0, 1.0], [1.0, 3.0]), [shared])
    stats = balancer.last_stats()
    # task1 gets L(0) = 3 now, so L~ = (1/2, 3/3) = (0.5, 1), mean 0.75, r = (2/3, 4/3).
    assert balancer.initial_losses.tolist() == [2.0, 3.0]
    assert stats["gradnorm/target/task0"] == pytest.approx(2 / 3, rel=1e-5)
    assert stats["gradnorm/target/task1"] == pytest.approx(4 / 3, rel=1e-5)


def test_zero_gradient_task_gives_no_nan(caplog: pytest.LogCaptureFixture) -> None:
    balancer = make_balancer(2, alpha=1.5, lr=0.1, optimizer="sgd")
    shared = nn.Parameter(torch.ones(2))
    head = nn.Parameter(torch.tensor(1.5))
    with caplog.at_level(logging.WARNING, logger="mtrank.balancing.gradnorm"):
        for _ in range(3):
            losses = [2.0 * shared.sum(), head * head]  # task1 does not depend on W
            balancer.combine(losses, [shared]).backward()
            balancer.step()
    stats = balancer.last_stats()
    assert stats["gradnorm/grad_norm/task1"] == 0.0
    assert all(math.isfinite(value) for value in stats.values())
    assert bool(torch.isfinite(balancer.weights()).all())
    assert balancer.weights().sum().item() == pytest.approx(2.0, rel=1e-6)
    assert "task1" in caplog.text


def test_stacked_and_list_losses_agree() -> None:
    gradients = []
    for as_list in (True, False):
        balancer = make_balancer(2, alpha=1.5)
        shared = nn.Parameter(torch.ones(2))
        balancer.combine(linear_losses(shared, [0.5, 0.5], [1.0, 1.0]), [shared])
        balancer.task_weights.grad = None
        losses = linear_losses(shared, [0.01, 0.5], [0.02, 0.98])
        balancer.combine(losses if as_list else torch.stack(losses), [shared])
        gradients.append(balancer.task_weights.grad.clone())
    assert torch.allclose(gradients[0], gradients[1])


def test_network_loss_uses_detached_weights() -> None:
    balancer = make_balancer(2)
    shared = nn.Parameter(torch.ones(2))
    total = balancer.combine(linear_losses(shared, [1.0, 3.0], [2.0, 5.0]), [shared])
    balancer.task_weights.grad = None
    total.backward()
    assert total.item() == pytest.approx(7.0)
    assert shared.grad.tolist() == [1.0, 3.0]
    assert balancer.task_weights.grad is None


def test_no_grad_skips_weight_update() -> None:
    balancer = make_balancer(2)
    shared = nn.Parameter(torch.ones(2))
    with torch.no_grad():
        total = balancer.combine(linear_losses(shared, [1.0, 3.0], [2.0, 5.0]), [shared])
    assert total.item() == pytest.approx(7.0)
    assert balancer.task_weights.grad is None
    assert not bool(balancer.has_initial_loss.any())


def test_missing_shared_parameters_raises() -> None:
    balancer = make_balancer(2)
    with pytest.raises(ValueError, match="default_shared_parameters"):
        balancer.combine(torch.tensor([1.0, 2.0], requires_grad=True))


def test_invalid_options_listed_together() -> None:
    with pytest.raises(ConfigError) as caught:
        make_balancer(2, alpha=-1.0, lr="fast", optimizer="lbfgs")
    assert caught.value.problems == [
        "`alpha` must be a finite number >= 0, got -1.0",
        "`optimizer` must be one of adam, sgd, got `lbfgs`",
        "`lr` must be a positive number, got 'fast'",
    ]


def _toy_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, nn.Sequential, nn.ModuleList]:
    torch.manual_seed(seed)
    inputs = torch.randn(128, 8)
    # Task 1 has 4 times the output scale of task 0, so its gradients at W start several times larger.
    targets = torch.stack([torch.tanh(inputs[:, 0]), 4 * torch.tanh(inputs[:, 1] - inputs[:, 2])], dim=1)
    trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(2)])
    return inputs, targets, trunk, heads


def test_alpha_zero_equalises_gradient_norms() -> None:
    inputs, targets, trunk, heads = _toy_problem(seed=0)
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    balancer = make_balancer(2, alpha=0.0)
    shared = [trunk[2].weight]
    spreads = []
    for _ in range(200):
        hidden = trunk(inputs)
        losses = [nn.functional.mse_loss(heads[i](hidden).squeeze(1), targets[:, i]) for i in range(2)]
        total = balancer.combine(losses, shared)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        balancer.step()
        stats = balancer.last_stats()
        norms = [stats["gradnorm/grad_norm/task0"], stats["gradnorm/grad_norm/task1"]]
        spreads.append(max(norms) / min(norms))
    # Measured on this seed: the spread starts at 7.3 and stays below 1.07 over the last 50 steps.
    assert spreads[0] > 3.0
    assert statistics.median(spreads[-50:]) < 1.1
    assert max(spreads[-50:]) < 1.2


def test_weights_positive_and_sum_to_t_every_step() -> None:
    torch.manual_seed(1)
    inputs = torch.randn(64, 6)
    targets = torch.stack([inputs[:, 0], 50 * inputs[:, 1].sin(), (inputs[:, 2] > 0).float()], dim=1)
    trunk = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(12, 1) for _ in range(3)])
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-2)
    balancer = make_balancer(3, alpha=1.5, lr=0.1)
    for _ in range(60):
        hidden = trunk(inputs)
        outputs = [head(hidden).squeeze(1) for head in heads]
        losses = [
            nn.functional.mse_loss(outputs[0], targets[:, 0]),
            nn.functional.mse_loss(outputs[1], targets[:, 1]),
            nn.functional.binary_cross_entropy_with_logits(outputs[2], targets[:, 2]),
        ]
        total = balancer.combine(losses, [trunk[2].weight, trunk[2].bias])
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        balancer.step()
        weights = balancer.weights()
        assert bool((weights > 0).all()), weights
        assert weights.sum().item() == pytest.approx(3.0, rel=1e-5)
