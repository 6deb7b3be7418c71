"""Typed run configuration: data, features, tasks, model, training and evaluation.

Every section rejects unknown keys. :func:`mtrank.config.loader.load_config` validates a YAML file
against these models and reports every problem together, each with its key path.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Vocabulary entries seen fewer times than this in the training split map to the OOV id. One keeps
# every value seen in training, which suits the small public sets shipped as examples.
DEFAULT_MIN_COUNT = 1
# Embedding width when a feature does not set one. Census-Income fields have at most ~50 values.
DEFAULT_EMBEDDING_DIM = 8
# Share of training impressions whose position is replaced by "missing" during training, from Zhao et
# al. 2019 ("Recommending What Video to Watch Next", Section 5.3): it keeps the model from over-relying
# on position, which is always missing at serving time.
DEFAULT_POSITION_DROP_RATE = 0.1


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------------
# data


class RandomSplit(Strict):
    """Seeded random split of one file into train, validation and test rows."""

    method: Literal["random"] = "random"
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of the non-test rows")
    seed: int = 2024


class ColumnSplit(Strict):
    """Split by a column value: rows with ``column <= train_max`` train, the others test."""

    method: Literal["column"]
    column: str
    train_max: float | int | str
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of train rows held out, seeded")
    seed: int = 2024


class FilesSplit(Strict):
    """Separate files: ``data.path`` trains, ``valid_path`` and ``test_path`` evaluate."""

    method: Literal["files"]
    valid_path: str | None = None
    test_path: str
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="used only when valid_path is unset")
    seed: int = 2024
    header: bool | None = Field(
        None,
        description="whether valid_path and test_path start with a header line; default data.header. "
        "Header-less files take data.column_names, or else the training file's header names",
    )


SplitConfig = Annotated[RandomSplit | ColumnSplit | FilesSplit, Field(discriminator="method")]


class JoinConfig(Strict):
    """A side table (such as user features) left-joined onto the log by a key column."""

    path: str
    key: str = Field(description="column present in both files")
    format: Literal["auto", "csv", "tsv", "parquet"] = "auto"
    separator: str | None = None
    columns: list[str] | None = Field(None, description="columns to keep from the side table; all by default")


class RowFilter(Strict):
    """Keep only rows whose ``column`` passes one test, e.g. one user segment for a scenario."""

    column: str
    equals: str | int | float | None = None
    not_equals: str | int | float | None = None
    isin: list[str | int | float] | None = Field(None, alias="in")
    not_in: list[str | int | float] | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_test(self) -> RowFilter:
        tests = [self.equals, self.not_equals, self.isin, self.not_in]
        if sum(t is not None for t in tests) != 1:
            raise ValueError("set exactly one of `equals`, `not_equals`, `in`, `not_in`")
        return self


# Rows per Arrow record batch read from a Parquet row group while streaming. Each batch is parsed and
# encoded with whole-column Arrow and numpy calls, so their per-call overhead is amortised over
# this many rows, while one batch of 20 columns stays in the tens of megabytes.
DEFAULT_STREAMING_READ_ROWS = 65_536
# Encoded training rows the shuffle buffer holds. Each row is drawn from this many candidates, at
# about 200 bytes per row for 20 features (50 MB). Raise it for better mixing when memory allows.
DEFAULT_SHUFFLE_BUFFER_ROWS = 262_144
# File name suffixes that `data.format: auto` reads as Parquet, as mtrank.data.readers.detect_format does.
PARQUET_SUFFIXES = (".parquet", ".pq")


class StreamingConfig(Strict):
    """Training by row group from a Parquet log larger than memory (see :mod:`mtrank.data.streaming`)."""

    enabled: bool = Field(
        False, description="stream the training rows instead of reading the log into memory"
    )
    read_rows: int = Field(
        DEFAULT_STREAMING_READ_ROWS, ge=1, description="rows per batch read from a Parquet row group"
    )
    shuffle_buffer_rows: int = Field(
        DEFAULT_SHUFFLE_BUFFER_ROWS,
        ge=0,
        description="capacity of the shuffle buffer in encoded training rows; 0 shuffles only within each read batch",
    )


class DataConfig(Strict):
    """Location and parsing of the log files."""

    path: str = Field(description="file path; ${VAR} expands environment variables")
    format: Literal["auto", "csv", "tsv", "parquet"] = "auto"
    header: bool = True
    column_names: list[str] | None = Field(None, description="names for a header-less file, in order")
    separator: str | None = Field(None, description="field separator; default ',' for csv and tab for tsv")
    strip: bool = Field(True, description="strip surrounding spaces from text values")
    missing_values: list[str] = Field(default_factory=lambda: ["", "?"])
    on_invalid: Literal["skip", "error"] = Field(
        "skip", description="rows with unparsable values: skip (counted and logged) or raise"
    )
    missing_labels: Literal["skip_row", "mask"] = Field(
        "skip_row",
        description="a row missing one task's label: skip the row (counted and logged), or keep it and "
        "leave it out of that task's loss and metrics only",
    )
    join: JoinConfig | None = None
    filters: list[RowFilter] = Field(default_factory=list, description="row filters applied before splitting")
    split: SplitConfig = Field(default_factory=RandomSplit)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)

    @model_validator(mode="after")
    def _names_for_headerless(self) -> DataConfig:
        if not self.header and not self.column_names and self.format != "parquet":
            raise ValueError("a file without a header needs `column_names`")
        return self

    @model_validator(mode="after")
    def _streaming_input(self) -> DataConfig:
        if not self.streaming.enabled:
            return self
        fix = "or set `data.streaming.enabled: false` to read the data into memory"
        if isinstance(self.split, RandomSplit):
            raise ValueError(
                "`data.streaming.enabled` supports `data.split.method` `files` or `column`, got `random`; "
                f"split by a column such as a date (`method: column`) or into separate files (`method: files`), {fix}"
            )
        paths = {"data.path": self.path}
        if isinstance(self.split, FilesSplit):
            paths["data.split.test_path"] = self.split.test_path
            if self.split.valid_path is not None:
                paths["data.split.valid_path"] = self.split.valid_path
        if self.format not in ("auto", "parquet"):
            raise ValueError(
                f"`data.streaming.enabled` needs Parquet input, got `data.format: {self.format}`; "
                f"convert the log to Parquet {fix}"
            )
        if self.format == "auto":
            for key, path in paths.items():
                if not set(PARQUET_SUFFIXES) & {suffix.lower() for suffix in PurePath(path).suffixes}:
                    raise ValueError(
                        f"`data.streaming.enabled` needs Parquet input, but `{key}` is {path!r}; convert it to "
                        f"Parquet, set `data.format: parquet` if it is Parquet without a .parquet suffix, {fix}"
                    )
        return self


# ----------------------------------------------------------------------------------------------------
# features


class EmbeddingConfig(Strict):
    """Embedding of a categorical feature. ``options`` go to the embedding kind's constructor."""

    kind: str = "table"
    dim: int | None = Field(None, ge=1, le=4096)
    options: dict[str, Any] = Field(default_factory=dict)


