"""Save and load one PEFT set: its tensors as safetensors and its description as a JSON sidecar.

Only the set's own tensors are written (PEFT modules plus the set's trainable modules), never the
base weights, and nothing is pickled. Loading re-injects the set into a freshly built base model from
the JSON description and then loads the tensors strictly. For a set with trainable modules (a new
task tower), the caller builds those modules into the base model before loading.

Two checks catch a changed weights file: the JSON records the SHA-256 of the whole file, and the
file's own header records the digest of its tensors (see
:func:`mtrank.training.checkpoint.tensor_digest`), which is checked when the tensors are loaded.

Files for set ``NAME`` in ``DIRECTORY``: ``NAME.safetensors`` and ``NAME.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtrank import __version__
from mtrank.errors import ArtifactError, ConfigError
from mtrank.peft.inject import PeftModel, PeftSetSpec
from mtrank.peft.targets import find_site
from mtrank.tensor_io import atomic_save_tensors, atomic_write_text, load_tensors

logger = logging.getLogger(__name__)

FORMAT_NAME = "mtrank-peft"
FORMAT_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"
CONFIG_SUFFIX = ".json"
# How many missing or unexpected keys an error message lists before shortening.
MAX_KEYS_IN_ERROR = 10


@dataclasses.dataclass(frozen=True)
class PeftSetFiles:
    """Paths of a saved PEFT set."""

    weights: Path
    config: Path


@dataclasses.dataclass
class SavedPeftSet:
    """The JSON sidecar of a saved PEFT set.

    Attributes:
        spec: the set's description, used to re-inject it.
        base_run: reference to the base model run, as given by the caller when saving.
        weights_sha256: SHA-256 of the safetensors file, checked on load.
        mtrank_version: version of mtrank that wrote the files.
    """

    spec: PeftSetSpec
    base_run: str
    weights_sha256: str
    mtrank_version: str

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object written to ``NAME.json``."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "mtrank_version": self.mtrank_version,
            "base_run": self.base_run,
            "weights_sha256": self.weights_sha256,
            **dataclasses.asdict(self.spec),
        }


def peft_set_files(directory: str | Path, name: str) -> PeftSetFiles:
    """Return the paths set ``name`` is saved under in ``directory``."""
    directory = Path(directory)
    return PeftSetFiles(
        weights=directory / f"{name}{WEIGHTS_SUFFIX}", config=directory / f"{name}{CONFIG_SUFFIX}"
    )


def list_peft_sets(directory: str | Path) -> list[str]:
    """Return the names of the sets saved in ``directory`` (those with both files), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        path.stem
        for path in directory.glob(f"*{CONFIG_SUFFIX}")
        if path.with_suffix(WEIGHTS_SUFFIX).is_file()
    )


def save_peft_set(model: PeftModel, name: str, directory: str | Path, *, base_run: str) -> PeftSetFiles:
    """Write set ``name``'s tensors and description to ``directory``, replacing earlier files.

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written
    file under the final name. The weights file's header records the digest of its tensors.

    Args:
        model: the model holding the set.
        name: the set to save.
        directory: output folder, created if missing.
        base_run: reference to the base model run (a run directory or id), stored in the JSON and
            checked by :func:`load_peft_set` when asked.

    Returns:
        The two paths written.

    Raises:
        ConfigError: there is no such set.
        ArtifactError: a module name contains ``/``, which the key layout reserves.
    """
    spec = model.spec(name)
    files = peft_set_files(directory, name)
    files.weights.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in model.set_state_dict(name).items():
        namespace, _, rest = key.partition("/")
        if rest.count("/") != (0 if namespace == "set" else 1):
            raise ArtifactError(f"cannot save tensor `{key}`: module names must not contain `/`")
        tensors[key] = tensor.detach().to("cpu").contiguous().clone()
    metadata = {"format": FORMAT_NAME, "peft_set": name, "method": spec.method}
    atomic_save_tensors(files.weights, tensors, metadata)
    saved = SavedPeftSet(
        spec=spec,
        base_run=base_run,
        weights_sha256=_sha256(files.weights),
        mtrank_version=__version__,
    )
    atomic_write_text(files.config, json.dumps(saved.to_json(), indent=2, sort_keys=True) + "\n")
    logger.info("saved PEFT set %s (%d tensors) to %s", name, len(tensors), files.weights)
    return files


