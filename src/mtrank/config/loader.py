"""Read a YAML run configuration and validate it, reporting every problem at once."""

from __future__ import annotations

import logging
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mtrank.config.schema import BackboneConfig, CategoricalFeature, FeatureConfig, RunConfig, SplitConfig
from mtrank.errors import ConfigError

logger = logging.getLogger(__name__)

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Union fields whose error locations carry the discriminator tag right after the field name.
_TAGGED_UNIONS = {"split", "backbone", "features"}


def expand_env(text: str) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` with environment values.

    Raises:
        ConfigError: a variable is unset and has no default.
    """

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None:
            if default is None:
                raise ConfigError(
                    [
                        f"environment variable `{name}` is not set (used in `{text}`); set it or use ${{{name}:-default}}"
                    ]
                )
            return default
        return value

    return _ENV_PATTERN.sub(substitute, text)


def _format_location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    skip_tag = False
    for i, element in enumerate(loc):
        if skip_tag:
            skip_tag = False
            continue
        if isinstance(element, int):
            parts.append(f"[{element}]")
            if i > 0 and loc[i - 1] == "features":
                skip_tag = True
            continue
        parts.append(("." if parts else "") + element)
        if element in ("split", "backbone") and i + 1 < len(loc) and isinstance(loc[i + 1], str):
            skip_tag = _is_tag(loc[i + 1])
    return "".join(parts) or "<root>"


def _is_tag(name: int | str) -> bool:
    return name in {"random", "column", "files", "shared_bottom", "mmoe", "ple", "categorical", "numeric"}


def _model_at(loc: tuple[int | str, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """Return the config model class that owns the key at ``loc``, to list its allowed keys."""
    current: Any = root
    skip_key = False
    for element in loc[:-1]:
        if isinstance(element, int):
            continue
        if skip_key:  # a key of a mapping whose values are models
            skip_key = False
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and element in current.model_fields:
            current, skip_key = _unwrap(current.model_fields[element].annotation)
        elif isinstance(current, tuple):
            matches = [m for m in current if _tag_of(m) == element]
            if not matches:
                return None
            current = matches[0]
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Return the model class (or tuple of union members) inside an annotation, and whether it is a mapping."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated or origin is list:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is dict:
        inner, _ = _unwrap(typing.get_args(annotation)[1])
        return inner, True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and origin is not None:
        models = tuple(a for a in args if isinstance(a, type) and issubclass(a, BaseModel))
        if len(models) == 1:
            return models[0], False
        if models:
            return models, False
    return annotation, False


def _tag_of(model: type[BaseModel]) -> str | None:
    for key in ("method", "kind", "type"):
        field = model.model_fields.get(key)
        if field is not None:
            args = typing.get_args(field.annotation)
            if args:
                return str(args[0])
    return None


def describe_error(error: Any, root: type[BaseModel] = RunConfig) -> str:
    """Turn one pydantic error of a ``root`` config into ``key.path: what is wrong (got value)``."""
    loc = tuple(error["loc"])
    path = _format_location(loc)
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc, root)
        keys = [field.alias or name for name, field in owner.model_fields.items()] if owner else []
        allowed = f"; allowed keys: {', '.join(keys)}" if keys else ""
        return f"{path}: unknown key{allowed}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    if error["type"] == "union_tag_not_found":
        key = str(error.get("ctx", {}).get("discriminator", "")).strip("'")
        return f"{path}.{key}: required key is missing; choose one of: {', '.join(_tag_choices(key))}"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"{path}: {error['msg']} (got {shown})"


def _tag_choices(key: str) -> list[str]:
    """Return the accepted values of a tagged union's tag key (``method``, ``type`` or ``kind``)."""
    union = {"method": SplitConfig, "type": FeatureConfig, "kind": BackboneConfig}.get(key)
    if union is None:
        return []
    members = typing.get_args(typing.get_args(union)[0])  # Annotated[Union[...], Field] -> the classes
    return [tag for member in members if (tag := _tag_of(member)) is not None]


def expand_tree(value: Any) -> Any:
    """Expand ``${VAR}`` in every string of a YAML tree."""
    if isinstance(value, str):
        return expand_env(value)
    if isinstance(value, list):
        return [expand_tree(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_tree(v) for k, v in value.items()}
    return value


def parse_config(raw: dict[str, Any], source: str | None = None) -> RunConfig:
    """Validate a config mapping, reporting every schema and cross-field problem together.

    Args:
        raw: the mapping read from YAML.
        source: the file it came from, named in error messages.

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        ConfigError: one or more problems; ``problems`` lists each with its key path.
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: expected a mapping, got {type(raw).__name__}"], source)
    expanded = expand_tree(raw)
    try:
        config = RunConfig.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError([describe_error(e) for e in exc.errors()], source) from None
    problems = check_semantics(config)
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run configuration.

    Raises:
        ConfigError: the file is missing, is not YAML, or contains invalid values.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError([f"{path} is a folder; give the YAML config file, such as {path / 'census.yaml'}"])
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], str(path)) from None
    return parse_config(raw, str(path))


def check_semantics(config: RunConfig) -> list[str]:
    """Return the cross-field problems of a schema-valid config (empty when it is consistent)."""
    from mtrank.balancing import balancer_names
    from mtrank.embeddings import EMBEDDING_KINDS
    from mtrank.models.activations import activation_names
    from mtrank.training.metrics import check_metric_names

    problems: list[str] = []
    problems += _duplicates("features", [f.name for f in config.features])
    problems += _duplicates("tasks", [t.name for t in config.tasks])

    feature_columns = {f.source: f"features[{i}]" for i, f in enumerate(config.features)}
    for i, task in enumerate(config.tasks):
        if task.label.column in feature_columns:
            problems.append(
                f"tasks[{i}].label.column: `{task.label.column}` is also the source of "
                f"{feature_columns[task.label.column]} (label leakage); remove it from the features"
            )

    for i, feature in enumerate(config.features):
        if isinstance(feature, CategoricalFeature):
            kind = feature.embedding.kind
            if kind not in EMBEDDING_KINDS:
                problems.append(
                    f"features[{i}].embedding.kind: unknown kind `{kind}`; choose one of: {', '.join(sorted(EMBEDDING_KINDS))}"
                )

    if config.model.activation.lower() not in activation_names():
        problems.append(
            f"model.activation: unknown activation `{config.model.activation}`; choose one of: {', '.join(activation_names())}"
        )

    if config.training.balancer.name not in balancer_names():
        problems.append(
            f"training.balancer.name: unknown balancer `{config.training.balancer.name}`; "
            f"choose one of: {', '.join(balancer_names())}"
        )

    task_metrics: dict[str, list[str]] = {}
    for i, task in enumerate(config.tasks):
        chosen = (
            task.metrics
            if task.metrics is not None
            else default_metrics(task.type, config.evaluation.group_column)
        )
        task_metrics[task.name] = chosen
        problems += [f"tasks[{i}].metrics: {problem}" for problem in check_metric_names(task.type, chosen)]
        for metric in chosen:
            if (metric == "gauc" or metric.startswith("ndcg@")) and not config.evaluation.group_column:
                problems.append(
                    f"tasks[{i}].metrics: `{metric}` needs `evaluation.group_column` (e.g. user_id)"
                )

    if config.model.batch_norm and config.training.batch_size < 2:
        problems.append(
            "training.batch_size: batch norm needs at least 2 rows per training batch, got 1; "
            "raise `training.batch_size` or set `model.batch_norm: false`"
        )

    stopping = config.training.early_stopping
    if stopping is not None:
        scope, _, metric = stopping.metric.partition("/")
        if not metric:
            problems.append(
                f"training.early_stopping.metric: expected `TASK/METRIC` or `mean/METRIC`, got `{stopping.metric}`"
            )
        elif scope == "mean":
            if not any(metric in m for m in task_metrics.values()):
                problems.append(f"training.early_stopping.metric: no task reports `{metric}`")
        elif scope not in task_metrics:
            problems.append(
                f"training.early_stopping.metric: unknown task `{scope}`; choose one of: mean, {', '.join(task_metrics)}"
            )
        elif metric not in task_metrics[scope]:
            problems.append(
                f"training.early_stopping.metric: task `{scope}` does not report `{metric}`; it reports: {', '.join(task_metrics[scope])}"
            )

    bias = config.model.position_bias
    if bias is not None and not bias.tasks and not any(t.type == "binary" for t in config.tasks):
        problems.append(
            "model.position_bias.tasks: no task gets the bias (the default is every binary task, and there is none); "
            "list the tasks in `model.position_bias.tasks`"
        )
    if bias is not None:
        for name in bias.tasks:
            if name not in task_metrics:
                problems.append(
                    f"model.position_bias.tasks: unknown task `{name}`; choose from: {', '.join(task_metrics)}"
                )
        if bias.position in feature_columns:
            problems.append(
                f"model.position_bias.position: column `{bias.position}` is also {feature_columns[bias.position]}; "
                "position must reach only the shallow tower (it is missing at serving), so remove it from the features"
            )
    attention = config.model.attention
    for i, feature in enumerate(config.features):
        dim = getattr(getattr(feature, "embedding", None), "dim", None)
        if attention is not None and dim is not None and dim != attention.dim:
            problems.append(
                f"features[{i}].embedding.dim: {dim} differs from model.attention.dim ({attention.dim}); with field "
                "attention every field has that width, so remove the feature's dim or make them equal"
            )
        if feature.source.startswith("true_"):
            problems.append(
                f"features[{i}]: `{feature.source}` is a simulated ground-truth column, kept for evaluation only; "
                "remove it from the features"
            )
    return problems


def default_metrics(task_type: str, group_column: str | None) -> list[str]:
    """Return the metrics a task reports when its config lists none."""
    if task_type == "binary":
        return ["auc", "logloss", "gauc"] if group_column else ["auc", "logloss"]
    return ["mse", "mae"]


def _duplicates(section: str, names: list[str]) -> list[str]:
    seen: set[str] = set()
    problems = []
    for i, name in enumerate(names):
        if name in seen:
            problems.append(f"{section}[{i}].name: duplicate name `{name}`; names must be unique")
        seen.add(name)
    return problems


def dump_config(config: RunConfig) -> str:
    """Render the resolved config as YAML, for the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