class CategoricalFeature(Strict):
    """A categorical column embedded per value."""

    name: str
    type: Literal["categorical"] = "categorical"
    column: str | None = Field(None, description="source column; defaults to `name`")
    min_count: int = Field(DEFAULT_MIN_COUNT, ge=1)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)

    @property
    def source(self) -> str:
        return self.column or self.name


class NumericFeature(Strict):
    """A numeric column fed to the model as a float after an optional transform and standardisation."""

    name: str
    type: Literal["numeric"]
    column: str | None = None
    transform: Literal["none", "log1p"] = "none"
    standardize: bool = True

    @property
    def source(self) -> str:
        return self.column or self.name


FeatureConfig = Annotated[CategoricalFeature | NumericFeature, Field(discriminator="type")]


# ----------------------------------------------------------------------------------------------------
# tasks


class LabelRule(Strict):
    """How a task's label is derived from a column.

    Exactly one form applies: ``equals`` (1 where the stripped value equals it, else 0),
    ``greater_than`` (1 where the numeric value exceeds it), or neither: the column is used as it is
    (0/1 for binary tasks, a number after ``transform`` for regression).
    """

    column: str
    equals: str | int | float | None = None
    greater_than: float | None = None
    transform: Literal["none", "log1p"] = "none"

    @model_validator(mode="after")
    def _one_rule(self) -> LabelRule:
        if self.equals is not None and self.greater_than is not None:
            raise ValueError("set at most one of `equals` and `greater_than`")
        return self


