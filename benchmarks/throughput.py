"""Training and inference throughput and peak memory of mtrank's MMoE against two peers.

The three systems train the same MMoE (same embedding width, experts, expert and tower hidden sizes,
optimizer and learning rate) on the same synthetic Census-like data, each in its own subprocess:

- ``mtrank``: ``build_ranker`` + ``Trainer.train_epoch`` for training, ``predict`` for inference.
- ``hand-written``: a plain PyTorch MMoE and loop over pre-built tensors, the floor that any library
  adds its overhead to.
- ``torch-rechub``: torch-rechub's ``MMOE`` model, its ``DataGenerator`` data loaders and its
  ``MTLTrainer.train_one_epoch`` / ``MTLTrainer.predict``.

The parent process generates the data, encodes it once with mtrank's encoders (not timed) and stores
the encoded arrays in a temporary folder. Each system runs in its own worker subprocess, which loads
them, records its RSS and builds its model. The parent then has the workers warm up and take turns
at timed training epochs and inference passes over all rows. It reports the median samples/s and
each worker's peak RSS (``ru_maxrss``). Separate processes keep one system's allocations out of
another's peak, and taking turns spreads any background load over all systems alike.

Run from the repository root (torch-rechub installed with ``pip install --no-deps torch-rechub==0.9.0``
plus ``tqdm`` and ``pandas``, also with ``--no-deps``):

    python benchmarks/throughput.py                      # full size, writes docs/benchmarks.md
    python benchmarks/throughput.py --rows 20000 --no-write
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

SYSTEMS = ("mtrank", "hand-written", "torch-rechub")
SECTION_HEADING = "## MMoE training and inference throughput"
DEFAULT_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

# The categorical columns of the Census-Income (KDD) test split (99,762 rows) have 2 to 53 distinct
# values each. These 30 cardinalities follow that spread: most are small, a few are near 50.
CENSUS_LIKE_CARDINALITIES = (
    9, 52, 47, 17, 3, 24, 15, 5, 10, 2, 3, 6, 8, 6, 6, 51, 38, 8, 10, 9, 10, 3, 4, 7, 5, 43, 43, 43, 5, 3,
)  # fmt: skip
# Positive rates of the two synthetic tasks, those of the Census-Income (KDD) test split's labels
# income > 50K (6.2 %) and marital status "Never married" (43.2 %).
TASK_POSITIVE_RATES = (0.06, 0.43)
# Model sizes of examples/census.yaml: 8-dimensional embeddings (mtrank's default), 8 experts of one
# 64-unit layer, one 32-unit tower layer per task.
EMBEDDING_DIM = 8
NUM_EXPERTS = 8
EXPERT_HIDDEN = (64,)
TOWER_HIDDEN = (32,)
LEARNING_RATE = 1e-3
# Megabytes per kilobyte: Linux reports ru_maxrss in kilobytes.
KB_PER_MB = 1024.0
# A 1-minute load average above the worker's own threads plus this margin means other processes ran.
BUSY_LOAD_MARGIN = 0.5


# ----------------------------------------------------------------------------------------------------
# data


def make_table(rows: int, num_categorical: int, num_numeric: int, seed: int) -> Any:
    """Generate a Census-like table: skewed categorical codes, numeric columns and two binary labels.

    Each categorical field draws its codes with Zipf-like frequencies (probability of rank r
    proportional to ``1 / (r + 1)``). Labels come from a random logistic score over all fields,
    thresholded at the quantile that gives :data:`TASK_POSITIVE_RATES`, so they depend on the features.

    Args:
        rows: number of rows N.
        num_categorical: number of categorical columns ``c00``, ``c01``, ...
        num_numeric: number of numeric columns ``n00``, ``n01``, ...; every other one is log-normal.
        seed: seed of the generator.

    Returns:
        A ``pyarrow.Table`` with the feature columns and the label columns ``task_0`` and ``task_1``.
    """
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    scores = np.zeros((rows, len(TASK_POSITIVE_RATES)))
    for j in range(num_categorical):
        cardinality = CENSUS_LIKE_CARDINALITIES[j % len(CENSUS_LIKE_CARDINALITIES)]
        weights = 1.0 / np.arange(1, cardinality + 1)
        codes = rng.choice(cardinality, size=rows, p=weights / weights.sum())
        columns[f"c{j:02d}"] = codes.astype(np.int64)
        effects = rng.normal(0.0, 0.5, size=(cardinality, len(TASK_POSITIVE_RATES)))
        scores += effects[codes]
    for j in range(num_numeric):
        values = rng.lognormal(2.0, 1.5, size=rows) if j % 2 else rng.normal(40.0, 12.0, size=rows)
        columns[f"n{j:02d}"] = values.astype(np.float64)
        standardized = (values - values.mean()) / values.std()
        scores += np.outer(standardized, rng.normal(0.0, 0.3, size=len(TASK_POSITIVE_RATES)))
    scores += rng.logistic(size=scores.shape)
    for t, rate in enumerate(TASK_POSITIVE_RATES):
        threshold = np.quantile(scores[:, t], 1.0 - rate)
        columns[f"task_{t}"] = (scores[:, t] > threshold).astype(np.int64)
    return pa.table(columns)


def run_config_dict(
    data_path: Path,
    num_categorical: int,
    num_numeric: int,
    batch_size: int,
    eval_batch_size: int,
    threads: int,
) -> dict[str, Any]:
    """Return the mtrank run config (as read from YAML) for the synthetic table."""
    features: list[dict[str, Any]] = [
        {"name": f"c{j:02d}", "type": "categorical", "embedding": {"dim": EMBEDDING_DIM}}
        for j in range(num_categorical)
    ]
    features += [
        {"name": f"n{j:02d}", "type": "numeric", "transform": "log1p" if j % 2 else "none"}
        for j in range(num_numeric)
    ]
    return {
        "name": "throughput-benchmark",
        "seed": 2024,
        "data": {"path": str(data_path), "format": "parquet"},
        "features": features,
        "tasks": [
            {"name": f"task_{t}", "type": "binary", "label": {"column": f"task_{t}"}}
            for t in range(len(TASK_POSITIVE_RATES))
        ],
        "model": {
            "backbone": {"kind": "mmoe", "num_experts": NUM_EXPERTS, "expert_hidden": list(EXPERT_HIDDEN)},
            "tower": {"hidden": list(TOWER_HIDDEN)},
            "activation": "relu",
        },
        "training": {
            "optimizer": "adam",
            "lr": LEARNING_RATE,
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "epochs": 1,
            "early_stopping": None,
            "balancer": {"name": "fixed"},
            "num_threads": threads,
        },
    }


def prepare_inputs(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Generate the data, encode it with mtrank's encoders and store the arrays in ``folder``.

    Every row is both trained on and scored, so N is ``args.rows`` for training and inference.

    Returns:
        A summary: rows, fields, tasks and the vocabulary sizes (padding and OOV ids included).
    """
    import pyarrow.parquet as pq

    from mtrank.config import parse_config
    from mtrank.data.pipeline import FeatureEncoders, read_source

    table = make_table(args.rows, args.categorical_fields, args.numeric_fields, args.seed)
    data_path = folder / "synthetic.parquet"
    pq.write_table(table, data_path)
    raw = run_config_dict(
        data_path,
        args.categorical_fields,
        args.numeric_fields,
        args.batch_size,
        args.eval_batch_size,
        args.threads,
    )
    config = parse_config(raw)
    encoders = FeatureEncoders.from_config(config)
    loaded = read_source(config.data, config.data.path, encoders.input_columns() + encoders.label_columns())
    encoders.fit(loaded)
    encoded = encoders.encode(loaded)
    batch = encoded.batch
    assert batch.labels is not None  # encoded with labels above
    np.save(folder / "categorical.npy", batch.categorical.numpy())
    np.save(folder / "numeric.npy", batch.numeric.numpy())
    np.save(folder / "labels.npy", batch.labels.numpy())
    encoders.save(folder / "encoders.json")
    (folder / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    sizes = [size for size in encoders.vocabulary_sizes().values() if size is not None]
    summary = {
        "rows": len(encoded),
        "categorical_fields": int(batch.categorical.shape[1]),
        "numeric_fields": int(batch.numeric.shape[1]),
        "tasks": int(batch.labels.shape[1]),
        "vocabulary_sizes": sizes,
        "positive_rates": [float(rate) for rate in batch.labels.mean(dim=0)],
    }
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return summary


# ----------------------------------------------------------------------------------------------------
# measurement helpers (run inside a worker)


def current_rss_mb() -> float:
    """Return the resident set size of this process now, from ``/proc/self/statm``."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)


def peak_rss_mb() -> float:
    """Return the peak resident set size of this process so far (``ru_maxrss``, kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KB_PER_MB


def address_space_peak_mb() -> float:
    """Return ``VmHWM`` from ``/proc/self/status``: the peak RSS of this process since its last exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / KB_PER_MB
    return float("nan")


def load_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Load the encoded categorical ids, numeric values, labels and summary stored by the parent."""
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return (
        np.load(folder / "categorical.npy"),
        np.load(folder / "numeric.npy"),
        np.load(folder / "labels.npy"),
        summary,
    )


# ----------------------------------------------------------------------------------------------------
# the three systems. Each setup returns a dict: "baseline" (RSS in MB once the inputs are loaded),
# "train" and "infer" (callables taking a call counter), "model", "loss" (reads the last training
# loss) and "rows".


def setup_mtrank(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build mtrank's ranker and trainer over pre-built tensors (no file IO in the timed part)."""
    import torch

    from mtrank.config import parse_config
    from mtrank.data.pipeline import FeatureEncoders
    from mtrank.data.tensors import Batch, EncodedData
    from mtrank.models.builder import build_ranker
    from mtrank.training.evaluation import predict
    from mtrank.training.trainer import Trainer

    categorical, numeric, labels, _summary = load_arrays(folder)
    config = parse_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    encoders = FeatureEncoders.load(folder / "encoders.json")
    data = EncodedData(
        batch=Batch(
            categorical=torch.from_numpy(categorical),
            numeric=torch.from_numpy(numeric),
            labels=torch.from_numpy(labels),
        ),
        row_ids=np.arange(len(labels), dtype=np.int64),
    )
    baseline = current_rss_mb()
    model = build_ranker(config, encoders)
    trainer = Trainer(model, config)
    last: dict[str, float] = {}

    def train(epoch: int) -> None:
        last.update(trainer.train_epoch(data, epoch + 1))

    def infer(_call: int) -> None:
        predict(model, data, trainer.loss_kinds, config.training.eval_batch_size)

    return {
        "baseline": baseline,
        "train": train,
        "infer": infer,
        "model": model,
        "loss": lambda: last.get("loss/total", float("nan")),
        "rows": len(data),
    }


def build_hand_written_model(vocabulary_sizes: list[int], num_numeric: int, num_tasks: int) -> Any:
    """Return a plain PyTorch MMoE (an ``nn.Module``) with the benchmark's sizes."""
    import torch
    from torch import nn

    class HandWrittenMMoE(nn.Module):
        """Per-field embeddings -> E ReLU experts -> per-task softmax gates -> per-task towers.

        Shapes: B batch, Fc categorical fields, Fn numeric fields, E experts, H expert width, T tasks.
        """

        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.ModuleList(
                nn.Embedding(size, EMBEDDING_DIM, padding_idx=0) for size in vocabulary_sizes
            )
            in_dim = len(vocabulary_sizes) * EMBEDDING_DIM + num_numeric
            self.experts = nn.ModuleList(mlp(in_dim, EXPERT_HIDDEN) for _ in range(NUM_EXPERTS))
            self.gates = nn.ModuleList(nn.Linear(in_dim, NUM_EXPERTS) for _ in range(num_tasks))
            self.towers = nn.ModuleList(
                nn.Sequential(mlp(EXPERT_HIDDEN[-1], TOWER_HIDDEN), nn.Linear(TOWER_HIDDEN[-1], 1))
                for _ in range(num_tasks)
            )

        def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
            vectors = [emb(categorical[:, j]) for j, emb in enumerate(self.embeddings)]  # Fc x (B, D)
            x = torch.cat([*vectors, numeric], dim=1)  # (B, Fc * D + Fn)
            experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, E, H)
            logits = []
            for gate, tower in zip(self.gates, self.towers, strict=True):
                weights = torch.softmax(gate(x), dim=-1).unsqueeze(1)  # (B, 1, E)
                mixed = torch.bmm(weights, experts).squeeze(1)  # (B, 1, H) -> (B, H)
                logits.append(tower(mixed))  # (B, 1)
            return torch.cat(logits, dim=1)  # (B, T)

    def mlp(in_dim: int, hidden: tuple[int, ...]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(in_dim, size), nn.ReLU()]
            in_dim = size
        return nn.Sequential(*layers)

    return HandWrittenMMoE()


def setup_hand_written(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build the plain PyTorch MMoE and its minimal Adam loop over pre-built tensors."""
    import torch
    from torch.nn import functional as F

    categorical_np, numeric_np, labels_np, summary = load_arrays(folder)
    categorical = torch.from_numpy(categorical_np)
    numeric = torch.from_numpy(numeric_np)
    labels = torch.from_numpy(labels_np)
    rows = len(labels)
    baseline = current_rss_mb()
    model = build_hand_written_model(summary["vocabulary_sizes"], int(numeric.shape[1]), int(labels.shape[1]))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(args.seed)
    last: dict[str, float] = {}

    def train(_epoch: int) -> None:
        model.train()
        order = torch.randperm(rows, generator=generator)
        total = torch.zeros(())
        steps = 0
        for start in range(0, rows, args.batch_size):
            index = order[start : start + args.batch_size]
            logits = model(categorical[index], numeric[index])
            # Sum over tasks of each task's mean BCE, the objective of mtrank's fixed balancer.
            loss = F.binary_cross_entropy_with_logits(logits, labels[index], reduction="none").mean(0).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        last["loss"] = float(total) / steps

    @torch.no_grad()
    def infer(_call: int) -> None:
        model.eval()
        size = args.eval_batch_size
        parts = [
            torch.sigmoid(model(categorical[start : start + size], numeric[start : start + size]))
            for start in range(0, rows, size)
        ]
        torch.cat(parts).double().numpy()

    return {
        "baseline": baseline,
        "train": train,
        "infer": infer,
        "model": model,
        "loss": lambda: last.get("loss", float("nan")),
        "rows": rows,
    }


def setup_torch_rechub(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build torch-rechub's MMOE, its data loaders and its MTLTrainer with the benchmark's sizes.

    torch-rechub's ``MLP`` always puts ``BatchNorm1d`` and ``Dropout`` after each hidden linear layer,
    and its gates are such an MLP ending in softmax, so its model has batch norm in the experts, gates
    and towers. There is no option to turn that off; it is part of what is measured.
    """
    from torch.utils.data import DataLoader
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator, PredictDataset

    categorical, numeric, labels, summary = load_arrays(folder)
    rows = len(labels)
    num_tasks = int(labels.shape[1])
    features: list[Any] = [
        SparseFeature(f"c{j:02d}", vocab_size=size, embed_dim=EMBEDDING_DIM, padding_idx=0)
        for j, size in enumerate(summary["vocabulary_sizes"])
    ]
    features += [DenseFeature(f"n{j:02d}") for j in range(numeric.shape[1])]
    # torch-rechub reads one array per feature name, as its examples build from a DataFrame.
    columns = {f"c{j:02d}": np.ascontiguousarray(categorical[:, j]) for j in range(categorical.shape[1])}
    columns.update({f"n{j:02d}": np.ascontiguousarray(numeric[:, j]) for j in range(numeric.shape[1])})
    del categorical, numeric
    train_loader, _valid, _test = DataGenerator(columns, labels).generate_dataloader(
        x_val=columns, y_val=labels, x_test=columns, y_test=labels, batch_size=args.batch_size
    )
    predict_loader = DataLoader(PredictDataset(columns), batch_size=args.eval_batch_size, shuffle=False)
    baseline = current_rss_mb()
    task_types = ["classification"] * num_tasks
    model = MMOE(
        features,
        task_types,
        n_expert=NUM_EXPERTS,
        expert_params={"dims": list(EXPERT_HIDDEN), "activation": "relu"},
        tower_params_list=[{"dims": list(TOWER_HIDDEN), "activation": "relu"}] * num_tasks,
    )
    trainer = MTLTrainer(
        model,
        task_types,
        optimizer_params={"lr": LEARNING_RATE, "weight_decay": 0.0},
        device="cpu",
        model_path=str(folder),
    )
    last: dict[str, float] = {}

    def train(_epoch: int) -> None:
        # MTLTrainer averages the task losses; its per-task means are summed to match the others.
        last["loss"] = float(sum(trainer.train_one_epoch(train_loader)))

    def infer(_call: int) -> None:
        trainer.predict(model, predict_loader)

    return {
        "baseline": baseline,
        "train": train,
        "infer": infer,
        "model": model,
        "loss": lambda: last.get("loss", float("nan")),
        "rows": rows,
    }


SETUPS: dict[str, Callable[[Path, argparse.Namespace], dict[str, Any]]] = {
    "mtrank": setup_mtrank,
    "hand-written": setup_hand_written,
    "torch-rechub": setup_torch_rechub,
}


def run_worker(args: argparse.Namespace) -> None:
    """Serve one system's measurements: read commands from stdin, reply with one JSON line each.

    Commands: ``warmup`` (untimed training epochs and inference passes), ``train`` (time
    ``args.epochs`` epochs), ``infer`` (time one inference pass) and ``finish`` (report the last
    training loss and the peak RSS, then exit). Anything the system prints itself goes to stderr, so
    stdout carries only the replies.
    """
    import torch

    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    parts = SETUPS[args.worker](Path(args.data_dir), args)
    if args.profile:
        sys.stdout = sys.stderr
        profile_worker(parts, args)
        return
    rows = parts["rows"]
    calls = {"train": 0, "infer": 0}

    def timed(kind: str, units: int) -> dict[str, float]:
        load = os.getloadavg()[0]
        started = time.perf_counter()
        cpu_started = time.process_time()
        for _ in range(units):
            parts[kind](calls[kind])
            calls[kind] += 1
        cpu_seconds = time.process_time() - cpu_started
        rate = rows * units / (time.perf_counter() - started)
        return {"rate": rate, "cpu_rate": rows * units / max(cpu_seconds, 1e-9), "load": load}

    reply: dict[str, Any] = {
        "parameters": sum(p.numel() for p in parts["model"].parameters()),
        "baseline_rss_mb": parts["baseline"],
        "threads": torch.get_num_threads(),
    }
    replies.write(json.dumps(reply) + "\n")
    for line in sys.stdin:
        command = line.strip()
        if command == "warmup":
            for _ in range(args.warmup):
                timed("train", 1)
                timed("infer", 1)
            reply = {}
        elif command in ("train", "infer"):
            reply = timed(command, args.epochs if command == "train" else 1)
        elif command == "finish":
            final = {
                "loss": parts["loss"](),
                "peak_rss_mb": peak_rss_mb(),
                "vm_hwm_mb": address_space_peak_mb(),
            }
            replies.write(json.dumps(final) + "\n")
            return
        else:
            raise ValueError(f"unknown worker command {command!r}; expected warmup, train, infer or finish")
        replies.write(json.dumps(reply) + "\n")


def profile_worker(parts: dict[str, Any], args: argparse.Namespace) -> None:
    """Print cProfile's top functions for one training epoch and one inference pass (after warm-up)."""
    parts["train"](0)
    parts["infer"](0)
    for name in ("train", "infer"):
        profiler = cProfile.Profile()
        profiler.enable()
        parts[name](1)
        profiler.disable()
        print(f"--- {args.worker} {name}: top 25 functions by own time")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


# ----------------------------------------------------------------------------------------------------
# driver


class Worker:
    """The parent's handle on one system's worker subprocess.

    Args:
        system: one of :data:`SYSTEMS`.
        folder: the folder holding the encoded inputs; the worker's stderr goes to a log file there.
        args: the parsed command line, whose measurement flags the worker receives.
    """

    def __init__(self, system: str, folder: Path, args: argparse.Namespace) -> None:
        self.system = system
        self.log_path = folder / f"{system}.log"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            system,
            "--data-dir",
            str(folder),
            *passthrough_flags(args),
        ]
        self.log = self.log_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1
        )
        self.info = self.read()

    def read(self) -> dict[str, Any]:
        """Return the worker's next reply; raise with its log when it exited instead."""
        assert self.process.stdout is not None  # opened with stdout=PIPE
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.log.flush()
            tail = self.log_path.read_text(encoding="utf-8")[-3000:]
            raise RuntimeError(
                f"the {self.system} worker exited with code {code}; its log ends with:\n{tail}"
            )
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        """Send one command and return the reply."""
        assert self.process.stdin is not None  # opened with stdin=PIPE
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        """Stop the worker if it is still running and close its log."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def measure(systems: list[str], folder: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Start one worker per system and time them in turns, so that they share the machine's load.

    Each round times one training repeat of every system, then one inference pass of every system,
    with the order rotated by one system per round. Only one worker computes at any time.
    """
    workers: dict[str, Worker] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for system in systems:
            workers[system] = Worker(system, folder, args)
            results[system] = {**workers[system].info, "train": [], "infer": []}
        for system in systems:
            workers[system].ask("warmup")
            print(f"{system}: ready and warmed up", flush=True)
        for round_index in range(args.repeats):
            order = systems[round_index % len(systems) :] + systems[: round_index % len(systems)]
            for kind in ("train", "infer"):
                for system in order:
                    results[system][kind].append(workers[system].ask(kind))
            print(f"round {round_index + 1} of {args.repeats} done", flush=True)
        for system in systems:
            results[system].update(workers[system].ask("finish"))
    finally:
        for worker in workers.values():
            worker.close()
    return results


def data_flags(args: argparse.Namespace) -> list[str]:
    """Return the flags that size the synthetic data, as command-line arguments."""
    return [
        f"--rows={args.rows}",
        f"--categorical-fields={args.categorical_fields}",
        f"--numeric-fields={args.numeric_fields}",
    ]


def passthrough_flags(args: argparse.Namespace) -> list[str]:
    """Return the measurement flags a worker needs, as command-line arguments."""
    return [
        f"--batch-size={args.batch_size}",
        f"--eval-batch-size={args.eval_batch_size}",
        f"--epochs={args.epochs}",
        f"--repeats={args.repeats}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
        f"--seed={args.seed}",
    ]


def cpu_model() -> str:
    """Return ``lscpu``'s model name, or the processor string when ``lscpu`` is unavailable."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def package_versions() -> dict[str, str]:
    """Return the versions of the packages that take part, ``missing`` where not installed."""
    versions = {"python": platform.python_version()}
    for name in ("mtrank", "torch", "torch-rechub", "numpy", "pandas", "tqdm", "pyarrow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def ratio(numerator: float, denominator: float | None) -> str:
    """Format ``numerator / denominator`` as ``1.23x``, or ``-`` when there is no denominator."""
    return f"{numerator / denominator:.2f}x" if denominator else "-"


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Render the results as a markdown table, one row per system."""
    train = {name: median_rate(result["train"]) for name, result in results.items()}
    infer = {name: median_rate(result["infer"]) for name, result in results.items()}
    hand_train = train.get("hand-written")
    rechub_train = train.get("torch-rechub")
    rechub_infer = infer.get("torch-rechub")
    lines = [
        "| system | train samples/s | train vs hand-written | train vs torch-rechub | inference samples/s "
        "| inference vs torch-rechub | peak RSS MB | peak RSS over inputs MB | parameters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {train[name]:,.0f} | {ratio(train[name], hand_train)} | "
            f"{ratio(train[name], rechub_train)} | {infer[name]:,.0f} | {ratio(infer[name], rechub_infer)} | "
            f"{result['peak_rss_mb']:,.0f} | {result['peak_rss_mb'] - result['baseline_rss_mb']:,.0f} | "
            f"{result['parameters']:,} |"
        )
    return "\n".join(lines)


def median_rate(timings: list[dict[str, float]]) -> float:
    """Return the median samples/s of a system's timed repeats."""
    return statistics.median(timing["rate"] for timing in timings)


def iterate_runs(results: dict[str, dict[str, Any]]) -> Iterator[str]:
    """Yield one line per system with every timed rate, the CPU-time rates and the last training loss."""
    for name, result in results.items():
        train = ", ".join(f"{t['rate']:,.0f}" for t in result["train"])
        infer = ", ".join(f"{t['rate']:,.0f}" for t in result["infer"])
        train_cpu = statistics.median(t["cpu_rate"] for t in result["train"])
        infer_cpu = statistics.median(t["cpu_rate"] for t in result["infer"])
        yield (
            f"- {name}: train [{train}], inference [{infer}] samples/s. Median per CPU-second of the "
            f"process: train {train_cpu:,.0f}, inference {infer_cpu:,.0f}. Peak RSS since exec (VmHWM): "
            f"{result['vm_hwm_mb']:,.0f} MB. Mean training loss of the last epoch: {result['loss']:.4f}."
        )


def load_note(results: dict[str, dict[str, Any]], threads: int) -> list[str]:
    """Describe the machine's load during the timed calls, with a warning when other work was running."""
    loads = [t["load"] for result in results.values() for t in result["train"] + result["infer"]]
    lines = [
        f"- Load: the 1-minute load average was {min(loads):.1f} to {max(loads):.1f} just before the timed "
        f"calls, on {os.cpu_count()} cores. The measured worker itself adds up to {threads}."
    ]
    if max(loads) > threads + BUSY_LOAD_MARGIN:
        lines.append(
            "- Warning: other processes were running during this run, so single repeats can be slow. "
            "The median of the rounds and the list of repeats below show how much."
        )
        if threads > 1:
            lines.append(
                "  With several threads, contention slows tensor code (mtrank, hand-written) far more than "
                "torch-rechub's single-threaded per-row data loading, which understates the ratios against "
                "torch-rechub."
            )
    return lines


def section_intro() -> list[str]:
    """Return the section heading and the description shared by every run of this benchmark."""
    return [
        SECTION_HEADING,
        "",
        "Training and inference throughput (samples/s) and peak memory of the same MMoE in mtrank, in",
        "a minimal hand-written PyTorch loop over pre-built tensors, and in torch-rechub (its `MMOE`",
        "model, `DataGenerator` data loaders and `MTLTrainer`), written by `benchmarks/throughput.py`.",
        "Each thread count has its own subsection, replaced when the benchmark runs again with it.",
        "",
        "mtrank and the hand-written loop batch by slicing or gathering pre-built tensors. torch-rechub's",
        "dataset returns one dict of numpy scalars per row, which PyTorch's default collate turns into",
        "tensors, so its data loading runs Python per row and per feature on one thread. In cProfile",
        "(`--profile`, 20,000 rows), that loading took about half of a training epoch and three quarters",
        "of an inference pass. Its share grows with the thread count, because only the tensor work gets",
        "faster with more threads, so the ratios against torch-rechub are higher with 2 threads than 1.",
        "",
    ]


def run_text(
    args: argparse.Namespace,
    summary: dict[str, Any],
    results: dict[str, dict[str, Any]],
    command: str,
) -> str:
    """Write the subsection of ``docs/benchmarks.md`` for this run's thread count."""
    versions = package_versions()
    version_line = ", ".join(f"{name} {version}" for name, version in versions.items())
    sizes = summary["vocabulary_sizes"]
    rates = ", ".join(f"{rate:.2f}" for rate in summary["positive_rates"])
    machine = f"{os.cpu_count()}-core CPU ({cpu_model()}), torch.set_num_threads({args.threads}), no GPU"
    data = (
        f"synthetic Census-like table of {summary['rows']:,} rows: {summary['categorical_fields']} "
        f"categorical fields ({min(sizes)} to {max(sizes)} ids each, padding and OOV ids included), "
        f"{summary['numeric_fields']} numeric fields, {summary['tasks']} binary tasks (positive rates "
        f"{rates}). Every row is trained on and scored."
    )
    model = (
        f"embedding dim {EMBEDDING_DIM}, {NUM_EXPERTS} experts with hidden sizes {list(EXPERT_HIDDEN)}, "
        f"one tower per task with hidden sizes {list(TOWER_HIDDEN)}, ReLU, Adam with lr {LEARNING_RATE}, "
        f"training batch {args.batch_size}, inference batch {args.eval_batch_size}. torch-rechub's MLP "
        "always adds BatchNorm1d after each hidden layer (experts, gates and towers), hence its larger "
        "parameter count."
    )
    method = (
        f"each system runs in its own subprocess. After {args.warmup} untimed warm-up epoch(s) and "
        f"inference pass(es), the systems take turns for {args.repeats} rounds: in each round every system "
        f"trains {args.epochs} epoch(s), then every system scores all rows once, so that background load "
        "hits them alike. The table shows the median of the rounds. Data generation and encoding are not "
        "timed. Peak RSS is `ru_maxrss` of the subprocess, and the column after it subtracts the RSS "
        "measured once the inputs were loaded, before the model was built."
    )
    return "\n".join(
        [
            subsection_heading(args.threads),
            "",
            f"- Command: `{command}`",
            f"- Date: {datetime.date.today().isoformat()}",
            f"- Machine: {machine}",
            f"- Versions: {version_line}",
            f"- Data: {data}",
            f"- Model: {model}",
            f"- Method: {method}",
            *load_note(results, args.threads),
            "",
            results_table(results),
            "",
            "Every timed repeat:",
            "",
            *iterate_runs(results),
            "",
        ]
    )


def subsection_heading(threads: int) -> str:
    """Return the heading of the subsection for one thread count."""
    return f"### torch.set_num_threads({threads})"


def write_section(path: Path, heading: str, text: str) -> None:
    """Put ``text`` into this benchmark's section of ``path`` under its ``heading``.

    The subsection with that heading is replaced, or appended to the section, and the section's
    intro is rewritten. The section is created at the end of the file when missing. Every other
    section and subsection is kept.
    """
    existing = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = existing.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION_HEADING), None)
    if start is None:
        lines = [*lines, ""]
        start = len(lines)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    first_subsection = next((i for i in range(start + 1, end) if lines[i].startswith("### ")), end)
    # The intro is rewritten on every run so that it matches this script.
    section = [*section_intro(), *lines[first_subsection:end]]
    sub_start = next((i for i, line in enumerate(section) if line.strip() == heading), None)
    new_lines = text.rstrip("\n").splitlines()
    if sub_start is None:
        section = [*trim_blank_end(section), "", *new_lines]
    else:
        sub_end = next(
            (i for i in range(sub_start + 1, len(section)) if section[i].startswith(("### ", "## "))),
            len(section),
        )
        section = [*trim_blank_end(section[:sub_start]), "", *new_lines, "", *section[sub_end:]]
    after = lines[end:]
    updated = [*trim_blank_end(lines[:start]), "", *trim_blank_end(section)]
    if after:
        updated += ["", *after]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(trim_blank_end(updated)) + "\n", encoding="utf-8")


