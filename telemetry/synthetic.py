"""Wire-format windows and reference profiles built from raw samples.

Used by the benchmarks and tests to emulate devices without running a model:
:func:`reference_manifest` makes the manifest fields the monitor reads (decile
bin edges, histograms, moments, class priors) from training data, and
:func:`make_window` turns one batch of input rows, predicted classes and
latencies into the window a device would publish, with the device's own
statistics code (edge_runtime.stats).
"""

from __future__ import annotations

import json
import random
from typing import Iterator, Sequence

import numpy as np

from edge_runtime import distinct, wire
from edge_runtime.stats import ClassCounts, FeatureStats, LatencyHistogram


def reference_manifest(X: np.ndarray, y: np.ndarray | None, name: str, version: str = "1.0.0",
                       feature_names: Sequence[str] | None = None, n_bins: int = 10) -> dict:
    """A manifest with name, version, labels and a reference_profile of X (decile edges)."""
    X = np.asarray(X, dtype=np.float64)
    names = list(feature_names or [f"f{i}" for i in range(X.shape[1])])
    feats = [_column_profile(names[j], X[:, j], n_bins) for j in range(X.shape[1])]
    doc: dict = {"name": name, "version": version, "reference_profile": {"n_samples": int(len(X)),
                                                                         "monitored": "features", "features": feats}}
    if y is not None:
        classes = np.unique(y)
        priors = np.bincount(np.asarray(y, dtype=np.int64), minlength=int(classes.max()) + 1) / len(y)
        doc["labels"] = [str(c) for c in range(len(priors))]
        doc["reference_profile"]["class_priors"] = {"labels": doc["labels"], "priors": priors.tolist()}
    return doc


def _column_profile(name: str, col: np.ndarray, n_bins: int) -> dict:
    """One feature's profile entry: quantile edges, histogram and moments of its finite values."""
    ok = col[np.isfinite(col)]
    edges = np.unique(np.quantile(ok, np.linspace(0, 1, n_bins + 1)[1:-1]))
    hist = np.bincount(np.searchsorted(edges, ok, side="left"), minlength=len(edges) + 1)
    return {"name": name, "bin_edges": edges.tolist(), "hist": hist.tolist(), "mean": float(ok.mean()),
            "std": float(ok.std()), "min": float(ok.min()), "max": float(ok.max()),
            "nan_rate": float(1 - len(ok) / len(col))}


def make_window(rows: np.ndarray, manifest: dict, device_id: str, seq: int, fleet: str = "f1",  # noqa: PLR0913
                start: float = 0.0, end: float | None = None, predictions: Sequence[int] | None = None,
                latencies_ms: Sequence[float] | None = None, errors: int = 0) -> dict:
    """The telemetry window (schema_version 1) a device running ``manifest`` would send for these rows."""
    edges = [f["bin_edges"] for f in manifest["reference_profile"]["features"]]
    fs = FeatureStats(edges)
    fs.update(rows)
    registers = distinct.new_registers()
    distinct.add_rows(registers, rows)
    lat = LatencyHistogram()
    for ms in latencies_ms if latencies_ms is not None else np.full(len(rows), 2.0):
        lat.add(float(ms))
    cc = _class_counts(manifest, predictions)
    return {
        **wire.telemetry_message(fleet, device_id, {}), "seq": seq,
        "start": float(start), "end": float(end if end is not None else start + 10.0),
        "model": {"name": manifest["name"], "version": manifest["version"], "artifact": "model.tflite",
                  "sha256": None, "variant": None},
        "count": int(len(rows)), "errors": int(errors), "rejected": 0,
        "latency_ms": lat.to_dict(), "features": fs.to_dict(), "distinct": distinct.to_text(registers),
        "predictions": cc.to_dict(), "dropped_windows": 0,
    }


def _class_counts(manifest: dict, predictions: Sequence[int] | None) -> ClassCounts:
    """The predicted classes' counts over the manifest's labels (one class when it has none)."""
    cc = ClassCounts(max(len(manifest.get("labels") or []), 1))
    if predictions is not None:
        cc.update(np.asarray(predictions))
    return cc


def status_doc(device_id: str, fleet: str, online: bool, ts: float, model: dict | None = None) -> dict:
    """A status message (schema_version 1)."""
    return {**wire.status_message(fleet, device_id, online), "ts": ts, "runtime_version": "0.1.0",
            "platform": {"machine": "x86_64", "system": "Linux"},
            "model": model, "backend": "litert", "free_disk_bytes": 10**9, "previous_model": None}


# -- hostile messages ------------------------------------------------------------------------------

