"""Compare the loss balancers on the synthetic regression tasks of the GradNorm paper.

Chen et al. (ICML 2018, Section 4) train T regression tasks with targets

    f_i(x) = sigma_i * tanh((B + eps_i) x)

where B is a random matrix shared by all tasks, eps_i is a random matrix of task i, and sigma_i
sets the scale of task i's outputs. A shared 4-layer fully connected ReLU trunk with 100 units per
layer feeds one linear head per task, and every task uses the squared error. Since task i's loss
scales with sigma_i^2, the test loss is reported divided by sigma_i^2 so that tasks are comparable.

Choices the paper leaves open or that we made:

- B and eps_i have entries drawn from N(0, 10) and N(0, 3.5), read as variances.
- The network's inputs are standardised, z ~ N(0, I). The targets use x = z / sqrt(d_in * (10 + 3.5)),
  so each pre-activation of the tanh has unit variance and the tanh is curved but rarely saturated.
- sigma_i are log-spaced from 1 to 100, and inputs have 250 dimensions and outputs 100.
- The trunk and heads train with Adam; DWA's "epoch" is one pass over the training set.

Every method uses the same data, initial network and batch order for a given seed. The script
writes ``results.json``, ``results.md`` (markdown tables) and ``balancing_synthetic_weights.png``
(weights over training, seed of ``--plot-seed``) to ``--output-dir``.

Example:
    python benchmarks/balancing_synthetic.py --output-dir runs/balancing_synthetic --steps 2000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtrank.balancing import LossBalancer, build_balancer
from mtrank.models.mlp import MLP

INPUT_DIM = 250
OUTPUT_DIM = 100
HIDDEN = [100, 100, 100, 100]
SHARED_VARIANCE = 10.0
TASK_VARIANCE = 3.5

# Each method is "name" or "name:key=value,key=value" with options for build_balancer.
DEFAULT_METHODS = [
    "fixed",
    "uncertainty",
    "uncertainty:lr=0.1",
    "dwa",
    "gradnorm:alpha=0.12",
    "gradnorm:alpha=1.5",
]


@dataclass
class SyntheticData:
    """Inputs ``(N, D_in)`` and targets ``(N, T, D_out)`` of the train and test splits."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    sigmas: torch.Tensor


@dataclass
class MethodResult:
    """Outcome of training one method on one seed."""

    method: str
    seed: int
    normalised_test_loss: list[float]
    final_weights: list[float]
    weight_steps: list[int] = field(default_factory=list)
    weight_history: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0


class MultiTaskNet(nn.Module):
    """Shared ReLU trunk and one linear head per task.

    Shapes: B batch, T tasks, I input dim, O output dim.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.trunk = MLP(INPUT_DIM, HIDDEN, activation="relu")
        self.heads = nn.ModuleList([nn.Linear(HIDDEN[-1], OUTPUT_DIM) for _ in range(num_tasks)])

    def forward(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """Map ``(B, I)`` inputs to T outputs of shape ``(B, O)``."""
        hidden = self.trunk(inputs)
        return [head(hidden) for head in self.heads]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Return the weight of the last trunk layer, GradNorm's W."""
        return [self.trunk.linear_layers()[-1].weight]


def make_data(num_tasks: int, num_train: int, num_test: int, seed: int) -> SyntheticData:
    """Draw B, eps_i, the inputs and the targets f_i(x) for one seed."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(OUTPUT_DIM, INPUT_DIM, generator=generator) * math.sqrt(SHARED_VARIANCE)
    task_specific = torch.randn(num_tasks, OUTPUT_DIM, INPUT_DIM, generator=generator) * math.sqrt(
        TASK_VARIANCE
    )
    sigmas = torch.logspace(0, 2, num_tasks)
    inputs = torch.randn(num_train + num_test, INPUT_DIM, generator=generator)
    input_scale = 1 / math.sqrt(INPUT_DIM * (SHARED_VARIANCE + TASK_VARIANCE))
    # (N, I) x (T, O, I) -> (N, T, O)
    pre_activations = torch.einsum("ni,toi->nto", inputs * input_scale, shared + task_specific)
    targets = sigmas.view(1, num_tasks, 1) * torch.tanh(pre_activations)
    return SyntheticData(
        train_inputs=inputs[:num_train],
        train_targets=targets[:num_train],
        test_inputs=inputs[num_train:],
        test_targets=targets[num_train:],
        sigmas=sigmas,
    )


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``name:key=value,...`` into the balancer name and its options (numbers parsed as float)."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return name, options


def task_losses(outputs: list[torch.Tensor], targets: torch.Tensor) -> list[torch.Tensor]:
    """Return the T mean squared errors as scalars; ``targets`` is ``(B, T, O)``."""
    return [nn.functional.mse_loss(output, targets[:, i]) for i, output in enumerate(outputs)]


def train_method(spec: str, data: SyntheticData, args: argparse.Namespace, seed: int) -> MethodResult:
    """Train one balancer from the seed's initial network and return its normalised test losses."""
    num_tasks = data.sigmas.numel()
    name, options = parse_method(spec)
    task_names = [f"sigma_{sigma:.3g}" for sigma in data.sigmas.tolist()]
    balancer: LossBalancer = build_balancer(name, task_names, ["regression"] * num_tasks, options)

    torch.manual_seed(seed)
    model = MultiTaskNet(num_tasks)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    shared = model.last_shared_parameters() if balancer.needs_shared_parameters else []
    batch_order = torch.Generator().manual_seed(seed)
    num_train = data.train_inputs.shape[0]
    steps_per_epoch = num_train // args.batch_size

    result = MethodResult(method=spec, seed=seed, normalised_test_loss=[], final_weights=[])
    epoch_sum = torch.zeros(num_tasks)
    epoch_batches = 0
    permutation = torch.randperm(num_train, generator=batch_order)
    start = time.perf_counter()
    for step in range(args.steps):
        position = step % steps_per_epoch
        if position == 0 and step > 0:
            balancer.end_epoch(epoch_sum / epoch_batches)
            epoch_sum.zero_()
            epoch_batches = 0
            permutation = torch.randperm(num_train, generator=batch_order)
        index = permutation[position * args.batch_size : (position + 1) * args.batch_size]
        losses = task_losses(model(data.train_inputs[index]), data.train_targets[index])
        total = balancer.combine(losses, shared)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        balancer.step()
        epoch_sum += torch.stack(losses).detach()
        epoch_batches += 1
        if step % args.record_every == 0 or step == args.steps - 1:
            result.weight_steps.append(step)
            result.weight_history.append(balancer.weights().tolist())
    result.seconds = time.perf_counter() - start

    with torch.no_grad():
        test_losses = torch.stack(task_losses(model(data.test_inputs), data.test_targets))
    result.normalised_test_loss = (test_losses / data.sigmas.pow(2)).tolist()
    result.final_weights = balancer.weights().tolist()
    return result


