"""Compare the table, hashing-trick and Deep Hash Embedding (DHE) kinds on KuaiRand and Census-Income.

Every variant trains the same MMoE ranker end to end through ``mtrank.training.run.train_run`` on
the same split, with the same run seeds, and changes only the embedding kind of the ID features:

- KuaiRand explicit-feedback subset (``examples/kuairand.yaml``): ``user_id`` and ``video_id`` change
  kind and every other feature stays as in the example. The date split (train up to 2022-04-18) puts
  videos first seen after the training days in the test split. For those rows the script reports the
  AUC next to the table's out-of-vocabulary fallback, embeds the unseen ids and counts distinct rows.
- Census-Income KDD (``examples/census.yaml``): all 33 categorical fields change kind.

Variants: the full table; the hashing trick with one hash function into a quarter and a sixteenth of
each feature's vocabulary (at least one bucket); DHE with k hash functions, m = 10**6 buckets, the
uniform encoding and one hidden layer of H units with batch normalization and Mish. On KuaiRand, H is
chosen for each k so that the two DHE modules together hold about a fifth of the table's parameters.
A Census field has 4 to 54 table ids, at most 432 table parameters at D = 8, which is fewer than any
DHE decoder has, so no DHE there is smaller than the table.

Reported per run: test AUC of each binary task (MSE for regressions), the parameters of the changed
embeddings, and training throughput (the median over epochs of training rows per second, evaluation
excluded). The script replaces its section of ``docs/benchmarks.md`` and draws AUC against embedding
parameters to ``docs/img/embeddings_auc_vs_params.png``. ``--results`` also saves every measurement as
JSON, and ``--render`` rebuilds the section and the plot from such a file without training.

Example:
    MTRANK_DATA_DIR=/path/to/data python benchmarks/embeddings.py --seeds 2024 2025
    python benchmarks/embeddings.py --datasets kuairand --seeds 2024 --epochs 1 --no-write   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from mtrank.config.loader import parse_config
from mtrank.data.encoders import OOV_ID
from mtrank.models.builder import build_ranker
from mtrank.training.evaluation import predict
from mtrank.training.metrics import binary_auc
from mtrank.training.run import RunResult, load_run, train_run

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_DOC = REPOSITORY / "docs" / "benchmarks.md"
DEFAULT_PLOT = REPOSITORY / "docs" / "img" / "embeddings_auc_vs_params.png"
SECTION_HEADING = "## Embedding kinds: table, hash and DHE"

# The DHE paper's claim that the benchmark checks: about the table's AUC at a quarter of its size
# (Kang et al., KDD 2021, arXiv:2010.10784, Figure 1 caption). 0.005 AUC is this benchmark's reading of
# "about the same".
TARGET_AUC_GAP = 0.005
TARGET_PARAMETER_SHARE = 0.25
# Buckets per hash function in DHE, the paper's m = 10**6 (also mtrank's default).
DHE_BUCKETS = 1_000_000


@dataclass(frozen=True)
class Variant:
    """One embedding setting applied to every changed feature of a dataset.

    Attributes:
        label: short name in tables and the plot, such as ``hash m=V/4``.
        kind: ``table``, ``hash`` or ``dhe``.
        bucket_divisor: for ``hash``, each feature gets ``max(1, V // bucket_divisor)`` buckets.
        num_hashes: for ``dhe``, k.
        hidden: for ``dhe``, the decoder's hidden widths.
    """

    label: str
    kind: Literal["table", "hash", "dhe"]
    bucket_divisor: int = 1
    num_hashes: int = 0
    hidden: tuple[int, ...] = ()

    def options(self, vocab_size: int, seed: int) -> dict[str, Any]:
        """Return the ``embedding.options`` of a feature with ``vocab_size`` table ids."""
        if self.kind == "hash":
            return {"num_buckets": max(1, vocab_size // self.bucket_divisor), "num_hashes": 1, "seed": seed}
        if self.kind == "dhe":
            return {
                "num_hashes": self.num_hashes,
                "num_buckets": DHE_BUCKETS,
                "hidden": list(self.hidden),
                "seed": seed,
            }
        return {}


@dataclass(frozen=True)
class DatasetSpec:
    """A real dataset, the example config it trains with, and the variants compared on it.

    Attributes:
        name: ``kuairand`` or ``census``.
        config_path: the example run config.
        id_features: the categorical features whose kind changes; empty means all of them.
        unseen_feature: the feature whose unseen test ids are analysed, or ``None``.
        variants: the settings compared.
        epochs: training epochs in place of the example's, or ``None`` to keep them.
    """

    name: str
    config_path: Path
    id_features: tuple[str, ...]
    unseen_feature: str | None
    variants: tuple[Variant, ...]
    epochs: int | None = None


TABLE = Variant("table", "table")
HASH_QUARTER = Variant("hash m=V/4", "hash", bucket_divisor=4)
HASH_SIXTEENTH = Variant("hash m=V/16", "hash", bucket_divisor=16)

# KuaiRand: the hidden width of each k keeps one DHE module near 13,000 parameters, so user_id and
# video_id together stay near 20% of their 128,624-parameter tables (665 and 7,374 ids, D = 16).
KUAIRAND = DatasetSpec(
    name="kuairand",
    config_path=REPOSITORY / "examples" / "kuairand.yaml",
    id_features=("user_id", "video_id"),
    unseen_feature="video_id",
    variants=(
        TABLE,
        HASH_QUARTER,
        HASH_SIXTEENTH,
        Variant("dhe k=64 H=160", "dhe", num_hashes=64, hidden=(160,)),
        Variant("dhe k=256 H=48", "dhe", num_hashes=256, hidden=(48,)),
        Variant("dhe k=1024 H=12", "dhe", num_hashes=1024, hidden=(12,)),
    ),
)

# Census: 567 table ids over 33 fields (D = 8) make a 4,536-parameter table. The smallest DHE below
# (k = 64, H = 16) already has 1,208 parameters per field. Four epochs instead of the example's eight
# keep the whole benchmark near 15 minutes on 2 cores: a DHE epoch over 33 fields took about 25 s.
CENSUS = DatasetSpec(
    name="census",
    config_path=REPOSITORY / "examples" / "census.yaml",
    id_features=(),
    unseen_feature=None,
    variants=(
        TABLE,
        HASH_QUARTER,
        HASH_SIXTEENTH,
        Variant("dhe k=64 H=16", "dhe", num_hashes=64, hidden=(16,)),
    ),
    epochs=4,
)

DATASETS = {spec.name: spec for spec in (KUAIRAND, CENSUS)}


@dataclass
class RunRecord:
    """Measurements of one variant on one seed."""

    dataset: str
    variant: str
    kind: str
    seed: int
    embedding_parameters: int
    model_parameters: int
    test_metrics: dict[str, float]
    train_samples_per_s: float
    epochs_run: int
    best_epoch: int
    wall_s: float
    load_average_start: float
    load_average_end: float
    embedding_options: dict[str, dict[str, Any]]
    regression_tasks: list[str] = field(default_factory=list)
    unseen: dict[str, Any] = field(default_factory=dict)


def vocabulary_sizes(spec: DatasetSpec) -> dict[str, int]:
    """Fit the table encoders of ``spec``'s example config and return each changed feature's V."""
    from mtrank.data.pipeline import prepare_data

    config = parse_config(load_raw_config(spec.config_path), str(spec.config_path))
    sizes = prepare_data(config).encoders.vocabulary_sizes()
    names = spec.id_features or tuple(sizes)
    return {name: int(sizes[name] or 0) for name in names}


def load_raw_config(path: Path) -> dict[str, Any]:
    """Read a YAML run config as a plain mapping."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def variant_config(
    spec: DatasetSpec,
    variant: Variant,
    seed: int,
    sizes: dict[str, int],
    epochs: int | None,
) -> dict[str, Any]:
    """Return ``spec``'s example config with ``variant`` applied to its changed features.

    The data split keeps the example's seed, so every run trains and tests on the same rows. ``seed``
    sets the run seed (initialisation, batch order, dropout) and the hash coefficients.
    """
    raw = copy.deepcopy(load_raw_config(spec.config_path))
    raw["seed"] = seed
    if epochs is not None or spec.epochs is not None:
        raw["training"]["epochs"] = epochs if epochs is not None else spec.epochs
    for feature in raw["features"]:
        if feature["name"] not in sizes:
            continue
        embedding = dict(feature.get("embedding") or {})
        embedding["kind"] = variant.kind
        embedding["options"] = variant.options(sizes[feature["name"]], seed)
        feature["embedding"] = embedding
    return raw


