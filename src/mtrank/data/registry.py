"""Registry of the public datasets mtrank's examples use: local lookup, download and sha256 check.

A file is looked for, in order, under ``$MTRANK_DATA_DIR/<dataset>/``, then in the download cache
(``$MTRANK_CACHE_DIR`` or ``~/.cache/mtrank``), then downloaded from its official location when a URL
is known and ``$MTRANK_OFFLINE`` is unset. Config paths of the form ``dataset:<name>/<file>`` resolve through this registry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mtrank.config.loader import expand_env
from mtrank.errors import DatasetNotFoundError

logger = logging.getLogger(__name__)

DATASET_SCHEME = "dataset:"
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset.

    Attributes:
        name: path inside the dataset folder.
        sha256: expected checksum, or ``None`` where no copy was available to pin one; such downloads
            are accepted with a warning that prints the checksum seen.
        url: official download location, or ``None`` when the file is not downloadable on its own.
    """

    name: str
    sha256: str | None
    url: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A public dataset known to mtrank."""

    name: str
    description: str
    licence: str
    homepage: str
    files: tuple[DatasetFile, ...] = field(default_factory=tuple)

    def file(self, name: str) -> DatasetFile:
        for entry in self.files:
            if entry.name == name:
                return entry
        known = ", ".join(f.name for f in self.files)
        raise DatasetNotFoundError(f"dataset `{self.name}` has no file `{name}`; its files are: {known}")


_KERAS_MMOE = "https://raw.githubusercontent.com/drawbridge/keras-mmoe/master/data"
_OBP = "https://raw.githubusercontent.com/st-tech/zr-obp/master/obd"
_KUAIRAND_SUBSET = (
    "https://raw.githubusercontent.com/alessandrosocc/predict_explicit_negative_feedback_kuairand/"
    "959232d6dd3c66f45e802436c2914e9584139eac/processed_data"
)
_KUAISIM = (
    "https://raw.githubusercontent.com/Applied-Machine-Learning-Lab/KuaiSim/"
    "2ae32aa25a0aac103194a66e6864e3d2ac6d6580/dataset/kuairand/kuairand-Pure/data"
)

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            name="census-income-kdd",
            description="UCI Census-Income (KDD), the MMoE paper's multi-task benchmark: income > 50K and never married",
            licence="CC BY 4.0 (UCI Machine Learning Repository)",
            homepage="https://archive.ics.uci.edu/dataset/117/census+income+kdd",
            files=(
                DatasetFile(
                    "census-income.test.gz",
                    "5ac4cacd3ca9f1ecb10de1a0a41e4ac68fdc419e3fec190f5c0c6cc03b2ea659",
                    f"{_KERAS_MMOE}/census-income.test.gz",
                ),
                # NOTE: no copy of the training file was available to pin its checksum; the first
                # download logs the sha256 it saw. Pin it here once verified.
                DatasetFile("census-income.data.gz", None, f"{_KERAS_MMOE}/census-income.data.gz"),
            ),
        ),
        Dataset(
            name="kuairand-explicit-feedback-subset",
            description="41,828 KuaiRand-27K impressions with click, long view, like/hate and play time, plus user features",
            licence="CC BY-SA 4.0 (KuaiRand)",
            homepage="https://kuairand.com",
            files=(
                DatasetFile(
                    "processed_standard_kcore_15.csv",
                    "321128c4543d3e658a1fa9788edd4049295b0d1ccf4469154326fb7769556e0a",
                    f"{_KUAIRAND_SUBSET}/processed_standard_kcore_15.csv",
                ),
                DatasetFile(
                    "user_features_pure.csv",
                    "dc729a656301b4c6d07f713fe41d05ec9bfaab670b90e531c70037caf033c011",
                    f"{_KUAISIM}/user_features_pure.csv",
                ),
            ),
        ),
        Dataset(
            name="open-bandit-dataset",
            description="ZOZOTOWN Open Bandit Dataset (small): 3 display slots, click, propensity; random and BTS logging",
            licence="Apache-2.0 (zr-obp repository sample)",
            homepage="https://research.zozo.com/data.html",
            files=tuple(
                DatasetFile(f"{policy}/{campaign}/{file}", checksum, f"{_OBP}/{policy}/{campaign}/{file}")
                for policy, campaign, file, checksum in (
                    (
                        "random",
                        "men",
                        "men.csv",
                        "ede6d08c6877f99cd3770f7d09e26c738e6aa6de4445ccccfb1356ba5d06b1eb",
                    ),
                    (
                        "random",
                        "men",
                        "item_context.csv",
                        "6d855c2b7e917d0448d71bbe62c023147495882c0fdc8c41e86fef86abf9fe09",
                    ),
                    (
                        "random",
                        "women",
                        "women.csv",
                        "e65f3bd3beb17664fa69cc129bf7bf852a775f8ffa630506e505fc905315bb34",
                    ),
                    (
                        "random",
                        "women",
                        "item_context.csv",
                        "b1ca4905f97703d196004f2ad4552c1e90c2afad8b50688d333b0d2dc0b33147",
                    ),
                    (
                        "bts",
                        "men",
                        "men.csv",
                        "db6d1f7ed2d591ba521533e45286d4c1fba7fe57a8ad2e80342210335f43c527",
                    ),
                    (
                        "bts",
                        "men",
                        "item_context.csv",
                        "3b411ed6b0471316321a6b93f4f756bb25888eac6218cd71d0b603d41d85732d",
                    ),
                    (
                        "bts",
                        "women",
                        "women.csv",
                        "e5d1b49a39b608585a2f3014a3f54970430cd37a495c1b73fceb85cdf428a5b8",
                    ),
                    (
                        "bts",
                        "women",
                        "item_context.csv",
                        "a56295bad066a558eb783055afd9279f5f4e209a4776eafc22151c53f0ac89d4",
                    ),
                )
            ),
        ),
    )
}


def data_dir() -> Path | None:
    """Return ``$MTRANK_DATA_DIR`` as a path, or ``None`` when unset."""
    value = os.environ.get("MTRANK_DATA_DIR")
    return Path(value) if value else None


def cache_dir() -> Path:
    """Return the download cache folder (``$MTRANK_CACHE_DIR`` or ``~/.cache/mtrank``)."""
    value = os.environ.get("MTRANK_CACHE_DIR")
    return Path(value) if value else Path.home() / ".cache" / "mtrank"


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate(dataset: str, file: str, *, download: bool = True) -> Path:
    """Return a local path to one dataset file, downloading it if needed and allowed.

    Raises:
        DatasetNotFoundError: the dataset or file is unknown, the download failed or its checksum
            did not match; the message names where to put the file by hand.
    """
    if dataset not in DATASETS:
        raise DatasetNotFoundError(
            f"unknown dataset `{dataset}`; known datasets: {', '.join(sorted(DATASETS))}"
        )
    entry = DATASETS[dataset].file(file)
    local_root = data_dir()
    candidates = [local_root / dataset / file] if local_root else []
    candidates.append(cache_dir() / dataset / file)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = " or ".join(str(c) for c in candidates)
    if os.environ.get("MTRANK_OFFLINE"):
        download = False
    if not download or entry.url is None:
        if os.environ.get("MTRANK_OFFLINE"):
            reason = "MTRANK_OFFLINE is set, so no download is tried"
        elif entry.url is None:
            reason = "it has no public download address"
        else:
            reason = "downloads are off for this call"
        data_dir_setting = os.environ.get("MTRANK_DATA_DIR")
        hint = (
            f"MTRANK_DATA_DIR is {data_dir_setting}"
            if data_dir_setting
            else "MTRANK_DATA_DIR is not set; point it at the folder that holds the dataset folders"
        )
        raise DatasetNotFoundError(
            f"{dataset}/{file} is not on disk (looked in {where}) and {reason}; {hint}. Otherwise "
            f"download it from {DATASETS[dataset].homepage} and put it at {candidates[0]}"
        )
    target = cache_dir() / dataset / file
    try:
        _download(entry, target)
    except (OSError, ValueError) as exc:
        raise DatasetNotFoundError(
            f"{dataset}/{file} is not on disk (looked in {where}) and the download from {entry.url} failed: {exc}. "
            f"Without internet, copy the file to {candidates[0]} (set MTRANK_DATA_DIR to its parent folder)"
        ) from None
    return target


def _download(entry: DatasetFile, target: Path) -> None:
    """Download to a temporary file, check the sha256, then move it into place atomically."""
    if entry.url is None:
        raise ValueError(f"{entry.name} has no download location")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", entry.url, target)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".download-")
    try:
        with (
            os.fdopen(handle, "wb") as out,
            urllib.request.urlopen(entry.url, timeout=DOWNLOAD_TIMEOUT_S) as response,
        ):
            shutil.copyfileobj(response, out)
        seen = sha256_of(Path(temporary))
        if entry.sha256 is None:
            logger.warning("%s has no pinned checksum; the downloaded file has sha256 %s", entry.name, seen)
        elif seen != entry.sha256:
            raise ValueError(f"sha256 mismatch: expected {entry.sha256}, got {seen}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def resolve_path(path: str | Path) -> Path:
    """Resolve a config path: ``dataset:<name>/<file>`` through the registry, else a plain path with ``${VAR}``."""
    text = str(path)
    if text.startswith(DATASET_SCHEME):
        name, _, file = text[len(DATASET_SCHEME) :].partition("/")
        return locate(name, file)
    return Path(expand_env(text)).expanduser()


def is_available(dataset: str, file: str) -> bool:
    """Return whether a dataset file is on disk already (no download is tried)."""
    try:
        locate(dataset, file, download=False)
    except DatasetNotFoundError:
        return False
    return True
