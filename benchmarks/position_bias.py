"""Measure the position-bias shallow tower (Zhao et al., RecSys 2019) against known ground truth.

Five experiments, all through mtrank's Python API (``parse_config``, ``train_run``, ``load_run``,
``evaluate_artifact``):

1. ``simulated``: the log of ``mtrank simulate --requests 20000 --seed 0`` (200,000 impressions,
   examination ``0.9 / p ** eta`` with eta 1.5 phone, 1.0 tablet, 0.6 desktop). The logging policy
   ranks each list by true relevance plus fresh Gaussian noise per impression.
2. ``simulated_item_error``: the same users, items, relevance and devices, logged by a policy whose
   score also carries a persistent error per item (``mtrank simulate --logging-item-error``, the
   standard deviation on the logit scale given by ``--item-error``), as a previous ranker's
   mistakes would.
3. ``simulated_random_policy``: the same population logged by a uniformly random policy, so the
   position carries no information about relevance. A control: the tower should learn the true
   log examination and leave the ranking unchanged.
4. ``kuairand`` and ``kuairand_item_error``: the semi-synthetic KuaiRand logs of ``mtrank simulate
   --kuairand DIR --seed 0``, without and with the persistent logging error per video.
5. ``open_bandit``: the Open Bandit Dataset's Bernoulli-TS logs (``bts``, men and women pooled)
   train a ranker with a device-less shallow tower. Its learned slot effect is set beside the click
   rate per slot on the uniform-random logs (``random``), where the slot does not depend on the item.

Experiments 1-4 (five logs) train every seed with and without the shallow tower from the example configs in
``examples/`` and compare the click tower's ranking against true relevance (NDCG@10 and pairwise
AUC per request on the test split) and the learned bias against the true examination. Seeds vary
the model's initialisation and batch order; each experiment's log is fixed.

Outputs in ``--out``: the logs, one run directory per training run, ``results.json`` and
``results.md``. The bias plots of seed 0 are copied to ``--img-dir``.

Example:
    MTRANK_DATA_DIR=/path/to/data python benchmarks/position_bias.py --out runs/position-bias
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import yaml

from mtrank.config import parse_config
from mtrank.data import simulator
from mtrank.training.run import load_run, train_run
from mtrank.training.unbiased import evaluate_artifact, plot_position_bias

logger = logging.getLogger("position_bias")

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLES = REPOSITORY / "examples"
# The CLI's `mtrank simulate` defaults (2,000 users, 5,000 items), with 20,000 requests of 10 items.
SIMULATION = {"num_users": 2_000, "num_items": 5_000, "num_requests": 20_000, "list_size": 10}
LOG_SEED = 0
# Standard deviation of the persistent per-item logging error, on the relevance-logit scale. It
# equals the simulator's per-impression logging noise (1.0), so half of the logging error's variance
# is persistent.
DEFAULT_ITEM_ERROR = 1.0
# Duration bias of the KuaiRand logging policy: +1 logit per standard deviation of log duration, as
# large as the fresh logging noise, so long videos sit visibly higher whatever their label.
DURATION_WEIGHT = 1.0
OPEN_BANDIT_CAMPAIGNS = ("men", "women")
OPEN_BANDIT_COLUMNS = ["item_id", "position", "click", "user_feature_0", "user_feature_1", "user_feature_2",
                       "user_feature_3"]  # fmt: skip
# Normal quantile of a two-sided 95% interval.
Z_95 = 1.959964

VARIANTS = ("with", "without")
# Experiments that compare runs with and without the shallow tower, and the example config of each.
COMPARISONS = {
    "simulated": "simulated.yaml",
    "simulated_item_error": "simulated.yaml",
    "simulated_random_policy": "simulated.yaml",
    "kuairand": "kuairand_semi_synthetic.yaml",
    "kuairand_item_error": "kuairand_semi_synthetic.yaml",
    "kuairand_duration_bias": "kuairand_semi_synthetic.yaml",
}


# ---------------------------------------------------------------------------------------------------
# Logs


def write_simulated_logs(folder: Path, data_dir: Path | None, item_error: float) -> dict[str, Path]:
    """Write the simulated logs, as ``mtrank simulate`` would; the KuaiRand ones only when the folder exists."""
    folder.mkdir(parents=True, exist_ok=True)
    configs = {
        "simulated": simulator.SimulationConfig(**SIMULATION, seed=LOG_SEED),
        "simulated_item_error": simulator.SimulationConfig(
            **SIMULATION, seed=LOG_SEED, logging_item_error=item_error
        ),
        "simulated_random_policy": simulator.SimulationConfig(
            **SIMULATION, seed=LOG_SEED, logging_policy="random"
        ),
    }
    paths = {}
    for scenario, config in configs.items():
        paths[scenario] = simulator.write_click_log(config, folder / f"{scenario}.parquet")
    kuairand = (data_dir / "kuairand-explicit-feedback-subset") if data_dir else None
    if kuairand is not None and kuairand.is_dir():
        kuairand_configs = {
            "kuairand": simulator.SimulationConfig(seed=LOG_SEED),
            "kuairand_item_error": simulator.SimulationConfig(seed=LOG_SEED, logging_item_error=item_error),
            "kuairand_duration_bias": simulator.SimulationConfig(
                seed=LOG_SEED, logging_duration_weight=DURATION_WEIGHT
            ),
        }
        for scenario, config in kuairand_configs.items():
            paths[scenario] = simulator.write_click_log(
                config, folder / f"{scenario}.parquet", kuairand_dir=kuairand
            )
    else:
        logger.warning("KuaiRand subset not found under %s; skipping the kuairand experiments", data_dir)
    return paths


def pool_open_bandit(source: Path, policy: str, path: Path) -> Path:
    """Write the men and women logs of one policy as one CSV with campaign-prefixed item ids."""
    parts = []
    for campaign in OPEN_BANDIT_CAMPAIGNS:
        table = pacsv.read_csv(
            source / policy / campaign / f"{campaign}.csv",
            convert_options=pacsv.ConvertOptions(include_columns=OPEN_BANDIT_COLUMNS),
        )
        items = pc.binary_join_element_wise(f"{campaign}_", pc.cast(table["item_id"], pa.string()), "")
        parts.append(table.set_column(0, "item_id", items))
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(pa.concat_tables(parts), path)
    return path


# ---------------------------------------------------------------------------------------------------
# Runs


def run_config(
    example: str, log: Path, name: str, seed: int, variant: str, threads: int, lr: float | None = None
) -> Any:
    """Load an example config with the log path, name and seed replaced; drop the tower for ``without``."""
    raw = yaml.safe_load((EXAMPLES / example).read_text(encoding="utf-8"))
    raw["name"] = name
    raw["seed"] = seed
    raw["data"]["path"] = str(log)
    raw["training"]["num_threads"] = threads
    if lr is not None:
        raw["training"]["lr"] = lr
    if variant == "without":
        raw["model"].pop("position_bias")
    return parse_config(raw, str(EXAMPLES / example))


def train_and_evaluate(config: Any, run_dir: Path) -> tuple[dict[str, Any], Any]:
    """Train one run, evaluate it on its test split and return a summary and the report."""
    started = time.perf_counter()
    result = train_run(config, run_dir)
    seconds = time.perf_counter() - started
    report = evaluate_artifact(load_run(run_dir))
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "seconds": round(seconds, 1),
        "epochs_run": len(result.fit.history),
        "best_epoch": result.fit.best_epoch,
        "valid_click_auc": [r.valid["click"]["auc"] for r in result.fit.history if r.valid is not None],
        "metrics": report.metrics,
        "spearman": report.details.get("position_bias_spearman", {}),
        "monotone": report.details.get("position_bias_monotone", {}),
        "bias": report.details.get("position_bias", []),
    }
    return summary, report


def run_comparison(
    scenario: str, example: str, log: Path, args: argparse.Namespace, img_dir: Path
) -> dict[str, Any]:
    """Train every seed with and without the shallow tower and collect the click task's metrics."""
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    for seed in args.seeds:
        for variant in VARIANTS:
            name = f"{scenario}-{variant}-seed{seed}"
            config = run_config(example, log, name, seed, variant, args.threads, args.lr)
            summary, _report = train_and_evaluate(config, args.out / "runs" / name)
            summary["seed"] = seed
            runs[variant].append(summary)
            click = summary["metrics"]["click"]
            logger.info(
                "%s: %.0f s, best epoch %d of %d, true NDCG@10 %.4f, true pairwise AUC %.4f, Spearman %s",
                name, summary["seconds"], summary["best_epoch"], summary["epochs_run"],
                click["true_ndcg@10"], click["true_pairwise_auc"],
                {d: round(v, 3) for d, v in summary["spearman"].items()},
            )  # fmt: skip
    first = runs["with"][0]
    plot = plot_position_bias(
        first["bias"],
        img_dir / f"position_bias_{scenario}.png",
        title=f"{scenario}: shallow-tower bias (seed {first['seed']}) vs truth",
    )
    return {"example": example, "log": str(log), "runs": runs, "plot": str(plot) if plot else None}


