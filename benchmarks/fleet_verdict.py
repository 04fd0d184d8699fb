"""What one fleet-level verdict costs at 1,000 and at 10,000 devices.

A monitor (SQLite) holds ``--windows`` recent windows per device (Breast Cancer, 30 features, 100
inferences each, built from a few templates). The fleet view is filled once from the database (what
a monitor does at its first fleet verdict); then, per round, one device reports a new window, its
own evaluation runs, and the fleet verdict is timed. The old way, re-merging every device's recent
windows from the database, is timed once for comparison.

    python -m benchmarks.fleet_verdict [--devices 1000,10000] [--windows 10] [--rounds 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _templates(n: int = 8):
    from convert.reference import load_reference_data
    from telemetry.synthetic import make_window, reference_manifest

    d = load_reference_data("breast_cancer")
    manifest = reference_manifest(d.X_train, d.y_train, "bc-model", feature_names=d.feature_names)
    rng = np.random.default_rng(0)
    return manifest, [make_window(d.X_train[rng.integers(0, len(d.X_train), 100)], manifest, "x", 0,
                                  predictions=rng.integers(0, 2, 100)) for _ in range(n)]


def measure(devices: int, windows: int, rounds: int, manifest: dict, templates: list[dict]) -> dict:
    from edge_runtime.mqtt import parse_broker_url
    from telemetry import store
    from telemetry.evaluate import evaluate
    from telemetry.monitor import FleetMonitor

    with tempfile.TemporaryDirectory() as tmp:
        m = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{Path(tmp)}/m.db", bundles=[manifest])
        now = time.time()
        items = [("f1", f"dev-{i:05d}", {**templates[(i + s) % len(templates)], "device_id": f"dev-{i:05d}",
                                          "fleet": "f1", "seq": s, "start": now - 60 + s, "end": now - 50 + s})
                 for i in range(devices) for s in range(windows)]
        for k in range(0, len(items), 5000):
            store.store_windows(m.engine, items[k:k + 5000])
        t0 = time.perf_counter()
        m._load_fleet_view("f1", "bc-model", "1.0.0")
        load_s = time.perf_counter() - t0
        fleet_ms, device_ms = [], []
        for r in range(rounds):
            dev = f"dev-{r % devices:05d}"
            w = {**templates[r % len(templates)], "device_id": dev, "fleet": "f1", "seq": windows + r,
                 "start": now - 40 + r, "end": now - 30 + r}
            store.store_windows(m.engine, [("f1", dev, w)])
            t0 = time.perf_counter()
            m.evaluate_device("f1", dev, "bc-model", "1.0.0")
            device_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            m._evaluate_fleet("f1", "bc-model", "1.0.0", manifest)
            fleet_ms.append((time.perf_counter() - t0) * 1000)
        # the old way, once: every device's recent windows from the database, merged
        t0 = time.perf_counter()
        recent = store.recent_windows(m.engine, "f1", None, "bc-model", "1.0.0", windows * devices)
        evaluate(recent, manifest, m.config)
        old_ms = (time.perf_counter() - t0) * 1000
        m.engine.dispose()
    return {"devices": devices, "windows_per_device": windows, "fleet_verdict_ms_median": round(
        statistics.median(fleet_ms), 2), "fleet_verdict_ms_max": round(max(fleet_ms), 2),
            "device_evaluation_ms_median": round(statistics.median(device_ms), 2),
            "first_load_s": round(load_s, 2), "full_remerge_ms": round(old_ms, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1000,10000")
    ap.add_argument("--windows", type=int, default=10, help="windows per device (the monitor keeps 10 recent)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    manifest, templates = _templates()
    rows = [measure(int(n), args.windows, args.rounds, manifest, templates) for n in args.devices.split(",")]
    print(f"{'devices':>8} {'fleet verdict ms (median / max)':>32} {'device eval ms':>15} {'first load s':>13} "
          f"{'full re-merge ms':>17}")
    for r in rows:
        print(f"{r['devices']:>8} {r['fleet_verdict_ms_median']:>20} / {r['fleet_verdict_ms_max']:<9} "
              f"{r['device_evaluation_ms_median']:>15} {r['first_load_s']:>13} {r['full_remerge_ms']:>17}")
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
