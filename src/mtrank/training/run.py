"""A whole training run and its artifact directory.

Layout of a run directory::

    config.yaml        the resolved config
    encoders.json      encoders fitted on the training split
    model.safetensors  best weights (written atomically)
    metrics.json       per-epoch train/validation metrics and the final test metrics
    train.log          the run's log
    checkpoints/       the latest complete checkpoints, for --resume

Under ``torchrun`` with more than one process, :func:`train_run` joins the process group, every
rank reads and encodes the data, and only rank 0 writes these files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mtrank.config.loader import dump_config, parse_config
from mtrank.config.schema import FilesSplit, RunConfig
from mtrank.data.pipeline import FeatureEncoders, PreparedData, prepare_data
from mtrank.data.registry import DATASET_SCHEME
from mtrank.data.streaming import StreamingData, prepare_streaming_data
from mtrank.errors import ArtifactError
from mtrank.models.builder import build_ranker
from mtrank.models.ranker import MultiTaskRanker
from mtrank.peft import PeftModel
from mtrank.training.checkpoint import atomic_write_text, load_tensors
from mtrank.training.distributed import (
    DeviceChoice,
    DistributedContext,
    barrier,
    broadcast_object,
    distributed_session,
)
from mtrank.training.evaluation import Metrics
from mtrank.training.lock import RunDirectoryLock
from mtrank.training.progress import NoProgress, Progress
from mtrank.training.trainer import WEIGHTS_FILE, FitResult, Trainer, format_metrics

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
ENCODERS_FILE = "encoders.json"
LOG_FILE = "train.log"


@dataclass
class RunResult:
    """Result of :func:`train_run`. ``data`` is a :class:`StreamingData` when ``data.streaming.enabled``."""

    run_dir: Path
    model: MultiTaskRanker
    data: PreparedData | StreamingData
    fit: FitResult
    test_metrics: Metrics


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy mtrank's log records to ``path`` for the duration of the block."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("mtrank")
    previous_level = package_logger.level
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)
    package_logger.addHandler(handler)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
        handler.close()


def train_run(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    stop_after: int | None = None,
    overwrite: bool = True,
    device: DeviceChoice = "auto",
) -> RunResult:
    """Prepare data, build the ranker, train it, evaluate on the test split and save the artifact.

    Launched by ``torchrun`` with ``WORLD_SIZE`` above 1, it joins the process group for the run
    (unless the caller already did) and trains with DistributedDataParallel. Rank 0 alone checks
    and writes ``run_dir`` and draws progress. Every rank returns the same metrics once rank 0 has
    written all files.

    Args:
        config: validated run config, whose ``training.batch_size`` is per process.
        run_dir: the artifact directory (created if needed).
        resume: continue from the latest checkpoint in ``run_dir``. With several machines, every
            machine must see the run directory at the same path.
        progress: progress hook for the CLI.
        stop_after: stop after this many epochs (for interruption tests).
        overwrite: replace a finished run in ``run_dir`` instead of raising.
        device: under ``torchrun`` with several processes, ``auto`` (CUDA when available), ``cpu``
            or ``cuda``. A process started without ``torchrun`` trains on the CPU and
            rejects ``cuda``; for one GPU, launch ``torchrun --nproc-per-node 1``.

    Raises:
        ArtifactError: ``run_dir`` cannot be used (see :func:`check_run_dir`). In a distributed run,
            every rank raises it when rank 0 rejects the directory.
    """
    config = with_absolute_paths(config)
    with distributed_session(device) as context, ExitStack() as cleanup:
        lock = _check_run_dir_on_main(config, run_dir, context, resume=resume, overwrite=overwrite)
        if lock is not None:
            cleanup.callback(lock.release)
        if context.is_main and not resume:
            # A fresh or replaced run starts a fresh log; a resumed run appends to its log.
            (run_dir / LOG_FILE).unlink(missing_ok=True)
        if config.training.num_threads:
            torch.set_num_threads(config.training.num_threads)
        if not context.is_main:
            progress = NoProgress()
        run_log: AbstractContextManager[None] = (
            log_to_file(run_dir / LOG_FILE) if context.is_main else nullcontext()
        )
        with run_log:
            logger.info("run %s: writing to %s", config.name, run_dir)
            # The data source and split in the run's own log, whatever chose them (a preset, a config).
            logger.info("data: %s, split %s", config.data.path, config.data.split.model_dump(mode="json"))
            data: PreparedData | StreamingData
            if config.data.streaming.enabled:
                data = prepare_streaming_data(config, rank=context.rank, world_size=context.world_size)
            else:
                data = prepare_data(config)
            if context.is_main:
                atomic_write_text(run_dir / CONFIG_FILE, dump_config(config))
                atomic_write_text(run_dir / ENCODERS_FILE, _encoders_json(data.encoders))
            torch.manual_seed(config.seed)
            model = build_ranker(config, data.encoders)
            logger.info("model: %d parameters", sum(p.numel() for p in model.parameters()))
            trainer = Trainer(model, config, run_dir=run_dir, progress=progress)
            fit = trainer.fit(data.train, data.valid, resume=resume, stop_after=stop_after)
            test_metrics = trainer.evaluate(data.test, "test")
            trainer.write_metrics(fit, test_metrics)
            for task, values in test_metrics.items():
                logger.info("test %s: %s", task, format_metrics(values))
        # The other ranks return only once rank 0 has written metrics.json.
        barrier()
    return RunResult(run_dir, model, data, fit, test_metrics)


def _check_run_dir_on_main(
    config: RunConfig, run_dir: Path, context: DistributedContext, *, resume: bool, overwrite: bool
) -> RunDirectoryLock | None:
    """Lock, check and create ``run_dir`` on rank 0, and raise its error on every rank when it fails.

    Rank 0 decides alone, so ranks on machines that do not share the run directory cannot disagree.

    Returns:
        On rank 0, the held lock of ``run_dir``, which the caller releases; ``None`` on other ranks.
    """
    problem: ArtifactError | None = None
    lock: RunDirectoryLock | None = None
    if context.is_main:
        lock = RunDirectoryLock(run_dir)
        try:
            lock.acquire()
            check_run_dir(config, run_dir, resume=resume, overwrite=overwrite)
        except ArtifactError as exc:
            lock.release()
            lock = None
            if not context.is_distributed:
                raise
            problem = exc
    message = broadcast_object(None if problem is None else str(problem))
    if problem is not None:
        raise problem
    if message is not None:
        raise ArtifactError(f"rank 0 rejected the run directory: {message}")
    return lock


def _absolute_path(path: str) -> str:
    if path.startswith(DATASET_SCHEME):
        return path
    return os.path.abspath(os.path.expanduser(path))


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """Return a copy of ``config`` whose data paths are absolute, as the run's ``config.yaml`` records them.

    Relative paths are relative to the working folder of the training, so a run evaluated or served
    from another folder would otherwise look for its data in the wrong place. ``dataset:`` paths
    stay as they are, because the registry resolves them.
    """
    copy = config.model_copy(deep=True)
    data = copy.data
    data.path = _absolute_path(data.path)
    if data.join is not None:
        data.join.path = _absolute_path(data.join.path)
    if isinstance(data.split, FilesSplit):
        data.split.test_path = _absolute_path(data.split.test_path)
        if data.split.valid_path is not None:
            data.split.valid_path = _absolute_path(data.split.valid_path)
    return copy


def check_run_dir(config: RunConfig, run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Reject a run directory that would be damaged before anything is read or written.

    Raises:
        ArtifactError: ``resume`` without a checkpoint, ``resume`` with a config whose model or data
            differ from the run's ``config.yaml``, or an existing run without ``overwrite``.
    """
    from mtrank.training.checkpoint import LATEST
    from mtrank.training.trainer import CHECKPOINTS

    has_checkpoint = (run_dir / CHECKPOINTS / LATEST).is_file()
    if resume:
        if not has_checkpoint:
            raise ArtifactError(
                f"no checkpoint to resume from in {run_dir / CHECKPOINTS}; start without --resume"
            )
        saved_file = run_dir / CONFIG_FILE
        if saved_file.is_file():
            try:
                saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise ArtifactError(f"cannot read {saved_file}: {exc}") from None
            current = config.model_dump(mode="json")
            changed = [
                key
                for key in ("data", "features", "tasks", "model", "seed")
                if saved.get(key) != current.get(key)
            ]
            if changed:
                raise ArtifactError(
                    f"the config differs from {saved_file} in: {', '.join(changed)}; resume needs the same config "
                    "(only `training.epochs` may change). Train into a new run directory instead"
                )
        return
    if not overwrite and ((run_dir / WEIGHTS_FILE).is_file() or has_checkpoint):
        raise ArtifactError(
            f"{run_dir} already contains a run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another run directory"
        )