def poison_messages(window: dict) -> dict[str, tuple[str, bytes]]:
    """Each kind of message once seen to stall or break the monitor, built from a valid ``window``:
    name -> (topic kind, payload); the kind "topic" means: send it on a topic with an invalid device id."""
    def edited(**changes) -> bytes:
        doc = json.loads(json.dumps(window))
        for path, value in changes.items():
            node = doc
            *parents, leaf = path.split("__")
            for p in parents:
                node = node[int(p)] if p.isdigit() else node[p]
            node[int(leaf) if leaf.isdigit() else leaf] = value
        return json.dumps(doc).encode()

    status = status_doc(window["device_id"], window["fleet"], True, 1.0, window["model"])
    return {
        "nested_100k": ("telemetry", b"[" * 100_000 + b"]" * 100_000),
        "huge_int_start": ("telemetry", edited(start=10**400)),
        "seq_2_63": ("telemetry", edited(seq=2**63)),
        "status_model_list": ("status", json.dumps({**status, "model": [1, 2]}).encode()),
        "lone_surrogate_name": ("telemetry", edited(model__name="\ud800bad")),
        "nul_in_name": ("telemetry", edited(model__name="bc\x00model")),
        "name_200_chars": ("telemetry", edited(model__name="m" * 200)),
        "huge_int_mean": ("telemetry", edited(features__mean__0=10**400)),
        "dated_2100": ("telemetry", edited(start=4102444800.0, end=4102444810.0)),
        "utf16": ("telemetry", json.dumps(window).encode("utf-16")),
        "not_json": ("telemetry", b"\xff\xfe garbage"),
        "bench_nested": ("bench", json.dumps({"results": [{"latency_ms": {"p95": [[[1]]]}}]}).encode()),
        "bad_device_id": ("topic", json.dumps(window).encode()),
    }


_ODD_VALUES = [None, True, -1, 0, 2**63, 10**400, -1e308, 1e308, float("inf"), "", "\x00", "\ud800", "x" * 300,
               [], {}, [[[[1]]]], {"a": {"b": {"c": 1}}}, "1.0", 0.5, [None], [-1, 2**64]]


def hostile_messages(window: dict, n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``n`` (kind, payload) pairs derived from a valid ``window``: fields replaced by odd values, removed,
    nested deep, truncated, re-encoded, bit-flipped, or the whole payload replaced (kind: telemetry,
    status or bench, the topic kind to send it on)."""
    rng = random.Random(seed)
    base = json.dumps(window)
    paths = list(_paths(window))
    for _ in range(n):
        mutate = _MUTATIONS[rng.randrange(len(_MUTATIONS))]
        kind = rng.choice(("telemetry", "telemetry", "telemetry", "status", "bench"))
        yield kind, mutate(rng, base, paths)


def _odd_value(rng: random.Random, base: str, paths: list) -> bytes:
    """A field replaced by an odd value (wrong type, out of range, lone surrogate...)."""
    doc = json.loads(base)
    _set(doc, rng.choice(paths), rng.choice(_ODD_VALUES))
    return json.dumps(doc).encode("utf-8", "surrogatepass")


def _removed_field(rng: random.Random, base: str, paths: list) -> bytes:
    doc = json.loads(base)
    _set(doc, rng.choice(paths), _DELETE)
    return json.dumps(doc).encode()


def _deep_nesting(rng: random.Random, base: str, paths: list) -> bytes:
    depth = rng.choice((50, 900, 5_000, 100_000))
    return b'{"x":' + b"[" * depth + b"]" * depth + b"}"


def _truncated(rng: random.Random, base: str, paths: list) -> bytes:
    raw = base.encode()
    return raw[:rng.randrange(len(raw))]


def _re_encoded(rng: random.Random, base: str, paths: list) -> bytes:
    return base.encode(rng.choice(("utf-16", "utf-32", "latin-1")), "replace")


def _bit_flipped(rng: random.Random, base: str, paths: list) -> bytes:
    raw = bytearray(base.encode())
    for _ in range(rng.randrange(1, 8)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    return bytes(raw)


def _random_bytes(rng: random.Random, base: str, paths: list) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))


def _odd_model_name(rng: random.Random, base: str, paths: list) -> bytes:
    doc = json.loads(base)
    doc["model"]["name"] = rng.choice(("\x00", "\ud800", "m" * 200, ["list"], 7))
    return json.dumps(doc).encode("utf-8", "surrogatepass")


_MUTATIONS = (_odd_value, _removed_field, _deep_nesting, _truncated, _re_encoded, _bit_flipped, _random_bytes,
              _odd_model_name)


_DELETE = object()


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list) and node:
        yield prefix + (0,)
        yield from _paths(node[0], prefix + (0,))


def _set(doc, path, value) -> None:
    node = doc
    for p in path[:-1]:
        node = node[p]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
