"""Fine-tune a trained run with a PEFT method on new data, new tasks or both, and load the result.

:func:`finetune` runs these steps:

1. Load the base run. Its fitted encoders are reused unchanged (never refitted), so a category the
   base never saw maps to the out-of-vocabulary id.
2. Build the ranker for the base tasks plus any new tasks and load the base weights into it. Only the
   new tasks' modules (tower, MMoE gate, PLE task experts) start fresh.
3. Freeze the base with :class:`~mtrank.peft.PeftModel`, inject the method at its targets and register
   the new tasks' modules as trainable modules of the set.
4. Build the optimizer over exactly :meth:`PeftModel.trainable_parameters` and train with the
   :class:`~mtrank.training.trainer.Trainer` on the fine-tune data.
5. Save only the set (:func:`mtrank.peft.save_peft_set`) plus its config and metrics.

Layout of a set folder (default ``BASE_RUN/peft/NAME``)::

    NAME.safetensors   the set's tensors: PEFT modules and new task modules, nothing of the base
    NAME.json          the set's description and the reference to the base run's weights
    finetune.yaml      the fine-tune config and method, to rebuild the new tasks at loading
    metrics.json       per-epoch history, test metrics, parameter counts and training time
    train.log          the fine-tuning log

:func:`load_peft_run` (called by ``load_run(run_dir, peft=NAME)``) rebuilds the base plus the set for
scoring and evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from pydantic import Field, ValidationError
from torch import nn

from mtrank.balancing import BALANCERS
from mtrank.config.loader import check_semantics, describe_error, expand_tree
from mtrank.config.schema import (
    DataConfig,
    RunConfig,
    Strict,
    TaskConfig,
    TrainingConfig,
)
from mtrank.data.encoders import LabelEncoder
from mtrank.data.pipeline import FeatureEncoders, PreparedData, split_and_encode
from mtrank.data.tensors import Batch
from mtrank.errors import ArtifactError, ConfigError, DataError
from mtrank.models.builder import build_ranker
from mtrank.models.mlp import MLP
from mtrank.models.ranker import MultiTaskRanker, RankerOutput
from mtrank.peft import (
    ParameterCounts,
    PeftModel,
    list_peft_sets,
    load_peft_set,
    peft_method_names,
    save_peft_set,
)
from mtrank.peft.base import build_peft_method
from mtrank.peft.inject import SET_NAME_PATTERN
from mtrank.training.checkpoint import atomic_write_text
from mtrank.training.evaluation import Metrics, evaluate_predictions, predict
from mtrank.training.progress import Progress
from mtrank.training.run import LoadedRun, load_run, log_to_file
from mtrank.training.trainer import METRICS_FILE, WEIGHTS_FILE, FitResult, Trainer, finite_json

logger = logging.getLogger(__name__)

PEFT_FOLDER = "peft"
FINETUNE_FILE = "finetune.yaml"
LOG_FILE = "train.log"
FORMAT_NAME = "mtrank-finetune"
FORMAT_VERSION = 1
BASE_REFERENCE_PREFIX = "sha256:"


# ----------------------------------------------------------------------------------------------------
# Config


class PeftMethodSettings(Strict):
    """Targets and options of one PEFT method in a fine-tune config."""

    targets: list[str] | None = Field(
        None, description="module name patterns; default per method, see `default_targets`"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options, e.g. `rank`")


class FinetuneConfig(Strict):
    """Fine-tune settings for a base run: data, tasks, PEFT method settings and training settings.

    The method itself is chosen per call (``mtrank finetune --method``), so one config can compare
    several methods. ``peft`` contains the settings of any method by name.
    """

    name: str = Field(
        "finetune", pattern=f"^{SET_NAME_PATTERN.pattern}$", description="default PEFT set name"
    )
    seed: int = 2024
    data: DataConfig
    tasks: list[str] | None = Field(None, description="base tasks to train; default every base task")
    new_tasks: list[TaskConfig] = Field(default_factory=list, description="tasks that get new towers")
    peft: dict[str, PeftMethodSettings] = Field(default_factory=dict, description="settings per method name")
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    def trained_base_tasks(self, base: RunConfig) -> list[str]:
        """Return the names of the base tasks this fine-tune trains."""
        return list(self.tasks) if self.tasks is not None else base.task_names()


def parse_finetune_config(raw: Any, source: str | None = None) -> FinetuneConfig:
    """Validate a fine-tune config mapping against the schema, reporting every problem together.

    ``${VAR}`` and ``${VAR:-default}`` in string values expand from the environment.

    Raises:
        ConfigError: one or more problems, each with its key path.
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: expected a mapping, got {type(raw).__name__}"], source)
    try:
        return FinetuneConfig.model_validate(expand_tree(raw))
    except ValidationError as error:
        raise ConfigError([describe_error(item, FinetuneConfig) for item in error.errors()], source) from None


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """Read and validate a YAML fine-tune config.

    Raises:
        ConfigError: the file is missing, is not YAML, or contains invalid or unknown keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"fine-tune config file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError([f"invalid YAML: {error}"], str(path)) from None
    return parse_finetune_config(raw, str(path))


def check_finetune_config(config: FinetuneConfig, base: RunConfig, method: str) -> list[str]:
    """Return every problem of ``config`` against the base run's config and the chosen method.

    Checks the task names against the base, the PEFT method names and options, the base
    architecture the method needs, and the training settings (metrics, early stopping, balancer).
    """
    problems: list[str] = []
    base_names = base.task_names()
    trained = config.trained_base_tasks(base)
    # Locations of the tasks checked below: `tasks[i]` (or the base's list by default) and `new_tasks[i]`.
    locations: list[str] = []
    checked: list[TaskConfig] = []
    for index, name in enumerate(trained):
        location = (
            f"tasks[{index}]" if config.tasks is not None else f"base task `{name}` (trained by default)"
        )
        if name not in base_names:
            problems.append(
                f"{location}: `{name}` is not a task of the base run (it has: {', '.join(base_names)}); "
                "define a new task under `new_tasks`"
            )
        elif name in trained[:index]:
            problems.append(f"{location}: `{name}` is listed twice")
        else:
            locations.append(location)
            checked.append(base.tasks[base_names.index(name)])
    for index, task in enumerate(config.new_tasks):
        if task.name in base_names:
            problems.append(
                f"new_tasks[{index}].name: `{task.name}` is already a task of the base run; list it under "
                "`tasks` to train it, or give the new task another name"
            )
        else:
            locations.append(f"new_tasks[{index}]")
            checked.append(task)
    if not trained and not config.new_tasks:
        problems.append("tasks: nothing to train; list base tasks under `tasks` or add `new_tasks`")

    problems += _check_methods(config, base, method)

    balancer = config.training.balancer.name
    if balancer in BALANCERS and BALANCERS[balancer].needs_shared_parameters:
        problems.append(
            f"training.balancer.name: `{balancer}` needs a trainable layer shared by all tasks, and a "
            "frozen base has none; use fixed, uncertainty or dwa"
        )

    combined = base.model_copy(update={"data": config.data, "tasks": checked, "training": config.training})
    problems += _relocate_task_problems(check_semantics(combined), locations)
    return problems


def _check_methods(config: FinetuneConfig, base: RunConfig, method: str) -> list[str]:
    problems: list[str] = []
    known = peft_method_names()
    if method not in known:
        problems.append(f"unknown PEFT method `{method}`; choose one of: {', '.join(known)}")
    for name, settings in config.peft.items():
        if name not in known:
            problems.append(f"peft.{name}: unknown PEFT method; choose one of: {', '.join(known)}")
            continue
        try:
            build_peft_method(name, settings.options)
        except ConfigError as error:
            problems += [f"peft.{name}.options: {problem}" for problem in error.problems]
    if method == "prefix" and base.model.attention is None:
        problems.append(
            "prefix-tuning needs the field-attention block, but the base run was trained without it; "
            "add `model.attention` to the base config (e.g. `attention: {num_layers: 1}`) and train the "
            "base again, or fine-tune with `adapter` or `lora`"
        )
    return problems


def _relocate_task_problems(problems: list[str], locations: list[str]) -> list[str]:
    """Replace ``tasks[i]`` of the combined task list in messages by the task's place in the config."""
    relocated = []
    for problem in problems:
        match = re.match(r"tasks\[(\d+)\]", problem)
        if match is None:
            relocated.append(problem)
        else:
            relocated.append(locations[int(match.group(1))] + problem[match.end() :])
    return relocated


