"""Atomic writes of text and safetensors files, with a content digest checked on every load.

Runs, checkpoints and PEFT sets all write through these functions; nothing is pickled. Every
safetensors file mtrank writes records a SHA-256 of its tensor content in the header metadata
(key :data:`DIGEST_METADATA_KEY`, layout in :func:`tensor_digest`), and :func:`load_tensors` checks it,
so a changed byte inside a tensor raises :class:`~mtrank.errors.ArtifactError` instead of loading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtrank.errors import ArtifactError

logger = logging.getLogger(__name__)

# Header metadata key of the tensor-content digest that `tensor_digest` computes.
DIGEST_METADATA_KEY = "mtrank.sha256"
# Hashed before the tensors, so that a digest of another layout can never match this one.
DIGEST_LAYOUT = b"mtrank-tensors-v1\n"

# Files already reported as written without a digest; each is reported once per process.
_files_without_digest: set[str] = set()
_files_without_digest_lock = threading.Lock()


def _read_umask() -> int:
    # os.umask can only be read by setting it, so set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import, usually before other threads start: changing the umask while another thread
# creates a file would give that file the wrong mode.
_UMASK = _read_umask()


def apply_default_mode(path: Path) -> None:
    """Give a file or folder made by ``tempfile`` (mode 0600 or 0700) the mode a plain ``open`` gives.

    Temporary files are private on purpose, but a run directory is read by other users and services
    (a model server running under its own account), so the renamed result follows the umask.
    """
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_UMASK)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        apply_default_mode(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Compute the SHA-256 of tensor names, dtypes, shapes and bytes, independent of dict order.

    The hash input is :data:`DIGEST_LAYOUT`, then for each tensor in sorted name order one line of
    JSON ``["NAME", "DTYPE", [SHAPE...]]`` and a newline (``DTYPE`` is the torch dtype name, e.g.
    ``float32``), then the tensor's elements in row-major order as stored in memory. The dtype and
    shape fix the byte count, so the layout needs no separator after the bytes.

    Args:
        tensors: name -> tensor, on any device.

    Returns:
        The hex digest (64 characters).
    """
    # NOTE: the bytes are in torch's in-memory order. That is little-endian, as in safetensors files,
    # on every platform torch ships for. A big-endian machine would compute other digests.
    digest = hashlib.sha256(DIGEST_LAYOUT)
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        line = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])
        digest.update(line.encode("utf-8") + b"\n")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # (numel * itemsize,) bytes
    return digest.hexdigest()


def save_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors with their :func:`tensor_digest` in the header metadata.

    The file is written in place, so use :func:`atomic_save_tensors` unless the folder itself is
    renamed into place afterwards.

    Args:
        path: the output file.
        tensors: name -> tensor, on any device; they are copied to the CPU.
        metadata: further header metadata (text only).

    Raises:
        ValueError: ``metadata`` sets :data:`DIGEST_METADATA_KEY`, which this function computes.
    """
    if metadata is not None and DIGEST_METADATA_KEY in metadata:
        raise ValueError(
            f"metadata key `{DIGEST_METADATA_KEY}` is reserved for the tensor digest, so remove it from `metadata`"
        )
    cpu = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    save_file(cpu, str(path), metadata={**(metadata or {}), DIGEST_METADATA_KEY: tensor_digest(cpu)})
    # safetensors creates its files with mode 0600.
    apply_default_mode(path)


def atomic_save_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors with :func:`save_tensors` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        save_tensors(Path(temporary), tensors, metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def verify_tensor_digest(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Check loaded tensors against the digest that their file's header records.

    A file without a digest (written by mtrank before digests existed, or by another program) passes,
    and a warning names it once per process.

    Args:
        path: the file the tensors were read from, for messages.
        tensors: the tensors as loaded.
        metadata: the file's header metadata.

    Raises:
        ArtifactError: the digest of ``tensors`` differs from the recorded one.
    """
    expected = metadata.get(DIGEST_METADATA_KEY)
    if expected is None:
        key = str(path.resolve())
        with _files_without_digest_lock:
            first_time = key not in _files_without_digest
            _files_without_digest.add(key)
        if first_time:
            logger.warning(
                "%s records no `%s` digest (written before mtrank checked tensor content), so its tensors "
                "were loaded unchecked. Save the weights again to add one",
                path,
                DIGEST_METADATA_KEY,
            )
        return
    actual = tensor_digest(tensors)
    if actual != expected:
        raise ArtifactError(
            f"{path} is corrupt: its tensors have SHA-256 {actual}, but its header records {expected}. "
            "Train again (`mtrank train`, or `mtrank finetune` for a PEFT set) to write the file anew, "
            "or restore it from a backup copy"
        )


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file and check its tensors against the digest in its header.

    Args:
        path: the file.

    Returns:
        Name -> tensor, on the CPU.

    Raises:
        ArtifactError: the file is missing, cannot be parsed, or its tensors differ from the recorded
            digest (see :func:`verify_tensor_digest`). The message names the file.
    """
    if not path.is_file():
        raise ArtifactError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ArtifactError(f"cannot read weights from {path}: {exc}") from None
    verify_tensor_digest(path, tensors, metadata)
    return tensors
