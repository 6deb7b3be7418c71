"""Typed run configuration read from YAML."""

from mtrank.config.loader import dump_config, load_config, parse_config
from mtrank.config.schema import RunConfig

__all__ = ["RunConfig", "dump_config", "load_config", "parse_config"]