# ----------------------------------------------------------------------------------------------------
# Data with the base run's encoders


def task_label_encoders(
    base: RunConfig, encoders: FeatureEncoders, tasks: Sequence[TaskConfig]
) -> dict[str, tuple[str, LabelEncoder]]:
    """Return ``task name -> (label column, encoder)`` for ``tasks``, in order.

    Base tasks reuse the base run's saved label encoders; new tasks get encoders built from their
    label rules (label encoders need no fitting).
    """
    new = [task for task in tasks if task.name not in encoders.labels]
    built = FeatureEncoders.from_config(base.model_copy(update={"tasks": new})).labels if new else {}
    return {task.name: encoders.labels.get(task.name) or built[task.name] for task in tasks}


def prepare_finetune_data(encoders: FeatureEncoders, data: DataConfig) -> PreparedData:
    """Read, filter, clean and split the fine-tune data, then encode it with fixed encoders.

    Nothing is fitted: feature encoders come from the base run, so values the base never saw map to
    the out-of-vocabulary id and numeric features use the base's statistics. Labels are encoded for
    the tasks in ``encoders.labels``.

    Args:
        encoders: the base run's encoders, with ``labels`` set to the tasks to label.
        data: where the data is and how to split it, as in a run config.

    Returns:
        Encoded train, validation and test splits; ``encoders`` is the one passed in.

    Raises:
        DataError: a file or column is missing, or a split is empty.
    """
    return split_and_encode(data, encoders, fit=False)


