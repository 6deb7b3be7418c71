"""The training loop: batches, task losses, loss balancing, validation, early stopping, checkpoints.

Files the trainer writes into its run directory::

    metrics.json       per-epoch train/validation records, best epoch and test metrics
    steps.jsonl        one JSON object per training step: the balancer's statistics (see ``Trainer``)
    task_weights.png   task weights and unweighted losses per step (needs matplotlib)
    model.safetensors  the kept (best or last) weights
    checkpoints/       the latest complete checkpoints, for resuming

Under ``torchrun`` with more than one process, the model is wrapped in ``DistributedDataParallel``,
each rank trains on its part of every step's rows (see :mod:`mtrank.training.distributed`) and only
rank 0 writes these files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtrank.balancing.base import all_reduce_mean_
from mtrank.config.schema import RunConfig, TaskConfig, TrainingConfig
from mtrank.data.streaming import BatchStream
from mtrank.data.tensors import Batch, EncodedData, iterate_batches
from mtrank.errors import ArtifactError, ConfigError
from mtrank.training.checkpoint import (
    LATEST,
    atomic_save_tensors,
    atomic_write_text,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_latest,
    write_checkpoint,
)
from mtrank.training.distributed import (
    all_gather_rows,
    barrier,
    broadcast_object,
    current_context,
    epoch_steps,
    shard_range,
)
from mtrank.training.evaluation import Metrics, evaluate_model, evaluate_predictions
from mtrank.training.losses import task_loss_list, to_predictions
from mtrank.training.progress import NoProgress, Progress

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
# Tensor files of one checkpoint folder, in the order `_read_checkpoint` returns them.
CHECKPOINT_TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "extra.safetensors")
METRICS_FILE = "metrics.json"
STEPS_FILE = "steps.jsonl"
WEIGHTS_PLOT_FILE = "task_weights.png"
CHECKPOINTS = "checkpoints"
# Per-epoch seeds are derived from the run seed with this stride, so epoch k's shuffling and dropout
# are the same whether the run was resumed or not.
EPOCH_SEED_STRIDE = 1_000_003
# Rank r adds RANK_SEED_STEP * r to its epoch seed, so ranks draw different dropout and position-drop
# masks, and rank 0 draws those of a single process. With a step of 2, no rank's seed equals the
# shuffle seed (epoch seed + 1), and below 500,000 ranks no two (epoch, rank) pairs share a seed.
RANK_SEED_STEP = 2
# The error for an unknown `shared_layer` prefix lists the model's layer names. Past this many, it
# gives the count of the remaining layers instead.
MAX_LISTED_LAYERS = 80
SHARED_LAYER_KEY = "training.balancer.options.shared_layer"


def build_optimizer(parameters: Sequence[nn.Parameter], training: TrainingConfig) -> torch.optim.Optimizer:
    """Build the configured optimizer over exactly ``parameters``."""
    params = list(parameters)
    if not params:
        raise ConfigError(["the model has no trainable parameters; nothing to optimise"])
    kind = training.optimizer
    if kind == "adam":
        return torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD(params, lr=training.lr, weight_decay=training.weight_decay)


class StepStats:
    """Per-step statistics of one epoch, stored as float64 columns (8 bytes per value).

    The columns are the keys of :meth:`~mtrank.balancing.LossBalancer.last_stats` plus
    ``loss/total``. A key that first appears after some steps is padded with NaN for the earlier
    steps, and a step that lacks a known key stores NaN for it.

    Example:
        >>> stats = StepStats()
        >>> stats.append({"loss/click": 0.5, "weight/click": 1.0})
        >>> stats.append({"loss/click": 0.25, "weight/click": 1.0})
        >>> stats.mean("loss/click")
        0.375
    """

    def __init__(self) -> None:
        self.columns: dict[str, array[float]] = {}
        self.num_steps = 0

    def __len__(self) -> int:
        return self.num_steps

    def append(self, values: Mapping[str, float]) -> None:
        """Add one step's values."""
        for key, value in values.items():
            column = self.columns.get(key)
            if column is None:
                column = self.columns[key] = array("d", [math.nan] * self.num_steps)
            column.append(float(value))
        self.num_steps += 1
        for column in self.columns.values():
            if len(column) < self.num_steps:
                column.append(math.nan)

    def rows(self) -> Iterator[dict[str, float]]:
        """Yield one ``{key: value}`` dict per step, in step order."""
        keys = list(self.columns)
        for index in range(self.num_steps):
            yield {key: self.columns[key][index] for key in keys}

    def mean(self, key: str) -> float:
        """Return the mean of column ``key`` over its finite values, NaN when there are none."""
        values = np.frombuffer(self.columns[key], dtype=np.float64) if key in self.columns else np.zeros(0)
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if finite.size else math.nan