def analyse_unseen(result: RunResult, feature: str) -> dict[str, Any]:
    """Measure the test rows whose ``feature`` value never occurs in the training split.

    The reloaded artifact (``load_run``) scores them, and its predictions are compared bitwise with
    those of the in-memory model. Unseen ids are embedded one per distinct value to count distinct
    embedding rows: the table maps them all to its OOV id, the hashing kinds keep raw ids. For the
    table, the trained OOV row is compared with its initial value, rebuilt the way ``train_run``
    builds the model (``torch.manual_seed(config.seed)`` then ``build_ranker``).
    """
    column = list(result.data.encoders.categorical).index(feature)
    train_ids = result.data.train.batch.categorical[:, column].numpy()
    test_ids = result.data.test.batch.categorical[:, column].numpy()
    embedding = result.model.embeddings[feature]
    if getattr(embedding, "needs_vocabulary", True):
        unseen_rows = test_ids == OOV_ID
    else:
        unseen_rows = ~np.isin(test_ids, train_ids)
    index = np.flatnonzero(unseen_rows)
    seen_index = np.flatnonzero(~unseen_rows)

    loaded = load_run(result.run_dir)
    tasks = list(loaded.config.tasks)
    loss_kinds = [t.loss or "bce" for t in tasks]
    unseen_data = result.data.test.take(index)
    seen_data = result.data.test.take(seen_index)
    reloaded_predictions = predict(loaded.model, unseen_data, loss_kinds)  # type: ignore[arg-type]
    memory_predictions = predict(result.model, unseen_data, loss_kinds)
    seen_predictions = predict(loaded.model, seen_data, loss_kinds)  # type: ignore[arg-type]

    labels = unseen_data.batch.labels.numpy()  # type: ignore[union-attr]
    seen_labels = seen_data.batch.labels.numpy()  # type: ignore[union-attr]
    unseen_auc: dict[str, float] = {}
    seen_auc: dict[str, float] = {}
    for position, task in enumerate(tasks):
        if task.type != "binary":
            continue
        unseen_auc[task.name] = binary_auc(labels[:, position], reloaded_predictions[:, position])
        seen_auc[task.name] = binary_auc(seen_labels[:, position], seen_predictions[:, position])

    # Distinct model inputs of the unseen rows: raw ids for the hashing kinds, the OOV id for the table.
    distinct_ids = torch.unique(torch.from_numpy(test_ids[index]))  # (U,)
    with torch.no_grad():
        rows = loaded.model.embeddings[feature](distinct_ids)  # (U, D)
    oov_row_unchanged = None
    if getattr(embedding, "needs_vocabulary", True):
        torch.manual_seed(loaded.config.seed)
        initial = build_ranker(loaded.config, loaded.encoders)
        oov_row_unchanged = bool(
            torch.equal(initial.embeddings[feature].weight[OOV_ID], embedding.weight[OOV_ID])
        )
    return {
        "oov_row_unchanged": oov_row_unchanged,
        "test_rows": int(len(test_ids)),
        "unseen_rows": int(len(index)),
        "distinct_inputs": int(distinct_ids.numel()),
        "distinct_embedding_rows": int(torch.unique(rows, dim=0).shape[0]),
        "unseen_auc": unseen_auc,
        "seen_auc": seen_auc,
        "reload_bitwise_equal": bool(np.array_equal(reloaded_predictions, memory_predictions)),
    }