# ----------------------------------------------------------------------------------------------------
# The ranker with new tasks


@dataclasses.dataclass
class ExtendedRanker:
    """A base ranker rebuilt with extra tasks, base weights loaded.

    Attributes:
        model: the ranker; its outputs are the base tasks followed by the new tasks.
        config: the base config with the new tasks appended (and position-bias tasks pinned).
        new_modules: dotted names of the modules that exist only for the new tasks, such as
            ``towers.never_married`` and ``backbone.gates.1``; empty without new tasks.
    """

    model: MultiTaskRanker
    config: RunConfig
    new_modules: list[str]


def build_extended_ranker(
    base: RunConfig,
    encoders: FeatureEncoders,
    base_state: Mapping[str, torch.Tensor],
    new_tasks: Sequence[TaskConfig],
) -> ExtendedRanker:
    """Build the base architecture for the base tasks plus ``new_tasks`` and load the base weights.

    The new tasks' modules are whatever the builder adds for a task (a tower, an MMoE gate, PLE task
    experts and gates). They keep their fresh initialisation, drawn from torch's global generator.

    Raises:
        ConfigError: adding the tasks would change the shape of a base tensor (a PLE backbone with
            more than one level sizes its shared gates by the task count), or a new module shares a
            tensor owner with base tensors.
    """
    config = _config_with_tasks(base, new_tasks)
    model = build_ranker(config, encoders)
    expected = model.state_dict()
    problems = [
        f"`{key}` is {tuple(tensor.shape)} in the base, {tuple(expected[key].shape)} with the new tasks"
        for key, tensor in base_state.items()
        if key in expected and expected[key].shape != tensor.shape
    ]
    problems += [
        f"`{key}` of the base has no place in the model with the new tasks"
        for key in base_state
        if key not in expected
    ]
    if problems:
        names = ", ".join(task.name for task in new_tasks)
        raise ConfigError(
            [
                f"new_tasks: adding {names} changes base tensors, so these tasks cannot join this base "
                "as a PEFT set (a PLE base with num_levels > 1 sizes its shared gates by the task count); "
                "train a new base with these tasks instead",
                *problems,
            ]
        )
    model.load_state_dict(dict(base_state), strict=False)
    missing = set(expected) - set(base_state)
    new_modules = _new_module_names(model, missing)
    return ExtendedRanker(model=model, config=config, new_modules=new_modules)


def _config_with_tasks(base: RunConfig, new_tasks: Sequence[TaskConfig]) -> RunConfig:
    if not new_tasks:
        return base
    model = base.model
    bias = model.position_bias
    if bias is not None and not bias.tasks:
        # The shallow tower has one output per biased task; keep it at the base's tasks.
        pinned = [task.name for task in base.tasks if task.type == "binary"]
        model = model.model_copy(update={"position_bias": bias.model_copy(update={"tasks": pinned})})
    return base.model_copy(update={"tasks": [*base.tasks, *new_tasks], "model": model})