def _encoders_json(encoders: FeatureEncoders) -> str:
    import json

    return json.dumps(encoders.to_dict(), ensure_ascii=False)


@dataclass
class LoadedRun:
    """A trained run read back from its directory.

    Attributes:
        run_dir: the run folder.
        config: the run config; with a PEFT set, its tasks include the set's new tasks and its data
            config is the fine-tune's.
        encoders: the fitted encoders; with a PEFT set, label encoders of the new tasks are added.
        model: the ranker, or a :class:`~mtrank.peft.PeftModel` around it with the set active.
        peft_set: name of the loaded PEFT set, or ``None`` for the base run alone.
        peft_dir: folder of the loaded PEFT set, or ``None``.
    """

    run_dir: Path
    config: RunConfig
    encoders: FeatureEncoders
    model: MultiTaskRanker | PeftModel
    peft_set: str | None = None
    peft_dir: Path | None = None


def load_run(run_dir: str | Path, peft: str | Path | None = None) -> LoadedRun:
    """Rebuild the config, encoders and model of a finished run, weights loaded, in eval mode.

    Args:
        run_dir: the run folder.
        peft: a PEFT set made by ``mtrank finetune``: its name under ``RUN/peft/`` or its folder.
            The set is loaded onto the base and made active, see
            :func:`mtrank.training.finetune.load_peft_run`.

    Raises:
        ArtifactError: a file of the run or the set is missing or does not match the model.
    """
    run_dir = Path(run_dir)
    if peft is not None:
        # Imported here because the fine-tuning module builds on this one.
        from mtrank.training.finetune import load_peft_run

        return load_peft_run(run_dir, peft)
    for name in (CONFIG_FILE, ENCODERS_FILE, WEIGHTS_FILE):
        if not (run_dir / name).is_file():
            raise ArtifactError(
                f"{run_dir} is not a finished run: {name} is missing (train it with `mtrank train`)"
            )
    try:
        raw = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ArtifactError(f"cannot read {run_dir / CONFIG_FILE}: {exc}") from None
    config = parse_config(raw, str(run_dir / CONFIG_FILE))
    try:
        encoders = FeatureEncoders.load(run_dir / ENCODERS_FILE)
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(
            f"cannot read {run_dir / ENCODERS_FILE}: {exc!r}; the run directory is damaged"
        ) from None
    model = build_ranker(config, encoders)
    state = load_tensors(run_dir / WEIGHTS_FILE)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{run_dir / WEIGHTS_FILE} does not match the model built from its config: {exc}"
        ) from None
    if missing or unexpected:
        raise ArtifactError(
            f"{run_dir / WEIGHTS_FILE} does not match the model built from its config: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    model.eval()
    return LoadedRun(run_dir, config, encoders, model)
