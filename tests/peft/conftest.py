"""A small multi-task ranker built from mtrank parts, and helpers shared by the PEFT tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from mtrank.embeddings.table import TableEmbedding
from mtrank.models.attention import FieldAttention
from mtrank.models.mlp import MLP
from mtrank.peft import PeftModel

EMBEDDING_DIM = 8
NUM_EXPERTS = 2
EXPERT_WIDTH = 16
TASKS = ("click", "like")
BATCH_SIZE = 16

# Per method: target patterns and options used by the tests that run every method.
METHOD_SETUPS: dict[str, tuple[list[str] | None, dict[str, object]]] = {
    "adapter": (["experts.*", "towers.*.layers.2", "attention"], {"bottleneck": 4}),
    "lora": (
        [
            "embeddings.*",
            "attention.layers.*.query",
            "attention.layers.*.value",
            "experts.*.layers.0",
            "towers.**",
        ],
        {"rank": 2, "alpha": 4.0},
    ),
    "prefix": (None, {"length": 3, "embedding_dim": 4, "hidden_dim": 8}),
}


class TinyRanker(nn.Module):
    """Embeddings -> optional field attention -> MMoE experts and gates -> towers -> logits.

    Shapes: B batch, F = 3 fields, T tasks (one per tower). ``forward`` maps int64 ids ``(B, F)``
    to logits ``(B, T)``. Towers added to ``towers`` later produce extra columns.
    """

    def __init__(self, *, attention: bool = True, batch_norm: bool = True) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict(
            {
                "user": nn.Embedding(20, EMBEDDING_DIM, padding_idx=0),
                "item": TableEmbedding(vocab_size=30, dim=EMBEDDING_DIM, init_std=0.5),
                "city": nn.Embedding(10, EMBEDDING_DIM),
            }
        )
        self.attention = (
            FieldAttention(EMBEDDING_DIM, num_layers=2, num_heads=2, head_dim=4, layer_norm=True)
            if attention
            else None
        )
        width = len(self.embeddings) * EMBEDDING_DIM
        self.experts = nn.ModuleList(
            MLP(width, [EXPERT_WIDTH], batch_norm=batch_norm) for _ in range(NUM_EXPERTS)
        )
        self.gates = nn.ModuleDict({task: nn.Linear(width, NUM_EXPERTS) for task in TASKS})
        self.towers = nn.ModuleDict(
            {task: MLP(EXPERT_WIDTH, [8], batch_norm=batch_norm, output_dim=1) for task in TASKS}
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Step 1: per-field embeddings, (B, F, D), then optional field attention.
        fields = torch.stack([table(ids[:, i]) for i, table in enumerate(self.embeddings.values())], dim=1)
        if self.attention is not None:
            fields = self.attention(fields)
        flat = fields.flatten(1)  # (B, F*D)
        # Step 2: experts, (B, E, H).
        experts = torch.stack([expert(flat) for expert in self.experts], dim=1)
        # Step 3: one gate-weighted mixture per tower; towers beyond the gates use the first gate.
        gate_list = list(self.gates.values())
        logits = []
        for index, tower in enumerate(self.towers.values()):
            gate = gate_list[min(index, len(gate_list) - 1)]
            weights = torch.softmax(gate(flat), dim=-1).unsqueeze(-1)  # (B, E, 1)
            logits.append(tower((weights * experts).sum(dim=1)))  # (B, 1)
        return torch.cat(logits, dim=1)  # (B, T)


def _make_ids(seed: int, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Return int64 ids ``(B, 3)`` within every field's vocabulary, padding id 0 included."""
    generator = torch.Generator().manual_seed(seed)
    columns = [torch.randint(0, size, (batch_size,), generator=generator) for size in (20, 30, 10)]
    return torch.stack(columns, dim=1)


def _make_labels(seed: int, num_tasks: int, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Return random 0/1 float labels ``(B, T)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch_size, num_tasks), generator=generator).float()


def _train_steps(model: PeftModel, steps: int, *, seed: int = 0, lr: float = 0.05) -> None:
    """Train the active set for ``steps`` Adam steps on fixed random batches."""
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    model.train()
    for step in range(steps):
        ids = _make_ids(seed + step)
        logits = model(ids)
        loss = nn.functional.binary_cross_entropy_with_logits(
            logits, _make_labels(seed + step, logits.shape[1])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _perturb_zero_parameters(parameters: Sequence[nn.Parameter], seed: int = 0) -> None:
    """Fill every all-zero parameter with small random values.

    A zero-initialised factor (adapter up-projection, LoRA B or embedding A) makes the gradient of
    its partner factor exactly zero on the first step. Filling it lets one step change every tensor.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            if torch.count_nonzero(parameter) == 0:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.fixture
def make_ranker() -> Callable[..., TinyRanker]:
    """Return a builder of seeded TinyRanker models; the same seed gives the same weights."""

    def build(*, seed: int = 0, attention: bool = True, batch_norm: bool = True) -> TinyRanker:
        torch.manual_seed(seed)
        model = TinyRanker(attention=attention, batch_norm=batch_norm)
        _warm_up_batch_norm(model)
        return model.eval()

    return build


def _warm_up_batch_norm(model: nn.Module) -> None:
    """Run two training-mode forwards without gradients so batch-norm statistics are not the defaults."""
    model.train()
    with torch.no_grad():
        for seed in (100, 101):
            model(_make_ids(seed))
    model.eval()


@pytest.fixture
def make_ids() -> Callable[..., torch.Tensor]:
    """Return the seeded id-batch builder: ``make_ids(seed, batch_size=16)`` gives ``(B, 3)`` int64."""
    return _make_ids


@pytest.fixture
def train_steps() -> Callable[..., None]:
    """Return ``train_steps(model, steps, seed=0, lr=0.05)``, which trains the active set with Adam."""
    return _train_steps


@pytest.fixture
def perturb_zero_parameters() -> Callable[..., None]:
    """Return the helper that fills all-zero parameters with small random values."""
    return _perturb_zero_parameters


@pytest.fixture
def method_setups() -> dict[str, tuple[list[str] | None, dict[str, object]]]:
    """Return target patterns and options per method for the TinyRanker."""
    return METHOD_SETUPS
