"""Bytes per telemetry window on the wire: raw float32 forwarding, JSON, JSON+zlib and compact CBOR.

    python -m benchmarks.wire_size [--sizes 50,100,500] [--repeat 200] [--json FILE]

For Breast Cancer (30 features), Wine (13) and Digits (64 pixels) from scikit-learn, at 50, 100 and
500 inferences per window: the window the device's own statistics code (``WindowRecorder``) closes
over rows drawn from the held-out data, with reference bins from the training data (as a converted
bundle has them), class probabilities from a nearest-centroid softmax and log-normal latencies,
wrapped in the envelope the agent publishes (ids, seq, dropped_windows). ``float32`` is what
forwarding the raw inputs would cost (inferences x features x 4 bytes, no envelope at all); every
other column is a whole payload. Also: encode and decode microseconds per window for each
encoding, the monitor's validation rate (``wire.parse``: decode + bounds) and its ingest rate
(``FleetMonitor.ingest``: validation against the bundle, SQLite storage) for JSON and CBOR windows.

Target (issue 15): compact CBOR at least 25x fewer bytes than float32 forwarding at 100 inferences on
Breast Cancer (12,000 bytes -> at most 480): ``cbor-ref``, the moments coded against the bundle's
reference profile (``setup`` registers each data set's bundle, as the device and the monitor do).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_json

DATASETS = ("breast_cancer", "wine", "digits")
ENCODINGS = ("json", "zlib", "cbor", "cbor-exact", "cbor-ref")
SHA256 = "5e0f3c1b" * 8
TARGET_RATIO = 25.0


def setup(dataset: str) -> dict:
    """The data, the bundle-like reference profile and a probability model for one data set."""
    from convert.profile import feature_profile
    from convert.reference import load_reference_data
    from edge_runtime import compact

    d = load_reference_data(dataset)
    feats = [feature_profile(name, d.X_train[:, j].astype(np.float64)) for j, name in enumerate(d.feature_names)]
    mu, sd = d.X_train.mean(axis=0), d.X_train.std(axis=0) + 1e-9
    centroids = np.stack([((d.X_train[d.y_train == c] - mu) / sd).mean(axis=0) for c in range(len(d.labels))])
    manifest = {"name": f"{dataset.replace('_', '-')}-mlp", "version": "1.0.0", "labels": d.labels,
                "artifacts": [{"file": "model.int8.tflite", "sha256": SHA256}],
                "reference_profile": {"monitored": "features", "features": feats}}
    compact.register_bundle(manifest)     # cbor-ref: the device and the monitor both have the bundle
    return {"data": d, "features": feats, "mu": mu, "sd": sd, "centroids": centroids, "manifest": manifest}


def probabilities(s: dict, X: np.ndarray) -> np.ndarray:
    dist = (((X - s["mu"]) / s["sd"])[:, None, :] - s["centroids"][None, :, :]) ** 2
    logits = -dist.sum(axis=2) / X.shape[1] * 4.0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def window(s: dict, n: int, seq: int = 17, seed: int = 0, device: str = "pi-0042", fleet: str = "clinic-a",
           start: float = 1795584000.123, transform=None) -> dict:
    """The telemetry message an agent would publish for ``n`` inferences (JSON-ready); ``transform`` (a
    function of the drawn rows) makes drifted inputs."""
    from edge_runtime import wire
    from edge_runtime.window import WindowRecorder

    feats, d = s["features"], s["data"]
    info = {"name": s["manifest"]["name"], "version": "1.0.0", "artifact": "model.int8.tflite",
            "sha256": SHA256, "variant": None}
    clock = iter([start] + [start + 10.0] * 2)
    rec = WindowRecorder(info, [f["bin_edges"] for f in feats], "features", len(d.labels), window_seconds=None,
                         window_size=n, ranges=[(f.get("min"), f.get("max")) for f in feats],
                         clock=lambda: next(clock))
    rng = np.random.default_rng(seed)
    X = d.X_test[rng.integers(0, len(d.X_test), n)].astype(np.float64)
    if transform is not None:
        X = transform(X)
    probs = probabilities(s, X)
    for i in range(n):
        rec.record(X[i:i + 1], float(rng.lognormal(-1.4, 0.35)), probs[i:i + 1])
    w = rec.poll()[0]
    msg = wire.telemetry_message(fleet, device, w)
    msg["seq"], msg["dropped_windows"] = seq, 0
    return json.loads(json.dumps(msg))


def _time_us(fn, repeat: int, runs: int = 7) -> float:
    """CPU microseconds per call (process time: other processes sharing the machine count less than in
    wall time): the median of ``runs`` runs of ``repeat`` calls each."""
    fn()
    times = []
    for _ in range(runs):
        t = time.process_time()
        for _ in range(repeat):
            fn()
        times.append((time.process_time() - t) / repeat * 1e6)
    return statistics.median(times)


def measure(s: dict, dataset: str, n: int, repeat: int) -> dict:
    from edge_runtime import wire

    msg = window(s, n)
    n_features = len(s["features"])
    topic = wire.topic("edgeops", "clinic-a", "pi-0042", "telemetry")
    row = {"dataset": dataset, "features": n_features, "inferences": n, "float32": n * n_features * 4}
    now = msg["end"] + 1
    for enc in ENCODINGS:
        payload = wire.encode(msg, encoding=enc)
        row[enc] = len(payload)
        row[f"{enc}_ratio"] = round(row["float32"] / len(payload), 1)
        row[f"{enc}_encode_us"] = round(_time_us(lambda e=enc: wire.encode(msg, encoding=e), repeat), 1)
        row[f"{enc}_decode_us"] = round(_time_us(lambda p=payload: wire.decode(p), repeat), 1)
        row[f"{enc}_parse_us"] = round(_time_us(lambda p=payload: wire.parse(topic, p, now=now), repeat), 1)
    row["json_zlib_level9"] = len(zlib.compress(wire.encode(msg), 9))
    return row


def ingest_rate(s: dict, encoding: str, windows: int = 2000, batch: int = 100) -> float:
    """Windows per second ``FleetMonitor.ingest`` validates and stores (SQLite), for one encoding."""
    from edge_runtime import wire
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.monitor import FleetMonitor

    base = window(s, 100)
    msgs = []
    for i in range(windows):
        dev = f"dev-{i % 200}"
        doc = {**base, "device_id": dev, "seq": i // 200, "start": time.time() - 60, "end": time.time() - 50}
        msgs.append((wire.topic("edgeops", "clinic-a", dev, "telemetry"), wire.encode(doc, encoding=encoding), 0, 1))
    with tempfile.TemporaryDirectory() as tmp:
        mon = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{Path(tmp) / 'm.db'}",
                           bundles=[s["manifest"]], confirm=False)
        t = time.perf_counter()
        for i in range(0, windows, batch):
            mon.ingest(msgs[i:i + batch])
        elapsed = time.perf_counter() - t
        assert mon.stats.stored == windows, (mon.stats.stored, dict(mon.stats.rejected))
        mon.engine.dispose()
    return windows / elapsed


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="50,100,500", help="inferences per window")
    ap.add_argument("--repeat", type=int, default=200, help="timing repetitions per figure")
    ap.add_argument("--ingest-windows", type=int, default=2000, help="windows per ingest-rate run (0: skip)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    rows, setups = [], {}
    for dataset in DATASETS:
        setups[dataset] = setup(dataset)
        rows += [measure(setups[dataset], dataset, n, args.repeat) for n in sizes]
    cols = [("dataset", "data set"), ("inferences", "n"), ("float32", "float32 B")]
    cols += [(e, f"{e} B") for e in ENCODINGS] + [(f"{e}_ratio", f"{e} x") for e in ENCODINGS]
    print_table(rows, cols, "bytes per window (x: float32 forwarding / this)")
    print()
    tcols = [("dataset", "data set"), ("inferences", "n")]
    tcols += [(f"{e}_{k}_us", f"{e} {k[:3]} us") for k in ("encode", "decode", "parse") for e in ENCODINGS]
    print_table(rows, tcols, "CPU microseconds per window, median of 7 runs: encode (device), decode, parse = decode + "
                             "validation (monitor)")
    ingest = {}
    if args.ingest_windows:
        bc = setups["breast_cancer"]
        ingest = {e: round(ingest_rate(bc, e, args.ingest_windows)) for e in ("json", "cbor", "cbor-ref")}
        print("\nmonitor ingest (FleetMonitor.ingest, SQLite, Breast Cancer, 100 inferences): "
              + ", ".join(f"{e} {r} windows/s" for e, r in ingest.items()))
    bc100 = next((r for r in rows if r["dataset"] == "breast_cancer" and r["inferences"] == 100), None)
    met = None if bc100 is None else bc100["cbor-ref_ratio"] >= TARGET_RATIO
    doc = {"benchmark": "wire_size", "rows": rows, "ingest_windows_per_s": ingest,
           "target": {"ratio": TARGET_RATIO, "encoding": "cbor-ref", "breast_cancer_100": bc100 and bc100["cbor-ref"],
                      "met": met}}
    print(json.dumps(doc))
    write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
