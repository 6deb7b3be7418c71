"""Export a trained ranker as ONNX or TorchScript, with a JSON sidecar that describes the graph.

The exported graph takes the encoded tensors that :meth:`mtrank.data.pipeline.FeatureEncoders.encode`
produces, so a caller encodes rows with the run's ``encoders.json`` and feeds the result:

- ``categorical``: int64 ``(B, Fc)``, one column per categorical feature in config order.
- ``numeric``: float32 ``(B, Fn)``, one column per numeric feature in config order.
- ``device``: int64 ``(B, Fd)``, only when the run has a position-bias shallow tower.

There is no position input. The shallow tower receives the missing position id at serving, as the
ranker does in eval mode, so the device features still shift the biased tasks. The graph returns one
output per task, named after the task, of shape ``(B,)``: a probability for binary tasks and the
predicted value for regression tasks. The batch dimension is dynamic.

The sidecar ``OUT.json`` (``model.onnx`` -> ``model.onnx.json``) lists the inputs with their
feature columns, the outputs with their task types, and the path and SHA-256 of the encoders file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mtrank.data.encoders import MISSING_POSITION_ID, VocabularyEncoder
from mtrank.data.pipeline import FeatureEncoders
from mtrank.data.tensors import Batch
from mtrank.errors import ArtifactError, ConfigError
from mtrank.serving.scorer import Scorer
from mtrank.training.losses import to_predictions
from mtrank.training.run import ENCODERS_FILE

logger = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "torchscript"]
SIDECAR_FORMAT = 1
BATCH_AXIS = "batch"
# Rows of random encoded inputs used to trace the model and to check the exported copy. More than
# one, because torch.export specialises a dimension whose example size is 0 or 1.
EXAMPLE_ROWS = 8
# The exported copy must reproduce PyTorch within this tolerance (absolute and relative, float32),
# or the export is rejected.
EXPORT_TOLERANCE = 1e-5
# Upper bound for random raw ids (hashing and DHE features), which accept any int64.
RAW_ID_HIGH = 2**31
SIDECAR_SUFFIX = ".json"


class ServingModule(nn.Module):
    """A ranker wrapped for export: encoded tensors in, one named output per task out.

    Shapes: B batch, Fc categorical features, Fn numeric features, Fd device features.

    Args:
        model: the trained ranker (or a PEFT model around it), in eval mode.
        task_names: the output names, one per logit column.
        loss_kinds: the loss of each task; ``bce`` tasks output probabilities, the others values.
        has_device: whether the model has a shallow tower and so reads ``device``.
    """

    def __init__(
        self, model: nn.Module, task_names: Sequence[str], loss_kinds: Sequence[str], *, has_device: bool
    ) -> None:
        super().__init__()
        self.model = model
        self.task_names = list(task_names)
        self.loss_kinds = list(loss_kinds)
        self.has_device = has_device

    def forward(
        self, categorical: torch.Tensor, numeric: torch.Tensor, device: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Score encoded rows.

        Args:
            categorical: ``(B, Fc)`` int64 ids.
            numeric: ``(B, Fn)`` float32 values.
            device: ``(B, Fd)`` int64 device ids; required when ``has_device``.

        Returns:
            Task name -> ``(B,)`` prediction.
        """
        if self.has_device and device is None:
            raise ValueError("this ranker has a shallow tower, so `device` (B, Fd) is required")
        position = None
        if device is not None:
            # The missing position id for every row. The row sum only supplies a (B,) int64 tensor whose
            # B stays symbolic in the exported graph, also when Fd is 0.
            position = torch.full_like(device.sum(dim=1), MISSING_POSITION_ID)  # (B, Fd) -> (B,)
        batch = Batch(categorical=categorical, numeric=numeric, position=position, device=device)
        predictions = to_predictions(self.model(batch).logits, self.loss_kinds)  # (B, T)
        return {name: predictions[:, t] for t, name in enumerate(self.task_names)}  # T x (B,)


@dataclass
class ExportResult:
    """Files an export wrote, and how closely the exported copy reproduced PyTorch.

    Attributes:
        model_path: the ONNX or TorchScript file.
        sidecar_path: the JSON description beside it.
        max_abs_diff: the largest absolute difference between the exported copy's outputs and
            PyTorch's on random encoded rows.
        sidecar: the sidecar's content.
    """

    model_path: Path
    sidecar_path: Path
    max_abs_diff: float
    sidecar: dict[str, Any]


