"""Compare the loss balancers on the KuaiRand subset through mtrank's training API.

Every method trains the ranker of ``examples/kuairand.yaml`` (MMoE, four tasks: click, long_view and
like are binary, play_time is log1p watch time with a squared error) on the same date split. Only
the balancer and the run seed change. The seed sets the initial weights, the batch order and
dropout, while the split is the same for every seed.

Protocol, chosen so the methods are compared at equal training cost:

- Early stopping is off and every run trains for the same number of epochs. The validation split
  is a random 10% of the training dates rather than later dates, so it does not choose the epoch.
  The test metrics are those of the model after the last epoch.
- Each run trains to the first of ``--report-epochs``, is evaluated on the test dates, and then
  resumes from its checkpoint to the next one. Resuming continues exactly as an uninterrupted run
  would, so this only adds test evaluations at earlier epochs.
- "s/epoch" is the training time of one epoch without validation, as recorded in ``metrics.json``,
  taken as the median over a run's epochs and averaged over seeds. Both the wall time and the
  process CPU time are reported. Other processes on the machine stretch the wall time, but they
  change the CPU time much less. Methods alternate within each seed, so a change in machine load
  affects them alike, and the load average before and after is recorded.

Writes ``results.json`` (every run and the summary) and ``results.md`` (markdown tables) to
``--output-dir``, and each run's directory (with ``steps.jsonl`` and ``task_weights.png``) under
``--output-dir/runs``.

Example:
    MTRANK_DATA_DIR=/path/to/data python benchmarks/balancing_kuairand.py --output-dir runs/balancing_kuairand
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from mtrank.config import parse_config
from mtrank.training.run import train_run

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "kuairand.yaml"
DEFAULT_METHODS = ["fixed", "uncertainty", "dwa", "gradnorm"]
BINARY_METRICS = ["auc", "gauc"]
REGRESSION_METRICS = ["mse"]


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``name:key=value,...`` into the balancer name and its options (values read as YAML)."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)
    return name, options


def run_config(base: dict[str, Any], spec: str, seed: int, epochs: int, threads: int) -> dict[str, Any]:
    """Return the raw config of one run: the base config with this balancer, seed and epoch budget."""
    name, options = parse_method(spec)
    raw = json.loads(json.dumps(base))  # a deep copy of plain YAML data
    raw["name"] = f"kuairand-{spec}-seed{seed}"
    raw["seed"] = seed
    raw["training"]["epochs"] = epochs
    raw["training"]["early_stopping"] = None
    raw["training"]["num_threads"] = threads
    raw["training"]["balancer"] = {"name": name, "options": options}
    return raw


def flatten_test_metrics(
    metrics: dict[str, dict[str, float]], task_types: dict[str, str]
) -> dict[str, float]:
    """Flatten the reported test metrics to ``{"<task>/<metric>": value}``."""
    values: dict[str, float] = {}
    for task, kind in task_types.items():
        names = BINARY_METRICS if kind == "binary" else REGRESSION_METRICS
        for metric in names:
            values[f"{task}/{metric}"] = float(metrics[task][metric])
    return values


def train_method(
    base: dict[str, Any], spec: str, seed: int, args: argparse.Namespace, task_types: dict[str, str]
) -> dict[str, Any]:
    """Train one method with one seed and return its test metrics at every report epoch."""
    raw = run_config(base, spec, seed, max(args.report_epochs), args.threads)
    run_dir = args.output_dir / "runs" / spec.replace(":", "_").replace(",", "_") / f"seed{seed}"
    started = time.perf_counter()
    at_epoch: dict[str, dict[str, float]] = {}
    done = 0
    result = None
    for epoch in sorted(args.report_epochs):
        result = train_run(parse_config(raw), run_dir, resume=done > 0, stop_after=epoch - done)
        at_epoch[str(epoch)] = flatten_test_metrics(result.test_metrics, task_types)
        done = epoch
    assert result is not None  # report_epochs is never empty
    history = result.fit.history
    final = history[-1].train
    return {
        "method": spec,
        "seed": seed,
        "test": at_epoch,
        "epoch_seconds": [record.seconds for record in history],
        "median_epoch_seconds": statistics.median(record.seconds for record in history),
        "epoch_cpu_seconds": [record.cpu_seconds for record in history],
        "median_epoch_cpu_seconds": statistics.median(record.cpu_seconds or 0.0 for record in history),
        "final_weights": {task: final[f"weight/{task}"] for task in task_types},
        "wall_seconds": time.perf_counter() - started,
        "run_dir": str(run_dir),
    }


def spread(values: list[float]) -> dict[str, float]:
    """Return the mean, sample standard deviation, minimum and maximum of ``values``."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarise(records: list[dict[str, Any]], methods: list[str], report_epochs: list[int]) -> dict[str, Any]:
    """Aggregate the runs of each method over seeds.

    The relative time is paired: each seed's seconds per epoch divided by those of ``fixed`` with the
    same seed, which ran right before it, so a load change between seeds cancels out.
    """
    summary: dict[str, Any] = {}
    fixed = {r["seed"]: r for r in records if r["method"] == "fixed"}
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        by_epoch = {}
        for epoch in report_epochs:
            keys = list(mine[0]["test"][str(epoch)])
            by_epoch[str(epoch)] = {key: spread([r["test"][str(epoch)][key] for r in mine]) for key in keys}
        seconds = spread([r["median_epoch_seconds"] for r in mine])
        weights = {
            task: spread([r["final_weights"][task] for r in mine]) for task in mine[0]["final_weights"]
        }
        cpu_seconds = spread([r["median_epoch_cpu_seconds"] for r in mine])
        ratios = spread([r["median_epoch_seconds"] / fixed[r["seed"]]["median_epoch_seconds"] for r in mine])
        cpu_ratios = spread(
            [r["median_epoch_cpu_seconds"] / fixed[r["seed"]]["median_epoch_cpu_seconds"] for r in mine]
        )
        summary[method] = {
            "test": by_epoch,
            "epoch_seconds": seconds,
            "relative_time": ratios,
            "epoch_cpu_seconds": cpu_seconds,
            "relative_cpu_time": cpu_ratios,
            "final_weights": weights,
        }
    return summary