def _new_module_names(model: nn.Module, missing: set[str]) -> list[str]:
    """Return the largest modules whose every tensor is in ``missing``, in module order."""
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(chosen + ".") for chosen in names):
            continue
        keys = {f"{name}.{key}" for key in module.state_dict()}
        if keys and keys <= missing:
            names.append(name)
    uncovered = sorted(key for key in missing if not any(key.startswith(name + ".") for name in names))
    if uncovered:
        raise ConfigError(
            [
                f"new_tasks: tensors {uncovered} are new but belong to modules that also hold base tensors; "
                "such a module cannot be trained apart from the frozen base"
            ]
        )
    return names


class TaskSubset(nn.Module):
    """View of a ranker that outputs only some task columns, so the trainer computes their losses only.

    Shapes: B batch, T tasks of the ranker, S selected tasks.

    Args:
        model: the ranker (or a :class:`PeftModel` around it).
        indices: S column indices into the ranker's T outputs, in the order of the trained tasks.
    """

    def __init__(self, model: nn.Module, indices: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.int64), persistent=False)

    def forward(self, batch: Batch) -> RankerOutput:
        """Score ``batch`` and keep the selected columns: logits ``(B, T) -> (B, S)``."""
        output = self.model(batch)
        return dataclasses.replace(output, logits=output.logits.index_select(1, self.indices))


# ----------------------------------------------------------------------------------------------------
# Targets


def default_targets(method: str, model: MultiTaskRanker) -> list[str] | None:
    """Return the default target module names of ``method`` on ``model``, or ``None`` for the method's own.

    - ``adapter``: after every expert MLP of the backbone (the shared bottom for shared-bottom), after
      the last hidden block of every tower, and after the field-attention block when there is one.
    - ``lora``: every linear layer of the backbone (experts and gates) and of the towers.
    - ``prefix``: the field-attention block.
    """
    if method == "adapter":
        targets = [
            name
            for name, module in model.backbone.named_modules(prefix="backbone")
            if isinstance(module, MLP)
        ]
        for task, tower in model.towers.items():
            tower_layers = cast(MLP, tower).layers
            linear_positions = [i for i, layer in enumerate(tower_layers) if isinstance(layer, nn.Linear)]
            if len(linear_positions) >= 2:
                # The block just before the output layer, so that the adapter adapts the hidden width.
                targets.append(f"towers.{task}.layers.{linear_positions[-1] - 1}")
        if model.interaction is not None:
            targets.append("interaction")
        return targets
    if method == "lora":
        return ["backbone.**", "towers.**"]
    if method == "prefix":
        return ["interaction"]
    return None


def resolve_set_targets(
    peft_model: PeftModel,
    method: str,
    patterns: Sequence[str] | None,
    options: Mapping[str, Any],
    exclude: Sequence[str],
) -> list[str]:
    """Resolve target patterns to module names, leaving out the modules in ``exclude`` and below.

    New task modules are trained whole, so no PEFT module goes inside them.

    Raises:
        ConfigError: a pattern matches nothing the method accepts, or nothing is left after the
            exclusion.
    """
    names = peft_model.match_targets(method, patterns, options)
    kept = [
        name for name in names if not any(name == item or name.startswith(item + ".") for item in exclude)
    ]
    if len(kept) < len(names):
        logger.info("PEFT targets inside new task modules left out: %s", sorted(set(names) - set(kept)))
    if not kept:
        raise ConfigError(
            [
                f"peft.{method}.targets: the patterns {list(patterns or [])} select only modules of new "
                "tasks, which train whole; target base modules such as `backbone.**`"
            ]
        )
    return kept


# ----------------------------------------------------------------------------------------------------
# Fine-tuning