def read_step_log(path: Path) -> dict[str, np.ndarray]:
    """Read a run's ``steps.jsonl`` into one float64 column per key.

    Args:
        path: the step log written by :meth:`Trainer.fit`.

    Returns:
        ``{key: (N,) array}`` for N steps, including ``epoch`` and ``step``; a missing or ``null``
        value reads as NaN.

    Raises:
        ArtifactError: the file is missing or a line is not a JSON object.
    """
    if not path.is_file():
        raise ArtifactError(
            f"step log not found: {path}; it is written by `Trainer.fit` with a run directory"
        )
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{path}, line {number}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ArtifactError(
                    f"{path}, line {number}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {
        key: np.array([math.nan if row.get(key) is None else row[key] for row in rows], dtype=np.float64)
        for key in keys
    }


def select_parameters_by_prefix(model: nn.Module, prefixes: object) -> list[tuple[str, nn.Parameter]]:
    """Return the trainable parameters whose names start with one of ``prefixes``, for GradNorm's W.

    A prefix matches at a dot boundary: ``backbone.experts.1`` selects
    ``backbone.experts.1.layers.0.weight`` but not ``backbone.experts.10.layers.0.weight``. A full
    parameter name selects that parameter alone. A model wrapped in ``DistributedDataParallel`` or
    ``DataParallel`` is unwrapped first, so names never start with ``module.``. Frozen parameters
    under a prefix that also selects trainable ones are left out, and their names are logged.

    Args:
        model: the multi-task network.
        prefixes: one name prefix, or a list of them (the value of ``shared_layer``).

    Returns:
        ``(name, parameter)`` pairs in the model's parameter order, without repeats.

    Raises:
        ConfigError: ``prefixes`` is not a non-empty string or list of them, a prefix matches no
            parameter (the message lists the model's layers), or it matches only frozen parameters.
    """
    if isinstance(prefixes, str) and prefixes:
        prefix_list = [prefixes]
    elif isinstance(prefixes, (list, tuple)) and prefixes and all(isinstance(x, str) and x for x in prefixes):
        prefix_list = list(prefixes)
    else:
        raise ConfigError(
            [f"{SHARED_LAYER_KEY} must be a parameter name prefix or a list of them, got {prefixes!r}"]
        )
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    module = model.module if isinstance(model, wrappers) else model
    named = list(module.named_parameters())
    chosen: set[str] = set()
    problems: list[str] = []
    for prefix in prefix_list:
        stem = prefix.rstrip(".")
        matches = [(n, p) for n, p in named if n == stem or n.startswith(f"{stem}.")]
        trainable = [n for n, p in matches if p.requires_grad]
        frozen = [n for n, p in matches if not p.requires_grad]
        if not matches:
            layers = sorted({n.rsplit(".", 1)[0] for n, p in named if p.requires_grad})
            listed = ", ".join(layers[:MAX_LISTED_LAYERS])
            rest = len(layers) - MAX_LISTED_LAYERS
            more = f" and {rest} more" if rest > 0 else ""
            problems.append(
                f"{SHARED_LAYER_KEY}: no parameter name starts with `{prefix}`; "
                f"layers with trainable parameters: {listed}{more}"
            )
        elif not trainable:
            problems.append(
                f"{SHARED_LAYER_KEY}: `{prefix}` selects only frozen parameters ({', '.join(frozen[:5])}); "
                "GradNorm needs their gradients, so choose a trainable layer"
            )
        else:
            if frozen:
                logger.info(
                    "GradNorm shared layer: left out frozen parameters under `%s`: %s", prefix, frozen
                )
            chosen.update(trainable)
    if problems:
        raise ConfigError(problems)
    return [(n, p) for n, p in named if n in chosen]


@dataclass
class EpochRecord:
    """Record of one epoch, as stored in ``metrics.json``.

    ``seconds`` is the wall time of the epoch's training without validation, and ``cpu_seconds``
    the CPU time the process spent in it, summed over its threads. On a machine shared with other
    jobs, the CPU time varies less than the wall time. It is ``None`` in records read from
    checkpoints written before it was recorded.
    """

    epoch: int
    train: dict[str, float]
    valid: Metrics | None
    seconds: float
    samples_per_second: float
    cpu_seconds: float | None = None


