"""LoRA for linear and embedding layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (arXiv 2021). A frozen
weight ``W`` gains a low-rank update ``(alpha / r) * B A``. One of the two factors starts at zero, so a
freshly injected LoRA module changes no output. Following the paper's reference code (microsoft/LoRA,
``loralib``), ``B`` is the zero factor for linear layers and ``A`` for embeddings. The update can be
merged into ``W`` for serving and unmerged again.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional

from mtrank.embeddings.table import PADDING_ID, TableEmbedding
from mtrank.errors import ConfigError
from mtrank.peft.base import (
    MethodOptions,
    PeftMethod,
    check_int,
    check_positive_number,
    check_probability,
    register_peft_method,
)
from mtrank.peft.targets import TargetSite
from mtrank.peft.wrapper import InjectedModule, unwrap

# Hu et al. 2021 (Section 7.1, Table 5) adapt GPT-3's attention weights with ranks 2 to 8 and find
# rank 4 enough when two weight types are adapted; 8 is the top of that range.
DEFAULT_RANK = 8


@dataclasses.dataclass
class LoraOptions(MethodOptions):
    """Options of the ``lora`` method.

    Attributes:
        rank: r, the inner width of the update.
        alpha: scale numerator, so the update is multiplied by ``alpha / rank``. ``None`` means
            ``alpha = rank``, a scale of 1.
        dropout: dropout probability on a linear layer's input to the LoRA path. Embedding inputs
            are ids, so embeddings get no dropout.
    """

    rank: int = DEFAULT_RANK
    alpha: float | None = None
    dropout: float = 0.0

    def problems(self) -> list[str]:
        """Return one message per invalid option value."""
        problems = check_int("rank", self.rank, 1) + check_probability("dropout", self.dropout)
        if self.alpha is not None:
            problems += check_positive_number("alpha", self.alpha)
        return problems

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied to ``B A``."""
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / self.rank


class _LoraBase(InjectedModule):
    """Merge bookkeeping shared by the linear and embedding variants."""

    def __init__(self, scaling: float) -> None:
        super().__init__()
        self.scaling = scaling
        self._merged = False
        # The base weight before a merge with keep_original, which unmerge copies back.
        self._original_weight: torch.Tensor | None = None

    @property
    def merged(self) -> bool:
        """Whether ``delta_weight()`` is currently added into the base layer's weight."""
        return self._merged

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """Return the update in the base weight's layout."""
        raise NotImplementedError

    def merge(self, base_layer: nn.Module, *, keep_original: bool = True) -> None:
        """Add the update into ``base_layer.weight`` so that the base layer alone computes W + update.

        While merged, :meth:`forward` skips the LoRA path and the LoRA factors receive no gradient.

        Args:
            base_layer: the wrapped layer.
            keep_original: keep a copy of the weight so that :meth:`unmerge` restores it bit for
                bit. Without the copy, unmerge subtracts the update, which matches only within
                float rounding.
        """
        if self._merged:
            return
        weight = _weight_of(base_layer)
        with torch.no_grad():
            self._original_weight = weight.detach().clone() if keep_original else None
            weight.add_(self.delta_weight().to(weight.dtype))
        self._merged = True

    def unmerge(self, base_layer: nn.Module) -> None:
        """Remove the update from ``base_layer.weight``; a no-op when not merged."""
        if not self._merged:
            return
        weight = _weight_of(base_layer)
        with torch.no_grad():
            if self._original_weight is not None:
                weight.copy_(self._original_weight)
            else:
                weight.sub_(self.delta_weight().to(weight.dtype))
        self._original_weight = None
        self._merged = False


class LoraLinear(_LoraBase):
    """LoRA update of an ``nn.Linear``: ``y = base(x) + s * B A dropout(x)`` with ``s = alpha / r``.

    Shapes: I ``in_features``, O ``out_features``, r ``rank``; ``A`` is ``(r, I)`` with the
    ``nn.Linear`` default initialisation and ``B`` is ``(O, r)`` zeros.

    Args:
        in_features: I.
        out_features: O.
        rank: r.
        scaling: s.
        dropout: dropout probability on the input of the LoRA path.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, scaling: float, dropout: float = 0.0
    ) -> None:
        super().__init__(scaling)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        # Same as nn.Linear.reset_parameters, which loralib also uses for A.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., I)`` to ``(..., O)``."""
        out = base_layer(x)
        if self._merged:
            return out
        low_rank = functional.linear(self.dropout(x), self.lora_A)  # (..., r)
        return out + functional.linear(low_rank, self.lora_B) * self.scaling  # (..., O)

    def delta_weight(self) -> torch.Tensor:
        """Return ``s * B A``, shape ``(O, I)`` like ``nn.Linear.weight``."""
        return (self.lora_B @ self.lora_A) * self.scaling