@dataclasses.dataclass
class FinetuneResult:
    """Outcome of :func:`finetune`.

    Attributes:
        set_name: the PEFT set's name.
        set_dir: the folder the set was saved to.
        method: the PEFT method.
        model: the base model with the set, active.
        trainer: the trainer. Its ``optimizer`` contains exactly the set's trainable parameters.
        fit: the training history.
        test_metrics: metrics of the trained tasks on the fine-tune test split, set active.
        counts: trainable values during training and base values.
        train_seconds: wall time of training.
        data: the encoded fine-tune splits.
        new_modules: modules trained whole for the new tasks.
    """

    set_name: str
    set_dir: Path
    method: str
    model: PeftModel
    trainer: Trainer
    fit: FitResult
    test_metrics: Metrics
    counts: ParameterCounts
    train_seconds: float
    data: PreparedData
    new_modules: list[str]


def base_reference(run_dir: Path) -> str:
    """Return the reference a PEFT set stores to its base run: the SHA-256 of its weights file.

    A run folder can move, but its weights define what the set was trained on.
    """
    digest = hashlib.sha256()
    with (run_dir / WEIGHTS_FILE).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return BASE_REFERENCE_PREFIX + digest.hexdigest()


def finetune(
    base_run: str | Path,
    config: FinetuneConfig,
    method: str,
    *,
    name: str | None = None,
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Fine-tune a trained run with a PEFT method and save only the set.

    Args:
        base_run: the finished base run folder.
        config: the validated fine-tune config.
        method: ``adapter``, ``lora``, ``prefix`` or another registered PEFT method.
        name: the set's name; default ``config.name``.
        out_dir: folder for the set's files; default ``BASE_RUN/peft/NAME``.
        progress: progress hook for the CLI.

    Returns:
        :class:`FinetuneResult`.

    Raises:
        ConfigError: the config does not fit the base run or the method (every problem listed).
        ArtifactError: the base run is incomplete, or the output folder already contains a set.
        DataError: the fine-tune data is missing a column or a split is empty.
    """
    base_dir = Path(base_run)
    base = load_run(base_dir)
    set_name = name or config.name
    problems = check_finetune_config(config, base.config, method)
    if SET_NAME_PATTERN.fullmatch(set_name) is None:
        problems.append(
            f"invalid PEFT set name {set_name!r}: use letters, digits, `_` and `-`, starting with a letter"
        )
    if problems:
        raise ConfigError(problems)
    set_dir = Path(out_dir) if out_dir is not None else base_dir / PEFT_FOLDER / set_name
    if (set_dir / FINETUNE_FILE).exists() or list_peft_sets(set_dir):
        raise ArtifactError(
            f"{set_dir} already contains a fine-tuned PEFT set; choose another --name or -o, or delete it"
        )
    set_dir.mkdir(parents=True, exist_ok=True)
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    with log_to_file(set_dir / LOG_FILE):
        return _finetune_in(base_dir, base, config, method, set_name, set_dir, progress)


def _inject_set(
    extended: ExtendedRanker, set_name: str, method: str, settings: PeftMethodSettings
) -> PeftModel:
    """Freeze the extended ranker, inject set ``set_name`` and make the new task modules trainable with it."""
    peft_model = PeftModel(extended.model)
    patterns = settings.targets or default_targets(method, extended.model)
    targets = resolve_set_targets(peft_model, method, patterns, settings.options, extended.new_modules)
    peft_model.inject(set_name, method, targets, settings.options, activate=False)
    for module_name in extended.new_modules:
        peft_model.add_trainable_module(set_name, module_name)
    peft_model.enable(set_name)
    counts = peft_model.parameter_counts(set_name)
    logger.info(
        "PEFT set %s: %d trainable values (%.3f%% of the base's %d), new task modules: %s",
        set_name,
        counts.trainable,
        counts.percent_of_base,
        counts.base,
        extended.new_modules or "none",
    )
    return peft_model


def _finetune_in(
    base_dir: Path,
    base: LoadedRun,
    config: FinetuneConfig,
    method: str,
    set_name: str,
    set_dir: Path,
    progress: Progress | None,
) -> FinetuneResult:
    logger.info("fine-tuning %s with %s into PEFT set %s at %s", base_dir, method, set_name, set_dir)
    base_config = base.config
    trained_tasks = [
        base_config.tasks[base_config.task_names().index(task)]
        for task in config.trained_base_tasks(base_config)
    ]
    trained_tasks += config.new_tasks

    torch.manual_seed(config.seed)
    extended = build_extended_ranker(base_config, base.encoders, base.model.state_dict(), config.new_tasks)
    settings = config.peft.get(method, PeftMethodSettings())
    peft_model = _inject_set(extended, set_name, method, settings)
    counts = peft_model.parameter_counts(set_name)

    encoders = dataclasses.replace(
        base.encoders, labels=task_label_encoders(base_config, base.encoders, trained_tasks)
    )
    data = prepare_finetune_data(encoders, config.data)
    train_config = extended.config.model_copy(
        update={
            "name": set_name,
            "seed": config.seed,
            "data": config.data,
            "tasks": trained_tasks,
            "training": config.training,
        }
    )
    task_names = extended.config.task_names()
    indices = [task_names.index(task.name) for task in trained_tasks]
    trained_model: nn.Module = (
        peft_model if indices == list(range(len(task_names))) else TaskSubset(peft_model, indices)
    )
    # The optimizer is built here, after injection, over exactly the set's trainable parameters.
    trainer = Trainer(
        trained_model,
        train_config,
        run_dir=None,
        trainable=peft_model.trainable_parameters(set_name),
        progress=progress,
    )
    started = time.perf_counter()
    fit = trainer.fit(data.train, data.valid)
    train_seconds = time.perf_counter() - started
    test_metrics = trainer.evaluate(data.test, "test")
    for task, values in test_metrics.items():
        logger.info("test %s: %s", task, " ".join(f"{k}={v:.5f}" for k, v in values.items()))

    # NOTE: a prefix set is saved with its reparameterisation MLP, so the returned model still matches
    # the optimizer. load_peft_run collapses the MLP into plain prefixes for scoring.
    peft_model.eval()
    reference = base_reference(base_dir)
    save_peft_set(peft_model, set_name, set_dir, base_run=reference)
    record = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "set_name": set_name,
        "method": method,
        "base_run": str(base_dir.resolve()),
        "base_reference": reference,
        "config": config.model_dump(mode="json", by_alias=True),
    }
    atomic_write_text(set_dir / FINETUNE_FILE, yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    metrics = {
        "set_name": set_name,
        "method": method,
        "trained_tasks": [task.name for task in trained_tasks],
        "new_modules": extended.new_modules,
        "trainable_values": counts.trainable,
        "base_values": counts.base,
        "percent_of_base": counts.percent_of_base,
        "train_seconds": train_seconds,
        "best_epoch": fit.best_epoch,
        "best_value": fit.best_value,
        "epochs": [dataclasses.asdict(epoch) for epoch in fit.history],
        "test": test_metrics,
    }
    atomic_write_text(set_dir / METRICS_FILE, json.dumps(finite_json(metrics), indent=2))
    return FinetuneResult(
        set_name=set_name,
        set_dir=set_dir,
        method=method,
        model=peft_model,
        trainer=trainer,
        fit=fit,
        test_metrics=test_metrics,
        counts=counts,
        train_seconds=train_seconds,
        data=data,
        new_modules=extended.new_modules,
    )


# ----------------------------------------------------------------------------------------------------
# Loading a base run plus a set


def resolve_set_dir(run_dir: Path, peft: str | Path) -> Path:
    """Return the folder of PEFT set ``peft``: a set folder path, or a name under ``RUN/peft/``.

    Raises:
        ArtifactError: no such set; the message lists the sets under ``RUN/peft/``.
    """
    candidate = Path(peft)
    if (candidate / FINETUNE_FILE).is_file():
        return candidate
    named = run_dir / PEFT_FOLDER / str(peft)
    if (named / FINETUNE_FILE).is_file():
        return named
    folder = run_dir / PEFT_FOLDER
    available = (
        sorted(path.parent.name for path in folder.glob(f"*/{FINETUNE_FILE}")) if folder.is_dir() else []
    )
    looked = (
        f"{named} does not" if named.resolve() == candidate.resolve() else f"neither {named} nor {candidate}"
    )
    verb = "contain" if looked.endswith("does not") else "contains"
    raise ArtifactError(
        f"PEFT set {str(peft)!r} not found: {looked} {verb} {FINETUNE_FILE}; "
        f"sets of this run: {', '.join(available) or 'none'} (create one with `mtrank finetune`)"
    )


@dataclasses.dataclass
class FinetuneRecord:
    """The content of a set folder's ``finetune.yaml``."""

    set_name: str
    method: str
    base_run: str
    base_reference: str
    config: FinetuneConfig


def read_finetune_record(set_dir: Path) -> FinetuneRecord:
    """Read and validate ``finetune.yaml`` of a set folder.

    Raises:
        ArtifactError: the file is missing, of another format, or lacks a field.
        ConfigError: the stored fine-tune config is invalid.
    """
    path = set_dir / FINETUNE_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} not found; {set_dir} is not a fine-tuned PEFT set folder")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not an {FORMAT_NAME} file")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {raw.get('format_version')!r}; "
            f"this mtrank reads version {FORMAT_VERSION}"
        )
    missing = [
        key for key in ("set_name", "method", "base_run", "base_reference", "config") if key not in raw
    ]
    if missing:
        raise ArtifactError(f"{path} is missing the keys {', '.join(missing)}")
    return FinetuneRecord(
        set_name=str(raw["set_name"]),
        method=str(raw["method"]),
        base_run=str(raw["base_run"]),
        base_reference=str(raw["base_reference"]),
        config=parse_finetune_config(raw["config"], str(path)),
    )


