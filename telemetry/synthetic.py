"""Wire-format windows and reference profiles built from raw samples.

Used by the benchmarks and tests to emulate devices without running a model:
:func:`reference_manifest` makes the manifest fields the monitor reads (decile
bin edges, histograms, moments, class priors) from training data, and
:func:`make_window` turns one batch of input rows, predicted classes and
latencies into the window a device would publish, with the device's own
statistics code (edge_runtime.stats).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edge_runtime.stats import ClassCounts, FeatureStats, LatencyHistogram


def reference_manifest(X: np.ndarray, y: np.ndarray | None, name: str, version: str = "1.0.0",
                       feature_names: Sequence[str] | None = None, n_bins: int = 10) -> dict:
    """A manifest with name, version, labels and a reference_profile of X (decile edges)."""
    X = np.asarray(X, dtype=np.float64)
    names = list(feature_names or [f"f{i}" for i in range(X.shape[1])])
    feats = []
    for j in range(X.shape[1]):
        col = X[:, j]
        ok = col[np.isfinite(col)]
        edges = np.unique(np.quantile(ok, np.linspace(0, 1, n_bins + 1)[1:-1]))
        hist = np.bincount(np.searchsorted(edges, ok, side="left"), minlength=len(edges) + 1)
        feats.append({"name": names[j], "bin_edges": edges.tolist(), "hist": hist.tolist(), "mean": float(ok.mean()),
                      "std": float(ok.std()), "min": float(ok.min()), "max": float(ok.max()),
                      "nan_rate": float(1 - len(ok) / len(col))})
    doc: dict = {"name": name, "version": version, "reference_profile": {"n_samples": int(len(X)),
                                                                         "monitored": "features", "features": feats}}
    if y is not None:
        classes = np.unique(y)
        priors = np.bincount(np.asarray(y, dtype=np.int64), minlength=int(classes.max()) + 1) / len(y)
        doc["labels"] = [str(c) for c in range(len(priors))]
        doc["reference_profile"]["class_priors"] = {"labels": doc["labels"], "priors": priors.tolist()}
    return doc


def make_window(rows: np.ndarray, manifest: dict, device_id: str, seq: int, fleet: str = "f1",
                start: float = 0.0, end: float | None = None, predictions: Sequence[int] | None = None,
                latencies_ms: Sequence[float] | None = None, errors: int = 0) -> dict:
    """The telemetry window (schema_version 1) a device running ``manifest`` would send for these rows."""
    edges = [f["bin_edges"] for f in manifest["reference_profile"]["features"]]
    fs = FeatureStats(edges)
    fs.update(rows)
    lat = LatencyHistogram()
    for ms in latencies_ms if latencies_ms is not None else np.full(len(rows), 2.0):
        lat.add(float(ms))
    n_classes = len(manifest.get("labels") or [])
    cc = ClassCounts(max(n_classes, 1))
    if predictions is not None:
        cc.update(np.asarray(predictions))
    return {
        "schema_version": 1, "type": "telemetry", "device_id": device_id, "fleet": fleet, "seq": seq,
        "start": float(start), "end": float(end if end is not None else start + 10.0),
        "model": {"name": manifest["name"], "version": manifest["version"], "artifact": "model.tflite",
                  "sha256": None, "variant": None},
        "count": int(len(rows)), "errors": int(errors), "rejected": 0,
        "latency_ms": lat.to_dict(), "features": fs.to_dict(), "predictions": cc.to_dict(), "dropped_windows": 0,
    }


def status_doc(device_id: str, fleet: str, online: bool, ts: float, model: dict | None = None) -> dict:
    """A status message (schema_version 1)."""
    return {"schema_version": 1, "type": "status", "device_id": device_id, "fleet": fleet, "online": online,
            "ts": ts, "runtime_version": "0.1.0", "platform": {"machine": "x86_64", "system": "Linux"},
            "model": model, "backend": "litert", "free_disk_bytes": 10**9, "previous_model": None}
