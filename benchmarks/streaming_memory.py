"""Peak memory of one training epoch over a Parquet log: streamed by row group against read into memory.

For each size in ``--rows``, the parent process writes a synthetic Parquet log of that many rows and
20 columns (10 categorical, 8 numeric, 2 binary labels) with row groups of ``--row-group-rows`` rows,
plus a small test file. Then one worker subprocess per mode prepares the data from the same run
config and runs one epoch:

- ``memory``: :func:`mtrank.data.pipeline.prepare_data` reads the log into one table, fits the
  encoders and encodes every row; the epoch iterates shuffled batches over the encoded tensors.
- ``streaming``: :func:`mtrank.data.streaming.prepare_streaming_data` scans the log once to fit
  the encoders; the epoch reads, encodes and shuffles the rows again through the shuffle buffer.

With ``--train`` each batch also takes a training step of a small MMoE (forward, backward, Adam).
Each worker reports its peak RSS (``ru_maxrss``), the RSS after imports, and the seconds of the
preparation and of the epoch. Separate processes keep one mode's allocations out of the other's peak.

Run from the repository root:

    python benchmarks/streaming_memory.py                        # 1,000,000 and 5,000,000 rows, prints a table
    python benchmarks/streaming_memory.py --rows 200000          # quick check
    python benchmarks/streaming_memory.py --write-doc            # also replaces the section in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SECTION_HEADING = "## Streaming Parquet: peak memory of one epoch"
DEFAULT_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
MODES = ("memory", "streaming")

# Distinct values of the 10 categorical columns: two id-like columns with many values (users,
# items), the rest small like device, city or category fields.
CARDINALITIES = (200_000, 50_000, 1_000, 500, 100, 50, 20, 10, 5, 3)
# The first STRING_COLUMNS categorical columns are stored as text ("v0_123"), the others as int64,
# because logs contain both.
STRING_COLUMNS = 4
NUM_NUMERIC = 8
# Positive rates of the two binary labels.
POSITIVE_RATES = (0.05, 0.3)
# Rows generated and written per step, so the parent process never has the whole log in memory.
WRITE_CHUNK_ROWS = 250_000
TEST_ROWS = 50_000
# Megabytes per kilobyte: Linux reports ru_maxrss in kilobytes.
KB_PER_MB = 1024.0


# ----------------------------------------------------------------------------------------------------
# data


def make_chunk(rows: int, rng: np.random.Generator) -> Any:
    """Generate ``rows`` rows: Zipf-like categorical ids, normal numeric values and two labels."""
    import pyarrow as pa

    columns: dict[str, Any] = {}
    for index, cardinality in enumerate(CARDINALITIES):
        # Rank r has weight 1 / (r + 1), drawn by inverse transform of a log-uniform variable.
        ids = np.minimum(
            np.exp(rng.uniform(0, np.log(cardinality + 1), rows)).astype(np.int64) - 1, cardinality - 1
        )
        if index < STRING_COLUMNS:
            columns[f"cat{index}"] = pa.array(np.char.add(f"v{index}_", ids.astype(str)))
        else:
            columns[f"cat{index}"] = pa.array(ids)
    for index in range(NUM_NUMERIC):
        columns[f"num{index}"] = pa.array(rng.normal(index, 1.0 + index, rows))
    for index, rate in enumerate(POSITIVE_RATES):
        columns[f"label{index}"] = pa.array((rng.random(rows) < rate).astype(np.int64))
    return pa.table(columns)


def write_log(path: Path, rows: int, row_group_rows: int, seed: int) -> None:
    """Write ``rows`` synthetic rows to ``path`` as Parquet, chunk by chunk."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer = None
    written = 0
    while written < rows:
        chunk = make_chunk(min(WRITE_CHUNK_ROWS, rows - written), rng)
        if writer is None:
            writer = pq.ParquetWriter(path, chunk.schema)
        writer.write_table(chunk, row_group_size=row_group_rows)
        written += chunk.num_rows
    assert writer is not None  # rows >= 1
    writer.close()


def run_config(train: Path, test: Path, args: argparse.Namespace, *, streaming: bool) -> dict[str, Any]:
    """Return the raw run config both modes read; only ``data.streaming.enabled`` differs."""
    features: list[dict[str, Any]] = [
        {"name": f"cat{i}", "type": "categorical", "embedding": {"dim": 8}} for i in range(len(CARDINALITIES))
    ]
    features += [{"name": f"num{i}", "type": "numeric"} for i in range(NUM_NUMERIC)]
    return {
        "name": "streaming-memory",
        "seed": 2024,
        "data": {
            "path": str(train),
            "split": {"method": "files", "test_path": str(test), "valid_fraction": 0.0},
            "streaming": {
                "enabled": streaming,
                "read_rows": args.read_rows,
                "shuffle_buffer_rows": args.shuffle_buffer_rows,
            },
        },
        "features": features,
        "tasks": [
            {"name": f"label{i}", "type": "binary", "label": {"column": f"label{i}"}}
            for i in range(len(POSITIVE_RATES))
        ],
        "model": {
            "backbone": {"kind": "mmoe", "num_experts": 4, "expert_hidden": [32]},
            "tower": {"hidden": [16]},
        },
        "training": {"batch_size": args.batch_size, "epochs": 1, "early_stopping": None},
    }


