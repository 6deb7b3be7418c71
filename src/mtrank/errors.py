"""Exception and warning classes shared by every mtrank part."""

from __future__ import annotations


class MtrankError(Exception):
    """Base class of every error mtrank raises on user input."""


class ConfigError(MtrankError, ValueError):
    """A configuration value is invalid; the message lists every problem with its key path."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} invalid configuration value(s){where}:\n{lines}")


class DataError(MtrankError, ValueError):
    """Input data is invalid: a missing file or column, or a value that cannot be parsed."""


class DatasetNotFoundError(MtrankError, FileNotFoundError):
    """A registered dataset is neither on disk nor downloadable."""


class ArtifactError(MtrankError, ValueError):
    """A run directory or checkpoint is missing, incomplete or of another version."""


class MtrankWarning(UserWarning):
    """Warning for misconfiguration the user can fix, such as a metric that is undefined on a split."""
