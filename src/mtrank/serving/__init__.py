"""mtrank.serving: batch scoring, ONNX/TorchScript export and the HTTP scoring service.

``Scorer`` needs only the core dependencies. ``create_app`` needs the ``serve`` extra (fastapi,
uvicorn) and the exporters need the ``export`` extra (onnx, onnxscript, onnxruntime), so those are
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from mtrank.serving.scorer import Scorer

_LAZY = {
    "create_app": "mtrank.serving.app",
    "export_onnx": "mtrank.serving.export",
    "export_torchscript": "mtrank.serving.export",
    "export_model": "mtrank.serving.export",
}

__all__ = ["Scorer", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
