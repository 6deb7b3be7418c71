"""The ``mtrank`` command line: the only layer that prints."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import typer
from pydantic import ValidationError
from rich.markup import escape

from mtrank.cli.console import RichProgress, console, metrics_table, setup_logging, stdout
from mtrank.errors import MtrankError

if TYPE_CHECKING:
    from mtrank.training.distributed import DeviceChoice

app = typer.Typer(
    name="mtrank",
    help="Multi-task ranking for recommender systems: train, evaluate, predict and fine-tune rankers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="List and fetch the public datasets the examples use.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

P = ParamSpec("P")
R = TypeVar("R")


def friendly_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn mtrank errors into one readable message and exit code 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except MtrankError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(code=2) from None
        except FloatingPointError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(code=2) from None
        except ValidationError as exc:
            # A command-line override (such as --epochs) failed the config's own validation.
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            console.print(
                f"[bold red]error:[/] invalid option value: {escape(problems)}", markup=True, highlight=False
            )
            raise typer.Exit(code=2) from None

    return wrapper


@app.callback()
def main_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
) -> None:
    # Under torchrun, ranks other than 0 log warnings only, so the terminal shows one progress log.
    rank = os.environ.get("RANK", "0")
    setup_logging(verbose, quiet or (rank.isdigit() and int(rank) > 0))


@app.command()
@friendly_errors
def train(
    config: Path = typer.Argument(..., help="YAML run config."),
    run_dir: Path | None = typer.Option(
        None, "--run-dir", "-o", help="Artifact directory; default runs/<config name>."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the latest checkpoint in the run directory."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in the run directory."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override training.epochs."),
    device: str = typer.Option(
        "auto",
        "--device",
        help="Under torchrun: auto (CUDA when available, per local rank), cpu or cuda. Without torchrun "
        "training runs on the CPU, and cuda is an error.",
    ),
) -> None:
    """Train a ranker from a YAML config and report per-task test metrics.

    Under torchrun (`torchrun --nproc-per-node N -m mtrank train CONFIG`) each process trains on its
    shard of every step; rank 0 writes the run directory and prints the results.
    """
    from mtrank.config import load_config
    from mtrank.errors import ConfigError
    from mtrank.training.distributed import is_main_process
    from mtrank.training.run import train_run

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError([f"--device must be auto, cpu or cuda, got {device!r}"], source="mtrank train")
    run_config = load_config(config)
    if epochs is not None:
        run_config.training.epochs = epochs
    target = run_dir or Path("runs") / run_config.name
    started = time.perf_counter()
    try:
        result = train_run(
            run_config,
            target,
            resume=resume,
            overwrite=overwrite,
            progress=RichProgress(),
            device=cast("DeviceChoice", device),
        )
    except KeyboardInterrupt:
        console.print(
            f"interrupted: checkpoints of finished epochs are in {target / 'checkpoints'}; continue with "
            f"`mtrank train {config} --run-dir {target} --resume`",
            highlight=False,
        )
        # 130 = 128 + SIGINT, the shell's exit status for a command stopped by Ctrl-C.
        raise typer.Exit(code=130) from None
    if is_main_process():
        stdout.print(metrics_table(f"test metrics ({run_config.name})", result.test_metrics))
        stdout.print(f"run directory: {target}  ({time.perf_counter() - started:.1f} s)")


@app.command()
@friendly_errors
def check(config: Path = typer.Argument(..., help="YAML run config.")) -> None:
    """Validate a run config and check its data files' columns, without reading rows or training."""
    from mtrank.config import load_config
    from mtrank.data.preflight import check_data_files
    from mtrank.errors import ConfigError

    if config.is_file() and config.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(config.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raw = None  # load_config reports the YAML error
        if isinstance(raw, dict) and "peft" in raw:
            raise ConfigError(
                [
                    f"{config} is a fine-tune config (it has `peft`); `mtrank check` takes run configs. "
                    "Check the base run's config, and `mtrank finetune BASE_RUN CONFIG` validates this one "
                    "before it trains"
                ],
                source=str(config),
            )
    run_config = load_config(config)
    report = check_data_files(run_config)
    for entry in report.files:
        stdout.print(f"{entry.role}: {entry.path} ({len(entry.columns)} columns)", soft_wrap=True)
    if report.problems:
        raise ConfigError(report.problems, source=str(config))
    stdout.print(
        f"{config}: valid; {len(run_config.features)} features, {len(run_config.tasks)} tasks, "
        "every needed column found",
        soft_wrap=True,
    )


@app.command()
@friendly_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    data: str | None = typer.Option(
        None, "--data", help="Labelled file to evaluate; default: the run's test split."
    ),
    out: Path | None = typer.Option(None, "--out", help="Also write the metrics as JSON here."),
    peft: str | None = typer.Option(
        None,
        "--peft",
        help="Load this PEFT set from `mtrank finetune`: a name under RUN/peft/ or a set folder.",
    ),
) -> None:
    """Evaluate a trained run on its test split or on another labelled file.

    With --peft and no --data, the test split is the fine-tune data's, encoded with the base encoders.
    """
    from mtrank.training.run import load_run
    from mtrank.training.unbiased import EvaluationReport, evaluate_artifact

    loaded = load_run(run_dir, peft=peft)
    if peft is not None and data is None:
        from mtrank.training.finetune import evaluate_finetune_split

        report = EvaluationReport(metrics=evaluate_finetune_split(loaded, "test"))
    else:
        report = evaluate_artifact(loaded, data)
    stdout.print(metrics_table(f"metrics ({data or 'test split'})", report.metrics))
    for table in report.tables():
        stdout.print(table)
    for path in report.files:
        stdout.print(f"wrote {path}")
    if out is not None:
        from mtrank.training.trainer import finite_json

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(finite_json(report.to_json()), indent=2), encoding="utf-8")
        stdout.print(f"wrote {out}")