def trim_blank_end(lines: list[str]) -> list[str]:
    """Return ``lines`` without trailing blank lines."""
    end = len(lines)
    while end and not lines[end - 1].strip():
        end -= 1
    return lines[:end]


def positive_int(text: str) -> int:
    """Parse a command-line value that must be an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=positive_int, default=200_000, help="rows of synthetic data (default 200000)"
    )
    parser.add_argument(
        "--categorical-fields", type=positive_int, default=30, help="categorical fields (default 30)"
    )
    parser.add_argument("--numeric-fields", type=positive_int, default=7, help="numeric fields (default 7)")

    parser.add_argument(
        "--batch-size", type=positive_int, default=1024, help="training batch size (default 1024)"
    )
    parser.add_argument(
        "--eval-batch-size",
        type=positive_int,
        default=8192,
        help="inference batch size, mtrank's default (8192)",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=1, help="training epochs per timed repeat (default 1)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="timed repeats; the median is reported (default 3)"
    )
    parser.add_argument(
        "--warmup",
        type=positive_int,
        default=1,
        help="untimed warm-up epochs and inference passes (default 1)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="torch intra-op threads for every system (default 2)"
    )
    parser.add_argument(
        "--seed", type=positive_int, default=2024, help="seed of the data and the models (default 2024)"
    )

    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_DOC, help="markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print the table without updating --output")
    parser.add_argument(
        "--profile", action="store_true", help="print cProfile hot spots of each system instead of timing"
    )

    # Internal modes: the parent starts the data preparation and each worker with these.
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)

    args = parser.parse_args(argv)
    unknown = sorted(set(args.systems.split(",")) - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Prepare the data, run every selected system in its own subprocess and report the results."""
    args = parse_args(argv)
    if args.prepare:
        prepare_inputs(args, Path(args.data_dir))
        return
    if args.worker:
        run_worker(args)
        return
    systems = [name for name in SYSTEMS if name in args.systems.split(",")]
    with tempfile.TemporaryDirectory(prefix="mtrank-throughput-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        # Linux carries a process's peak RSS over fork and exec into the child's ru_maxrss. This parent
        # therefore never imports torch, pyarrow or mtrank, and a child prepares the data, because the
        # parent's RSS would otherwise become every worker's peak.
        prepare = [sys.executable, str(Path(__file__).resolve()), "--prepare", "--data-dir", str(folder)]
        subprocess.run([*prepare, *data_flags(args), *passthrough_flags(args)], check=True)
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        print(f"data: {summary['rows']:,} rows encoded in {time.perf_counter() - started:.1f} s", flush=True)
        if args.profile:
            for system in systems:
                command = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--profile"]
                command += ["--data-dir", str(folder), *passthrough_flags(args)]
                subprocess.run(command, check=True)
            return
        results = measure(systems, folder, args)
        print(f"measured in {time.perf_counter() - started:.0f} s", flush=True)
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = run_text(args, summary, results, command.strip())
    print()
    print(text)
    if not args.no_write:
        write_section(args.output, subsection_heading(args.threads), text)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