def sidecar_path_for(model_path: Path) -> Path:
    """Return the sidecar path of an exported model: the model file name plus ``.json``."""
    return model_path.with_name(model_path.name + SIDECAR_SUFFIX)


def input_names(encoders: FeatureEncoders) -> list[str]:
    """Return the graph's input names in call order: categorical, numeric, and device with a shallow tower."""
    names = ["categorical", "numeric"]
    if encoders.position is not None:
        names.append("device")
    return names


def example_inputs(encoders: FeatureEncoders, num_rows: int, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Return random valid encoded inputs, in :func:`input_names` order.

    Vocabulary features get ids in ``[0, vocabulary size)``, raw-id features any id below
    :data:`RAW_ID_HIGH`, numeric features standard normal values.

    Args:
        encoders: the run's fitted encoders.
        num_rows: B.
        seed: seed of the random generator.

    Returns:
        ``categorical (B, Fc)`` int64, ``numeric (B, Fn)`` float32 and, with a shallow tower,
        ``device (B, Fd)`` int64.
    """
    generator = torch.Generator().manual_seed(seed)
    categorical = torch.zeros((num_rows, len(encoders.categorical)), dtype=torch.int64)
    for j, (_source, encoder) in enumerate(encoders.categorical.values()):
        high = encoder.size if isinstance(encoder, VocabularyEncoder) else RAW_ID_HIGH
        categorical[:, j] = torch.randint(0, high, (num_rows,), generator=generator)
    numeric = torch.randn((num_rows, len(encoders.numeric)), generator=generator)
    inputs: tuple[torch.Tensor, ...] = (categorical, numeric)
    if encoders.position is not None:
        device = torch.zeros((num_rows, len(encoders.device)), dtype=torch.int64)
        for j, encoder in enumerate(encoders.device.values()):
            device[:, j] = torch.randint(0, encoder.size, (num_rows,), generator=generator)
        inputs += (device,)
    return inputs


def _serving_module(scorer: Scorer) -> ServingModule:
    run = scorer.run
    module = ServingModule(
        run.model, scorer.task_names, scorer.loss_kinds, has_device=run.encoders.position is not None
    )
    return module.eval()


def _reference_outputs(module: ServingModule, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        return {name: value.numpy() for name, value in module(*inputs).items()}


def _max_abs_diff(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], where: Path) -> float:
    """Compare exported outputs with PyTorch's; raise when a task differs beyond the tolerance."""
    worst = 0.0
    for name, reference in expected.items():
        if name not in actual:
            raise ArtifactError(
                f"{where}: the exported model has no output `{name}`; outputs: {sorted(actual)}"
            )
        value = np.asarray(actual[name])
        if value.shape != reference.shape:
            raise ArtifactError(
                f"{where}: output `{name}` has shape {value.shape}, expected {reference.shape} from PyTorch"
            )
        diff = float(np.max(np.abs(value - reference))) if reference.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(value, reference, rtol=EXPORT_TOLERANCE, atol=EXPORT_TOLERANCE):
            raise ArtifactError(
                f"{where}: output `{name}` differs from PyTorch by up to {diff:.3g} "
                f"(tolerance {EXPORT_TOLERANCE}); the exporter changed the model, so do not serve this file"
            )
    return worst


def _describe_inputs(encoders: FeatureEncoders) -> list[dict[str, Any]]:
    categorical = [
        {"feature": name, "column": source, "encoder": encoder.kind}
        for name, (source, encoder) in encoders.categorical.items()
    ]
    numeric = [
        {"feature": name, "column": source, "encoder": encoder.kind}
        for name, (source, encoder) in encoders.numeric.items()
    ]
    described = [
        {
            "name": "categorical",
            "dtype": "int64",
            "shape": [BATCH_AXIS, len(categorical)],
            "columns": categorical,
        },
        {"name": "numeric", "dtype": "float32", "shape": [BATCH_AXIS, len(numeric)], "columns": numeric},
    ]
    if encoders.position is not None:
        device = [{"column": column, "encoder": encoder.kind} for column, encoder in encoders.device.items()]
        described.append(
            {"name": "device", "dtype": "int64", "shape": [BATCH_AXIS, len(device)], "columns": device}
        )
    return described


def _build_sidecar(
    scorer: Scorer, model_path: Path, export_format: ExportFormat, extra: dict[str, Any]
) -> dict[str, Any]:
    run = scorer.run
    encoders_path = (run.run_dir / ENCODERS_FILE).resolve()
    task_types = {task.name: task.type for task in run.config.tasks}
    outputs = [
        {
            "name": name,
            "task_type": task_types[name],
            "value": "probability" if kind == "bce" else "prediction",
            "dtype": "float32",
            "shape": [BATCH_AXIS],
        }
        for name, kind in zip(scorer.task_names, scorer.loss_kinds, strict=True)
    ]
    position_column = run.encoders.position[0] if run.encoders.position is not None else None
    return {
        "format": SIDECAR_FORMAT,
        "export_format": export_format,
        "model_file": model_path.name,
        "run": {"name": run.config.name, "dir": str(run.run_dir.resolve()), "peft_set": run.peft_set},
        "encoders": {
            "path": str(encoders_path),
            "sha256": hashlib.sha256(encoders_path.read_bytes()).hexdigest(),
        },
        "inputs": _describe_inputs(run.encoders),
        "outputs": outputs,
        "position": {
            "column": position_column,
            "input": False,
            "note": "the shallow tower always sees the missing position id"
            if position_column is not None
            else "the run has no shallow tower",
        },
        "torch_version": torch.__version__,
        **extra,
    }


def _write_sidecar(model_path: Path, sidecar: dict[str, Any]) -> Path:
    path = sidecar_path_for(model_path)
    path.write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _prepare(
    run_dir: str | Path, out_path: str | Path, peft: str | Path | None
) -> tuple[Scorer, ServingModule, Path]:
    scorer = Scorer.from_run(run_dir, peft=peft)
    out = Path(out_path)
    if out.is_dir():
        raise ConfigError([f"--out {out} is a folder; give a file name such as {out / 'model.onnx'}"])
    out.parent.mkdir(parents=True, exist_ok=True)
    return scorer, _serving_module(scorer), out


def write_onnx(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    out: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int | None = None,
) -> None:
    """Write ``module`` as ONNX with torch.onnx's dynamo exporter, axis 0 of every input dynamic.

    Args:
        module: the module to export, in eval mode.
        inputs: example inputs with at least 2 rows (torch.export specialises sizes 0 and 1).
        out: the ``.onnx`` file.
        input_names: one name per input.
        output_names: one name per output, in the order the module returns them.
        opset: the ONNX opset version; default: torch's.
    """
    dynamic_shapes = {name: {0: BATCH_AXIS} for name in input_names}
    # NOTE: optimize=False because onnxscript's optimizer (0.7.2, the default of torch 2.13's exporter)
    # rewrites a ScatterND with reduction="add" whose static indices cover the whole axis into its
    # updates alone. A shallow tower that biases every task adds its logits with exactly such a node:
    # in one export the main towers' logits vanished (outputs off by 0.05), and whether the rule fires
    # depended on how the position tensor was built. ONNX Runtime still optimises the graph on load.
    # TODO: drop optimize=False once onnxscript's ScatterAllStatic rule checks `reduction`.
    with warnings.catch_warnings():
        # Every input shares the one batch axis, which torch 2.13 reports as a name it will not use.
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
        torch.onnx.export(
            module,
            inputs,
            str(out),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            optimize=False,
            # One self-contained file: rankers are small, and a separate .data file is easy to lose.
            external_data=False,
            opset_version=opset,
            verbose=False,
        )


def export_onnx(
    run_dir: str | Path, out_path: str | Path, *, peft: str | Path | None = None, opset: int | None = None
) -> ExportResult:
    """Export a run's ranker to ONNX with torch.onnx's dynamo exporter and check it with ONNX Runtime.

    Args:
        run_dir: the run folder.
        out_path: the ``.onnx`` file to write; its sidecar is ``out_path`` plus ``.json``.
        peft: a PEFT set to load onto the base first (a name under ``RUN/peft/`` or a folder); its
            new tasks become extra outputs.
        opset: the ONNX opset version; default: torch's.

    Returns:
        :class:`ExportResult`.

    Raises:
        ArtifactError: the run is incomplete, or the exported model's outputs differ from PyTorch's.
        ConfigError: ``out_path`` is a folder.
        ImportError: onnx, onnxscript or onnxruntime is not installed (``pip install 'mtrank[export]'``).
    """
    import onnx
    import onnxruntime

    scorer, module, out = _prepare(run_dir, out_path, peft)
    names = input_names(scorer.run.encoders)
    inputs = example_inputs(scorer.run.encoders, EXAMPLE_ROWS)
    write_onnx(module, inputs, out, input_names=names, output_names=list(scorer.task_names), opset=opset)
    opset_used = next(
        (
            entry.version
            for entry in onnx.load(str(out), load_external_data=False).opset_import
            if entry.domain in ("", "ai.onnx")
        ),
        None,
    )
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    check_inputs = example_inputs(scorer.run.encoders, EXAMPLE_ROWS + 3, seed=1)
    produced = session.run(
        None, {name: tensor.numpy() for name, tensor in zip(names, check_inputs, strict=True)}
    )
    output_names = [output.name for output in session.get_outputs()]
    diff = _max_abs_diff(
        _reference_outputs(module, check_inputs), dict(zip(output_names, produced, strict=True)), out
    )
    sidecar = _build_sidecar(scorer, out, "onnx", {"opset": opset_used, "max_abs_diff_vs_torch": diff})
    sidecar_path = _write_sidecar(out, sidecar)
    logger.info(
        "exported %s to ONNX %s (opset %s); max |diff| vs PyTorch %.3g", run_dir, out, opset_used, diff
    )
    return ExportResult(out, sidecar_path, diff, sidecar)


def export_torchscript(
    run_dir: str | Path, out_path: str | Path, *, peft: str | Path | None = None
) -> ExportResult:
    """Export a run's ranker to TorchScript by tracing, and check the saved file against PyTorch.

    The traced module returns a dict from task name to ``(B,)`` prediction. TorchScript is deprecated
    in recent torch releases (torch 2.13 warns on ``torch.jit.trace``), so prefer ONNX for new
    deployments.

    Args:
        run_dir: the run folder.
        out_path: the ``.pt`` file to write; its sidecar is ``out_path`` plus ``.json``.
        peft: a PEFT set to load onto the base first; its new tasks become extra outputs.

    Returns:
        :class:`ExportResult`.

    Raises:
        ArtifactError: the run is incomplete, or the saved module's outputs differ from PyTorch's.
        ConfigError: ``out_path`` is a folder.
    """
    scorer, module, out = _prepare(run_dir, out_path, peft)
    inputs = example_inputs(scorer.run.encoders, EXAMPLE_ROWS)
    with warnings.catch_warnings():
        # torch 2.13 repeats this deprecation once per traced method; one log line replaces them.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        # The task kinds that `to_predictions` turns into a tensor are fixed per run, so a constant is right.
        warnings.filterwarnings(
            "ignore",
            message=r"torch\.tensor results are registered as constants",
            category=torch.jit.TracerWarning,
        )
        # strict=False lets the traced module return the dict of named task outputs.
        traced = torch.jit.trace(module, inputs, strict=False)
        torch.jit.save(traced, str(out))
        loaded = torch.jit.load(str(out))
    logger.warning(
        "TorchScript is deprecated in torch %s; prefer `--format onnx` for new deployments", torch.__version__
    )
    check_inputs = example_inputs(scorer.run.encoders, EXAMPLE_ROWS + 3, seed=1)
    with torch.inference_mode():
        produced = {name: value.numpy() for name, value in loaded(*check_inputs).items()}
    diff = _max_abs_diff(_reference_outputs(module, check_inputs), produced, out)
    sidecar = _build_sidecar(scorer, out, "torchscript", {"max_abs_diff_vs_torch": diff})
    sidecar_path = _write_sidecar(out, sidecar)
    logger.info("exported %s to TorchScript %s; max |diff| vs PyTorch %.3g", run_dir, out, diff)
    return ExportResult(out, sidecar_path, diff, sidecar)


EXPORTERS: dict[str, Callable[..., ExportResult]] = {"onnx": export_onnx, "torchscript": export_torchscript}


def export_model(
    run_dir: str | Path, out_path: str | Path, export_format: str, *, peft: str | Path | None = None
) -> ExportResult:
    """Export a run in ``export_format`` (``onnx`` or ``torchscript``).

    Raises:
        ConfigError: the format is unknown.
    """
    exporter = EXPORTERS.get(export_format)
    if exporter is None:
        raise ConfigError([f"unknown export format `{export_format}`; choose one of: {', '.join(EXPORTERS)}"])
    return exporter(run_dir, out_path, peft=peft)