@app.command()
@friendly_errors
def predict(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    data: str = typer.Option(..., "--data", help="File to score (CSV, TSV, gzip CSV or Parquet)."),
    out: Path = typer.Option(..., "--out", help="Output file: .csv or .parquet, one column per task."),
    batch_size: int = typer.Option(8192, min=1, help="Rows scored per batch."),
    peft: str | None = typer.Option(
        None,
        "--peft",
        help="Load this PEFT set from `mtrank finetune`: a name under RUN/peft/ or a set folder.",
    ),
) -> None:
    """Score a file with a trained run; the position column is never needed.

    With --peft, the set's new tasks are extra columns after the base tasks.
    """
    from mtrank.serving.scorer import Scorer

    scorer = Scorer.from_run(run_dir, peft=peft)
    rows = scorer.score_file(data, out, batch_size=batch_size)
    stdout.print(f"scored {rows} rows -> {out}")


@app.command()
@friendly_errors
def finetune(
    base_run: Path = typer.Argument(..., help="The finished base run directory."),
    config: Path = typer.Argument(..., help="YAML fine-tune config: data, tasks, PEFT settings, training."),
    method: str = typer.Option(..., "--method", help="PEFT method: adapter, prefix or lora."),
    name: str | None = typer.Option(
        None, "--name", help="Name of the PEFT set; default: the config's `name`."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for the set's files; default BASE_RUN/peft/NAME."
    ),
) -> None:
    """Fine-tune a trained run with a PEFT method; only the PEFT modules and new task towers are saved."""
    from mtrank.training.finetune import finetune as finetune_run
    from mtrank.training.finetune import load_finetune_config

    finetune_config = load_finetune_config(config)
    started = time.perf_counter()
    result = finetune_run(base_run, finetune_config, method, name=name, out_dir=out, progress=RichProgress())
    stdout.print(metrics_table(f"test metrics ({result.set_name}, {method})", result.test_metrics))
    counts = result.counts
    stdout.print(
        f"trained {counts.trainable:,} values, {counts.percent_of_base:.2f}% of the base's {counts.base:,}; "
        f"training {result.train_seconds:.1f} s"
    )
    stdout.print(f"PEFT set: {result.set_dir}  ({time.perf_counter() - started:.1f} s)")


