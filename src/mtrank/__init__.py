"""mtrank: multi-task ranking for recommender systems on PyTorch."""

from mtrank.errors import ConfigError, DataError, MtrankError, MtrankWarning

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "MtrankError", "MtrankWarning", "__version__"]
