"""Session fixtures: the reference models, trained and converted once per test session.

Bundles are built under a session temporary folder (or EDGEOPS_TEST_CACHE,
keyed by a hash of the converter's source so a code change rebuilds them).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _code_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "convert").glob("*.py")):
        h.update(p.read_bytes())
    h.update((ROOT / "edge_runtime" / "schemas" / "manifest.schema.json").read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def bundle_cache(tmp_path_factory) -> Path:
    base = os.environ.get("EDGEOPS_TEST_CACHE")
    if base:
        d = Path(base) / _code_hash()
        d.mkdir(parents=True, exist_ok=True)
        return d
    return tmp_path_factory.mktemp("reference-bundles")


def _build(cache: Path, kind: str, dataset: str) -> Path:
    import fcntl

    from convert.bundle_io import is_complete
    from convert.reference import convert_reference

    out = cache / f"{dataset}-{kind}"
    # A shared EDGEOPS_TEST_CACHE may serve several test sessions at once: one builds, the others wait.
    with open(cache / f".{dataset}-{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_complete(out):
            convert_reference(kind, dataset, out, force=True)
    return out


@pytest.fixture(scope="session")
def reference_data():
    from convert.reference import DATASETS, load_reference_data

    return {name: load_reference_data(name) for name in DATASETS}


@pytest.fixture(scope="session")
def digits_cnn_bundle(bundle_cache) -> Path:
    return _build(bundle_cache, "cnn", "digits")


@pytest.fixture(scope="session")
def bc_mlp_bundle(bundle_cache) -> Path:
    return _build(bundle_cache, "mlp", "breast_cancer")


@pytest.fixture(scope="session")
def wine_mlp_bundle(bundle_cache) -> Path:
    return _build(bundle_cache, "mlp", "wine")


@pytest.fixture(scope="session")
def digits_mlp_bundle(bundle_cache) -> Path:
    return _build(bundle_cache, "mlp", "digits")


@pytest.fixture(scope="session")
def bc_rf_bundle(bundle_cache) -> Path:
    return _build(bundle_cache, "rf", "breast_cancer")


@pytest.fixture(scope="session")
def wine_rf_bundle(bundle_cache) -> Path:
    return _build(bundle_cache, "rf", "wine")


@pytest.fixture(scope="session")
def digits_rf_bundle(bundle_cache) -> Path:
    return _build(bundle_cache, "rf", "digits")
