"""Ready-made configs for the example datasets."""

from __future__ import annotations

import logging
from importlib import resources

import yaml

from mtrank.config.loader import parse_config
from mtrank.config.schema import FilesSplit, RunConfig

logger = logging.getLogger(__name__)

CENSUS_TRAIN = "census-income.data.gz"
CENSUS_TEST = "census-income.test.gz"


def preset_names() -> list[str]:
    """Return the names of the packaged presets."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files(__package__).iterdir()
        if p.name.endswith(".yaml")
    )


def load_preset(name: str) -> RunConfig:
    """Load a packaged preset config by name (e.g. ``census``)."""
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return parse_config(yaml.safe_load(text), f"preset {name}")


def census_config() -> RunConfig:
    """Return the Census-Income MMoE preset, using the official train/test files when both exist.

    UCI ships a training file (199,523 rows) and a test file (99,762 rows). When only the test file is
    on disk (as in mtrank's CI), the preset splits it 80/20 with a fixed seed and logs that it did.
    """
    from mtrank.data.registry import is_available, locate

    config = load_preset("census")
    if is_available("census-income-kdd", CENSUS_TRAIN):
        config.data.path = f"dataset:census-income-kdd/{CENSUS_TRAIN}"
        config.data.split = FilesSplit(method="files", test_path=f"dataset:census-income-kdd/{CENSUS_TEST}")
        logger.info("census: training on %s, testing on %s", CENSUS_TRAIN, CENSUS_TEST)
        return config
    locate("census-income-kdd", CENSUS_TEST)
    logger.info(
        "census: the training file %s is not on disk; splitting %s 80/20 with seed %d instead",
        CENSUS_TRAIN,
        CENSUS_TEST,
        config.data.split.seed,
    )
    return config
