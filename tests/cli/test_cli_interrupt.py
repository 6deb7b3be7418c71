"""Ctrl-C during `mtrank train`: a readable message with the resume command, exit status 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

# Long enough that SIGINT arrives mid-run; short epochs keep the first checkpoint quick.
EPOCHS = 500
CHECKPOINT_WAIT_S = 60


def test_interrupt_prints_resume_command(tmp_path: Path, write_log, config_dict) -> None:
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(config_dict(write_log(), epochs=EPOCHS)), encoding="utf-8")
    run_dir = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "400"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrank", "-q", "train", str(config), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while not (run_dir / "checkpoints" / "latest.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=CHECKPOINT_WAIT_S)
    assert process.returncode == 130, output
    assert "interrupted: checkpoints of finished epochs are in" in output
    assert "--resume" in output
    assert "Traceback" not in output
