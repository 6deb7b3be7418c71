"""Balancers under torch.distributed: two CPU processes (gloo) must end with the same state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mtrank.balancing import build_balancer

WORLD_SIZE = 2


def _run_rank(rank: int, init_file: str, output_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        # Uncertainty: rank r has a binary loss of 0.1 * (r + 1); d/ds at s = 0 is 0.5 - L = (0.4, 0.3).
        uncertainty = build_balancer("uncertainty", ["click"], ["binary"], {"lr": 1.0, "optimizer": "sgd"})
        uncertainty.combine(torch.tensor([0.1 * (rank + 1)])).backward()
        uncertainty.step()

        # GradNorm: rank 0 starts at losses (1, 2), rank 1 at (3, 4).
        gradnorm = build_balancer("gradnorm", ["click", "like"], ["binary", "binary"])
        shared = nn.Parameter(torch.ones(2))
        offset = 2.0 * rank
        gradnorm.combine([shared[0] + offset, 2 * shared[1] + offset], [shared])

        # DWA: epoch means (1, 2) and (3, 4), then (1, 3) on both ranks.
        dwa = build_balancer("dwa", ["click", "like"], ["binary", "binary"])
        dwa.end_epoch(torch.tensor([1.0, 2.0]) + offset)
        dwa.end_epoch(torch.tensor([1.0, 3.0]))

        torch.save(
            {
                "log_variance": uncertainty.log_variances.detach(),
                "initial_losses": gradnorm.initial_losses.clone(),
                "dwa_weights": dwa.weights(),
            },
            Path(output_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_processes_share_state(tmp_path: Path) -> None:
    mp.spawn(_run_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for result in results:
        # Mean gradient (0.4 + 0.3) / 2 = 0.35, one SGD step of 1: s = -0.35.
        assert result["log_variance"].item() == pytest.approx(-0.35, rel=1e-6)
        # Mean of (1, 2) and (3, 4).
        assert result["initial_losses"].tolist() == [2.0, 3.0]
        # Epoch means (2, 3) then (1, 3): r = (0.5, 1), Temp 2, w = (0.875647, 1.124353).
        assert result["dwa_weights"][0].item() == pytest.approx(0.875647, rel=1e-5)