# ----------------------------------------------------------------------------------------------------
# worker


def current_rss_mb() -> float:
    """Resident set size of this process now, from /proc (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(mode: str, config_path: Path, train: bool, threads: int) -> dict[str, Any]:
    """Prepare the data in ``mode``, run one epoch, and return the measurements."""
    import torch

    from mtrank.config import parse_config
    from mtrank.data.pipeline import prepare_data
    from mtrank.data.streaming import prepare_streaming_data
    from mtrank.data.tensors import Batch, iterate_batches

    torch.set_num_threads(threads)
    config = parse_config(json.loads(config_path.read_text(encoding="utf-8")))
    rss_imports = current_rss_mb()

    started = time.perf_counter()
    if mode == "memory":
        prepared: Any = prepare_data(config)
    else:
        prepared = prepare_streaming_data(config)
    prepare_seconds = time.perf_counter() - started
    rss_prepared = current_rss_mb()

    step = None
    if train:
        step = _training_step(config, prepared.encoders)
    started = time.perf_counter()
    batches: Any
    if mode == "memory":
        generator = torch.Generator().manual_seed(config.seed)
        batches = iterate_batches(
            prepared.train, config.training.batch_size, shuffle=True, generator=generator
        )
    else:
        batches = prepared.train.iter_batches(1)
    rows = 0
    checksum = 0
    batch: Batch
    for batch in batches:
        rows += len(batch)
        checksum += int(batch.categorical[:, 0].sum())
        if step is not None:
            step(batch)
    epoch_seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "train_rows": len(prepared.train),
        "epoch_rows": rows,
        "checksum": checksum,
        "prepare_seconds": prepare_seconds,
        "epoch_seconds": epoch_seconds,
        "rss_imports_mb": rss_imports,
        "rss_prepared_mb": rss_prepared,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KB_PER_MB,
    }


def _training_step(config: Any, encoders: Any) -> Any:
    """Return ``step(batch)``: one forward, backward and Adam step of the configured MMoE."""
    import torch

    from mtrank.models.builder import build_ranker
    from mtrank.training.losses import task_loss_list

    torch.manual_seed(config.seed)
    model = build_ranker(config, encoders)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.training.lr)
    kinds = [task.loss or "bce" for task in config.tasks]

    def step(batch: Any) -> None:
        losses = task_loss_list(model(batch).logits, batch.labels, kinds, batch.label_mask)
        optimizer.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()
        optimizer.step()

    return step


# ----------------------------------------------------------------------------------------------------
# report


def render(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    """Return the markdown section for ``docs/benchmarks.md``."""
    import pyarrow
    import torch

    sizes = ", ".join(
        f"{r['rows']:,} rows ({r['file_mb']:,.0f} MB)" for r in results if r["mode"] == MODES[0]
    )
    loads = [r["load_average"] for r in results]
    lines = [
        SECTION_HEADING,
        "",
        "Peak resident memory of one process that prepares a Parquet log and runs one epoch over its",
        "training rows, with the data read into memory (`prepare_data`) or streamed by row group",
        "(`data.streaming.enabled`), written by `benchmarks/streaming_memory.py`.",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
        f"{_total_memory_gb():.0f} GiB RAM, torch.set_num_threads({args.threads}), no GPU. The 1-minute "
        f"load average before each worker was {min(loads):.1f} to {max(loads):.1f}, because other jobs "
        "shared the cores, so the seconds are rough.",
        f"- Versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"pyarrow {pyarrow.__version__}, numpy {np.__version__}",
        f"- Data: Parquet logs of {sizes}, with row groups of {args.row_group_rows:,} rows. Each has "
        f"20 columns: 10 categorical columns with {', '.join(f'{c:,}' for c in CARDINALITIES)} possible "
        f"values (Zipf-like), the first {STRING_COLUMNS} stored as text and the others as int64, "
        f"{NUM_NUMERIC} float64 columns and 2 binary labels. A {TEST_ROWS:,}-row test file, no validation rows.",
        f"- Epoch: batches of {args.batch_size:,} shuffled rows"
        + (
            ", each a training step of an MMoE (4 experts of 32 units, 8-dim embeddings, Adam)."
            if args.train
            else ", iterated without a model."
        )
        + f" Streaming reads {args.read_rows:,} rows at a time through a shuffle buffer of "
        f"{args.shuffle_buffer_rows:,} rows.",
        "- Peak RSS is `ru_maxrss` of the worker process. The RSS after importing torch and mtrank is",
        "  listed too, so that the data's share can be read off.",
        "",
        "| rows | mode | peak RSS MB | RSS after imports MB | peak over imports MB | RSS after preparation MB | preparation s | epoch s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['mode']} | {r['peak_rss_mb']:,.0f} | {r['rss_imports_mb']:,.0f} | "
            f"{r['peak_rss_mb'] - r['rss_imports_mb']:,.0f} | {r['rss_prepared_mb']:,.0f} | "
            f"{r['prepare_seconds']:,.1f} | {r['epoch_seconds']:,.1f} |"
        )
    largest = max(r["rows"] for r in results)
    memory, streaming = (next(r for r in results if r["rows"] == largest and r["mode"] == m) for m in MODES)
    lines += [
        "",
        f"At {largest:,} rows, streaming used {streaming['peak_rss_mb'] - streaming['rss_imports_mb']:,.0f} MB "
        f"above the imports against {memory['peak_rss_mb'] - memory['rss_imports_mb']:,.0f} MB in memory. "
        f"Its epoch took {streaming['epoch_seconds']:,.1f} s against {memory['epoch_seconds']:,.1f} s, "
        "because it reads and encodes the log again instead of slicing tensors already in memory.",
        "",
    ]
    return "\n".join(lines)


def _total_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def write_section(doc: Path, section: str) -> None:
    """Replace the section under :data:`SECTION_HEADING` in ``doc``, or append it."""
    text = doc.read_text(encoding="utf-8")
    start = text.find(SECTION_HEADING)
    if start < 0:
        doc.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")
        return
    following = text.find("\n## ", start + len(SECTION_HEADING))
    end = len(text) if following < 0 else following + 1
    doc.write_text(text[:start] + section + ("\n" if following >= 0 else "") + text[end:], encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[1_000_000, 5_000_000],
        help="training rows of each log to measure",
    )
    parser.add_argument("--row-group-rows", type=int, default=262_144, help="rows per Parquet row group")
    parser.add_argument("--read-rows", type=int, default=65_536, help="data.streaming.read_rows")
    parser.add_argument(
        "--shuffle-buffer-rows", type=int, default=262_144, help="data.streaming.shuffle_buffer_rows"
    )
    parser.add_argument("--batch-size", type=int, default=4096, help="training batch size in rows")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each worker")
    parser.add_argument("--train", action="store_true", help="take a training step of an MMoE per batch")
    parser.add_argument(
        "--folder", type=Path, default=None, help="where to write the logs (default: a temporary folder)"
    )
    parser.add_argument("--write-doc", action="store_true", help=f"replace the section in {DEFAULT_DOC}")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.config, args.train, args.threads)))
        return

    command = "python benchmarks/streaming_memory.py " + " ".join(sys.argv[1:])
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(dir=args.folder) as folder:
            results += measure_log_size(Path(folder), rows, args)
    section = render(results, args, command)
    print(section)
    if args.write_doc:
        write_section(DEFAULT_DOC, section)


def measure_log_size(root: Path, rows: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Write a log of ``rows`` rows into ``root`` and return the measurements of one worker per mode."""
    train, test = root / "train.parquet", root / "test.parquet"
    started = time.perf_counter()
    write_log(train, rows, args.row_group_rows, seed=0)
    write_log(test, TEST_ROWS, args.row_group_rows, seed=1)
    file_mb = train.stat().st_size / 2**20
    print(
        f"wrote {rows:,} rows ({file_mb:,.0f} MB) in {time.perf_counter() - started:.1f} s", file=sys.stderr
    )
    results = []
    for mode in MODES:
        config_path = root / f"{mode}.json"
        config_path.write_text(json.dumps(run_config(train, test, args, streaming=mode == "streaming")))
        worker_args = [sys.executable, __file__, "--worker", mode, "--config", str(config_path)]
        worker_args += ["--threads", str(args.threads)] + (["--train"] if args.train else [])
        load_average = os.getloadavg()[0]
        output = subprocess.run(worker_args, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        result.update({"rows": rows, "file_mb": file_mb, "load_average": load_average})
        results.append(result)
        print(json.dumps(result), file=sys.stderr)
    # Both modes must have trained on the same rows with the same ids.
    if len({(r["epoch_rows"], r["checksum"]) for r in results}) != 1:
        raise SystemExit(f"the modes trained on different rows: {results}")
    return results


if __name__ == "__main__":
    main()