class TaskConfig(Strict):
    """One objective of the ranker."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["binary", "regression"] = "binary"
    label: LabelRule
    loss: Literal["bce", "mse", "huber"] | None = Field(
        None, description="default: bce (binary), mse (regression)"
    )
    weight: float = Field(1.0, ge=0.0, description="initial or fixed weight in the balancer")
    metrics: list[str] | None = Field(None, description="default: auc, logloss (+gauc) or mse, mae")

    @model_validator(mode="after")
    def _loss_matches_type(self) -> TaskConfig:
        if self.loss is None:
            self.loss = "bce" if self.type == "binary" else "mse"
        if self.type == "binary" and self.loss != "bce":
            raise ValueError(f"binary task `{self.name}` takes loss `bce`, got `{self.loss}`")
        if self.type == "regression" and self.loss == "bce":
            raise ValueError(f"regression task `{self.name}` takes loss `mse` or `huber`, got `bce`")
        return self


# ----------------------------------------------------------------------------------------------------
# model


class SharedBottomConfig(Strict):
    """One MLP shared by all tasks (Caruana 1997)."""

    kind: Literal["shared_bottom"]
    hidden: list[int] = Field(default_factory=lambda: [128, 64])


class MMoEConfig(Strict):
    """Multi-gate mixture of experts (Ma et al., KDD 2018; Zhao et al., RecSys 2019)."""

    kind: Literal["mmoe"] = "mmoe"
    num_experts: int = Field(8, ge=1, le=256)
    expert_hidden: list[int] = Field(default_factory=lambda: [64])


class PLEConfig(Strict):
    """Progressive layered extraction (Tang et al., RecSys 2020)."""

    kind: Literal["ple"]
    num_levels: int = Field(2, ge=1, le=8)
    num_shared_experts: int = Field(2, ge=1, le=64)
    num_task_experts: int = Field(2, ge=1, le=64)
    expert_hidden: list[int] = Field(default_factory=lambda: [64])


BackboneConfig = Annotated[SharedBottomConfig | MMoEConfig | PLEConfig, Field(discriminator="kind")]


class TowerConfig(Strict):
    """Per-task tower: an MLP ending in one logit."""

    hidden: list[int] = Field(default_factory=lambda: [32])


class AttentionConfig(Strict):
    """Field-attention interaction block (AutoInt, Song et al. 2019) before the backbone."""

    num_layers: int = Field(1, ge=1, le=8)
    num_heads: int = Field(2, ge=1, le=32)
    head_dim: int = Field(8, ge=1, le=256)
    dim: int = Field(DEFAULT_EMBEDDING_DIM, ge=1, le=1024, description="common field width D")
    layer_norm: bool = False


class PositionBiasConfig(Strict):
    """Position-bias shallow tower (Zhao et al., RecSys 2019)."""

    position: str = Field(description="column holding the display position")
    device: list[str] = Field(default_factory=list, description="device columns fed to the shallow tower")
    drop_rate: float = Field(DEFAULT_POSITION_DROP_RATE, ge=0.0, le=1.0)
    tasks: list[str] = Field(
        default_factory=list, description="tasks whose logit gets the bias; default all binary"
    )
    max_position: int = Field(20, ge=1, le=100_000)
    first_position: Literal[0, 1] = 1
    embedding_dim: int = Field(4, ge=1, le=256)
    hidden: list[int] = Field(default_factory=lambda: [16])


class ModelConfig(Strict):
    """The ranker's architecture."""

    backbone: BackboneConfig = Field(default_factory=MMoEConfig)
    tower: TowerConfig = Field(default_factory=TowerConfig)
    activation: str = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    attention: AttentionConfig | None = None
    position_bias: PositionBiasConfig | None = None


# ----------------------------------------------------------------------------------------------------
# training and evaluation


class EarlyStoppingConfig(Strict):
    """Stop when a validation metric has not improved for ``patience`` epochs."""

    metric: str = Field("mean/auc", description="`TASK/METRIC`, or `mean/METRIC` averaged over tasks")
    mode: Literal["max", "min"] = "max"
    patience: int = Field(2, ge=1)


class BalancerConfig(Strict):
    """Task-loss balancing method and its options."""

    name: str = "fixed"
    options: dict[str, Any] = Field(default_factory=dict)


class TrainingConfig(Strict):
    """Optimisation settings."""

    optimizer: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(1024, ge=1)
    eval_batch_size: int = Field(8192, ge=1)
    epochs: int = Field(5, ge=1, le=10_000)
    early_stopping: EarlyStoppingConfig | None = Field(default_factory=EarlyStoppingConfig)
    balancer: BalancerConfig = Field(default_factory=BalancerConfig)
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's choice")


class EvaluationConfig(Strict):
    """Evaluation settings beyond the per-task metrics."""

    group_column: str | None = Field(None, description="column for GAUC, e.g. the user id")


class RunConfig(Strict):
    """A whole training run."""

    name: str = "run"
    seed: int = 2024
    data: DataConfig
    features: list[FeatureConfig] = Field(min_length=1)
    tasks: list[TaskConfig] = Field(min_length=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def categorical_features(self) -> list[CategoricalFeature]:
        return [f for f in self.features if isinstance(f, CategoricalFeature)]

    def numeric_features(self) -> list[NumericFeature]:
        return [f for f in self.features if isinstance(f, NumericFeature)]
