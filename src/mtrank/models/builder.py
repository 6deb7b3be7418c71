"""Build a :class:`MultiTaskRanker` from a run config and the fitted encoders."""

from __future__ import annotations

from torch import nn

from mtrank.config.schema import (
    DEFAULT_EMBEDDING_DIM,
    CategoricalFeature,
    MMoEConfig,
    PLEConfig,
    RunConfig,
    SharedBottomConfig,
)
from mtrank.data.pipeline import FeatureEncoders
from mtrank.embeddings import FeatureEmbedding, build_embedding
from mtrank.errors import ConfigError
from mtrank.models.backbones import PLE, Backbone, MMoE, PLELevel, SharedBottom
from mtrank.models.mlp import MLP
from mtrank.models.ranker import FieldStack, MultiTaskRanker, tower
from mtrank.models.shallow_tower import ShallowTower


def build_ranker(config: RunConfig, encoders: FeatureEncoders) -> MultiTaskRanker:
    """Build a freshly initialised ranker; two calls return two models that share no parameters.

    Args:
        config: the validated run config.
        encoders: the fitted encoders, which give vocabulary sizes.

    Raises:
        ConfigError: an embedding kind, activation or backbone setting is invalid.
    """
    model = config.model
    sizes = encoders.vocabulary_sizes()
    attention = model.attention
    feature_embeddings = {
        feature.name: _embedding(feature, sizes[feature.name], attention.dim if attention else None)
        for feature in config.categorical_features()
    }
    embeddings = nn.ModuleDict(feature_embeddings)

    num_numeric = len(config.numeric_features())
    interaction = numeric_fields = None
    if attention is not None:
        from mtrank.models.attention import FieldAttention

        interaction = FieldAttention(
            attention.dim,
            num_layers=attention.num_layers,
            num_heads=attention.num_heads,
            head_dim=attention.head_dim,
            layer_norm=attention.layer_norm,
        )
        numeric_fields = FieldStack(num_numeric, attention.dim) if num_numeric else None
        num_fields = len(embeddings) + num_numeric
        in_dim = num_fields * interaction.out_dim
    else:
        in_dim = sum(e.embedding_dim for e in feature_embeddings.values()) + num_numeric

    backbone = build_backbone(config, in_dim)
    towers = nn.ModuleDict(
        {
            task.name: tower(
                backbone.out_dim, model.tower.hidden, activation=model.activation, dropout=model.dropout
            )
            for task in config.tasks
        }
    )

    shallow = None
    bias_tasks: list[str] = []
    if model.position_bias is not None and encoders.position is not None:
        bias = model.position_bias
        bias_tasks = bias.tasks or [t.name for t in config.tasks if t.type == "binary"]
        shallow = ShallowTower(
            num_position_ids=encoders.position[1].size,
            device_vocab_sizes=[enc.size for enc in encoders.device.values()],
            embedding_dim=bias.embedding_dim,
            hidden=bias.hidden,
            num_outputs=len(bias_tasks),
            activation=model.activation,
            drop_rate=bias.drop_rate,
        )
    return MultiTaskRanker(
        task_names=config.task_names(),
        embeddings=embeddings,
        num_numeric=num_numeric,
        backbone=backbone,
        towers=towers,
        interaction=interaction,
        numeric_fields=numeric_fields,
        shallow_tower=shallow,
        bias_tasks=bias_tasks,
    )


def _embedding(
    feature: CategoricalFeature, vocab_size: int | None, forced_dim: int | None
) -> FeatureEmbedding:
    dim = forced_dim or feature.embedding.dim or DEFAULT_EMBEDDING_DIM
    try:
        return build_embedding(
            feature.embedding.kind, vocab_size=vocab_size, dim=dim, options=dict(feature.embedding.options)
        )
    except ConfigError as exc:
        raise ConfigError([f"feature `{feature.name}` embedding: {p}" for p in exc.problems]) from None


def build_backbone(config: RunConfig, in_dim: int) -> Backbone:
    """Build the configured backbone over an input of width ``in_dim``."""
    model = config.model
    spec = model.backbone
    num_tasks = len(config.tasks)

    def expert(in_width: int, hidden: list[int]) -> MLP:
        return MLP(
            in_width, hidden, activation=model.activation, dropout=model.dropout, batch_norm=model.batch_norm
        )

    if isinstance(spec, SharedBottomConfig):
        return SharedBottom(bottom=expert(in_dim, spec.hidden), num_tasks=num_tasks)
    if isinstance(spec, MMoEConfig):
        return MMoE(
            experts=[expert(in_dim, spec.expert_hidden) for _ in range(spec.num_experts)],
            gates=[nn.Linear(in_dim, spec.num_experts) for _ in range(num_tasks)],
        )
    if isinstance(spec, PLEConfig):
        levels = []
        width = in_dim
        for level in range(spec.num_levels):
            last = level == spec.num_levels - 1
            per_gate = spec.num_task_experts + spec.num_shared_experts
            all_experts = num_tasks * spec.num_task_experts + spec.num_shared_experts
            levels.append(
                PLELevel(
                    task_experts=[
                        [expert(width, spec.expert_hidden) for _ in range(spec.num_task_experts)]
                        for _ in range(num_tasks)
                    ],
                    shared_experts=[
                        expert(width, spec.expert_hidden) for _ in range(spec.num_shared_experts)
                    ],
                    task_gates=[nn.Linear(width, per_gate) for _ in range(num_tasks)],
                    shared_gate=None if last else nn.Linear(width, all_experts),
                )
            )
            width = spec.expert_hidden[-1] if spec.expert_hidden else width
        return PLE(levels=levels)
    raise TypeError(f"unhandled backbone config {type(spec).__name__}")
