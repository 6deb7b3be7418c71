"""Tests of the tensor-content digest in safetensors headers: recording, checking, and older files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtrank.config import parse_config
from mtrank.errors import ArtifactError
from mtrank.training.checkpoint import (
    DIGEST_METADATA_KEY,
    atomic_save_tensors,
    atomic_write_text,
    load_tensors,
    tensor_digest,
    write_checkpoint,
)
from mtrank.training.run import load_run, train_run
from mtrank.training.trainer import WEIGHTS_FILE

# Size of the little-endian unsigned integer that starts a safetensors file and gives the header length.
HEADER_LENGTH_BYTES = 8


def read_header(path: Path) -> tuple[int, dict]:
    """Return the offset where tensor data starts and the parsed JSON header of a safetensors file."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:HEADER_LENGTH_BYTES])
    header = json.loads(data[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + length])
    return HEADER_LENGTH_BYTES + length, header


def flip_tensor_byte(path: Path, name: str, index: int = 0) -> None:
    """Flip the lowest bit of byte ``index`` of tensor ``name``'s data, keeping the file's size."""
    data_start, header = read_header(path)
    begin, end = header[name]["data_offsets"]
    assert begin + index < end, f"tensor {name} has only {end - begin} bytes"
    data = bytearray(path.read_bytes())
    data[data_start + begin + index] ^= 0x01
    path.write_bytes(bytes(data))


def sample_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3),
        "layer.bias": torch.randn(4),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(2, 2).to(torch.bfloat16),
    }


# ----------------------------------------------------------------------------------------------------
# The digest itself


def test_digest_golden_value() -> None:
    # Expected bytes written out by hand from the layout in the `tensor_digest` docstring.
    expected = hashlib.sha256(
        b"mtrank-tensors-v1\n" + b'["w", "float32", [2]]\n' + struct.pack("<2f", 1.0, 2.0)
    ).hexdigest()

    assert tensor_digest({"w": torch.tensor([1.0, 2.0])}) == expected


def test_digest_ignores_dict_order() -> None:
    tensors = sample_tensors()
    reversed_order = dict(reversed(list(tensors.items())))

    assert tensor_digest(reversed_order) == tensor_digest(tensors)


def test_digest_covers_shape() -> None:
    flat = torch.arange(6, dtype=torch.float32)

    assert tensor_digest({"w": flat}) != tensor_digest({"w": flat.reshape(2, 3)})


def test_digest_covers_dtype() -> None:
    floats = torch.arange(4, dtype=torch.float32)

    assert tensor_digest({"w": floats}) != tensor_digest({"w": floats.view(torch.int32)})


def test_digest_covers_names() -> None:
    tensor = torch.ones(2)

    assert tensor_digest({"a": tensor}) != tensor_digest({"b": tensor})


def test_digest_of_non_contiguous_tensor() -> None:
    matrix = torch.arange(6, dtype=torch.float32).reshape(2, 3)

    assert tensor_digest({"w": matrix.t()}) == tensor_digest({"w": matrix.t().contiguous()})


# ----------------------------------------------------------------------------------------------------
# Writing