def load_peft_run(run_dir: str | Path, peft: str | Path) -> LoadedRun:
    """Load a base run plus a fine-tuned PEFT set, active, in eval mode.

    The returned run scores the base tasks followed by the set's new tasks, and its ``config.data``
    is the fine-tune data config, so evaluation and scoring read files the way fine-tuning did
    (filters included).

    Args:
        run_dir: the base run folder.
        peft: a set name under ``RUN/peft/`` or a set folder.

    Raises:
        ArtifactError: the set is missing or corrupt, or was trained on other base weights.
    """
    run_dir = Path(run_dir)
    set_dir = resolve_set_dir(run_dir, peft)
    record = read_finetune_record(set_dir)
    base = load_run(run_dir)
    new_tasks = record.config.new_tasks
    extended = build_extended_ranker(base.config, base.encoders, base.model.state_dict(), new_tasks)
    peft_model = load_peft_set(
        extended.model, set_dir, record.set_name, expected_base_run=base_reference(run_dir)
    )
    trained_modules = peft_model.spec(record.set_name).trainable_modules
    if sorted(trained_modules) != sorted(extended.new_modules):
        raise ArtifactError(
            f"PEFT set `{record.set_name}` trained modules {trained_modules}, but its new tasks need "
            f"{extended.new_modules} on this base; the set folder {set_dir} does not match its base run"
        )
    if record.method == "prefix" and not peft_model.spec(record.set_name).prefix_collapsed:
        # Scoring needs only the prefixes, not the MLP that produced them during training.
        peft_model.collapse_prefix(record.set_name)
    peft_model.eval()
    encoders = dataclasses.replace(
        base.encoders, labels=task_label_encoders(base.config, base.encoders, extended.config.tasks)
    )
    config = extended.config.model_copy(update={"data": record.config.data})
    logger.info("loaded %s with PEFT set %s (%s) from %s", run_dir, record.set_name, record.method, set_dir)
    return LoadedRun(run_dir, config, encoders, peft_model, peft_set=record.set_name, peft_dir=set_dir)


def evaluate_finetune_split(run: LoadedRun, split: str = "test") -> Metrics:
    """Score a loaded run on a split of its own data config, encoded with its saved encoders.

    For a run loaded with a PEFT set, this is the fine-tune scenario's split, and every task of the
    run (base and new) is evaluated, so the data needs every task's label column.

    Args:
        run: a loaded run.
        split: ``train``, ``valid`` or ``test``.

    Raises:
        DataError: a label column is missing or the split is empty.
    """
    data = prepare_finetune_data(run.encoders, run.config.data)
    chosen = {"train": data.train, "valid": data.valid, "test": data.test}[split]
    if chosen is None:
        raise DataError(f"the data config of {run.run_dir} has no {split} split")
    kinds = [task.loss or "bce" for task in run.config.tasks]
    predictions = predict(run.model, chosen, kinds, run.config.training.eval_batch_size)
    return evaluate_predictions(
        predictions, chosen, run.config.tasks, run.config.evaluation.group_column, split
    )