@dataclass
class FitResult:
    """Outcome of :meth:`Trainer.fit`."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float | None = None
    stopped_early: bool = False


class Trainer:
    """Train a ranker with per-task losses combined by a loss balancer.

    The trainer owns the optimizer and the balancer; the model only computes logits. Each epoch
    reseeds torch from ``(seed, epoch)``, so a run resumed from a checkpoint continues exactly as an
    uninterrupted run would. Checkpoints contain the balancer's state and its optimizer's state.

    Step log: at every training step the trainer reads ``balancer.last_stats()`` right after
    ``combine``, so ``weight/<task>`` is the weight that multiplied that step's loss, before the
    balancer's ``step()`` updates it. With ``loss/<task>`` (unweighted), ``loss/total`` and, for
    GradNorm, ``gradnorm/grad_norm/<task>`` (G_i) and ``gradnorm/target/<task>``, these values
    are kept as columns for the current epoch in :attr:`epoch_steps` and logged at debug level. With a
    run directory, :meth:`fit` appends them after each epoch to ``steps.jsonl``, one JSON object per
    step with ``epoch`` and ``step`` (0-based within the epoch), NaN and infinities written as
    ``null``. ``metrics.json`` names that file under ``steps_file``. At the end of :meth:`fit`, the
    weights are plotted per step to ``task_weights.png``. A resumed run first drops the lines of
    epochs after its checkpoint, so the log matches an uninterrupted run.

    GradNorm's shared layer W is ``model.last_shared_parameters()`` unless
    ``training.balancer.options.shared_layer`` names parameter prefixes, such as
    ``backbone.experts.0`` (one prefix or a list). W's parameter names are logged at start.

    Distributed data parallel: when a process group of more than one rank is initialised (see
    :func:`mtrank.training.distributed.distributed_session`), the model is moved to the rank's device
    and wrapped in ``DistributedDataParallel``. ``training.batch_size`` is then the batch of each rank,
    so a step reads ``batch_size * world_size`` rows. Each rank scales its task losses by its share of
    the step's labelled rows, so the gradient DDP averages is the gradient of the mean loss over the
    whole step. The values in the step log and the epoch records are means over ranks. Validation
    predictions of all ranks are gathered, and rank 0 computes the metrics from all of them and sends
    them to the other ranks, so every rank takes the same early-stopping decision. Only rank 0 writes
    the run directory. GradNorm measures the gradient norms G_i on each rank's own rows, and
    ``LossBalancer.step`` averages the task-weight gradient over ranks, so the weights stay identical
    on every rank.

    Args:
        model: the ranker (or any module with the same ``forward``). In a distributed run it is
            moved to the rank's device in place.
        config: the run config (tasks, training settings, seed).
        run_dir: where checkpoints and metrics go; ``None`` keeps everything in memory.
        trainable: parameters to optimise; all parameters that require grad by default. PEFT
            fine-tuning passes only its own.
        progress: progress hook (the CLI draws a rich bar).
    """

    def __init__(
        self,
        model: nn.Module,
        config: RunConfig,
        *,
        run_dir: Path | None = None,
        trainable: Sequence[nn.Parameter] | None = None,
        progress: Progress | None = None,
    ) -> None:
        from mtrank.balancing import build_balancer

        self.context = current_context()
        distributed = self.context.is_distributed
        if distributed:
            # Moved before the optimizer is built, although `Module.to` keeps the same parameter objects.
            model.to(self.context.device)
        self.model = model
        self.config = config
        self.tasks: list[TaskConfig] = list(config.tasks)
        self.loss_kinds = [t.loss or "bce" for t in self.tasks]
        self.run_dir = run_dir
        # Only rank 0 writes files. The other ranks only read checkpoints, when resuming.
        self.writes_files = run_dir is not None and self.context.is_main
        self.progress = progress or NoProgress()
        params = (
            list(trainable) if trainable is not None else [p for p in model.parameters() if p.requires_grad]
        )
        self.optimizer = build_optimizer(params, config.training)
        balancer_config = config.training.balancer
        options = dict(balancer_config.options)
        # `shared_layer` is the trainer's choice of GradNorm's W, not an option of the balancer itself.
        shared_layer = options.pop("shared_layer", None)
        if balancer_config.name == "fixed" and "weights" not in options:
            options["weights"] = {t.name: t.weight for t in self.tasks}
        self.balancer = build_balancer(
            balancer_config.name, [t.name for t in self.tasks], [t.type for t in self.tasks], options
        )
        if distributed:
            self.balancer.to(self.context.device)
        self.shared_parameters: list[nn.Parameter] = []
        if self.balancer.needs_shared_parameters:
            self.shared_parameters = self._shared_parameters(shared_layer)
        elif shared_layer is not None:
            raise ConfigError(
                [
                    f"training.balancer.options.shared_layer: balancer `{balancer_config.name}` does not "
                    "use a shared layer; remove the option (only gradnorm reads it)"
                ]
            )
        # The module the training steps call: DDP around the model in a distributed run, else the model.
        self.network: nn.Module = model
        if distributed:
            device_ids = [self.context.device] if self.context.device.type == "cuda" else None
            self.network = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.epoch_steps = StepStats()

    def _shared_parameters(self, prefixes: object) -> list[nn.Parameter]:
        """Pick GradNorm's shared layer W: by name prefixes from the config, else the model's default."""
        if prefixes is None:
            from mtrank.balancing import default_shared_parameters

            named = default_shared_parameters(self.model)
        else:
            named = select_parameters_by_prefix(self.model, prefixes)
        values = sum(p.numel() for _, p in named)
        logger.info("GradNorm shared layer W (%d values): %s", values, ", ".join(n for n, _ in named))
        return [p for _, p in named]

    # ------------------------------------------------------------------------------------------------
    def train_epoch(self, data: EncodedData | BatchStream, epoch: int) -> dict[str, float]:
        """Run one epoch and keep its per-step balancer statistics in :attr:`epoch_steps`.

        Args:
            data: the training split, in memory or streamed (``data.streaming``). A stream shuffles
                and shards its own rows and must have been made for this process's rank.
            epoch: the 1-based epoch number; it seeds shuffling and dropout.

        Returns:
            ``loss/<task>`` (mean unweighted loss), ``weight/<task>`` (the weight after the epoch,
            which for DWA is the next epoch's), ``loss/total`` (mean balanced loss) and the epoch
            mean of each method-specific statistic, such as ``gradnorm/grad_norm/<task>``.

        Raises:
            FloatingPointError: the balanced loss of a step is not finite.
        """
        config = self.config
        context = self.context
        torch.manual_seed(config.seed + EPOCH_SEED_STRIDE * epoch + RANK_SEED_STEP * context.rank)
        generator = torch.Generator().manual_seed(config.seed + EPOCH_SEED_STRIDE * epoch + 1)
        self.model.train()
        loss_sum = torch.zeros(len(self.tasks), dtype=torch.float64)
        total_sum = 0.0
        steps = 0
        batch_size = config.training.batch_size
        # Batch norm cannot normalise a single row in training mode. One process leaves a last batch of
        # one row out of the epoch (shuffling makes it a different row each epoch). Several processes
        # give every rank at least two rows per step instead.
        skip_single_row = any(isinstance(m, (nn.BatchNorm1d, nn.SyncBatchNorm)) for m in self.model.modules())
        self.epoch_steps = StepStats()
        log_steps = logger.isEnabledFor(logging.DEBUG)
        batches: Iterator[tuple[Batch, torch.Tensor | None]]
        if not isinstance(data, EncodedData):
            min_rows = 2 if skip_single_row and context.is_distributed else 1
            batches = self._stream_batches(data, epoch, min_rows)
            num_batches = data.num_batches(epoch, min_rows_per_batch=min_rows)
        elif context.is_distributed:
            plan = epoch_steps(
                len(data),
                batch_size,
                context.world_size,
                generator=generator,
                min_rows_per_rank=2 if skip_single_row else 1,
            )
            batches = self._rank_batches(data, plan)
            num_batches = len(plan)
        else:
            batches = (
                (batch, None)
                for batch in iterate_batches(data, batch_size, shuffle=True, generator=generator)
            )
            num_batches = math.ceil(len(data) / batch_size)
        self.progress.start(f"epoch {epoch}", num_batches)
        for batch, loss_scales in batches:
            assert batch.labels is not None  # training data is always encoded with labels
            if skip_single_row and len(batch) == 1:
                logger.debug("epoch %d: skipped a last batch of one row (batch norm needs two)", epoch)
                self.progress.advance()
                continue
            output = self.network(batch)
            loss_list = task_loss_list(
                output.logits, batch.labels, self.loss_kinds, batch.label_mask
            )  # T scalars
            if loss_scales is not None:
                loss_list = [
                    loss * scale for loss, scale in zip(loss_list, loss_scales.unbind(0), strict=True)
                ]
            losses = torch.stack([loss.detach() for loss in loss_list])  # (T,)
            self.optimizer.zero_grad(set_to_none=True)
            self.balancer.zero_grad(set_to_none=True)
            total = self.balancer.combine(loss_list, self.shared_parameters)
            # Read now, before balancer.step() changes the weights: these are the weights of this step.
            stats = self.balancer.last_stats()
            stats["loss/total"] = float(total.detach())
            if context.is_distributed:
                # A non-finite loss on any rank makes the mean non-finite, so every rank raises below.
                stats = self._mean_over_ranks(stats)
                losses = torch.tensor([stats[f"loss/{t.name}"] for t in self.tasks], dtype=torch.float64)
            if not math.isfinite(stats["loss/total"]):
                per_task = dict(zip([t.name for t in self.tasks], losses.tolist(), strict=True))
                raise FloatingPointError(
                    f"epoch {epoch}, step {steps}: the total loss is {stats['loss/total']} "
                    f"(per task: {per_task}); lower `training.lr`"
                )
            total.backward()
            self.optimizer.step()
            self.balancer.step()
            loss_sum += losses.detach().double()
            total_sum += stats["loss/total"]
            self.epoch_steps.append(stats)
            if log_steps:
                logger.debug("epoch %d step %d: %s", epoch, steps, _format_values(stats))
            steps += 1
            self.progress.advance()
        self.progress.stop()
        mean_losses = loss_sum / max(steps, 1)
        self.balancer.end_epoch(mean_losses.float().to(context.device))
        weights = self.balancer.weights().detach()
        record = {f"loss/{t.name}": float(mean_losses[i]) for i, t in enumerate(self.tasks)}
        record.update({f"weight/{t.name}": float(weights[i]) for i, t in enumerate(self.tasks)})
        record["loss/total"] = total_sum / max(steps, 1)
        for key in self.epoch_steps.columns:
            if not key.startswith(("loss/", "weight/")):
                record[key] = self.epoch_steps.mean(key)
        return record

    def _rank_batches(
        self, data: EncodedData, plan: Sequence[torch.Tensor]
    ) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Yield this rank's rows of each step, on its device, with the ``(T,)`` scales of its task losses.

        Task i's loss on rank r is the mean over its m_ri labelled rows. Scaling it by W * m_ri / m_i,
        with m_i the labelled rows of the whole step, makes the mean over ranks that DDP takes equal
        the mean over the step's m_i rows. A task with no labelled rows in the step gets scale 0.
        """
        context = self.context
        world_size = context.world_size
        mask = data.batch.label_mask
        for step in plan:
            start, stop = shard_range(len(step), world_size, context.rank)
            if mask is None:
                local = torch.full((len(self.tasks),), float(stop - start), dtype=torch.float64)
                total = torch.full((len(self.tasks),), float(len(step)), dtype=torch.float64)
            else:
                step_mask = mask.index_select(0, step).double()  # (G, T)
                local = step_mask[start:stop].sum(dim=0)  # (T,)
                total = step_mask.sum(dim=0)  # (T,)
            scales = world_size * local / total.clamp(min=1.0)  # (T,)
            batch = data.batch.select(step[start:stop]).to(context.device)
            yield batch, scales.float().to(context.device)

    def _stream_batches(
        self, stream: BatchStream, epoch: int, min_rows_per_batch: int
    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """Yield a stream's batches for this rank, with the ``(T,)`` task-loss scales of a distributed run.

        The scales are those of :meth:`_rank_batches`. Each rank reads its own rows, so one
        all-reduce per step sums the labelled rows m_i of the whole step.

        Raises:
            ConfigError: the stream was made for another rank or world size.
        """
        context = self.context
        if (stream.rank, stream.world_size) != (context.rank, context.world_size):
            raise ConfigError(
                [
                    f"the training stream reads the rows of rank {stream.rank} of {stream.world_size}, but this "
                    f"process is rank {context.rank} of {context.world_size}; pass the process's rank and "
                    "world size to `prepare_streaming_data`"
                ]
            )
        for batch in stream.iter_batches(epoch, min_rows_per_batch=min_rows_per_batch):
            if not context.is_distributed:
                yield batch, None
                continue
            batch = batch.to(context.device)
            if batch.label_mask is None:
                local = torch.full((len(self.tasks),), float(len(batch)), dtype=torch.float64)
            else:
                local = batch.label_mask.double().sum(dim=0).cpu()  # (T,)
            # A copy: on the CPU `.to` returns `local` itself, which the in-place all_reduce would overwrite.
            total = local.clone().to(context.device)
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)  # (T,) over all ranks
            scales = context.world_size * local / total.cpu().clamp(min=1.0)  # (T,)
            yield batch, scales.float().to(context.device)

    def _mean_over_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        """Average one step's statistics over ranks with a single all-reduce."""
        keys = list(stats)
        values = torch.tensor([stats[key] for key in keys], dtype=torch.float64, device=self.context.device)
        all_reduce_mean_(values)
        return dict(zip(keys, values.tolist(), strict=True))

    def evaluate(self, data: EncodedData, split: str = "") -> Metrics:
        """Per-task metrics of the current model on all rows of ``data``.

        In a distributed run each rank scores a contiguous part of the rows, rank 0 computes the
        metrics from the gathered predictions of every row, and every rank returns rank 0's result.
        """
        if not self.context.is_distributed:
            return evaluate_model(
                self.model,
                data,
                self.tasks,
                self.config.evaluation.group_column,
                batch_size=self.config.training.eval_batch_size,
                split=split,
            )
        context = self.context
        # Each rank updates the batch-norm running statistics from its own rows, and rank 0's are saved.
        # Every rank scores with rank 0's statistics, so the metrics describe the saved model.
        for buffer in self.model.buffers():
            torch.distributed.broadcast(buffer, src=0)
        start, stop = shard_range(len(data), context.world_size, context.rank)
        local = self._predict(data.slice(start, stop))  # (n_r, T)
        predictions = all_gather_rows(local).cpu().numpy()  # (N, T), rows in split order
        metrics: Metrics | None = None
        if context.is_main:
            metrics = evaluate_predictions(
                predictions, data, self.tasks, self.config.evaluation.group_column, split
            )
        received = broadcast_object(metrics)
        assert received is not None  # rank 0 always sends its metrics
        return received

    @torch.no_grad()
    def _predict(self, data: EncodedData) -> torch.Tensor:
        """Score ``data`` in eval mode on this rank's device and return ``(N, T)`` float64 predictions."""
        was_training = self.model.training
        self.model.eval()
        device = self.context.device
        parts = [
            to_predictions(self.model(batch.to(device)).logits, self.loss_kinds).double()
            for batch in iterate_batches(data, self.config.training.eval_batch_size)
        ]
        self.model.train(was_training)
        if not parts:
            return torch.zeros((0, len(self.tasks)), dtype=torch.float64, device=device)
        return torch.cat(parts, dim=0)

    # ------------------------------------------------------------------------------------------------
    def fit(
        self,
        train: EncodedData | BatchStream,
        valid: EncodedData | None,
        *,
        resume: bool = False,
        stop_after: int | None = None,
    ) -> FitResult:
        """Train for the configured epochs with early stopping; keep the best weights.

        Args:
            train: training split, in memory or a stream (see :meth:`train_epoch`).
            valid: validation split for early stopping; without it the last epoch is kept.
            resume: continue from the latest checkpoint in ``run_dir`` (must exist).
            stop_after: stop after this many epochs of this call (simulates an interruption in tests).

        Returns:
            :class:`FitResult`; afterwards the model has the best weights.

        Raises:
            ArtifactError: ``resume`` is set but ``run_dir`` contains no checkpoint.
            FloatingPointError: the balanced loss of a step is not finite.
        """
        training = self.config.training
        stopping = training.early_stopping if valid is not None else None
        result = FitResult()
        best_state: dict[str, torch.Tensor] | None = None
        bad_epochs = 0
        start_epoch = 1
        if resume:
            start_epoch, best_state, bad_epochs = self._resume(result)
        elif self.writes_files:
            assert self.run_dir is not None  # writes_files implies a run directory
            atomic_write_text(self.run_dir / STEPS_FILE, "")

        epochs_run = 0
        for epoch in range(start_epoch, training.epochs + 1):
            started = time.perf_counter()
            cpu_started = time.process_time()
            train_record = self.train_epoch(train, epoch)
            seconds = time.perf_counter() - started
            cpu_seconds = time.process_time() - cpu_started
            self._append_step_log(epoch)
            valid_metrics = self.evaluate(valid, "valid") if valid is not None else None
            samples_per_second = len(train) / max(seconds, 1e-9)
            record = EpochRecord(epoch, train_record, valid_metrics, seconds, samples_per_second, cpu_seconds)
            result.history.append(record)
            self._log_epoch(record)

            improved = True
            if stopping is not None and valid_metrics is not None:
                value = _lookup(valid_metrics, stopping.metric)
                if not math.isfinite(value):
                    logger.warning(
                        "epoch %d: early-stopping metric %s is undefined (%s); this epoch counts as no improvement",
                        epoch,
                        stopping.metric,
                        value,
                    )
                    improved = False
                else:
                    improved = result.best_value is None or (
                        value > result.best_value if stopping.mode == "max" else value < result.best_value
                    )
                if improved:
                    result.best_value = value
            if improved:
                result.best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                bad_epochs = 0
            else:
                bad_epochs += 1
            self._checkpoint(epoch, result, best_state, bad_epochs)
            # No rank starts the next epoch before rank 0 has written this epoch's checkpoint.
            barrier()
            epochs_run += 1
            if stopping is not None and bad_epochs >= stopping.patience:
                logger.info(
                    "early stopping after epoch %d: %s has not improved for %d epoch(s); "
                    "best %.5f at epoch %d",
                    epoch,
                    stopping.metric,
                    bad_epochs,
                    result.best_value,
                    result.best_epoch,
                )
                result.stopped_early = True
                break
            if stop_after is not None and epochs_run >= stop_after:
                break

        if best_state is not None:
            self.model.load_state_dict(best_state)
        if self.writes_files:
            assert self.run_dir is not None  # writes_files implies a run directory
            atomic_save_tensors(self.run_dir / WEIGHTS_FILE, self.model.state_dict())
            self._plot_weights()
        barrier()
        return result

    def _append_step_log(self, epoch: int) -> None:
        """Append the finished epoch's steps to ``steps.jsonl``, one JSON object per line."""
        if not self.writes_files or self.run_dir is None:
            return
        lines = [
            json.dumps(finite_json({"epoch": epoch, "step": index, **row}), allow_nan=False) + "\n"
            for index, row in enumerate(self.epoch_steps.rows())
        ]
        with (self.run_dir / STEPS_FILE).open("a", encoding="utf-8") as handle:
            handle.writelines(lines)
            # Synced before the epoch's checkpoint is written, so a checkpoint never outlives its steps.
            handle.flush()
            os.fsync(handle.fileno())

    def _truncate_step_log(self, last_epoch: int) -> None:
        """Remove the step log lines after epoch ``last_epoch``, the epoch of the resumed checkpoint.

        A run that stopped after writing an epoch's steps but before completing its checkpoint leaves
        lines of a later epoch, and possibly a line cut short.
        """
        assert self.run_dir is not None  # only called on resume, which requires a run directory
        path = self.run_dir / STEPS_FILE
        if not path.is_file():
            logger.warning("%s is missing, so the resumed step log starts at epoch %d", path, last_epoch + 1)
            return
        kept_lines: list[str] = []
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if not isinstance(row, dict) or row.get("epoch", last_epoch + 1) > last_epoch:
                    break
                kept_lines.append(line if line.endswith("\n") else line + "\n")
        atomic_write_text(path, "".join(kept_lines))

    def _plot_weights(self) -> None:
        """Draw the task weights of every logged step to ``task_weights.png``."""
        assert self.run_dir is not None  # only called with a run directory
        from mtrank.training.plots import plot_task_weights

        path = self.run_dir / STEPS_FILE
        steps = read_step_log(path) if path.is_file() else {}
        names = [t.name for t in self.tasks]
        if not all(f"weight/{name}" in steps for name in names):
            logger.info("no training steps in %s, so no task weight plot was drawn", STEPS_FILE)
            return
        title = f"{self.config.name}: {self.config.training.balancer.name} task weights"
        written = plot_task_weights(steps, names, self.run_dir / WEIGHTS_PLOT_FILE, title=title)
        if written is not None:
            logger.info("task weight plot written: %s", written)

    def _log_epoch(self, record: EpochRecord) -> None:
        logger.info(
            "epoch %d train (%.1f s, %.0f samples/s): %s",
            record.epoch,
            record.seconds,
            record.samples_per_second,
            _format_values(record.train),
        )
        if record.valid is not None:
            for task, values in record.valid.items():
                logger.info(
                    "epoch %d valid %s: %s",
                    record.epoch,
                    task,
                    format_metrics(values),
                )

    def _checkpoint(
        self, epoch: int, result: FitResult, best_state: dict[str, torch.Tensor] | None, bad_epochs: int
    ) -> None:
        if not self.writes_files or self.run_dir is None:
            return
        extra = {f"balancer.{k}": v for k, v in self.balancer.state_dict().items()}
        balancer_optimizer = getattr(self.balancer, "optimizer", None)
        balancer_plain = None
        if balancer_optimizer is not None:
            tensors, balancer_plain = optimizer_to_tensors(balancer_optimizer)
            extra.update({f"balancer_optimizer.{k}": v for k, v in tensors.items()})
        if best_state is not None:
            extra.update({f"best.{k}": v for k, v in best_state.items()})
        state = {
            "epoch": epoch,
            "best_epoch": result.best_epoch,
            "best_value": result.best_value,
            "bad_epochs": bad_epochs,
            "history": [_record_to_json(r) for r in result.history],
            "balancer_optimizer": balancer_plain,
        }
        write_checkpoint(
            self.run_dir / CHECKPOINTS,
            epoch,
            model=self.model.state_dict(),
            optimizer=self.optimizer,
            extra_tensors=extra,
            state=state,
        )
        self.write_metrics(result)

    def _resume(self, result: FitResult) -> tuple[int, dict[str, torch.Tensor] | None, int]:
        if self.run_dir is None:
            raise ArtifactError("resume needs a run directory")
        folder, state, model_tensors, optimizer_tensors, extra = self._read_checkpoint()
        self.model.load_state_dict(model_tensors)
        optimizer_from_tensors(self.optimizer, optimizer_tensors, state["optimizer"])
        self.balancer.load_state_dict(
            {k[len("balancer.") :]: v for k, v in extra.items() if k.startswith("balancer.")}
        )
        balancer_optimizer = getattr(self.balancer, "optimizer", None)
        if balancer_optimizer is not None and state.get("balancer_optimizer"):
            prefix = "balancer_optimizer."
            tensors = {k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)}
            optimizer_from_tensors(balancer_optimizer, tensors, state["balancer_optimizer"])
        best = {k[len("best.") :]: v for k, v in extra.items() if k.startswith("best.")} or None
        if self.writes_files:
            self._truncate_step_log(int(state["epoch"]))
        result.best_epoch = state["best_epoch"]
        result.best_value = state["best_value"]
        result.history = [_record_from_json(r) for r in state["history"]]
        logger.info("resumed from %s (epoch %d done)", folder, state["epoch"])
        return int(state["epoch"]) + 1, best, int(state["bad_epochs"])

    def _read_checkpoint(
        self,
    ) -> tuple[
        Path, dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]
    ]:
        """Read the latest checkpoint, or the newest older one when the latest is damaged.

        Checkpoints are written atomically, so damage means the disk or a person changed a file
        afterwards. The previous checkpoint, kept beside the latest, then saves the run.

        Raises:
            ArtifactError: there is no checkpoint, or every kept one is damaged.
        """
        assert self.run_dir is not None
        root = self.run_dir / CHECKPOINTS
        if not (root / LATEST).is_file():
            raise ArtifactError(f"no checkpoint to resume from in {root}; start without --resume")
        candidates: list[Path] = []
        try:
            latest = read_latest(root)
            if latest is not None:
                candidates.append(latest[0])
        except (ArtifactError, ValueError, KeyError) as exc:
            logger.warning("cannot follow %s: %s", root / LATEST, exc)
        candidates += sorted(
            (p for p in root.glob("epoch-*") if p.is_dir() and p not in candidates), reverse=True
        )
        problems: list[str] = []
        for folder in candidates:
            try:
                state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
                tensors = [load_tensors(folder / name) for name in CHECKPOINT_TENSOR_FILES]
            except (ArtifactError, OSError, ValueError) as exc:
                problems.append(f"{folder.name}: {exc}")
                logger.warning("checkpoint %s is damaged (%s); trying an older one", folder, exc)
                continue
            if problems:
                logger.warning("resuming from %s, the newest undamaged checkpoint", folder)
            return folder, state, tensors[0], tensors[1], tensors[2]
        raise ArtifactError(
            f"no undamaged checkpoint in {root}: {'; '.join(problems) or 'no checkpoint folder'}; "
            "train again without --resume, or restore the checkpoint files from a backup"
        )

    def write_metrics(self, result: FitResult, test: Metrics | None = None) -> None:
        """Write ``metrics.json``: per-epoch history, best epoch and (when given) test metrics.

        Only rank 0 writes it in a distributed run, and the call does nothing on the other ranks.
        """
        if not self.writes_files or self.run_dir is None:
            return
        payload: dict[str, Any] = {
            "best_epoch": result.best_epoch,
            "best_value": result.best_value,
            "early_stopping_metric": self.config.training.early_stopping.metric
            if self.config.training.early_stopping
            else None,
            "epochs": [_record_to_json(r) for r in result.history],
            "steps_file": STEPS_FILE,
        }
        if test is not None:
            payload["test"] = test
        atomic_write_text(self.run_dir / METRICS_FILE, json.dumps(finite_json(payload), indent=2))