def test_digest_recorded_in_header(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"

    atomic_save_tensors(path, tensors)

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata[DIGEST_METADATA_KEY] == tensor_digest(tensors)


def test_caller_metadata_kept(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"

    atomic_save_tensors(path, {"w": torch.ones(2)}, {"format": "test"})

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "test"
    assert DIGEST_METADATA_KEY in metadata


def test_reserved_metadata_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"metadata key `mtrank.sha256` is reserved"):
        atomic_save_tensors(tmp_path / "model.safetensors", {"w": torch.ones(2)}, {DIGEST_METADATA_KEY: "0"})


def write_small_checkpoint(tmp_path: Path) -> Path:
    """Write one checkpoint of a stepped linear model with Adam state and return its folder."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return write_checkpoint(
        tmp_path / "checkpoints",
        1,
        model=model.state_dict(),
        optimizer=optimizer,
        extra_tensors={"balancer.weights": torch.ones(2)},
        state={"epoch": 1},
    )


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "extra.safetensors"])
def test_checkpoint_files_record_digest(tmp_path: Path, name: str) -> None:
    folder = write_small_checkpoint(tmp_path)

    with safe_open(str(folder / name), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata[DIGEST_METADATA_KEY] == tensor_digest(load_file(str(folder / name)))


# ----------------------------------------------------------------------------------------------------
# Loading


def test_intact_file_loads(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    atomic_save_tensors(path, tensors)

    loaded = load_tensors(path)

    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("name", ["layer.weight", "steps", "mask", "half"])
def test_flipped_tensor_byte_rejected(tmp_path: Path, name: str) -> None:
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    atomic_save_tensors(path, tensors)
    size = path.stat().st_size

    flip_tensor_byte(path, name)

    assert path.stat().st_size == size
    with pytest.raises(ArtifactError, match=r"model\.safetensors is corrupt"):
        load_tensors(path)


def test_corruption_message_names_digests_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    atomic_save_tensors(path, sample_tensors())
    expected = tensor_digest(sample_tensors())
    flip_tensor_byte(path, "layer.bias", index=5)
    actual = tensor_digest(load_file(str(path)))

    with pytest.raises(ArtifactError) as caught:
        load_tensors(path)

    message = str(caught.value)
    assert str(path) in message
    assert f"its header records {expected}" in message
    assert f"its tensors have SHA-256 {actual}" in message
    assert "Train again" in message
    assert "restore it from a backup copy" in message


def test_dtype_changed_in_header_rejected(tmp_path: Path) -> None:
    # F32 -> I32 keeps the header length and the byte count, so the file still parses.
    path = tmp_path / "model.safetensors"
    atomic_save_tensors(path, {"w": torch.randn(3)})
    data = path.read_bytes()
    assert data.count(b'"F32"') == 1
    path.write_bytes(data.replace(b'"F32"', b'"I32"'))

    with pytest.raises(ArtifactError, match="is corrupt"):
        load_tensors(path)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "extra.safetensors"])
def test_checkpoint_corruption_rejected(tmp_path: Path, name: str) -> None:
    folder = write_small_checkpoint(tmp_path)
    _start, header = read_header(folder / name)
    first_tensor = sorted(key for key in header if key != "__metadata__")[0]

    flip_tensor_byte(folder / name, first_tensor)

    with pytest.raises(ArtifactError, match=f"{name} is corrupt"):
        load_tensors(folder / name)


def test_file_without_digest_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    save_file({"w": torch.arange(3.0)}, str(path))

    loaded = load_tensors(path)

    assert torch.equal(loaded["w"], torch.arange(3.0))


def test_file_without_digest_warned_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "old.safetensors"
    save_file({"w": torch.arange(3.0)}, str(path))

    with caplog.at_level(logging.WARNING, logger="mtrank.training.checkpoint"):
        load_tensors(path)
        load_tensors(path)

    warnings = [r for r in caplog.records if str(path) in r.getMessage()]
    assert len(warnings) == 1
    assert "records no `mtrank.sha256` digest" in warnings[0].getMessage()


def test_each_file_without_digest_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("one.safetensors", "two.safetensors"):
        save_file({"w": torch.ones(1)}, str(tmp_path / name))

    with caplog.at_level(logging.WARNING, logger="mtrank.training.checkpoint"):
        load_tensors(tmp_path / "one.safetensors")
        load_tensors(tmp_path / "two.safetensors")

    named = {
        name for r in caplog.records for name in ("one", "two") if f"{name}.safetensors" in r.getMessage()
    }
    assert named == {"one", "two"}


# ----------------------------------------------------------------------------------------------------
# A trained run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, write_log_in, config_dict) -> Path:
    folder = tmp_path_factory.mktemp("integrity")
    path = write_log_in(folder, num_rows=200)
    return train_run(parse_config(config_dict(path)), folder / "run").run_dir


def test_run_weights_record_digest(run_dir: Path) -> None:
    with safe_open(str(run_dir / WEIGHTS_FILE), framework="pt") as handle:
        metadata = handle.metadata()

    assert metadata[DIGEST_METADATA_KEY] == tensor_digest(load_file(str(run_dir / WEIGHTS_FILE)))


def test_corrupt_run_weights_rejected(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    for file in run_dir.iterdir():
        if file.is_file():
            (copy / file.name).write_bytes(file.read_bytes())
    load_run(copy)  # the intact copy loads
    _start, header = read_header(copy / WEIGHTS_FILE)
    largest = max(
        (key for key in header if key != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
    )

    flip_tensor_byte(copy / WEIGHTS_FILE, largest, index=3)

    with pytest.raises(ArtifactError, match=rf"{WEIGHTS_FILE} is corrupt"):
        load_run(copy)


# --- file modes -------------------------------------------------------------------------------------


def test_written_files_follow_umask(tmp_path: Path) -> None:
    # Temporary files are created 0600; the renamed results must get the mode a plain open gives.
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_save_tensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})
    atomic_write_text(tmp_path / "a.json", "{}")
    folder = write_checkpoint(
        tmp_path / "checkpoints",
        epoch=1,
        model={"w": torch.ones(2)},
        optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1),
        extra_tensors={},
        state={},
    )
    file_mode, folder_mode = 0o666 & ~mask, 0o777 & ~mask
    modes = {
        path.name: stat.S_IMODE(path.stat().st_mode)
        for path in (tmp_path / "w.safetensors", tmp_path / "a.json", folder, folder / "model.safetensors")
    }
    assert modes == {
        "w.safetensors": file_mode,
        "a.json": file_mode,
        "epoch-0001": folder_mode,
        "model.safetensors": file_mode,
    }


# --- resume past a damaged checkpoint -----------------------------------------------------------------


def test_resume_skips_damaged_latest_checkpoint(tmp_path: Path, write_log, config_dict, caplog) -> None:
    raw = config_dict(write_log(num_rows=300), epochs=4)
    raw["training"]["early_stopping"] = {"metric": "mean/auc", "mode": "max", "patience": 5}
    whole = train_run(parse_config(raw), tmp_path / "whole")
    train_run(parse_config(raw), tmp_path / "parts", stop_after=3)
    latest = tmp_path / "parts" / "checkpoints" / "epoch-0003" / "model.safetensors"
    _start, header = read_header(latest)
    flip_tensor_byte(latest, sorted(key for key in header if key != "__metadata__")[0])

    with caplog.at_level("WARNING", logger="mtrank.training.trainer"):
        resumed = train_run(parse_config(raw), tmp_path / "parts", resume=True)

    # Epoch 3 is trained again from the kept epoch-2 checkpoint, so the result is the uninterrupted run's.
    assert "epoch-0003 is damaged" in caplog.text
    assert [r.epoch for r in resumed.fit.history] == [1, 2, 3, 4]
    assert resumed.test_metrics == whole.test_metrics


def test_resume_with_every_checkpoint_damaged(tmp_path: Path, write_log, config_dict) -> None:
    raw = config_dict(write_log(num_rows=300), epochs=4)
    train_run(parse_config(raw), tmp_path / "run", stop_after=2)
    for folder in (tmp_path / "run" / "checkpoints").glob("epoch-*"):
        (folder / "state.json").write_text("{not json", encoding="utf-8")

    with pytest.raises(ArtifactError, match="no undamaged checkpoint in .*; train again without --resume"):
        train_run(parse_config(raw), tmp_path / "run", resume=True)