def slot_click_rates(path: Path) -> dict[int, tuple[int, int]]:
    """Return ``position -> (clicks, impressions)`` of a pooled Open Bandit log."""
    table = pacsv.read_csv(path)
    positions = table["position"].to_numpy()
    clicks = table["click"].to_numpy()
    return {
        int(p): (int(clicks[positions == p].sum()), int((positions == p).sum())) for p in np.unique(positions)
    }


def log_rate_ratio(counts: dict[int, tuple[int, int]], slot: int, base: int = 1) -> dict[str, float]:
    """Log of the click-rate ratio of ``slot`` to ``base`` with a 95% interval (delta method)."""
    clicks, shown = counts[slot]
    base_clicks, base_shown = counts[base]
    value = math.log((clicks / shown) / (base_clicks / base_shown))
    error = math.sqrt(1 / clicks - 1 / shown + 1 / base_clicks - 1 / base_shown)
    return {"value": value, "low": value - Z_95 * error, "high": value + Z_95 * error}


def run_open_bandit(source: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train on the pooled BTS (and, as a check, random) logs and compare slot effects."""
    logs = {
        policy: pool_open_bandit(source, policy, args.out / "logs" / f"obd_{policy}.csv")
        for policy in ("bts", "random")
    }
    counts = {policy: slot_click_rates(path) for policy, path in logs.items()}
    learned: dict[str, list[dict[str, Any]]] = {policy: [] for policy in logs}
    for policy, path in logs.items():
        for seed in args.seeds:
            name = f"open_bandit-{policy}-seed{seed}"
            config = run_config("open_bandit.yaml", path, name, seed, "with", args.threads)
            summary, _report = train_and_evaluate(config, args.out / "runs" / name)
            summary["seed"] = seed
            learned[policy].append(summary)
            logger.info(
                "%s: %.0f s, click AUC %.4f, learned slot bias %s", name, summary["seconds"],
                summary["metrics"]["click"]["auc"], [round(r["learned"], 3) for r in summary["bias"]],
            )  # fmt: skip
    ratios = {
        policy: {slot: log_rate_ratio(counts[policy], slot) for slot in sorted(counts[policy]) if slot != 1}
        for policy in logs
    }
    return {
        "logs": {k: str(v) for k, v in logs.items()},
        "counts": counts,
        "log_ratios": ratios,
        "runs": learned,
    }


# ---------------------------------------------------------------------------------------------------
# Report


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def comparison_markdown(scenario: str, result: dict[str, Any]) -> list[str]:
    """Markdown tables of one scenario: ranking metrics by seed and variant, then bias agreement."""
    runs = result["runs"]
    seeds = [r["seed"] for r in runs["with"]]
    lines = [f"### {scenario}", "", f"Log: `{result['log']}`, config `examples/{result['example']}`.", ""]

    # Ranking against true relevance, per seed and variant, then the paired difference.
    header = "| metric (click tower, test) | shallow tower | " + " | ".join(f"seed {s}" for s in seeds)
    lines += [header + " | mean | sd |", "|---|---|" + "---|" * (len(seeds) + 2)]
    for metric in ("true_ndcg@10", "true_pairwise_auc", "auc"):
        for variant in VARIANTS:
            values = [r["metrics"]["click"][metric] for r in runs[variant]]
            mean, sd = mean_sd(values)
            cells = " | ".join(f"{v:.4f}" for v in values)
            lines.append(f"| {metric} | {variant} | {cells} | {mean:.4f} | {sd:.4f} |")
        differences = [
            w["metrics"]["click"][metric] - o["metrics"]["click"][metric]
            for w, o in zip(runs["with"], runs["without"], strict=True)
        ]
        mean, sd = mean_sd(differences)
        cells = " | ".join(f"{v:+.4f}" for v in differences)
        lines.append(f"| {metric} | with - without | {cells} | {mean:+.4f} | {sd:.4f} |")

    # Training length and agreement of the learned bias with the truth, per seed.
    lines += [
        "",
        "| seed | best epoch (with / without) | validation click AUC by epoch (with) | Spearman per device |"
        " monotone per device |",
        "|---|---|---|---|---|",
    ]
    for with_run, without_run in zip(runs["with"], runs["without"], strict=True):
        valid = ", ".join(f"{v:.4f}" for v in with_run["valid_click_auc"])
        spearman = ", ".join(f"{d} {v:.3f}" for d, v in with_run["spearman"].items())
        monotone = ", ".join(f"{d} {'yes' if v else 'no'}" for d, v in with_run["monotone"].items())
        lines.append(
            f"| {with_run['seed']} | {with_run['best_epoch']} / {without_run['best_epoch']} | {valid} | "
            f"{spearman} | {monotone} |"
        )

    bias = runs["with"][0]["bias"]
    if bias:
        lines += ["", f"Learned bias of seed {seeds[0]} against the truth, relative to position 1:", ""]
        lines += ["| device | position | learned | true log(exam) | true log-odds |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['device']} | {r['position']} | {r['learned']:+.3f} | {r['true_log_examination']:+.3f} | "
            f"{r['true_log_odds']:+.3f} |"
            for r in bias
        ]
    return lines + [""]


def open_bandit_markdown(result: dict[str, Any]) -> list[str]:
    """Markdown table of the Open Bandit slot effects."""
    lines = ["### open_bandit", ""]
    lines += ["| slot | random: clicks / shown | bts: clicks / shown | random log-ratio vs slot 1 (95% CI) |"
              " bts raw log-ratio | learned on bts, per seed | learned on random, per seed |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for slot in sorted(result["counts"]["random"]):
        random_clicks, random_shown = result["counts"]["random"][slot]
        bts_clicks, bts_shown = result["counts"]["bts"][slot]
        if slot == 1:
            random_ratio = bts_ratio = "0 (reference)"
        else:
            r = result["log_ratios"]["random"][slot]
            random_ratio = f"{r['value']:+.3f} ({r['low']:+.3f}, {r['high']:+.3f})"
            bts_ratio = f"{result['log_ratios']['bts'][slot]['value']:+.3f}"
        per_policy = []
        for policy in ("bts", "random"):
            values = [
                next(b["learned"] for b in run["bias"] if b["position"] == slot)
                for run in result["runs"][policy]
            ]
            per_policy.append(", ".join(f"{v:+.3f}" for v in values))
        lines.append(
            f"| {slot} | {random_clicks} / {random_shown} | {bts_clicks} / {bts_shown} | {random_ratio} | "
            f"{bts_ratio} | {per_policy[0]} | {per_policy[1]} |"
        )
    return lines + [""]


# ---------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/position-bias"), help="Output folder.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds.")
    # One thread: on a busy 2-core machine, two threads made one epoch of the simulated log take
    # about 68 s, against about 2 s with one.
    parser.add_argument("--threads", type=int, default=1, help="Torch intra-op threads per run.")
    parser.add_argument(
        "--item-error", type=float, default=DEFAULT_ITEM_ERROR, help="Per-item logging error (logit sd)."
    )
    parser.add_argument(
        "--items", type=int, default=SIMULATION["num_items"], help="Items in the synthetic logs."
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="Learning rate of experiments 1-4; default the example's."
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ["MTRANK_DATA_DIR"]) if os.environ.get("MTRANK_DATA_DIR") else None,
        help="Folder of the real datasets; default $MTRANK_DATA_DIR.",
    )
    parser.add_argument("--img-dir", type=Path, default=REPOSITORY / "docs" / "img", help="Where plots go.")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*COMPARISONS, "open_bandit"],
        help="Run only these experiments.",
    )
    return parser.parse_args()


def main() -> None:
    # Progress lines of this script only; each run's full mtrank log is in its run directory.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.img_dir.mkdir(parents=True, exist_ok=True)
    chosen = set(args.only or [*COMPARISONS, "open_bandit"])
    started = time.perf_counter()
    load_start = os.getloadavg()

    results: dict[str, Any] = {
        "seeds": args.seeds,
        "item_error": args.item_error,
        "lr": args.lr,
        "experiments": {},
    }
    SIMULATION["num_items"] = args.items
    results["num_items"] = args.items
    logs = write_simulated_logs(args.out / "logs", args.data_dir, args.item_error)
    for scenario, example in COMPARISONS.items():
        if scenario in chosen and scenario in logs:
            results["experiments"][scenario] = run_comparison(
                scenario, example, logs[scenario], args, args.img_dir
            )
    obd = (args.data_dir / "open-bandit-dataset") if args.data_dir else None
    if "open_bandit" in chosen and obd is not None and obd.is_dir():
        results["experiments"]["open_bandit"] = run_open_bandit(obd, args)

    results["seconds"] = round(time.perf_counter() - started, 1)
    results["load_average"] = {"start": load_start, "end": os.getloadavg()}
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
    lines = [f"Total {results['seconds']:.0f} s; load average (1, 5, 15 min) at start {load_start}, "
             f"at end {results['load_average']['end']}.", ""]  # fmt: skip
    for scenario, result in results["experiments"].items():
        lines += (
            open_bandit_markdown(result)
            if scenario == "open_bandit"
            else comparison_markdown(scenario, result)
        )
    (args.out / "results.md").write_text("\n".join(lines), encoding="utf-8")
    logger.info(
        "wrote %s and %s in %.0f s", args.out / "results.json", args.out / "results.md", results["seconds"]
    )


if __name__ == "__main__":
    main()