def run_variant(
    spec: DatasetSpec,
    variant: Variant,
    seed: int,
    sizes: dict[str, int],
    epochs: int | None,
    run_dir: Path,
) -> RunRecord:
    """Train and evaluate one variant on one seed and collect its measurements."""
    raw = variant_config(spec, variant, seed, sizes, epochs)
    config = parse_config(raw, f"{spec.name}/{variant.label}")
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    result = train_run(config, run_dir)
    wall = time.perf_counter() - started
    load_end = os.getloadavg()[0]

    changed = list(sizes)
    embedding_parameters = sum(
        parameter.numel() for name in changed for parameter in result.model.embeddings[name].parameters()
    )
    metrics: dict[str, float] = {}
    for task in config.tasks:
        values = result.test_metrics[task.name]
        metrics[task.name] = values["auc"] if task.type == "binary" else values["mse"]
    metrics["mean_auc"] = result.test_metrics["mean"]["auc"]
    record = RunRecord(
        dataset=spec.name,
        variant=variant.label,
        kind=variant.kind,
        seed=seed,
        embedding_parameters=embedding_parameters,
        model_parameters=sum(parameter.numel() for parameter in result.model.parameters()),
        test_metrics=metrics,
        train_samples_per_s=statistics.median(epoch.samples_per_second for epoch in result.fit.history),
        epochs_run=len(result.fit.history),
        best_epoch=result.fit.best_epoch,
        wall_s=wall,
        load_average_start=load_start,
        load_average_end=load_end,
        embedding_options={name: variant.options(sizes[name], seed) for name in changed},
        regression_tasks=[task.name for task in config.tasks if task.type == "regression"],
    )
    if spec.unseen_feature is not None:
        record.unseen = analyse_unseen(result, spec.unseen_feature)
    return record


# ----------------------------------------------------------------------------------------------------
# summary and report


@dataclass
class VariantSummary:
    """The runs of one variant on one dataset, reduced over seeds."""

    dataset: str
    variant: str
    kind: str
    embedding_parameters: int
    table_share: float
    metrics: dict[str, float]
    spreads: dict[str, float]
    train_samples_per_s: float
    runs: list[RunRecord]


