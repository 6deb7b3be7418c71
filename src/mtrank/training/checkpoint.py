"""Atomic checkpoints: safetensors for tensors, JSON for everything else; never pickle.

A checkpoint is a folder ``checkpoints/epoch-NNNN`` written under a temporary name and renamed into
place, then ``checkpoints/latest.json`` is replaced atomically to point at it. A crash at any moment
leaves the previous checkpoint intact and ``latest.json`` pointing at a complete folder. The tensor
files carry a content digest that :func:`mtrank.tensor_io.load_tensors` checks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mtrank.errors import ArtifactError

# Re-exported: the trainer, runs, fine-tuning and their tests import these from here.
from mtrank.tensor_io import (
    DIGEST_LAYOUT,
    DIGEST_METADATA_KEY,
    apply_default_mode,
    atomic_save_tensors,
    atomic_write_text,
    load_tensors,
    save_tensors,
    tensor_digest,
    verify_tensor_digest,
)

__all__ = [
    "DIGEST_LAYOUT",
    "DIGEST_METADATA_KEY",
    "LATEST",
    "atomic_save_tensors",
    "atomic_write_text",
    "load_tensors",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "read_latest",
    "save_tensors",
    "tensor_digest",
    "verify_tensor_digest",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

LATEST = "latest.json"


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-ready values."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        plain["state"][str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                plain["state"][str(index)][key] = value
    return tensors, plain


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict[str, Any]
) -> None:
    """Load state written by :func:`optimizer_to_tensors` into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def write_checkpoint(
    root: Path,
    epoch: int,
    *,
    model: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    extra_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write one complete checkpoint folder atomically and point ``latest.json`` at it.

    Args:
        root: the ``checkpoints`` folder.
        epoch: the finished epoch (1-based).
        model: model state dict.
        optimizer: the optimizer whose state is saved.
        extra_tensors: further tensors (balancer state, best weights).
        state: JSON-ready training state (epoch, early-stopping counters, history).
        keep: how many checkpoint folders to keep.

    Returns:
        The checkpoint folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".epoch-{epoch:04d}."))
    try:
        opt_tensors, opt_plain = optimizer_to_tensors(optimizer)
        # The staging folder is renamed into place as a whole, so each file is written in place.
        save_tensors(staging / "model.safetensors", model)
        save_tensors(staging / "optimizer.safetensors", opt_tensors)
        save_tensors(staging / "extra.safetensors", extra_tensors)
        (staging / "state.json").write_text(json.dumps({**state, "optimizer": opt_plain}), encoding="utf-8")
        for file in staging.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        apply_default_mode(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    atomic_write_text(root / LATEST, json.dumps({"epoch": epoch, "folder": final.name}))
    logger.info("checkpoint written: %s", final)
    for old in sorted(p for p in root.glob("epoch-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_latest(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """Return the latest complete checkpoint folder and its state, or ``None`` when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / json.loads(pointer.read_text(encoding="utf-8"))["folder"]
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise ArtifactError(f"checkpoint {folder} named by {pointer} is incomplete (no state.json)")
    return folder, json.loads(state_file.read_text(encoding="utf-8"))
