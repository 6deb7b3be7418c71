"""The ``mtrank serve`` and ``mtrank export`` commands.

``register(app)`` adds both commands to the ``mtrank`` typer app; ``mtrank.cli.main`` calls it once
``friendly_errors`` is defined.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mtrank.cli.console import stdout

# Loopback only by default: the service has no authentication, so exposing it is the user's choice.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    host: str = typer.Option(
        DEFAULT_HOST, "--host", help="Address to listen on; 0.0.0.0 listens on every interface."
    ),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="TCP port to listen on."),
    peft: str | None = typer.Option(
        None,
        "--peft",
        help="Load this PEFT set from `mtrank finetune`: a name under RUN/peft/ or a set folder.",
    ),
    max_rows: int | None = typer.Option(
        None, "--max-rows", min=1, help="Rows accepted per POST /score; default 10000."
    ),
    limit_max_requests: int | None = typer.Option(
        None,
        "--limit-max-requests",
        min=1,
        help="Exit after this many requests (for tests and process recycling).",
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch intra-op threads per scoring call; default: torch's choice."
    ),
) -> None:
    """Serve a trained run over HTTP: GET /health, GET /metadata and POST /score (FastAPI + uvicorn)."""
    import torch
    import uvicorn

    from mtrank.serving.app import DEFAULT_MAX_ROWS, create_app

    if threads is not None:
        torch.set_num_threads(threads)
    app = create_app(run_dir, peft=peft, max_rows=max_rows or DEFAULT_MAX_ROWS)
    stdout.print(f"serving {run_dir} on http://{host}:{port} (docs at /docs); Ctrl+C stops")
    uvicorn.run(app, host=host, port=port, limit_max_requests=limit_max_requests, log_level="info")


def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    export_format: str = typer.Option(..., "--format", help="onnx or torchscript."),
    out: Path = typer.Option(..., "--out", help="File to write, e.g. model.onnx; the sidecar is OUT.json."),
    peft: str | None = typer.Option(
        None,
        "--peft",
        help="Load this PEFT set from `mtrank finetune` first; its new tasks become extra outputs.",
    ),
) -> None:
    """Export a run's ranker to ONNX or TorchScript: encoded tensors in, one output per task out."""
    from mtrank.serving.export import export_model

    result = export_model(run_dir, out, export_format, peft=peft)
    inputs = ", ".join(
        f"{item['name']} {item['dtype']} {tuple(item['shape'])}" for item in result.sidecar["inputs"]
    )
    outputs = ", ".join(item["name"] for item in result.sidecar["outputs"])
    stdout.print(f"wrote {result.model_path} and {result.sidecar_path}")
    stdout.print(f"inputs: {inputs}; outputs: {outputs}; max |diff| vs PyTorch {result.max_abs_diff:.3g}")


def register(app: typer.Typer) -> None:
    """Add the ``serve`` and ``export`` commands to ``app``, with mtrank errors shown as one line.

    Call it after ``mtrank.cli.main.friendly_errors`` is defined, because it imports that decorator.
    """
    # Imported here: mtrank.cli.main imports this module to call `register`.
    from mtrank.cli.main import friendly_errors

    app.command("serve")(friendly_errors(serve))
    app.command("export")(friendly_errors(export))