@app.command()
@friendly_errors
def demo(
    run_dir: Path = typer.Option(Path("runs/demo-census"), "--run-dir", "-o", help="Artifact directory."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the preset's epochs."),
) -> None:
    """Train MMoE on Census-Income (KDD) with the MMoE paper's two tasks and print test AUC."""
    from mtrank.config.presets import census_config
    from mtrank.training.run import train_run

    config = census_config()
    if epochs is not None:
        config.training.epochs = epochs
    started = time.perf_counter()
    result = train_run(config, run_dir, progress=RichProgress())
    elapsed = time.perf_counter() - started
    stdout.print(metrics_table("Census-Income (KDD), MMoE, test split", result.test_metrics))
    stdout.print(
        f"income AUC {result.test_metrics['income']['auc']:.4f}, "
        f"never-married AUC {result.test_metrics['never_married']['auc']:.4f}, {elapsed:.1f} s; run directory: {run_dir}"
    )


# Defaults of `mtrank simulate` that differ from SimulationConfig's: 2,000 users keep about 100
# impressions per user at 20,000 requests, so user embeddings can learn something in a short run.
SIMULATE_DEFAULT_USERS = 2_000


@app.command()
@friendly_errors
def simulate(
    out: Path = typer.Option(..., "--out", help="Parquet file to write."),
    config_file: Path | None = typer.Option(
        None,
        "--config",
        help="YAML mapping of simulator settings (any SimulationConfig field, devices included); "
        "options given on the command line override it.",
    ),
    requests: int | None = typer.Option(None, help="Number of requests (lists). Default 20000."),
    list_size: int | None = typer.Option(None, help="Items per list (positions 1..K). Default 10."),
    users: int | None = typer.Option(None, help=f"Number of users. Default {SIMULATE_DEFAULT_USERS}."),
    items: int | None = typer.Option(None, help="Number of items. Default 5000."),
    logging_policy: str | None = typer.Option(
        None, help="noisy_relevance (default) or random (a uniformly shuffled, unbiased log)."
    ),
    logging_noise: float | None = typer.Option(
        None, help="Std of the logging policy's noise, fresh per impression. Default 1.0."
    ),
    logging_item_error: float | None = typer.Option(
        None,
        help="Std of the logging policy's persistent error per item (a previous ranker's mistakes). Default 0.",
    ),
    logging_duration_weight: float | None = typer.Option(
        None,
        help="With --kuairand: logit the logging policy adds per std of log duration (a duration bias). Default 0.",
    ),
    seed: int | None = typer.Option(None, help="Random seed. Default 0."),
    kuairand: Path | None = typer.Option(
        None,
        "--kuairand",
        help="Semi-synthetic mode: folder of the KuaiRand subset; real items and likes as relevance.",
    ),
) -> None:
    """Write a click log with known ground truth (position bias by device) as Parquet."""
    import yaml

    from mtrank.data import simulator
    from mtrank.errors import ConfigError

    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError([f"failed to read {config_file}: {exc}"], source=str(config_file)) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                [f"the file must hold a mapping of simulator settings, got {type(loaded).__name__}"],
                source=str(config_file),
            )
        values.update(loaded or {})
    cli_values = {
        "num_requests": requests,
        "list_size": list_size,
        "num_users": users,
        "num_items": items,
        "logging_policy": logging_policy,
        "logging_noise": logging_noise,
        "logging_item_error": logging_item_error,
        "logging_duration_weight": logging_duration_weight,
        "seed": seed,
    }
    if kuairand is not None:
        # The real log fixes these; silently ignoring them would mislead.
        fixed = {"num_requests": "--requests", "num_users": "--users", "num_items": "--items"}
        ignored = [flag for key, flag in fixed.items() if cli_values[key] is not None]
        unused = sorted(key for key in values if key not in simulator.KUAIRAND_SETTINGS)
        if unused:
            raise ConfigError(
                [
                    f"{', '.join(unused)} in {config_file} do not apply with --kuairand: the real KuaiRand "
                    f"log fixes them; the settings that apply are {', '.join(simulator.KUAIRAND_SETTINGS)}"
                ],
                source=str(config_file),
            )
        if ignored:
            raise ConfigError(
                [
                    f"{', '.join(ignored)} cannot be combined with --kuairand: the real KuaiRand log fixes "
                    "the users, the videos and the number of lists; drop these options"
                ],
                source="mtrank simulate",
            )
    values.update({key: value for key, value in cli_values.items() if value is not None})
    values.setdefault("num_users", SIMULATE_DEFAULT_USERS)
    if kuairand is not None and isinstance(values.get("list_size"), int):
        # num_items does not apply to the real log; keep its check (list_size <= num_items) out of the way
        # so that a list longer than any user's history gets the KuaiRand error instead.
        values["num_items"] = max(values["list_size"], simulator.SimulationConfig.num_items)
    if out.is_dir():
        raise ConfigError([f"--out {out} is a folder; give a file name such as {out / 'log.parquet'}"])
    if out.suffix.lower() != ".parquet":
        raise ConfigError([f"--out {out}: the log is written as Parquet, so name it with a .parquet suffix"])
    config = simulator.SimulationConfig.from_dict(
        values, source=str(config_file) if config_file is not None else "mtrank simulate"
    )
    path = simulator.write_click_log(config, out, kuairand_dir=kuairand)
    stdout.print(f"wrote {path}")


@datasets_app.command("list")
def datasets_list() -> None:
    """List the registered datasets and whether their files are on disk."""
    from rich import box
    from rich.table import Table

    from mtrank.data.registry import DATASETS, is_available

    table = Table(
        title="datasets (local copies under $MTRANK_DATA_DIR/<name>/ or the download cache)", box=box.SIMPLE
    )
    # Names are never cut: they are what `datasets fetch` takes. The licences follow the table, so
    # the table fits an 80-column terminal.
    for column in ("dataset", "file", "found"):
        table.add_column(column, no_wrap=True)
    for dataset in DATASETS.values():
        for index, entry in enumerate(dataset.files):
            available = "yes" if is_available(dataset.name, entry.name) else "no"
            table.add_row(dataset.name if index == 0 else "", entry.name, available)
    stdout.print(table)
    for dataset in DATASETS.values():
        stdout.print(f"{dataset.name}: {dataset.licence}", soft_wrap=True)


@datasets_app.command("fetch")
@friendly_errors
def datasets_fetch(name: str = typer.Argument(..., help="Dataset name from `mtrank datasets list`.")) -> None:
    """Download a dataset's files (with sha256 checks) into the cache, unless they are on disk."""
    from mtrank.data.registry import DATASETS, locate
    from mtrank.errors import DatasetNotFoundError

    if name not in DATASETS:
        raise DatasetNotFoundError(f"unknown dataset `{name}`; known: {', '.join(sorted(DATASETS))}")
    for entry in DATASETS[name].files:
        stdout.print(f"{entry.name}: {locate(name, entry.name)}")


from mtrank.cli.serve_export import register as register_serving_commands  # noqa: E402  (needs friendly_errors)

register_serving_commands(app)


def main() -> None:
    """Entry point of the ``mtrank`` console script."""
    app()


if __name__ == "__main__":
    main()
