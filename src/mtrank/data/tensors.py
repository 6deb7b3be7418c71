"""Encoded splits as pre-built tensors, and batches that are slices of them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch


@dataclass
class Batch:
    """Model inputs (and labels) for B rows.

    Shapes: B batch, Fc categorical features, Fn numeric features, Fd device features, T tasks.

    Attributes:
        categorical: ``(B, Fc)`` int64 ids (vocabulary ids, or raw ids for hashing embeddings).
        numeric: ``(B, Fn)`` float32.
        labels: ``(B, T)`` float32, or ``None`` when scoring unlabelled rows.
        position: ``(B,)`` int64 position ids for the shallow tower, or ``None``.
        device: ``(B, Fd)`` int64 device ids for the shallow tower, or ``None``.
        label_mask: ``(B, T)`` float32, 1 where the task's label is present, or ``None`` when every
            label is present.
    """

    categorical: torch.Tensor
    numeric: torch.Tensor
    labels: torch.Tensor | None = None
    position: torch.Tensor | None = None
    device: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.categorical.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """Return the batch moved to ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def select(self, rows: torch.Tensor) -> Batch:
        """Return the rows at ``rows``, a ``(R,)`` int64 index, with one gather per tensor."""
        selected: dict[str, Any] = {}
        for f in fields(self):
            tensor = getattr(self, f.name)
            selected[f.name] = tensor.index_select(0, rows) if tensor is not None else None
        return Batch(**selected)


@dataclass
class EncodedData:
    """One split, fully encoded into tensors, plus the columns evaluation needs.

    Attributes:
        batch: every row as one :class:`Batch`.
        row_ids: ``(N,)`` row numbers in the source file (0-based data rows), for joining predictions back.
        groups: ``(N,)`` group key per row for GAUC and NDCG (e.g. user id), or ``None``.
        extras: evaluation-only columns such as ``true_relevance`` from a simulated log.
    """

    batch: Batch
    row_ids: np.ndarray
    groups: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.batch)

    def slice(self, start: int, stop: int) -> EncodedData:
        """Return rows ``start .. stop - 1`` as views of the tensors and arrays, without copying."""
        parts: dict[str, Any] = {}
        for f in fields(self.batch):
            tensor = getattr(self.batch, f.name)
            parts[f.name] = tensor[start:stop] if tensor is not None else None
        return EncodedData(
            batch=Batch(**parts),
            row_ids=self.row_ids[start:stop],
            groups=self.groups[start:stop] if self.groups is not None else None,
            extras={k: v[start:stop] for k, v in self.extras.items()},
        )

    def take(self, index: np.ndarray) -> EncodedData:
        """Return the rows at ``index`` (a gather on every tensor, no per-row Python)."""
        rows = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        parts: dict[str, Any] = {
            f.name: (
                getattr(self.batch, f.name).index_select(0, rows)
                if getattr(self.batch, f.name) is not None
                else None
            )
            for f in fields(self.batch)
        }
        return EncodedData(
            batch=Batch(**parts),
            row_ids=self.row_ids[index],
            groups=self.groups[index] if self.groups is not None else None,
            extras={k: v[index] for k, v in self.extras.items()},
        )


def iterate_batches(
    data: EncodedData, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[Batch]:
    """Yield batches of at most ``batch_size`` rows; the last one may be smaller.

    Without shuffling each batch is a view (a slice) of the pre-built tensors; with shuffling it is
    one gather per tensor through a seeded permutation.
    """
    total = len(data)
    source = data.batch
    order = torch.randperm(total, generator=generator) if shuffle else None
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        parts: dict[str, Any] = {}
        for f in fields(source):
            tensor = getattr(source, f.name)
            if tensor is None:
                parts[f.name] = None
            elif order is None:
                parts[f.name] = tensor[start:stop]
            else:
                parts[f.name] = tensor.index_select(0, order[start:stop])
        yield Batch(**parts)
