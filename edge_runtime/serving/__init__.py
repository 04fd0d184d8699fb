"""`edgeops serve`: predictions over HTTP on Starlette and uvicorn (the ``serve`` extra).

Endpoints: ``POST /predict`` (JSON ``{"inputs": [...]}`` with one sample or a batch of
finite numbers; for image models also an image as the body, ``multipart/form-data``
files in the field ``image``, or base64 in JSON ``{"image": ...}`` / ``{"images": [...]}``),
``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /model`` and
``GET /openapi.json``. Inputs are never file paths. Every client mistake is a 4xx with
``{"error": kind, "detail": message}``; a 500 means a bug and never carries a traceback.

Nothing here is imported by ``import edge_runtime``, and this package imports the web
stack only when one of its names is used (``ServeLimits`` alone needs none of it).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {"ServeLimits": "limits", "Rejection": "bodies", "ServeMetrics": "metrics", "model_summary": "metrics",
         "create_app": "app", "running_server": "server", "serve_forever": "server"}
__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
