"""Copies of a bundle under another version (re-signed, or with broken test vectors) for flashing tests."""

from __future__ import annotations

import json
import shutil

from edge_runtime.bundle import write_manifest


def variant(src, dest, version, key=None, break_vectors=False):
    """Copy bundle ``src`` to ``dest`` as ``version``, signed with ``key`` (unsigned without one)."""
    shutil.copytree(src, dest)
    doc = json.loads((dest / "manifest.json").read_text())
    doc["version"] = version
    if break_vectors:
        for v in doc["test_vectors"]:
            v["expected"] = [[1.0 - x for x in row] for row in v["expected"]]
    (dest / "manifest.sig").unlink(missing_ok=True)
    write_manifest(dest, doc, sign_key=key)
    return dest
