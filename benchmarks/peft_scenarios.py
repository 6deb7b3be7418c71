"""Measure PEFT fine-tuning against zero-shot scoring and full fine-tuning on two real-data scenarios.

Scenario 1, new users (KuaiRand explicit-feedback subset):
    The base (examples/kuairand_base_full_active.yaml, with field attention) trains on users whose
    `user_active_degree` is `full_active`. The new scenario is every other user, with only their first
    three days for fine-tuning (examples/kuairand_finetune_other_users.yaml); the test split is their
    last three days. Compared: the base as it is (zero-shot), full fine-tuning (every parameter
    trainable, same data and training settings), adapters, prefix-tuning and LoRA. Reported per
    method: per-task AUC on the new scenario's test split, trainable values (and % of the base), the
    wall time of training, and the base scenario's test AUC afterwards (forgetting). For the PEFT
    methods the base scenario is scored with the set disabled, where the scores must equal the base's
    bit for bit, and with the set enabled.

Scenario 2, new task (Census-Income KDD):
    The base (examples/census_income_only.yaml) trains on income only. The never-married task is added
    as an adapter set with a new tower (examples/census_finetune_never_married.yaml) and compared with
    the two-task MMoE of the `census` preset trained from scratch for the same number of epochs. The
    income AUC is reported for the base, the base with the set enabled, and the base with the set
    disabled.

The script writes ``results.json`` and ``results.md`` to ``--output-dir``. Each measurement is one run
with one seed, on whatever else the machine is doing, so the times are rough.

Example:
    MTRANK_DATA_DIR=/path/to/shared/data python benchmarks/peft_scenarios.py --output-dir runs/peft_scenarios
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrank.config import load_config
from mtrank.config.presets import load_preset
from mtrank.config.schema import RunConfig, TaskConfig
from mtrank.data.pipeline import PreparedData
from mtrank.data.tensors import EncodedData
from mtrank.training.evaluation import Metrics, evaluate_predictions, predict
from mtrank.training.finetune import (
    FinetuneConfig,
    finetune,
    load_finetune_config,
    prepare_finetune_data,
    task_label_encoders,
)
from mtrank.training.run import LoadedRun, load_run, train_run
from mtrank.training.trainer import FitResult, Trainer

logger = logging.getLogger("peft_scenarios")

REPOSITORY = Path(__file__).resolve().parents[1]
KUAIRAND_BASE = REPOSITORY / "examples" / "kuairand_base_full_active.yaml"
KUAIRAND_FINETUNE = REPOSITORY / "examples" / "kuairand_finetune_other_users.yaml"
CENSUS_BASE = REPOSITORY / "examples" / "census_income_only.yaml"
CENSUS_FINETUNE = REPOSITORY / "examples" / "census_finetune_never_married.yaml"
PEFT_METHODS = ("adapter", "prefix", "lora")
KUAIRAND_BINARY_TASKS = ("click", "long_view", "like")


# ----------------------------------------------------------------------------------------------------
# Helpers


def scenario_split(
    run: LoadedRun, config: FinetuneConfig | RunConfig, tasks: list[TaskConfig]
) -> PreparedData:
    """Encode the data of ``config`` with the run's saved encoders, labelled for ``tasks``."""
    encoders = dataclasses.replace(run.encoders, labels=task_label_encoders(run.config, run.encoders, tasks))
    return prepare_finetune_data(encoders, config.data)


def score(
    model: torch.nn.Module, data: EncodedData, tasks: list[TaskConfig], group: str | None
) -> tuple[np.ndarray, Metrics]:
    """Return the ``(N, T)`` predictions of ``model`` on ``data`` and the per-task metrics."""
    predictions = predict(model, data, [task.loss or "bce" for task in tasks])
    return predictions, evaluate_predictions(predictions, data, tasks, group, "benchmark")