class LoraEmbedding(_LoraBase):
    """LoRA update of an embedding table: row ``i`` becomes ``W[i] + s * (B A)[:, i]``.

    Shapes: V ``num_embeddings``, D ``embedding_dim``, r ``rank``; ``A`` is ``(r, V)`` zeros and
    ``B`` is ``(D, r)`` drawn from a standard normal, as in ``loralib``.

    The padding id's column of ``A`` receives no gradient, so the padding row keeps its base value.

    Args:
        num_embeddings: V.
        embedding_dim: D.
        rank: r.
        scaling: s.
        padding_idx: the padding id, or ``None``.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, rank: int, scaling: float, padding_idx: int | None
    ) -> None:
        super().__init__(scaling)
        self.padding_idx = padding_idx
        self.lora_A = nn.Parameter(torch.zeros(rank, num_embeddings))
        self.lora_B = nn.Parameter(torch.randn(embedding_dim, rank))

    def forward(self, base_layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Look up int64 ids ``(...)`` and return ``(..., D)``."""
        out = base_layer(ids)
        if self._merged:
            return out
        low_rank = functional.embedding(ids, self.lora_A.t(), padding_idx=self.padding_idx)  # (..., r)
        return out + functional.linear(low_rank, self.lora_B) * self.scaling  # (..., D)

    def delta_weight(self) -> torch.Tensor:
        """Return ``s * (B A)^T``, shape ``(V, D)`` like the embedding weight."""
        return (self.lora_B @ self.lora_A).t() * self.scaling  # (V, D)


def _weight_of(layer: nn.Module) -> torch.Tensor:
    """Return ``layer.weight``, the tensor that a LoRA update is added to.

    Raises:
        TypeError: ``layer.weight`` is not a tensor.
    """
    weight = layer.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"LoRA needs a `weight` tensor on {type(layer).__name__}, got {type(weight).__name__}"
        )
    return weight


def is_lora_embedding_target(module: nn.Module) -> bool:
    """Check whether ``module`` is an ``nn.Embedding`` or ``TableEmbedding`` that LoRA can target."""
    return isinstance(module, (nn.Embedding, TableEmbedding))


@register_peft_method("lora")
class LoraMethod(PeftMethod):
    """Add a LoRA update to every target ``nn.Linear``, ``nn.Embedding`` or :class:`TableEmbedding`.

    Patterns may select other modules too (``towers.**``); those are skipped.
    """

    options_class = LoraOptions

    def accepts(self, module: nn.Module) -> bool:
        """Accept linear layers and embedding tables."""
        return isinstance(module, nn.Linear) or is_lora_embedding_target(module)

    def build_module(self, site: TargetSite, model: nn.Module) -> _LoraBase:
        """Build the LoRA factors for one target, on the target weight's device and dtype.

        Raises:
            ConfigError: the target is an ``nn.Embedding`` with ``max_norm``, whose in-place
                renormalisation would change the base weight.
        """
        options: LoraOptions = self.options
        target = unwrap(site.module)
        weight = _weight_of(target)
        module: _LoraBase
        if isinstance(target, nn.Linear):
            module = LoraLinear(
                target.in_features, target.out_features, options.rank, options.scaling, options.dropout
            )
        elif isinstance(target, nn.Embedding):
            if target.max_norm is not None:
                raise ConfigError(
                    [
                        f"LoRA cannot target `{site.name}`: its nn.Embedding renormalises rows "
                        "(max_norm is set), which would change the frozen base weight"
                    ]
                )
            module = LoraEmbedding(
                target.num_embeddings, target.embedding_dim, options.rank, options.scaling, target.padding_idx
            )
        else:
            vocab_size, dim = weight.shape
            module = LoraEmbedding(vocab_size, dim, options.rank, options.scaling, PADDING_ID)
        return module.to(device=weight.device, dtype=weight.dtype)