def read_peft_set(directory: str | Path, name: str) -> SavedPeftSet:
    """Read and validate the JSON sidecar of set ``name`` in ``directory``.

    Raises:
        ArtifactError: the file is missing, not valid JSON, of another format or version, or lacks a
            field; every problem is listed.
    """
    path = peft_set_files(directory, name).config
    if not path.is_file():
        raise ArtifactError(f"PEFT set description {path} not found; save the set with save_peft_set first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ArtifactError(f"PEFT set description {path} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise ArtifactError(f"PEFT set description {path} must contain a JSON object")
    problems = []
    if raw.get("format") != FORMAT_NAME:
        problems.append(f"`format` is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        problems.append(
            f"`format_version` is {raw.get('format_version')!r}; this mtrank reads version {FORMAT_VERSION}"
        )
    expected_types: dict[str, type | tuple[type, ...]] = {
        "name": str,
        "method": str,
        "targets": list,
        "options": dict,
        "resolved_targets": list,
        "trainable_modules": list,
        "prefix_collapsed": bool,
        "base_run": str,
        "weights_sha256": str,
        "mtrank_version": str,
    }
    for key, expected in expected_types.items():
        if not isinstance(raw.get(key), expected):
            problems.append(f"`{key}` is missing or not a {getattr(expected, '__name__', expected)}")
    if not problems and raw["name"] != name:
        problems.append(f"`name` is {raw['name']!r} but the file is named for set {name!r}")
    if problems:
        raise ArtifactError(
            f"invalid PEFT set description {path}:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    spec = PeftSetSpec(
        name=raw["name"],
        method=raw["method"],
        targets=list(raw["targets"]),
        options=dict(raw["options"]),
        resolved_targets=list(raw["resolved_targets"]),
        trainable_modules=list(raw["trainable_modules"]),
        prefix_collapsed=raw["prefix_collapsed"],
    )
    return SavedPeftSet(
        spec=spec,
        base_run=raw["base_run"],
        weights_sha256=raw["weights_sha256"],
        mtrank_version=raw["mtrank_version"],
    )


def load_peft_set(
    model: nn.Module,
    directory: str | Path,
    name: str,
    *,
    expected_base_run: str | None = None,
    activate: bool = True,
) -> PeftModel:
    """Re-inject set ``name`` from ``directory`` into ``model`` and load its tensors strictly.

    Args:
        model: a freshly built base model with the base weights loaded, or a :class:`PeftModel`
            around one. A set with trainable modules needs those modules built into it already.
        directory: folder given to :func:`save_peft_set`.
        name: the set to load.
        expected_base_run: when given, the ``base_run`` stored with the set must equal it.
        activate: make the loaded set the active one.

    Returns:
        The :class:`PeftModel` holding the set (``model`` itself when it already is one).

    Raises:
        ArtifactError: the files are missing, corrupt (the weights file differs from the SHA-256
            in the JSON, or its tensors from the digest in its header) or of another format, or
            the base run differs. Also when the patterns select other modules than at saving (another
            architecture), a trainable module is missing, or tensors are missing, unexpected or
            of another shape. On any of these errors the model is left without the set.
        ConfigError: the model already has a set of that name.
    """
    saved = read_peft_set(directory, name)
    spec = saved.spec
    files = peft_set_files(directory, name)
    if expected_base_run is not None and saved.base_run != expected_base_run:
        raise ArtifactError(
            f"PEFT set `{name}` was trained on base run {saved.base_run!r}, not {expected_base_run!r}; "
            "load it onto the base model it was trained on"
        )
    if not files.weights.is_file():
        raise ArtifactError(f"PEFT weights {files.weights} not found next to {files.config}")
    digest = _sha256(files.weights)
    if digest != saved.weights_sha256:
        raise ArtifactError(
            f"PEFT weights {files.weights} have SHA-256 {digest}, but {files.config} records "
            f"{saved.weights_sha256}; the files do not belong together or one is corrupt"
        )

    peft_model = model if isinstance(model, PeftModel) else PeftModel(model)
    if name in peft_model.set_names():
        raise ConfigError([f"the model already has a PEFT set named `{name}`; remove it before loading"])
    matched = peft_model.match_targets(spec.method, spec.targets, spec.options)
    if matched != spec.resolved_targets:
        raise ArtifactError(
            f"PEFT set `{name}` targets {_shorten(spec.resolved_targets)} but on this base model its "
            f"patterns {spec.targets} select {_shorten(matched)}; build the base model with the "
            "architecture the set was trained on"
        )
    missing_modules = [
        module for module in spec.trainable_modules if find_site(peft_model.base_model, module) is None
    ]
    if missing_modules:
        raise ArtifactError(
            f"PEFT set `{name}` trains modules {missing_modules} that the base model lacks; build them "
            "into the base model (for a new task, its tower) before loading"
        )

    peft_model.inject(name, spec.method, spec.targets, spec.options, activate=False)
    try:
        for module_name in spec.trainable_modules:
            peft_model.add_trainable_module(name, module_name)
        if spec.prefix_collapsed:
            peft_model.collapse_prefix(name)
        _load_tensors_strictly(peft_model, name, files.weights)
    except (ArtifactError, ConfigError):
        peft_model.remove_set(name)
        raise
    if activate:
        peft_model.enable(name)
    logger.info("loaded PEFT set %s (%s) from %s", name, spec.method, files.weights)
    return peft_model


def _load_tensors_strictly(model: PeftModel, name: str, path: Path) -> None:
    loaded = load_tensors(path)
    expected = model.set_state_dict(name)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_shorten(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_shorten(unexpected)}")
    for key in sorted(set(expected) & set(loaded)):
        if expected[key].shape != loaded[key].shape:
            problems.append(
                f"tensor `{key}` has shape {tuple(loaded[key].shape)} in the file but "
                f"{tuple(expected[key].shape)} in the model"
            )
    if problems:
        raise ArtifactError(
            f"PEFT weights {path} do not fit set `{name}` on this model:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(loaded[key])


def _shorten(names: list[str]) -> str:
    listed = ", ".join(names[:MAX_KEYS_IN_ERROR])
    if len(names) > MAX_KEYS_IN_ERROR:
        listed += f", ... ({len(names)} in all)"
    return f"[{listed}]"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