def epochs_run(fit: FitResult) -> str:
    """Return ``"epochs run (best epoch)"``, e.g. ``"10 (10)"``: a best last epoch means still improving."""
    return f"{len(fit.history)} ({fit.best_epoch})"


def mean_auc(metrics: Metrics) -> float:
    return float(metrics["mean"]["auc"])


def machine() -> dict[str, Any]:
    """Describe the machine and load, for the results page."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------------------------------
# Scenario 1: new users on KuaiRand


def kuairand_scenario(output: Path, epochs: int | None) -> dict[str, Any]:
    """Run the new-users scenario and return its rows."""
    base_config = load_config(KUAIRAND_BASE)
    finetune_config = load_finetune_config(KUAIRAND_FINETUNE)
    if epochs is not None:
        base_config.training.epochs = epochs
        finetune_config.training.epochs = epochs
    base_dir = output / "kuairand" / "base"
    started = time.perf_counter()
    train_run(base_config, base_dir)
    base_seconds = time.perf_counter() - started

    base = load_run(base_dir)
    tasks = list(base.config.tasks)
    group = base.config.evaluation.group_column
    base_test = scenario_split(base, base.config, tasks).test
    new_data = scenario_split(base, finetune_config, tasks)
    base_values = sum(parameter.numel() for parameter in base.model.parameters())
    base_predictions, base_scenario = score(base.model, base_test, tasks, group)
    _, zero_shot = score(base.model, new_data.test, tasks, group)
    rows: list[dict[str, Any]] = [
        {
            "method": "zero-shot base",
            "new_scenario": zero_shot,
            "trainable_values": 0,
            "percent_of_base": 0.0,
            "train_seconds": 0.0,
            "epochs": None,
            "base_scenario_after": base_scenario,
        }
    ]

    # Full fine-tuning: every parameter of a fresh copy of the base, same data and settings.
    full = load_run(base_dir)
    for parameter in full.model.parameters():
        parameter.requires_grad_(True)
    train_config = full.config.model_copy(
        update={
            "seed": finetune_config.seed,
            "data": finetune_config.data,
            "training": finetune_config.training,
        }
    )
    torch.manual_seed(finetune_config.seed)
    trainer = Trainer(full.model, train_config)
    started = time.perf_counter()
    full_fit = trainer.fit(new_data.train, new_data.valid)
    full_seconds = time.perf_counter() - started
    _, full_new = score(full.model, new_data.test, tasks, group)
    _, full_base = score(full.model, base_test, tasks, group)
    rows.append(
        {
            "method": "full fine-tuning",
            "new_scenario": full_new,
            "trainable_values": base_values,
            "percent_of_base": 100.0,
            "train_seconds": full_seconds,
            "epochs": epochs_run(full_fit),
            "base_scenario_after": full_base,
        }
    )

    for method in PEFT_METHODS:
        result = finetune(
            base_dir,
            finetune_config,
            method,
            name=f"other_users_{method}",
            out_dir=output / "kuairand" / method,
        )
        loaded = load_run(base_dir, peft=result.set_dir)
        _, enabled_new = score(loaded.model, new_data.test, tasks, group)
        _, enabled_base = score(loaded.model, base_test, tasks, group)
        loaded.model.disable()
        disabled_predictions, disabled_base = score(loaded.model, base_test, tasks, group)
        rows.append(
            {
                "method": method,
                "new_scenario": enabled_new,
                "trainable_values": result.counts.trainable,
                "percent_of_base": result.counts.percent_of_base,
                "train_seconds": result.train_seconds,
                "epochs": epochs_run(result.fit),
                "base_scenario_after": disabled_base,
                "base_scenario_set_enabled": enabled_base,
                "disabled_equals_base_bitwise": bool(np.array_equal(disabled_predictions, base_predictions)),
            }
        )
    return {
        "base_train_seconds": base_seconds,
        "base_values": base_values,
        "rows": {
            "train": len(new_data.train),
            "valid": 0 if new_data.valid is None else len(new_data.valid),
            "test": len(new_data.test),
            "base_test": len(base_test),
        },
        "methods": rows,
    }


# ----------------------------------------------------------------------------------------------------
# Scenario 2: a new task on Census-Income


def census_scenario(output: Path, epochs: int | None) -> dict[str, Any]:
    """Run the new-task scenario and return its rows."""
    base_config = load_config(CENSUS_BASE)
    multi_config = load_preset("census")
    finetune_config = load_finetune_config(CENSUS_FINETUNE)
    # The two-task model trains as long as the base, so the comparison does not favour either.
    multi_config.training.epochs = base_config.training.epochs
    if epochs is not None:
        for training in (base_config.training, multi_config.training, finetune_config.training):
            training.epochs = epochs

    base_dir = output / "census" / "base"
    started = time.perf_counter()
    base_result = train_run(base_config, base_dir)
    base_seconds = time.perf_counter() - started
    started = time.perf_counter()
    multi_result = train_run(multi_config, output / "census" / "multi_task")
    multi_seconds = time.perf_counter() - started
    if not np.array_equal(base_result.data.test.row_ids, multi_result.data.test.row_ids):
        raise RuntimeError("the income-only base and the two-task model have different test rows")

    result = finetune(base_dir, finetune_config, "adapter", out_dir=output / "census" / "adapter")
    base = load_run(base_dir)
    loaded = load_run(base_dir, peft=result.set_dir)
    tasks = list(loaded.config.tasks)
    test = scenario_split(loaded, finetune_config, tasks).test
    if not np.array_equal(test.row_ids, base_result.data.test.row_ids):
        raise RuntimeError("the fine-tune test split differs from the base's test split")
    base_predictions, base_metrics = score(base.model, test, tasks[:1], None)
    _, enabled = score(loaded.model, test, tasks, None)
    loaded.model.disable()
    # The disabled model still has the never-married column; only the income column is compared.
    disabled_all, _ = score(loaded.model, test, tasks, None)
    disabled_predictions = disabled_all[:, :1]
    disabled = evaluate_predictions(disabled_predictions, test, tasks[:1], None, "benchmark")
    multi_values = sum(parameter.numel() for parameter in multi_result.model.parameters())
    base_values = sum(parameter.numel() for parameter in base.model.parameters())
    return {
        "models": [
            {
                "model": "income-only base",
                "trainable_values": base_values,
                "train_seconds": base_seconds,
                "epochs": epochs_run(base_result.fit),
                "income_auc": base_metrics["income"]["auc"],
                "never_married_auc": None,
            },
            {
                "model": "two-task MMoE trained from scratch (census preset)",
                "trainable_values": multi_values,
                "train_seconds": multi_seconds,
                "epochs": epochs_run(multi_result.fit),
                "income_auc": multi_result.test_metrics["income"]["auc"],
                "never_married_auc": multi_result.test_metrics["never_married"]["auc"],
            },
            {
                "model": "base + adapter set with new tower, set enabled",
                "trainable_values": result.counts.trainable,
                "percent_of_base": result.counts.percent_of_base,
                "train_seconds": result.train_seconds,
                "epochs": epochs_run(result.fit),
                "income_auc": enabled["income"]["auc"],
                "never_married_auc": enabled["never_married"]["auc"],
            },
            {
                "model": "base + adapter set, set disabled",
                "trainable_values": None,
                "train_seconds": None,
                "epochs": None,
                "income_auc": disabled["income"]["auc"],
                "never_married_auc": None,
            },
        ],
        "disabled_income_equals_base_bitwise": bool(np.array_equal(disabled_predictions, base_predictions)),
        "disabled_income_max_abs_difference": float(np.abs(disabled_predictions - base_predictions).max()),
        "new_modules": result.new_modules,
        "test_rows": len(test),
    }


# ----------------------------------------------------------------------------------------------------
# Report


def _format(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    """Render the results as the markdown tables docs/peft.md quotes."""
    lines: list[str] = []
    kuairand = results.get("kuairand")
    if kuairand is not None:
        rows = kuairand["rows"]
        lines += [
            "### New users: KuaiRand, base on `full_active` users, adapted to the others",
            "",
            f"New scenario: {rows['train']:,} training, {rows['valid']:,} validation and "
            f"{rows['test']:,} test rows. Base scenario test split: {rows['base_test']:,} rows. Base: "
            f"{kuairand['base_values']:,} values, trained in {kuairand['base_train_seconds']:.1f} s.",
            "",
            "| method | click AUC | long_view AUC | like AUC | mean AUC | play_time MSE | trainable values "
            "| % of base | training s | epochs (best) | base-scenario mean AUC after | same with set enabled "
            "| set disabled = base, bitwise |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in kuairand["methods"]:
            new = row["new_scenario"]
            enabled = row.get("base_scenario_set_enabled")
            lines.append(
                "| "
                + " | ".join(
                    [
                        row["method"],
                        *(_format(new[task]["auc"]) for task in KUAIRAND_BINARY_TASKS),
                        _format(mean_auc(new)),
                        _format(new["play_time"]["mse"], 3),
                        _format(row["trainable_values"]),
                        _format(row["percent_of_base"], 2),
                        _format(row["train_seconds"], 1),
                        _format(row["epochs"]),
                        _format(mean_auc(row["base_scenario_after"])),
                        _format(mean_auc(enabled)) if enabled is not None else "-",
                        _format(row.get("disabled_equals_base_bitwise")),
                    ]
                )
                + " |"
            )
        lines.append("")
    census = results.get("census")
    if census is not None:
        lines += [
            "### New task: Census-Income, base on income only, never-married added",
            "",
            f"Test split: {census['test_rows']:,} rows. "
            f"New task modules: {', '.join(census['new_modules'])}.",
            "",
            "| model | trainable values | training s | epochs (best) | income AUC | never-married AUC |",
            "|---|---|---|---|---|---|",
        ]
        for row in census["models"]:
            values = _format(row["trainable_values"])
            if row.get("percent_of_base") is not None:
                values += f" ({row['percent_of_base']:.2f}% of base)"
            cells = [
                row["model"],
                values,
                _format(row["train_seconds"], 1),
                _format(row["epochs"]),
                _format(row["income_auc"]),
                _format(row["never_married_auc"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Income scores with the set disabled equal the base's bit for bit: "
            f"{_format(census['disabled_income_equals_base_bitwise'])}; largest absolute difference "
            f"{census['disabled_income_max_abs_difference']:.3g}.",
            "",
        ]
    info = results["machine"]
    lines += [
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs, torch {info['torch']} with "
        f"{info['torch_threads']} threads, Python {info['python']}. Load average at start "
        f"{', '.join(f'{v:.2f}' for v in info['load_average'])}, at end "
        f"{', '.join(f'{v:.2f}' for v in results['load_average_end'])}. Total wall time "
        f"{results['total_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir", type=Path, default=Path("runs/peft_scenarios"), help="Folder for runs and results."
    )
    parser.add_argument(
        "--scenarios", nargs="+", choices=["kuairand", "census"], default=["kuairand", "census"]
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="Override every run's epochs (for a quick check)."
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads.")
    parser.add_argument("--overwrite", action="store_true", help="Delete --output-dir first if it exists.")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        if not args.overwrite:
            parser.error(f"{args.output_dir} is not empty; pass --overwrite to replace it")
        shutil.rmtree(args.output_dir)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv)}
    if "kuairand" in args.scenarios:
        results["kuairand"] = kuairand_scenario(args.output_dir, args.epochs)
    if "census" in args.scenarios:
        results["census"] = census_scenario(args.output_dir, args.epochs)
    results["total_seconds"] = time.perf_counter() - started
    results["load_average_end"] = list(os.getloadavg())

    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    text = markdown(results)
    (args.output_dir / "results.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
