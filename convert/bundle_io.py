"""Small bundle-directory helpers for the conversion side."""

from __future__ import annotations

from pathlib import Path

from edge_runtime.bundle import open_bundle
from edge_runtime.errors import EdgeOpsError


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a bundle that opens and verifies."""
    try:
        open_bundle(path).cleanup()
        return True
    except EdgeOpsError:
        return False