def table_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    """Return a markdown table as lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def metric_tables(summary: dict[str, Any], methods: list[str], epoch: int, num_seeds: int) -> list[str]:
    """Return the test metric tables after ``epoch``: mean ± std, then min–max over seeds."""
    keys = list(summary[methods[0]]["test"][str(epoch)])
    cells = {method: [summary[method]["test"][str(epoch)][key] for key in keys] for method in methods}
    lines = [
        f"Test metrics after {epoch} epochs, mean ± std over {num_seeds} seeds "
        "(AUC and GAUC higher is better, MSE lower is better):",
        "",
    ]
    rows = [[method] + [f"{c['mean']:.4f} ± {c['std']:.4f}" for c in cells[method]] for method in methods]
    lines += table_rows(["method", *keys], rows)

    lines += ["", f"Min–max over seeds after {epoch} epochs:", ""]
    rows = [[method] + [f"{c['min']:.4f}–{c['max']:.4f}" for c in cells[method]] for method in methods]
    lines += table_rows(["method", *keys], rows)
    return lines + [""]


def time_table(summary: dict[str, Any], methods: list[str]) -> list[str]:
    """Return the table of training seconds per epoch (wall and CPU) and their ratios to fixed weights."""
    lines = [
        "Training time per epoch, without validation: the median over a run's epochs, then mean ± std "
        "over seeds. Ratios to fixed weights are taken per seed, then averaged (min–max in brackets):",
        "",
    ]

    def cell(values: dict[str, float], digits: int) -> str:
        return f"{values['mean']:.{digits}f} ± {values['std']:.{digits}f}"

    def ratio(values: dict[str, float]) -> str:
        return f"{cell(values, 2)} ({values['min']:.2f}–{values['max']:.2f})"

    rows = []
    for method in methods:
        entry = summary[method]
        rows.append(
            [
                method,
                cell(entry["epoch_seconds"], 2),
                ratio(entry["relative_time"]),
                cell(entry["epoch_cpu_seconds"], 2),
                ratio(entry["relative_cpu_time"]),
            ]
        )
    header = ["method", "wall s/epoch", "wall ratio", "CPU s/epoch", "CPU ratio"]
    lines += table_rows(header, rows)
    return lines + [""]


def weight_table(summary: dict[str, Any], methods: list[str], epoch: int) -> list[str]:
    """Return the table of task weights after the last epoch."""
    tasks = list(summary[methods[0]]["final_weights"])
    lines = [f"Task weights after epoch {epoch}, mean over seeds (min–max):", ""]
    rows = []
    for method in methods:
        cells = [summary[method]["final_weights"][task] for task in tasks]
        rows.append([method] + [f"{c['mean']:.3g} ({c['min']:.3g}–{c['max']:.3g})" for c in cells])
    lines += table_rows(["method", *tasks], rows)
    return lines + [""]


def markdown(summary: dict[str, Any], methods: list[str], report_epochs: list[int], seeds: list[int]) -> str:
    """Render the summary as markdown: test metrics per report epoch, time per epoch, final weights."""
    lines: list[str] = []
    for epoch in report_epochs:
        lines += metric_tables(summary, methods, epoch, len(seeds))
    lines += time_table(summary, methods)
    lines += weight_table(summary, methods, max(report_epochs))
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir", type=Path, required=True, help="folder for results and run directories"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base run config (YAML)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="name or name:key=value,...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds")
    parser.add_argument(
        "--report-epochs",
        type=int,
        nargs="+",
        default=[3, 6],
        help="epochs after which the test split is scored; the largest is the training length",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if "fixed" not in args.methods:
        parser.error("--methods must include `fixed`, the reference for the relative training time")
    if min(args.report_epochs) < 1:
        parser.error("--report-epochs must be positive")
    args.report_epochs = sorted(set(args.report_epochs))
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    task_types = {task["name"]: task["type"] for task in base["tasks"]}
    load_before = os.getloadavg()
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    for seed in args.seeds:
        for method in args.methods:
            record = train_method(base, method, seed, args, task_types)
            records.append(record)
            last = record["test"][str(max(args.report_epochs))]
            metrics_text = " ".join(f"{key}={value:.4f}" for key, value in last.items())
            seconds = record["median_epoch_seconds"]
            print(f"seed {seed} {method:20s} {seconds:.2f} s/epoch  {metrics_text}", flush=True)
    total_seconds = time.perf_counter() - started
    load_after = os.getloadavg()

    summary = summarise(records, args.methods, args.report_epochs)
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "total_seconds": total_seconds,
    }
    table = markdown(summary, args.methods, args.report_epochs, args.seeds)
    footer = (
        f"Total wall time {total_seconds / 60:.1f} min; load average (1, 5, 15 min) "
        f"{tuple(round(v, 1) for v in load_before)} before, {tuple(round(v, 1) for v in load_after)} after.\n"
    )
    (args.output_dir / "results.md").write_text(table + "\n" + footer, encoding="utf-8")
    payload = {
        "args": {key: str(value) for key, value in vars(args).items()},
        "machine": machine,
        "summary": summary,
        "runs": records,
    }
    (args.output_dir / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    print(table)
    print(footer)


if __name__ == "__main__":
    main()
