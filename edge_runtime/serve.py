"""`edgeops serve`'s former module: the server lives in :mod:`edge_runtime.serving` now."""

from edge_runtime.serving import (
    ServeLimits,
    ServeMetrics,
    create_app,
    model_summary,
    running_server,
    serve_forever,
)

__all__ = ["ServeLimits", "ServeMetrics", "create_app", "model_summary", "running_server", "serve_forever"]
