"""Tests of the run-directory lock with real processes: a second holder is turned away, a dead one is not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mtrank.errors import ArtifactError
from mtrank.training.lock import RunDirectoryLock

HOLDER = """
import sys, time
from pathlib import Path
from mtrank.training.lock import RunDirectoryLock
with RunDirectoryLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """A separate process that holds the lock of ``tmp_path / 'run'`` until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_second_process_is_turned_away(tmp_path: Path, holder) -> None:
    with pytest.raises(ArtifactError, match=f"in use by another training \\(pid {holder.pid} on "):
        RunDirectoryLock(tmp_path / "run").acquire()


def test_lock_freed_when_holder_dies(tmp_path: Path, holder) -> None:
    holder.kill()
    holder.wait()
    # The operating system dropped the dead process's lock; no stale file blocks the next run.
    with RunDirectoryLock(tmp_path / "run") as lock:
        assert lock.path.is_file()


def test_release_lets_next_holder_in(tmp_path: Path) -> None:
    first = RunDirectoryLock(tmp_path)
    first.acquire()
    first.release()
    with RunDirectoryLock(tmp_path):
        pass


def test_two_locks_in_one_process_conflict(tmp_path: Path) -> None:
    # flock locks belong to open file descriptions, so a second open in the same process conflicts too.
    with RunDirectoryLock(tmp_path), pytest.raises(ArtifactError, match="in use by another training"):
        RunDirectoryLock(tmp_path).acquire()


def test_second_training_into_busy_run_directory(tmp_path: Path, write_log, config_dict) -> None:
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(config_dict(write_log(), epochs=500)), encoding="utf-8")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "mtrank", "-q", "train", str(config), "--run-dir", str(run_dir)]
    env = {**os.environ, "COLUMNS": "400"}
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "checkpoints" / "latest.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = subprocess.run(
            [*command, "--overwrite"], capture_output=True, text=True, env=env, timeout=120
        )
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"in use by another training (pid {first.pid} on " in second.stdout + second.stderr