def summarise(records: Sequence[RunRecord]) -> list[VariantSummary]:
    """Average each variant's metrics over seeds; the spread is half the range across seeds."""
    summaries = []
    keys = list(dict.fromkeys((r.dataset, r.variant) for r in records))
    table_parameters = {r.dataset: r.embedding_parameters for r in records if r.kind == "table"}
    for dataset, variant in keys:
        runs = [r for r in records if r.dataset == dataset and r.variant == variant]
        metrics: dict[str, float] = {}
        spreads: dict[str, float] = {}
        for name in runs[0].test_metrics:
            values = [r.test_metrics[name] for r in runs]
            metrics[name] = float(np.mean(values))
            spreads[name] = (max(values) - min(values)) / 2
        parameters = runs[0].embedding_parameters
        summaries.append(
            VariantSummary(
                dataset=dataset,
                variant=variant,
                kind=runs[0].kind,
                embedding_parameters=parameters,
                table_share=parameters / table_parameters.get(dataset, math.nan),
                metrics=metrics,
                spreads=spreads,
                train_samples_per_s=statistics.median(r.train_samples_per_s for r in runs),
                runs=runs,
            )
        )
    return summaries


def format_metric(value: float, spread: float, num_seeds: int) -> str:
    """Format a mean with its half-range when more than one seed ran."""
    if num_seeds > 1:
        return f"{value:.4f} ± {spread:.4f}"
    return f"{value:.4f}"


