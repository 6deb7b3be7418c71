"""The training loop: batches, task losses, loss balancing, validation, early stopping, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtrank.config.schema import RunConfig, TaskConfig, TrainingConfig
from mtrank.data.tensors import EncodedData, iterate_batches
from mtrank.errors import ArtifactError, ConfigError
from mtrank.training.checkpoint import (
    atomic_save_tensors,
    atomic_write_text,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_latest,
    write_checkpoint,
)
from mtrank.training.evaluation import Metrics, evaluate_model
from mtrank.training.losses import task_loss_list
from mtrank.training.progress import NoProgress, Progress

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
# Per-epoch seeds are derived from the run seed with this stride, so epoch k's shuffling and dropout
# are the same whether the run was resumed or not.
EPOCH_SEED_STRIDE = 1_000_003


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


@dataclass
class EpochRecord:
    """What one epoch produced, as stored in ``metrics.json``."""

    epoch: int
    train: dict[str, float]
    valid: Metrics | None
    seconds: float
    samples_per_second: float


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
    uninterrupted run would.

    Args:
        model: the ranker (or any module with the same ``forward``).
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

        self.model = model
        self.config = config
        self.tasks: list[TaskConfig] = list(config.tasks)
        self.loss_kinds = [t.loss or "bce" for t in self.tasks]
        self.run_dir = run_dir
        self.progress = progress or NoProgress()
        params = list(trainable) if trainable is not None else [p for p in model.parameters() if p.requires_grad]
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
        self.shared_parameters: list[nn.Parameter] = []
        if self.balancer.needs_shared_parameters:
            self.shared_parameters = self._shared_parameters(shared_layer)

    def _shared_parameters(self, pattern: str | None) -> list[nn.Parameter]:
        """Pick GradNorm's shared layer W: by name prefix from the config, else the model's default."""
        if pattern:
            named = [(n, p) for n, p in self.model.named_parameters() if n.startswith(pattern) and p.requires_grad]
            if not named:
                choices = sorted({n.rsplit(".", 1)[0] for n, _ in self.model.named_parameters()})
                raise ConfigError(
                    [f"training.balancer.options.shared_layer: no parameter starts with `{pattern}`; "
                     f"layers are: {', '.join(choices[:40])}"]
                )
        else:
            from mtrank.balancing import default_shared_parameters

            named = default_shared_parameters(self.model)
        logger.info("GradNorm shared layer W: %s", ", ".join(n for n, _ in named))
        return [p for _, p in named]

    # ------------------------------------------------------------------------------------------------
    def train_epoch(self, data: EncodedData, epoch: int) -> dict[str, float]:
        """Run one epoch; return mean raw loss and final weight per task, and the mean total loss."""
        config = self.config
        torch.manual_seed(config.seed + EPOCH_SEED_STRIDE * epoch)
        generator = torch.Generator().manual_seed(config.seed + EPOCH_SEED_STRIDE * epoch + 1)
        self.model.train()
        loss_sum = torch.zeros(len(self.tasks), dtype=torch.float64)
        total_sum = 0.0
        steps = 0
        batch_size = config.training.batch_size
        # Batch norm cannot normalise a single row in training mode, so a last batch of one row is left
        # out of the epoch. Shuffling makes it a different row each epoch.
        skip_single_row = any(isinstance(m, (nn.BatchNorm1d, nn.SyncBatchNorm)) for m in self.model.modules())
        self.progress.start(f"epoch {epoch}", math.ceil(len(data) / batch_size))
        for batch in iterate_batches(data, batch_size, shuffle=True, generator=generator):
            assert batch.labels is not None  # training data is always encoded with labels
            if skip_single_row and len(batch) == 1:
                logger.debug("epoch %d: skipped a last batch of one row (batch norm needs two)", epoch)
                self.progress.advance()
                continue
            output = self.model(batch)
            loss_list = task_loss_list(output.logits, batch.labels, self.loss_kinds)  # T scalars
            losses = torch.stack([loss.detach() for loss in loss_list])  # (T,)
            self.optimizer.zero_grad(set_to_none=True)
            self.balancer.zero_grad(set_to_none=True)
            total = self.balancer.combine(loss_list, self.shared_parameters)
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"epoch {epoch}, step {steps}: the total loss is {total.item()} (per task: "
                    f"{dict(zip([t.name for t in self.tasks], losses.tolist()))}); lower `training.lr`"
                )
            total.backward()
            self.optimizer.step()
            self.balancer.step()
            loss_sum += losses.detach().double()
            total_sum += float(total.detach())
            steps += 1
            self.progress.advance()
        self.progress.stop()
        mean_losses = loss_sum / max(steps, 1)
        self.balancer.end_epoch(mean_losses.float())
        weights = self.balancer.weights().detach()
        record = {f"loss/{t.name}": float(mean_losses[i]) for i, t in enumerate(self.tasks)}
        record.update({f"weight/{t.name}": float(weights[i]) for i, t in enumerate(self.tasks)})
        record["loss/total"] = total_sum / max(steps, 1)
        for key, value in self.balancer.last_stats().items():
            record.setdefault(key, float(value))
        return record

    def evaluate(self, data: EncodedData, split: str = "") -> Metrics:
        """Per-task metrics of the current model on ``data``."""
        return evaluate_model(
            self.model,
            data,
            self.tasks,
            self.config.evaluation.group_column,
            batch_size=self.config.training.eval_batch_size,
            split=split,
        )

    # ------------------------------------------------------------------------------------------------
    def fit(
        self, train: EncodedData, valid: EncodedData | None, *, resume: bool = False, stop_after: int | None = None
    ) -> FitResult:
        """Train for the configured epochs with early stopping; keep the best weights.

        Args:
            train: training split.
            valid: validation split for early stopping; without it the last epoch is kept.
            resume: continue from the latest checkpoint in ``run_dir`` (must exist).
            stop_after: stop after this many epochs of this call (simulates an interruption in tests).

        Returns:
            :class:`FitResult`; the model holds the best weights afterwards.
        """
        training = self.config.training
        stopping = training.early_stopping if valid is not None else None
        result = FitResult()
        best_state: dict[str, torch.Tensor] | None = None
        bad_epochs = 0
        start_epoch = 1
        if resume:
            start_epoch, best_state, bad_epochs = self._resume(result)

        epochs_run = 0
        for epoch in range(start_epoch, training.epochs + 1):
            started = time.perf_counter()
            train_record = self.train_epoch(train, epoch)
            seconds = time.perf_counter() - started
            valid_metrics = self.evaluate(valid, "valid") if valid is not None else None
            record = EpochRecord(epoch, train_record, valid_metrics, seconds, len(train) / max(seconds, 1e-9))
            result.history.append(record)
            self._log_epoch(record)

            improved = True
            if stopping is not None and valid_metrics is not None:
                value = _lookup(valid_metrics, stopping.metric)
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
            epochs_run += 1
            if stopping is not None and bad_epochs >= stopping.patience:
                logger.info(
                    "early stopping after epoch %d: %s has not improved for %d epoch(s); best %.5f at epoch %d",
                    epoch, stopping.metric, bad_epochs, result.best_value, result.best_epoch,
                )
                result.stopped_early = True
                break
            if stop_after is not None and epochs_run >= stop_after:
                break

        if best_state is not None:
            self.model.load_state_dict(best_state)
        if self.run_dir is not None:
            atomic_save_tensors(self.run_dir / WEIGHTS_FILE, self.model.state_dict())
        return result

    def _log_epoch(self, record: EpochRecord) -> None:
        parts = [f"{k}={v:.5f}" for k, v in record.train.items() if k.startswith(("loss/", "weight/"))]
        logger.info("epoch %d train (%.1f s, %.0f samples/s): %s", record.epoch, record.seconds,
                    record.samples_per_second, " ".join(parts))
        if record.valid is not None:
            for task, values in record.valid.items():
                logger.info("epoch %d valid %s: %s", record.epoch, task,
                            " ".join(f"{k}={v:.5f}" for k, v in values.items()))

    def _checkpoint(
        self, epoch: int, result: FitResult, best_state: dict[str, torch.Tensor] | None, bad_epochs: int
    ) -> None:
        if self.run_dir is None:
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
        latest = read_latest(self.run_dir / CHECKPOINTS)
        if latest is None:
            raise ArtifactError(f"no checkpoint to resume from in {self.run_dir / CHECKPOINTS}; start without --resume")
        folder, state = latest
        self.model.load_state_dict(load_tensors(folder / "model.safetensors"))
        optimizer_from_tensors(self.optimizer, load_tensors(folder / "optimizer.safetensors"), state["optimizer"])
        extra = load_tensors(folder / "extra.safetensors")
        self.balancer.load_state_dict({k[len("balancer."):]: v for k, v in extra.items() if k.startswith("balancer.")})
        balancer_optimizer = getattr(self.balancer, "optimizer", None)
        if balancer_optimizer is not None and state.get("balancer_optimizer"):
            prefix = "balancer_optimizer."
            tensors = {k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)}
            optimizer_from_tensors(balancer_optimizer, tensors, state["balancer_optimizer"])
        best = {k[len("best."):]: v for k, v in extra.items() if k.startswith("best.")} or None
        result.best_epoch = state["best_epoch"]
        result.best_value = state["best_value"]
        result.history = [_record_from_json(r) for r in state["history"]]
        logger.info("resumed from %s (epoch %d done)", folder, state["epoch"])
        return int(state["epoch"]) + 1, best, int(state["bad_epochs"])

    def write_metrics(self, result: FitResult, test: Metrics | None = None) -> None:
        """Write ``metrics.json``: per-epoch history, best epoch and (when given) test metrics."""
        if self.run_dir is None:
            return
        payload: dict[str, Any] = {
            "best_epoch": result.best_epoch,
            "best_value": result.best_value,
            "early_stopping_metric": self.config.training.early_stopping.metric
            if self.config.training.early_stopping
            else None,
            "epochs": [_record_to_json(r) for r in result.history],
        }
        if test is not None:
            payload["test"] = test
        atomic_write_text(self.run_dir / METRICS_FILE, json.dumps(_finite(payload), indent=2))


def _lookup(metrics: Metrics, key: str) -> float:
    scope, _, metric = key.partition("/")
    return metrics[scope][metric]


def _record_to_json(record: EpochRecord) -> dict[str, Any]:
    return {
        "epoch": record.epoch,
        "train": record.train,
        "valid": record.valid,
        "seconds": record.seconds,
        "samples_per_second": record.samples_per_second,
    }


def _record_from_json(data: dict[str, Any]) -> EpochRecord:
    return EpochRecord(data["epoch"], data["train"], data["valid"], data["seconds"], data["samples_per_second"])


def _finite(value: Any) -> Any:
    """Replace NaN and infinities with ``None`` so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, np.floating):
        return _finite(float(value))
    return value