def summarise(results: list[MethodResult], sigmas: list[float], methods: list[str]) -> str:
    """Return markdown tables: normalised test loss per method, per task, and the final weights."""
    lines = [
        "Normalised test loss (test MSE / sigma_i^2), mean over seeds; lower is better.",
        "",
        "| method | mean over tasks | worst task | " + " | ".join(f"σ={s:.3g}" for s in sigmas) + " |",
        "|---|---|---|" + "---|" * len(sigmas),
    ]
    for method in methods:
        runs = [r for r in results if r.method == method]
        per_task = torch.tensor([r.normalised_test_loss for r in runs])  # (seeds, T)
        means = per_task.mean(dim=1)  # (seeds,)
        spread = f" ± {means.std().item():.4f}" if len(runs) > 1 else ""
        task_means = per_task.mean(dim=0)
        cells = " | ".join(f"{v:.4f}" for v in task_means.tolist())
        worst = per_task.max(dim=1).values.mean().item()
        lines.append(f"| {method} | {means.mean().item():.4f}{spread} | {worst:.4f} | {cells} |")
    lines += [
        "",
        "Final task weights, mean over seeds, rescaled to sum to T (uncertainty's raw weights are "
        "0.5 * exp(-s_i)).",
        "",
        "| method | " + " | ".join(f"σ={s:.3g}" for s in sigmas) + " |",
        "|---|" + "---|" * len(sigmas),
    ]
    for method in methods:
        runs = [r for r in results if r.method == method]
        weights = torch.tensor([r.final_weights for r in runs])
        weights = weights / weights.sum(dim=1, keepdim=True) * len(sigmas)
        cells = " | ".join(f"{v:.3g}" for v in weights.mean(dim=0).tolist())
        lines.append(f"| {method} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_weights(results: list[MethodResult], sigmas: list[float], seed: int, path: Path) -> None:
    """Plot each method's task weights over training for one seed, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r.seed == seed]
    columns = min(3, len(runs))
    rows = math.ceil(len(runs) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    colours = plt.get_cmap("viridis")(torch.linspace(0, 1, len(sigmas)).tolist())
    for axis, run in zip(axes.flat, runs, strict=False):
        history = torch.tensor(run.weight_history)  # (records, T)
        for i, sigma in enumerate(sigmas):
            axis.plot(run.weight_steps, history[:, i].tolist(), color=colours[i], label=f"σ={sigma:.3g}")
        axis.set_yscale("log")
        axis.set_title(run.method)
        axis.set_xlabel("step")
        axis.set_ylabel("weight")
    for axis in list(axes.flat)[len(runs) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7, ncol=2)
    figure.suptitle(f"Task weights over training (seed {seed})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for results and the plot")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per method and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random seeds")
    parser.add_argument("--tasks", type=int, default=10, help="number of tasks T")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="name or name:key=value,...")
    parser.add_argument("--train-size", type=int, default=10_000, help="training examples")
    parser.add_argument("--test-size", type=int, default=2_000, help="test examples")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the network")
    parser.add_argument("--record-every", type=int, default=20, help="steps between recorded weights")
    parser.add_argument("--plot-seed", type=int, default=None, help="seed to plot; the first seed by default")
    # One thread: the operations are small, and more threads mostly add synchronisation.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results: list[MethodResult] = []
    sigmas: list[float] = []
    for seed in args.seeds:
        data = make_data(args.tasks, args.train_size, args.test_size, seed)
        sigmas = data.sigmas.tolist()
        for method in args.methods:
            result = train_method(method, data, args, seed)
            results.append(result)
            mean_loss = sum(result.normalised_test_loss) / len(result.normalised_test_loss)
            print(
                f"seed {seed} {method:24s} mean normalised test loss {mean_loss:.4f} ({result.seconds:.1f} s)"
            )

    table = summarise(results, sigmas, args.methods)
    (args.output_dir / "results.md").write_text(table)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": [vars(r) for r in results]}
    (args.output_dir / "results.json").write_text(json.dumps(payload, indent=1))
    plot_seed = args.seeds[0] if args.plot_seed is None else args.plot_seed
    plot_weights(results, sigmas, plot_seed, args.output_dir / "balancing_synthetic_weights.png")
    print(table)


if __name__ == "__main__":
    main()