def results_table(summaries: Sequence[VariantSummary], dataset: str) -> list[str]:
    """Return the markdown table of one dataset's variants."""
    rows = [s for s in summaries if s.dataset == dataset]
    table = next((s for s in rows if s.kind == "table"), None)
    metric_names = [name for name in rows[0].metrics if name != "mean_auc"]
    regression = set(rows[0].runs[0].regression_tasks)
    headers = ["variant", "embedding params", "share of table"]
    headers += [f"{name} {'MSE' if name in regression else 'AUC'}" for name in metric_names]
    headers += ["mean AUC", "mean AUC - table", "train samples/s"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for summary in rows:
        seeds = len(summary.runs)
        cells = [summary.variant, f"{summary.embedding_parameters:,}", f"{summary.table_share:.1%}"]
        cells += [format_metric(summary.metrics[n], summary.spreads[n], seeds) for n in metric_names]
        cells.append(format_metric(summary.metrics["mean_auc"], summary.spreads["mean_auc"], seeds))
        gap = summary.metrics["mean_auc"] - table.metrics["mean_auc"] if table else math.nan
        cells.append(f"{gap:+.4f}")
        cells.append(f"{summary.train_samples_per_s:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def unseen_table(summaries: Sequence[VariantSummary], dataset: str) -> list[str]:
    """Return the markdown table of AUC on test rows whose id the training split never contained."""
    rows = [s for s in summaries if s.dataset == dataset and s.runs[0].unseen]
    if not rows:
        return []
    tasks = list(rows[0].runs[0].unseen["unseen_auc"])
    headers = ["variant", "unseen rows", "distinct inputs", "distinct embedding rows"]
    headers += [f"{task} AUC unseen" for task in tasks]
    headers += ["mean AUC unseen", "mean AUC seen", "reload bitwise equal"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for summary in rows:
        runs = summary.runs
        seeds = len(runs)
        first = runs[0].unseen
        cells = [summary.variant, f"{first['unseen_rows']:,} of {first['test_rows']:,}"]
        cells.append(" / ".join(f"{r.unseen['distinct_inputs']:,}" for r in runs))
        cells.append(" / ".join(f"{r.unseen['distinct_embedding_rows']:,}" for r in runs))
        for task in tasks:
            values = [r.unseen["unseen_auc"][task] for r in runs]
            cells.append(format_metric(float(np.mean(values)), (max(values) - min(values)) / 2, seeds))
        for key in ("unseen_auc", "seen_auc"):
            means = [float(np.mean(list(r.unseen[key].values()))) for r in runs]
            cells.append(format_metric(float(np.mean(means)), (max(means) - min(means)) / 2, seeds))
        cells.append("yes" if all(r.unseen["reload_bitwise_equal"] for r in runs) else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def target_lines(summaries: Sequence[VariantSummary]) -> list[str]:
    """State for every DHE variant whether its seed means meet the paper's target against the table.

    The verdict reads the mean AUC over binary tasks; each line also gives every task's AUC difference,
    because a kind can trade one task against another.
    """
    lines = []
    for summary in summaries:
        if summary.kind != "dhe":
            continue
        table = next(s for s in summaries if s.dataset == summary.dataset and s.kind == "table")
        gap = table.metrics["mean_auc"] - summary.metrics["mean_auc"]
        close = gap <= TARGET_AUC_GAP
        small = summary.table_share <= TARGET_PARAMETER_SHARE
        reasons = []
        if not close:
            reasons.append(f"mean AUC {gap:.4f} below the table's")
        if not small:
            reasons.append(f"{summary.table_share:.0%} of the table's parameters")
        verdict = "met on mean AUC" if close and small else f"not met ({'; '.join(reasons)})"
        binary_tasks = [
            name
            for name in summary.metrics
            if name != "mean_auc" and name not in summary.runs[0].regression_tasks
        ]
        per_task = ", ".join(
            f"{name} {summary.metrics[name] - table.metrics[name]:+.4f}" for name in binary_tasks
        )
        lines += bullet(
            f"{summary.dataset}, {summary.variant}: {verdict}. Mean AUC {summary.metrics['mean_auc']:.4f} "
            f"against {table.metrics['mean_auc']:.4f}, {summary.embedding_parameters:,} against "
            f"{table.embedding_parameters:,} embedding parameters. AUC minus the table's, per task: "
            f"{per_task}."
        )
    return lines


def run_lines(records: Sequence[RunRecord]) -> list[str]:
    """Return one line per run with every measured value."""
    lines = []
    for record in records:
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in record.test_metrics.items())
        lines.append(
            f"- {record.dataset} / {record.variant} / seed {record.seed}: {metrics}; "
            f"{record.embedding_parameters:,} embedding and {record.model_parameters:,} model parameters; "
            f"{record.train_samples_per_s:,.0f} train samples/s; {record.epochs_run} epochs, best "
            f"{record.best_epoch}; {record.wall_s:.0f} s; load average {record.load_average_start:.1f} "
            f"to {record.load_average_end:.1f}"
        )
    return lines


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


# Width of the generated prose in docs/benchmarks.md; tables and the command line stay on one line.
TEXT_WIDTH = 100


def paragraph(text: str) -> list[str]:
    """Wrap one paragraph of prose to :data:`TEXT_WIDTH` columns."""
    return textwrap.wrap(text, TEXT_WIDTH, break_on_hyphens=False, break_long_words=False)


def bullet(text: str) -> list[str]:
    """Wrap one markdown list item, continuation lines indented by two spaces."""
    return textwrap.wrap(
        text,
        TEXT_WIDTH,
        initial_indent="- ",
        subsequent_indent="  ",
        break_on_hyphens=False,
        break_long_words=False,
    )


def machine_description(threads: int) -> str:
    """Describe the CPU, torch version and thread count of this process."""
    return (
        f"{os.cpu_count()}-core CPU ({cpu_model()}), torch {torch.__version__}, "
        f"torch.set_num_threads({threads}), no GPU"
    )


def discussion_lines(summaries: Sequence[VariantSummary], records: Sequence[RunRecord]) -> list[str]:
    """Return the findings that follow from the measured numbers, as wrapped list items."""
    lines = []
    for dataset in dict.fromkeys(s.dataset for s in summaries):
        rows = [s for s in summaries if s.dataset == dataset]
        table = next(s for s in rows if s.kind == "table")
        runs = [r for r in records if r.dataset == dataset]
        num_seeds = len(table.runs)
        if num_seeds > 1:
            lines += bullet(
                f"{dataset}: the table's mean AUC differs by {2 * table.spreads['mean_auc']:.4f} between "
                f"its {num_seeds} seeds, against the target's gap of {TARGET_AUC_GAP}. {num_seeds} seeds "
                "do not resolve differences between kinds that are smaller than that range."
            )
        last_epoch_best = sum(r.best_epoch == r.epochs_run for r in runs)
        if last_epoch_best:
            lines += bullet(
                f"{dataset}: in {last_epoch_best} of {len(runs)} runs the best validation epoch was the "
                "last one trained. Those models were still improving when training stopped, so longer "
                "training could change the order of the kinds."
            )
        ratios = []
        for summary in rows:
            if summary.kind == "table":
                continue
            per_seed = [
                run.train_samples_per_s / base.train_samples_per_s
                for run in summary.runs
                for base in table.runs
                if base.seed == run.seed
            ]
            ratios.append(f"{summary.variant} {min(per_seed):.2f} to {max(per_seed):.2f}")
        lines += bullet(
            f"{dataset}: training samples/s relative to the table of the same seed: "
            + ", ".join(ratios)
            + "."
        )
        if dataset == "kuairand":
            lines += kuairand_size_lines(rows, len(runs[0].embedding_options))
        lines += unseen_finding(rows)
    return lines


def unseen_finding(rows: Sequence[VariantSummary]) -> list[str]:
    """Compare the kinds' mean AUC on test rows with unseen ids, if the dataset has that analysis."""
    if not rows[0].runs[0].unseen:
        return []

    def unseen_auc(summary: VariantSummary) -> float:
        return float(np.mean([np.mean(list(r.unseen["unseen_auc"].values())) for r in summary.runs]))

    table = next(s for s in rows if s.kind == "table")
    by_kind = {kind: [unseen_auc(s) for s in rows if s.kind == kind] for kind in ("hash", "dhe")}
    hash_runs = [r for s in rows if s.kind == "hash" for r in s.runs]
    hash_rows = [r.unseen["distinct_embedding_rows"] for r in hash_runs]
    num_unseen = hash_runs[0].unseen["distinct_inputs"]
    return bullet(
        f"{rows[0].dataset}: on the test rows with unseen videos, the DHE variants reach a mean AUC of "
        f"{min(by_kind['dhe']):.4f} to {max(by_kind['dhe']):.4f} against {unseen_auc(table):.4f} for the "
        f"table's untrained OOV row. The hashing trick reaches {min(by_kind['hash']):.4f} to "
        f"{max(by_kind['hash']):.4f}. It gives the {num_unseen:,} unseen videos {min(hash_rows):,} to "
        f"{max(hash_rows):,} distinct rows, but each row is a bucket that, on average, 4 or 16 training "
        "videos share."
    )


def kuairand_size_lines(rows: Sequence[VariantSummary], num_features: int) -> list[str]:
    """Compare the size of one KuaiRand DHE module with the ``user_id`` and ``video_id`` tables."""
    dhe_sizes = [s.embedding_parameters // num_features for s in rows if s.kind == "dhe"]
    if not dhe_sizes:
        return []
    return bullet(
        f"kuairand: one DHE module above has {min(dhe_sizes):,} to {max(dhe_sizes):,} parameters. That is "
        "more than the 10,640 of the `user_id` table (665 ids at D = 16) and far fewer than the 117,984 of "
        "the `video_id` table (7,374 ids), so the whole saving comes from `video_id`."
    )


def section_text(
    args: argparse.Namespace,
    records: Sequence[RunRecord],
    sizes: dict[str, dict[str, int]],
    run_info: dict[str, str],
    plot_path: Path | None,
) -> str:
    """Write the benchmark's section of ``docs/benchmarks.md``.

    Args:
        args: the command line (seeds and threads of the measured run).
        records: every run.
        sizes: dataset -> changed feature -> table ids.
        run_info: ``command``, ``date`` and ``machine`` of the measured run, and ``render_command``
            when the section is rebuilt from saved results.
        plot_path: the PNG to link, or ``None``.
    """
    summaries = summarise(records)
    seeds = ", ".join(str(seed) for seed in args.seeds)
    lines = [SECTION_HEADING, ""]
    lines += paragraph(
        "Test AUC, embedding parameters and training throughput of the three embedding kinds. Each variant "
        "trains end to end through `train_run` with the example config's ranker. Only the embedding kind "
        "of the ID features changes between variants: the split, the other features, the model and the "
        "training settings stay as in the example, and every variant runs on the same seeds."
    )
    lines += ["", f"- Command: `{run_info['command']}`"]
    if "render_command" in run_info:
        lines.append(f"- Section and plot written from its results by: `{run_info['render_command']}`")
    lines.append(f"- Date: {run_info['date']}")
    lines += bullet(
        f"Machine: {run_info['machine']}. Other jobs shared the 2 cores: the 1-minute load average of each "
        "run is listed at the end, and throughput moved with it between seeds. Compare samples/s between "
        "kinds of the same seed, not with other benchmarks. One torch thread, because with two threads on "
        "the busy cores one epoch of the KuaiRand table model took 37 to 64 s against 1.7 to 2.3 s with "
        "one."
    )
    lines += bullet(
        f"Seeds: {seeds}. The seed sets the initialisation, batch order, dropout and hash coefficients. "
        "The data split keeps the example's seed, so every run trains and tests on the same rows."
    )
    lines += bullet(
        "Hash: one hash function into `max(1, V // 4)` or `max(1, V // 16)` buckets per feature, where V "
        "counts the feature's table ids (padding and OOV included)."
    )
    lines += bullet(
        f"DHE: k hash functions into m = {DHE_BUCKETS:,} buckets, uniform encoding, one hidden layer of H "
        "units with batch normalization and Mish, then a linear layer to D."
    )
    lines += bullet(
        "Embedding params: parameters of the changed embeddings only. DHE batch-norm running statistics "
        "are buffers and are not counted. Train samples/s: median over epochs of training rows per "
        "second, evaluation excluded, then the median over seeds."
    )
    lines += bullet("AUC and MSE: means over seeds, ± half the range across seeds.")
    lines.append("")
    for dataset in dict.fromkeys(r.dataset for r in records):
        lines += dataset_lines(summaries, records, sizes[dataset], dataset)
    lines += ["### Target: DHE within 0.005 AUC of the table with at most a quarter of its parameters", ""]
    lines += target_lines(summaries)
    lines += ["", "### Findings", "", *discussion_lines(summaries, records)]
    for finding in STATIC_FINDINGS:
        lines += bullet(finding)
    lines.append("")
    if plot_path is not None:
        relative = os.path.relpath(plot_path, DEFAULT_DOC.parent)
        lines += [f"![Mean test AUC against embedding parameters]({relative})", ""]
    lines += ["Every run:", ""]
    for line in run_lines(records):
        lines += bullet(line[2:])
    lines.append("")
    return "\n".join(lines)


def dataset_lines(
    summaries: Sequence[VariantSummary],
    records: Sequence[RunRecord],
    sizes: dict[str, int],
    dataset: str,
) -> list[str]:
    """Return one dataset's subsection: its setting, its results table and the unseen-id table."""
    config_name = DATASETS[dataset].config_path.relative_to(REPOSITORY)
    described = ", ".join(f"`{name}` {size:,}" for name, size in sizes.items())
    epochs = max(r.epochs_run for r in records if r.dataset == dataset)
    if dataset == "kuairand":
        lines = ["### KuaiRand explicit-feedback subset", ""]
        lines += paragraph(
            f"`{config_name}`: MMoE with 4 experts and early stopping on validation mean AUC. It trains on "
            "2022-04-08 to 2022-04-18, with 10% of those rows held out for validation, and tests on "
            f"2022-04-19 to 2022-04-21. Changed features and their table ids: {described}, embedding dim "
            "16. The other 27 categorical features keep their 8-dim tables."
        )
    else:
        lines = ["### Census-Income (KDD)", ""]
        lines += paragraph(
            f"`{config_name}`: MMoE with 8 experts, tasks income > 50K and never married, random 70/10/20 "
            f"split, trained for {epochs} epochs instead of the example's 8 to keep the benchmark near 15 "
            f"minutes. All {len(sizes)} categorical fields change kind. Together they have "
            f"{sum(sizes.values()):,} table ids ({min(sizes.values())} to {max(sizes.values())} per "
            "field), embedding dim 8."
        )
    lines += ["", *results_table(summaries, dataset), ""]
    unseen = unseen_table(summaries, dataset)
    if unseen:
        lines += [*unseen_intro(summaries, dataset), "", *unseen, ""]
    return lines


# Findings that follow from the parameter arithmetic and the datasets, not from one run's numbers.
STATIC_FINDINGS = [
    "A DHE module has `k*H + H*D` weights plus `3H + D` biases and batch-norm scales, whatever the "
    "vocabulary, and a table has `V*D`. DHE saves parameters only where `V*D` exceeds its decoder. The "
    "example in Kang et al.'s Figure 1 embeds 2 million ids at D = 32. The KuaiRand subset has 664 users "
    "and 9,359 videos, and the DHE paper's gains come from vocabularies far larger than that.",
    "Census fields have 4 to 54 table ids, so a field's table has at most 432 parameters at D = 8. The "
    "smallest decoder run here (k = 64, H = 16) has 1,208 parameters per field, so no DHE on Census "
    "meets the quarter budget: on vocabularies this small the table is the smaller model.",
    "DHE trades compute for memory: every id is hashed k times and passed through the decoder at every "
    "step, where a table does one gather.",
]


def unseen_intro(summaries: Sequence[VariantSummary], dataset: str) -> list[str]:
    """Return the paragraph above the unseen-id table, with the OOV-row check of the table runs."""
    checks = [
        r.unseen["oov_row_unchanged"]
        for s in summaries
        if s.dataset == dataset and s.kind == "table"
        for r in s.runs
    ]
    if all(checks):
        oov_state = f"after training it equals its random initial value in all {len(checks)} table runs"
    else:
        oov_state = (
            f"yet it differs from its initial value in {checks.count(False)} of {len(checks)} table runs"
        )
    return paragraph(
        "Test rows whose `video_id` never occurs in the training split (the 10% validation rows are not "
        "part of it). The table maps these videos to its OOV id. Every training value is in the "
        f"vocabulary, so the OOV row never gets a gradient: {oov_state}. The hashing kinds embed the raw id "
        "instead. The model reloaded from its run directory with `load_run` scored these rows, and "
        "`reload bitwise equal` says whether its predictions equal the in-memory model's bit for bit. "
        "`distinct inputs` counts the distinct ids the embedding received for these rows and `distinct "
        "embedding rows` the distinct vectors it returned, one value per seed. `mean AUC seen` is the "
        "same model on the other test rows."
    )


def plot_results(records: Sequence[RunRecord], path: Path) -> None:
    """Draw mean test AUC against embedding parameters, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = summarise(records)
    datasets = list(dict.fromkeys(r.dataset for r in records))
    colors = {"table": "black", "hash": "tab:orange", "dhe": "tab:blue"}
    titles = {
        "kuairand": "KuaiRand subset: user_id and video_id",
        "census": "Census-Income: 33 categorical fields",
    }
    figure, axes = plt.subplots(1, len(datasets), figsize=(6.0 * len(datasets), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        rows = [s for s in summaries if s.dataset == dataset]
        table = next(s for s in rows if s.kind == "table")
        for summary in rows:
            color = colors[summary.kind]
            for run in summary.runs:  # one small dot per seed
                axis.scatter(
                    run.embedding_parameters, run.test_metrics["mean_auc"], color=color, s=12, alpha=0.5
                )
            axis.scatter(
                summary.embedding_parameters, summary.metrics["mean_auc"], color=color, s=60, marker="D"
            )
            axis.annotate(
                summary.variant,
                (summary.embedding_parameters, summary.metrics["mean_auc"]),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
        band = table.metrics["mean_auc"] - TARGET_AUC_GAP
        axis.axhline(band, color="gray", linestyle="--", linewidth=1, label="table AUC - 0.005")
        axis.axvline(
            TARGET_PARAMETER_SHARE * table.embedding_parameters,
            color="gray",
            linestyle=":",
            linewidth=1,
            label="1/4 of the table's parameters",
        )
        axis.set_xscale("log")
        axis.set_xlabel("embedding parameters of the changed features")
        axis.set_ylabel("mean test AUC over binary tasks")
        axis.set_title(titles.get(dataset, dataset))
        axis.scatter([], [], color="gray", s=12, alpha=0.5, label="one seed")
        axis.scatter([], [], color="gray", s=60, marker="D", label="mean over seeds")
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (or append it), keeping every other section."""
    existing = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = existing.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION_HEADING), None)
    if start is None:
        updated = existing.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before = "\n".join(lines[:start]).rstrip("\n")
        after = "\n".join(lines[end:])
        updated = before + "\n\n" + text + ("\n" + after if after else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated.rstrip("\n") + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=sorted(DATASETS),
        default=["kuairand", "census"],
        help="datasets to run",
    )

    parser.add_argument("--seeds", nargs="+", type=int, default=[2024], help="run seeds (default 2024)")
    parser.add_argument(
        "--variants", nargs="+", help="variant labels to run (default all), e.g. table 'dhe k=64 H=160'"
    )
    parser.add_argument("--epochs", type=int, help="override the example configs' training epochs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a 2-core machine shared with other jobs, 2 threads "
        "made one KuaiRand epoch take 37 to 64 s against 1.7 to 2.3 s with 1 thread, torch 2.13 CPU)",
    )

    parser.add_argument("--output", type=Path, default=DEFAULT_DOC, help="markdown file to update")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG of AUC against parameters")
    parser.add_argument("--results", type=Path, help="also write every run's measurements to this JSON file")
    parser.add_argument("--keep-runs", type=Path, help="keep the run directories under this folder")
    parser.add_argument("--no-write", action="store_true", help="print the section without writing files")
    parser.add_argument(
        "--render",
        type=Path,
        help="skip training: rebuild the section and plot from a --results file of an earlier run",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run every selected variant on every seed and dataset, then report."""
    args = parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text(encoding="utf-8"))
        records = [RunRecord(**record) for record in saved["records"]]
        args.threads, args.seeds = saved["threads"], saved["seeds"]
        run_info = dict(saved["run_info"])
        render_command = "python benchmarks/embeddings.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        run_info["render_command"] = render_command.strip()
        report(args, records, saved["sizes"], run_info)
        return
    torch.set_num_threads(args.threads)
    runs_root = args.keep_runs or Path(tempfile.mkdtemp(prefix="mtrank-embeddings-"))
    records = []
    sizes: dict[str, dict[str, int]] = {}
    started = time.perf_counter()
    try:
        for name in args.datasets:
            spec = DATASETS[name]
            sizes[name] = vocabulary_sizes(spec)
            variants = [v for v in spec.variants if not args.variants or v.label in args.variants]
            for seed in args.seeds:
                for variant in variants:
                    run_dir = runs_root / name / f"{variant.label.replace(' ', '_')}_seed{seed}"
                    record = run_variant(spec, variant, seed, sizes[name], args.epochs, run_dir)
                    records.append(record)
                    print(run_lines([record])[0], flush=True)
    finally:
        if args.keep_runs is None:
            shutil.rmtree(runs_root, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)

    command = "python benchmarks/embeddings.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run_info = {
        "command": command.strip(),
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(args.threads),
    }
    if args.results is not None:
        saved = {
            "run_info": run_info,
            "threads": args.threads,
            "seeds": args.seeds,
            "sizes": sizes,
            "records": [asdict(record) for record in records],
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(saved, indent=1), encoding="utf-8")
    report(args, records, sizes, run_info)


def report(
    args: argparse.Namespace,
    records: Sequence[RunRecord],
    sizes: dict[str, dict[str, int]],
    run_info: dict[str, str],
) -> None:
    """Print the section and, unless ``--no-write``, write it and the plot."""
    plot_path = None if args.no_write else args.plot
    text = section_text(args, records, sizes, run_info, plot_path)
    print()
    print(text)
    if not args.no_write:
        plot_results(records, args.plot)
        write_section(args.output, text)
        print(f"wrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
