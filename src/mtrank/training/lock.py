"""An exclusive lock on a run directory, so two trainings never write into the same one.

The lock is an advisory ``flock`` on ``RUN_DIR/.mtrank.lock``, held for the whole run. The operating
system releases it when the process ends, even after a crash or ``kill -9``, so a lock is never left
behind. The file also records the holder's pid, host and start time, for the error message of the process
that is turned away.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from mtrank.errors import ArtifactError

if sys.platform != "win32":
    import fcntl

logger = logging.getLogger(__name__)

LOCK_FILE = ".mtrank.lock"


class RunDirectoryLock:
    """Exclusive, process-wide lock on one run directory; a context manager.

    Args:
        run_dir: the run directory; it is created when missing.

    Raises:
        ArtifactError: on entry, when another process holds the lock. The message names that
            process (pid, host, start time) and the fix.

    Example:
        >>> import tempfile
        >>> with RunDirectoryLock(Path(tempfile.mkdtemp())):
        ...     pass
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._handle: int | None = None

    def __enter__(self) -> RunDirectoryLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`ArtifactError` naming the holder."""
        if sys.platform == "win32":  # pragma: no cover - Windows has no flock
            logger.warning(
                "no file locking on Windows, so a second run into %s is not detected", self.run_dir
            )
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            os.close(handle)
            raise ArtifactError(
                f"run directory {self.run_dir} is in use by another training ({holder}); wait for it to "
                "finish or train into another --run-dir"
            ) from None
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(handle, 0)
        os.write(handle, json.dumps(owner).encode("utf-8"))
        self._handle = handle

    def release(self) -> None:
        """Release the lock. The file stays, and the next holder overwrites its contents."""
        if self._handle is None or sys.platform == "win32":
            return
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        os.close(self._handle)
        self._handle = None


def _read_holder(handle: int) -> str:
    """Return the lock holder from the file's JSON, or ``holder unknown``."""
    try:
        os.lseek(handle, 0, os.SEEK_SET)
        owner = json.loads(os.read(handle, 4096).decode("utf-8"))
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


__all__ = ["LOCK_FILE", "RunDirectoryLock"]
