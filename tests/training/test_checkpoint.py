"""Tests of atomic checkpoints: complete folders, the latest pointer, stray partial folders, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtrank.errors import ArtifactError
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

CHECKPOINT_FILES = {"model.safetensors", "optimizer.safetensors", "extra.safetensors", "state.json"}


def trained_model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def write_epoch(root: Path, epoch: int, **options) -> Path:
    model, optimizer = trained_model_and_optimizer()
    return write_checkpoint(
        root,
        epoch,
        model=model.state_dict(),
        optimizer=optimizer,
        extra_tensors={"balancer.log_vars": torch.zeros(2)},
        state={"epoch": epoch, "bad_epochs": 0},
        **options,
    )


def test_checkpoint_folder_complete(tmp_path: Path) -> None:
    folder = write_epoch(tmp_path / "checkpoints", 1)

    assert folder.name == "epoch-0001"
    assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES


def test_latest_points_at_complete_folder(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    write_epoch(root, 1)
    write_epoch(root, 2)

    pointer = json.loads((root / LATEST).read_text(encoding="utf-8"))

    assert pointer == {"epoch": 2, "folder": "epoch-0002"}
    assert {p.name for p in (root / pointer["folder"]).iterdir()} == CHECKPOINT_FILES


def test_stray_staging_folder_ignored(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    complete = write_epoch(root, 1)
    # What a crash while writing epoch 2 leaves behind: a staging folder with some of the files.
    stray = root / ".epoch-0002.crashed"
    stray.mkdir()
    save_file({"w": torch.ones(2)}, str(stray / "model.safetensors"))

    folder, state = read_latest(root)

    assert folder == complete
    assert state["epoch"] == 1


def test_stray_staging_folder_survives_next_write(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    write_epoch(root, 1)
    (root / ".epoch-0002.crashed").mkdir()

    write_epoch(root, 2)
    folder, state = read_latest(root)

    assert folder.name == "epoch-0002"
    assert state["epoch"] == 2
    assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES


def test_rewriting_an_epoch_replaces_it(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    write_epoch(root, 1)

    folder = write_epoch(root, 1)

    assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["epoch-0001", LATEST]


def test_old_checkpoints_pruned(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for epoch in range(1, 5):
        write_epoch(root, epoch, keep=2)

    folders = sorted(p.name for p in root.iterdir() if p.is_dir())

    assert folders == ["epoch-0003", "epoch-0004"]


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert read_latest(tmp_path / "checkpoints") is None


def test_pointer_to_incomplete_folder_rejected(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    (root / "epoch-0003").mkdir(parents=True)
    (root / LATEST).write_text(json.dumps({"epoch": 3, "folder": "epoch-0003"}), encoding="utf-8")

    with pytest.raises(ArtifactError, match=r"checkpoint .*epoch-0003 named by .*latest\.json is incomplete"):
        read_latest(root)


def test_model_tensors_round_trip(tmp_path: Path) -> None:
    model, _ = trained_model_and_optimizer()
    folder = write_epoch(tmp_path / "checkpoints", 1)

    loaded = load_tensors(folder / "model.safetensors")

    assert sorted(loaded) == sorted(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_optimizer_state_round_trip(tmp_path: Path) -> None:
    model, optimizer = trained_model_and_optimizer()
    tensors, plain = optimizer_to_tensors(optimizer)
    atomic_save_tensors(tmp_path / "optimizer.safetensors", tensors)
    atomic_write_text(tmp_path / "optimizer.json", json.dumps(plain))
    fresh = torch.optim.Adam(model.parameters(), lr=0.5)

    optimizer_from_tensors(
        fresh,
        load_tensors(tmp_path / "optimizer.safetensors"),
        json.loads((tmp_path / "optimizer.json").read_text(encoding="utf-8")),
    )

    original, restored = optimizer.state_dict(), fresh.state_dict()
    assert restored["param_groups"][0]["lr"] == 0.01
    for index, values in original["state"].items():
        assert torch.equal(restored["state"][index]["exp_avg"], values["exp_avg"])
        assert torch.equal(restored["state"][index]["exp_avg_sq"], values["exp_avg_sq"])
        assert float(restored["state"][index]["step"]) == float(values["step"])


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "metrics.json", "{}")
    atomic_write_text(tmp_path / "metrics.json", '{"auc": 0.9}')
    atomic_save_tensors(tmp_path / "model.safetensors", {"w": torch.ones(3)})

    names = sorted(p.name for p in tmp_path.iterdir())

    assert names == ["metrics.json", "model.safetensors"]
    assert (tmp_path / "metrics.json").read_text(encoding="utf-8") == '{"auc": 0.9}'


def test_missing_weights_file_named(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"weights file not found: .*absent\.safetensors"):
        load_tensors(tmp_path / "absent.safetensors")


def test_damaged_weights_file_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00\x01 not safetensors")

    with pytest.raises(ArtifactError, match=r"cannot read weights from .*model\.safetensors"):
        load_tensors(path)
