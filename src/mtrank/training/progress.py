"""Progress reporting hook: the library reports, the CLI draws (with rich)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives progress of long work; the CLI implements it with a rich progress bar."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, steps: int = 1) -> None: ...

    def stop(self) -> None: ...


class NoProgress:
    """A :class:`Progress` that shows nothing (the library default)."""

    def start(self, description: str, total: int) -> None:
        return None

    def advance(self, steps: int = 1) -> None:
        return None

    def stop(self) -> None:
        return None