def _lookup(metrics: Metrics, key: str) -> float:
    scope, _, metric = key.partition("/")
    return metrics[scope][metric]


def _format_values(values: Mapping[str, float]) -> str:
    """Format ``{key: value}`` as ``key=value`` pairs on one line, five significant digits each."""
    return " ".join(f"{key}={value:.5g}" for key, value in values.items())


def format_metrics(values: Mapping[str, float]) -> str:
    """Format one task's metrics as ``name=value`` pairs: group counts as integers, the rest to five decimals."""
    return " ".join(
        f"{key}={int(value)}" if key.endswith("_groups_skipped") else f"{key}={value:.5f}"
        for key, value in values.items()
    )


def _record_to_json(record: EpochRecord) -> dict[str, Any]:
    return {
        "epoch": record.epoch,
        "train": record.train,
        "valid": record.valid,
        "seconds": record.seconds,
        "samples_per_second": record.samples_per_second,
        "cpu_seconds": record.cpu_seconds,
    }


def _record_from_json(data: dict[str, Any]) -> EpochRecord:
    return EpochRecord(
        data["epoch"],
        data["train"],
        data["valid"],
        data["seconds"],
        data["samples_per_second"],
        data.get("cpu_seconds"),
    )


def finite_json(value: Any) -> Any:
    """Replace NaN and infinities with ``None`` so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    if isinstance(value, np.floating):
        return finite_json(float(value))
    return value
